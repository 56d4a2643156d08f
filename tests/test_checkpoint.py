"""Sharded checkpoints: resharding across layouts, atomicity, --load resolution, bad input, inspect."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from pretrain_utils import TINY, losses, train
from torch import nn

from megalite.config import Config, ConfigError, ModelConfig, ParallelConfig
from megalite.model import GPT
from megalite.parallel.apply_tp import apply_tp
from megalite.parallel.dims import ParallelDims
from megalite.training import checkpoint
from megalite.training.main import main

# GQA + SwiGLU + a vocabulary (520) whose padding differs for TP 1, 2 and 4 (640, 768, 1024 rows).
MODEL = [
    "--swiglu",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--vocab-size",
    "520",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "2",
]


def layout(tp, cp):
    return ["--tensor-parallel-size", str(tp), "--context-parallel-size", str(cp)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, corpus):
    """An uninterrupted TP=2 x CP=2 run of 6 iterations that saves at 3 and 6."""
    tmp = tmp_path_factory.mktemp("ref")
    ck = str(tmp / "ck")
    records = train(
        tmp, "ref", 4, corpus + MODEL + layout(2, 2) + ["--train-iters", "6", "--save", ck, "--save-interval", "3"]
    )
    return records, ck, corpus + MODEL + ["--train-iters", "6"]


def test_layout_and_dedup_of_saved_files(ref):
    _, ck, _ = ref
    d = os.path.join(ck, "iter_0000003")
    assert sorted(os.listdir(d)) == ["meta.json"] + [f"rank_{r:05d}.pt" for r in range(4)]
    meta = checkpoint.read_meta(d)
    assert meta["iteration"] == 3 and meta["consumed_samples"] == 12
    assert meta["layout"] == {"tp": 2, "cp": 2, "dp": 1, "world": 4}
    emb = meta["tensors"]["model/embedding.word.weight"]
    assert emb["shape"] == [768, 64] and emb["dim"] == 0 and emb["real"] == 520 and len(emb["files"]) == 2
    assert meta["tensors"]["model/layers.0.attention.proj.weight"]["dim"] == 1
    assert meta["tensors"]["optim/layers.0.attention.proj.weight/exp_avg"]["dim"] == 1
    assert meta["tensors"]["optim/layers.0.attention.proj.weight/step"] == {
        "shape": [],
        "dtype": "float32",
        "dim": None,
        "files": meta["tensors"]["optim/layers.0.attention.proj.weight/step"]["files"],
    }
    # every tensor shard is stored exactly once, and every rank wrote a share
    stored = {r: torch.load(os.path.join(d, f"rank_{r:05d}.pt"), weights_only=True)["tensors"] for r in range(4)}
    assert all(stored.values())
    expected = sum(torch.Size(e["shape"]).numel() * 4 for e in meta["tensors"].values())
    assert sum(t.nbytes for files in stored.values() for t in files.values()) == expected


def test_same_layout_resume_is_bitwise(ref, tmp_path):
    records, ck, common = ref
    rest = train(tmp_path, "same", 4, common + layout(2, 2) + ["--load", os.path.join(ck, "iter_0000003")])
    assert [r["iteration"] for r in rest] == [4, 5, 6]
    assert [r["loss"] for r in rest] == [r["loss"] for r in records[3:]]
    assert [r["grad_norm"] for r in rest] == [r["grad_norm"] for r in records[3:]]


@pytest.mark.fault("elastic-reshard")
@pytest.mark.parametrize("tp,cp,world", [(1, 1, 1), (1, 4, 4), (2, 1, 4)], ids=["TP1", "CP4", "DP2xTP2"])
def test_reshard_continues_the_same_run(ref, tmp_path, tp, cp, world, record_property):
    records, ck, common = ref
    rest = train(tmp_path, "re", world, common + layout(tp, cp) + ["--load", os.path.join(ck, "iter_0000003")])
    assert [r["iteration"] for r in rest] == [4, 5, 6]
    for a, b in zip(records[3:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == a["lr"] and b["consumed_samples"] == a["consumed_samples"]
    record_property(
        "observed",
        f"saved at TP2xCP2 (4 ranks), resumed at TP{tp} CP{cp} on {world} rank(s): same "
        "samples and LR, losses within 1e-5 of the uninterrupted run",
    )


def _rank1_killed_in_second_save(rank, world, argv):
    """Rank 1 writes half of its iteration-4 checkpoint file, then SIGKILLs itself."""
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(obj)
        if rank == 1 and len(saves) == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getbuffer()[: buf.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = save
    main(argv)


@pytest.mark.fault("kill-mid-save")
def test_rank_killed_mid_save_leaves_previous_checkpoint(ref, tmp_path, record_property):
    records, _, common = ref
    ck, out = tmp_path / "ck", tmp_path / "first"
    argv = TINY + common + ["--save", str(ck), "--save-interval", "2", "--log-dir", str(out)]
    with pytest.raises(Exception, match="rank 0 failed first|signal SIGKILL"):  # DP=2; rank 0 fails too
        run_ranks(_rank1_killed_in_second_save, 2, tmp_path / "spawn", argv)
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    partial = ck / ".tmp_iter_0000004"
    assert partial.is_dir() and not (ck / "iter_0000004").exists()
    assert 0 < (partial / "rank_00001.pt").stat().st_size < (ck / "iter_0000002" / "rank_00001.pt").stat().st_size
    lines = []
    assert checkpoint.resolve_load_dir(str(ck), lines.append) == str(ck / "iter_0000002")
    assert "warning: ignoring .tmp_iter_0000004" in lines[0] and "did not finish" in lines[0]
    first = losses(out)
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    rest = train(tmp_path, "rest", 2, common + layout(2, 1) + ["--load", str(ck), "--save", str(ck)])  # TP 1 -> 2
    assert [r["iteration"] for r in rest] == [3, 4, 5, 6]
    for a, b in zip(records + records[2:4], first[:2] + rest + first[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert not (ck / ".tmp_iter_0000004").exists()  # the next save cleared the leftover
    assert (ck / "latest").read_text().strip() == "iter_0000006"
    record_property(
        "observed",
        "rank 1 of 2 SIGKILLed halfway through its iteration-4 file: rank 0 failed too; latest "
        "still iter_0000002; --load warned about .tmp_iter_0000004 and resumed from iteration "
        "2 (at TP2), losses within 1e-5 of the uninterrupted run",
    )


def test_load_resolution(ref, tmp_path):
    _, ck, _ = ref
    with pytest.raises(ConfigError, match="no such directory.*mkdir -p"):
        checkpoint.resolve_load_dir(str(tmp_path / "nope"))
    lines = []
    fresh = tmp_path / "fresh"
    (fresh / ".tmp_iter_0000002").mkdir(parents=True)  # a first save that crashed, and a log
    (fresh / "metrics.jsonl").write_text("{}\n")
    assert checkpoint.resolve_load_dir(str(fresh), lines.append) is None
    assert "holds no checkpoint yet; starting from iteration 0" in lines[-1]

    copy = tmp_path / "copy"
    shutil.copytree(ck, copy)
    assert checkpoint.resolve_load_dir(str(copy)) == str(copy / "iter_0000006")
    victim = copy / "iter_0000006" / "rank_00002.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated (e.g. a disk that filled up)
    assert checkpoint.resolve_load_dir(str(copy), lines.append) == str(copy / "iter_0000003")
    assert "iter_0000006: rank_00002.pt is truncated" in lines[-1] and "resuming from iter_0000003" in lines[-1]
    os.remove(copy / "iter_0000003" / "meta.json")
    with pytest.raises(ConfigError, match="no complete checkpoint.*truncated.*no meta.json"):
        checkpoint.resolve_load_dir(str(copy))
    with pytest.raises(ConfigError, match="not a complete checkpoint: rank_00002.pt is truncated"):
        checkpoint.resolve_load_dir(str(copy / "iter_0000006"))
    aside = tmp_path / "aside"  # a re-save of iteration 6 died between its two renames
    shutil.copytree(ck, aside)
    os.replace(aside / "iter_0000006", aside / "iter_0000006.old")
    assert checkpoint.resolve_load_dir(str(aside)) == str(aside / "iter_0000006.old")
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "latest").write_text("iter_0000005\n")
    with pytest.raises(ConfigError, match="iter_0000005: missing.*'latest' names it"):
        checkpoint.resolve_load_dir(str(gone))


def test_bad_input_fails_before_any_collective(ref, monkeypatch):
    _, ck, common = ref
    with pytest.raises(
        ConfigError,
        match=r"holds a different model: tensor embedding.word.weight is \[520, 64\] "
        r"in the checkpoint but \[520, 32\].*hidden_size",
    ):
        main(TINY + common + ["--load", ck, "--hidden-size", "32"])
    no_swiglu = [a for a in common if a != "--swiglu"]
    with pytest.raises(
        ConfigError,
        match=r"tensors not in this model: layers.0.mlp.gate.weight, .*; tensor "
        r"layers.0.mlp.fc1.weight is \[192, 64\] in the checkpoint but \[256, 64\]",
    ):
        main(TINY + no_swiglu + ["--load", ck])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="world size 4 is not divisible by tensor-parallel-size 3"):
        main(TINY + common + layout(3, 1) + ["--load", ck])


def test_inspect_lists_iteration_layout_and_sizes(ref):
    _, ck, _ = ref
    out = subprocess.run(
        [sys.executable, "-m", "megalite.training.inspect_ckpt", ck, "--tensors"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "iter_0000006  complete  <- latest" in out and "iter_0000003  complete" in out
    assert "iteration 6, consumed samples 24, global batch 4" in out
    assert "layout: TP=2 CP=2 DP=1 (world 4)" in out
    assert "model.embedding.word.weight" not in out and "model/embedding.word.weight  [768, 64] (520 real rows)" in out
    meta = json.loads(open(os.path.join(ck, "iter_0000006", "meta.json")).read())
    assert f"{sum(meta['files'].values()):,} bytes" in out


def test_inspect_reads_a_checkpoint_with_model_fields_this_version_lacks(ref, tmp_path):
    from megalite.training.inspect_ckpt import describe

    _, ck, _ = ref
    old = tmp_path / "iter_0000006"
    shutil.copytree(os.path.join(ck, "iter_0000006"), old)
    meta = json.loads((old / "meta.json").read_text())
    meta["model"]["a_field_since_removed"] = 1
    (old / "meta.json").write_text(json.dumps(meta))
    assert any("layout: TP=2 CP=2 DP=1" in line for line in describe(str(old)))


class _ColumnScale(nn.Module):
    """A sharded layer megalite has never heard of: its weight is split along dim 1 over TP."""

    def __init__(self, rank):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6.0).view(3, 2) + 10 * rank)  # this rank's columns
        self.weight.tp_split_dim = 1


def _partition_map_at_tp2(rank, world, save_dir):
    cfg = Config(
        model=ModelConfig(
            num_layers=2,
            hidden_size=16,
            num_attention_heads=4,
            ffn_hidden_size=24,
            seq_length=8,
            swiglu=True,
            add_bias_linear=True,
            untie_embeddings_and_output_weights=True,
            make_vocab_size_divisible_by=4,
        ),
        parallel=ParallelConfig(tensor_parallel_size=2),
    )
    model = apply_tp(GPT(cfg.model, 37), dist.group.WORLD, sequence_parallel=False)
    want = {"embedding.word.weight": 0, "output_layer.weight": 0}  # vocabulary rows
    for i in range(2):
        for name, dim in [
            ("attention.qkv.weight", 0),
            ("attention.qkv.bias", 0),
            ("attention.proj.weight", 1),
            ("mlp.gate.weight", 0),
            ("mlp.gate.bias", 0),
            ("mlp.fc1.weight", 0),
            ("mlp.fc1.bias", 0),
            ("mlp.fc2.weight", 1),
        ]:  # row-parallel biases are replicated
            want[f"layers.{i}.{name}"] = dim
    assert checkpoint.partition_dims(model) == want

    # A new layer is checkpointed (and resharded) from its attribute alone: no class list to extend.
    model.layers[0].scale = _ColumnScale(rank)
    assert checkpoint.partition_dims(model) == {**want, "layers.0.scale.weight": 1}
    dims = ParallelDims.build(cfg.parallel)
    ck = checkpoint.save(save_dir, 1, 0, model, torch.optim.AdamW(model.parameters()), dims, cfg)
    entry = checkpoint.read_meta(ck)["tensors"]["model/layers.0.scale.weight"]
    assert (entry["dim"], entry["shape"], len(entry["files"])) == (1, [3, 4], 2)
    dense = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 10], dim=1)
    fresh = _ColumnScale(rank=5)
    model.layers[0].scale = fresh
    checkpoint.load(ck, model, torch.optim.AdamW(model.parameters()), dims, cfg, log=lambda *_: None)
    assert torch.equal(fresh.weight.detach(), dense[:, 2 * rank : 2 * rank + 2])


def test_partition_map_comes_from_parameter_attributes(tmp_path):
    run_ranks(_partition_map_at_tp2, 2, tmp_path, str(tmp_path / "ck"))
    bad = nn.Parameter(torch.zeros(3))
    bad.tp_split_dim = 1
    with pytest.raises(ValueError, match="tp_split_dim 1 of a parameter of shape \\(3,\\)"):
        checkpoint.partition_dims(nn.ParameterList([bad]))
