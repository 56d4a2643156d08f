import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from pretrain_utils import ROOT

from megalite import config as C
from megalite import config_checks
from megalite.config import ConfigError
from megalite.ops import attention
from megalite.training.checkpoint import resolve_load_dir
from megalite.training.main import main, validate_world


def test_megatron_flags_parse_into_sections():
    cfg = C.parse(
        [
            "--num-layers",
            "3",
            "--hidden-size",
            "96",
            "--num-attention-heads",
            "6",
            "--group-query-attention",
            "--num-query-groups",
            "2",
            "--swiglu",
            "--normalization",
            "RMSNorm",
            "--position-embedding-type",
            "learned_absolute",
            "--untie-embeddings-and-output-weights",
            "--lr",
            "3e-4",
            "--bf16",
            "--tensor-parallel-size",
            "2",
            "--sequence-parallel",
            "--save",
            "/tmp/x",
            "--wandb-project",
            "p",
            "--lr-decay-style",
            "linear",
            "--disable-bias-linear",
        ]
    )
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_kv_heads) == (3, 96, 2)
    assert cfg.model.swiglu and cfg.model.untie_embeddings_and_output_weights and not cfg.model.add_bias_linear
    assert cfg.train.lr == 3e-4 and cfg.train.bf16 and cfg.train.lr_decay_style == "linear"
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.checkpoint.save == "/tmp/x" and cfg.logging.wandb_project == "p"
    assert cfg.model.ffn_size % 64 == 0


def test_config_file_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num-layers": 7, "hidden_size": 128, "lr": 0.5}))
    cfg = C.parse(["--config", str(path), "--lr", "0.1"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.lr) == (7, 128, 0.1)
    path.write_text(json.dumps({"num-layerz": 7}))
    with pytest.raises(ConfigError, match=r"unknown key 'num-layerz' \(did you mean --num-layers\?\)"):
        C.parse(["--config", str(path)])
    path.write_text(json.dumps({"bf16": "false"}))
    with pytest.raises(ConfigError, match="bf16 must be true or false"):
        C.parse(["--config", str(path)])
    toml = tmp_path / "c.toml"
    toml.write_text('seq-length = "64"\nswiglu = true\nadd-bias-linear = false\n')
    cfg = C.parse(["--config", str(toml)])
    assert cfg.model.seq_length == 64 and cfg.model.swiglu and not cfg.model.add_bias_linear
    toml.write_text('lr-decay-style = "cosin"\n')
    with pytest.raises(
        ConfigError, match=r"c\.toml: lr-decay-style must be one of cosine, linear, constant \(got 'cosin'\)"
    ):
        C.parse(["--config", str(toml)])


@pytest.mark.fault("bad-config")
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.json", {"num-layerz": 3, "lr": 0.1}, r"c\.json: unknown key 'num-layerz' \(did you mean --num-layers\?\)"),
        ("c.toml", "seq_len = 64\n", r"c\.toml: unknown key 'seq_len' \(did you mean --seq-length\?\)"),
        ("c.json", {"num_layers": "four"}, r"c\.json: num_layers must be an integer \(got 'four'\)"),
        ("c.toml", "num-layers = 2.5\n", r"c\.toml: num-layers must be an integer \(got 2\.5\)"),
        ("c.json", {"lr": [0.1]}, r"c\.json: lr must be a number \(got \[0\.1\]\)"),
        ("c.json", {"swiglu": "yes"}, r"c\.json: swiglu must be true or false \(got 'yes'\)"),
        ("c.json", {"normalization": "rmsnorm"}, r"c\.json: normalization must be one of LayerNorm, RMSNorm"),
        (
            "c.json",
            {"tensor-parallel-size": 0},
            r"--tensor-parallel-size must be >= 1 \(got 0\) \(--tensor-parallel-size set in --config .*c\.json\)",
        ),
        (
            "c.json",
            {"hidden-size": 100, "num-attention-heads": 3},
            r"--hidden-size 100 is not divisible .* \(--hidden-size, --num-attention-heads set in --config .*c\.json\)",
        ),
        ("c.toml", "num-layers = = 2\n", r"c\.toml is not valid TOML"),
        ("c.json", "[1, 2]", r"c\.json must hold one object of flag names and values, not a list"),
    ],
)
def test_bad_config_file_fails_naming_the_key_before_any_collective(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        main(["--config", str(path), "--log-dir", str(tmp_path / "log")])
    assert not dist.is_initialized() and not (tmp_path / "log").exists()


@pytest.mark.fault("bad-config")
def test_bad_config_file_through_pretrain_py(tmp_path, record_property):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"tensor-parallel-size": 0}))
    # A value given on the command line is the one the error is about: no blame on the file.
    with pytest.raises(ConfigError, match=r"\(got 0\)$"):
        C.parse(["--config", str(path), "--tensor-parallel-size", "0"])
    path.write_text(json.dumps({"micro_batch_size": "two"}))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain.py"), "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"megalite: error: --config {path}: micro_batch_size must be an integer (got 'two')" in proc.stderr
    record_property(
        "observed",
        "unknown key, wrong type, bad choice or bad value: ConfigError naming the key "
        f"and the file; pretrain.py exits {proc.returncode}",
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--num-attention-heads", "6", "--group-query-attention", "--num-query-groups", "4", "--hidden-size", "96"],
            "not divisible by --num-query-groups 4",
        ),
        (["--group-query-attention"], "needs --num-query-groups"),
        (["--hidden-size", "100", "--num-attention-heads", "3"], "set --kv-channels"),
        (["--seq-length", "512", "--max-position-embeddings", "256"], "exceeds --max-position-embeddings"),
        (["--save-interval", "5"], "without --save"),
        (["--use-flash-attn"], "needs --bf16"),
        (["--kv-channels", "15"], "head dim 15 must be even"),
        (["--log-interval", "0"], "--log-interval must be >= 1"),
        (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
        (["--max-skipped-steps", "-1"], "--max-skipped-steps must be >= 0"),
        (["--lr-warmup-iters", "10", "--lr-decay-iters", "10"], "--lr-decay-iters 10 must exceed --lr-warmup-iters 10"),
        (
            ["--lr-warmup-iters", "5", "--train-iters", "5"],
            r"--train-iters 5 \(the default --lr-decay-iters\) must exceed",
        ),
        (["--lr-decay-iters", "0"], "--lr-decay-iters must be >= 1"),
    ],
)
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=message):
        C.parse(argv)


@pytest.mark.parametrize("installed", [False, True])
def test_use_flash_attn_needs_the_package(monkeypatch, installed):
    """Both answers of the availability probe, whatever this machine has installed."""
    monkeypatch.setattr(attention, "flash_attn_available", lambda: installed)
    if installed:
        assert C.parse(["--use-flash-attn", "--bf16"]).model.use_flash_attn
    else:
        with pytest.raises(ConfigError, match="flash-attn is not installed"):
            C.parse(["--use-flash-attn", "--bf16"])


def test_use_flash_attn_on_cpu_is_refused_before_any_collective(monkeypatch):
    from megalite.parallel.parallelize import validate_layout

    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--device", "cpu"], []):  # explicit, and the default on a machine without CUDA
        cfg = C.parse(["--use-flash-attn", "--bf16", *argv])
        with pytest.raises(ConfigError, match="--use-flash-attn needs a CUDA device"):
            validate_layout(cfg, 1, 1)


def test_world_and_batch_checks():
    cfg = C.parse(["--tensor-parallel-size", "2", "--context-parallel-size", "2"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        validate_world(cfg, 6)
    cfg = C.parse(["--micro-batch-size", "2", "--global-batch-size", "6"])
    with pytest.raises(
        ConfigError, match="--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"
    ):
        validate_world(cfg, 2)
    cfg = C.parse(["--micro-batch-size", "2"])
    assert validate_world(cfg, 4) == 4 and cfg.train.global_batch_size == 8


def test_load_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_load_dir(str(tmp_path / "nope"))
    assert resolve_load_dir(str(tmp_path), lambda *a: None) is None  # empty: a fresh start
    (tmp_path / "latest").write_text("iter_0000005\n")
    with pytest.raises(ConfigError, match="missing or incomplete"):
        resolve_load_dir(str(tmp_path))


@pytest.mark.parametrize("local_rank,gpus", [(1, {0: "A100", 1: "V100"}), (0, {0: "T4"})])
def test_bf16_refused_on_the_ranks_own_gpu_before_any_communication(monkeypatch, local_rank, gpus):
    """A rank whose GPU lacks bf16 kernels is refused after set_device and before the process group,
    even though torch.cuda.is_bf16_supported() (emulation included) says yes and device 0 is fine."""
    from megalite import distributed

    specs = {"A100": (8, 0), "V100": (7, 0), "T4": (7, 5)}
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"Tesla {gpus[d.index]}")

    def capability(d=None):
        calls.append(("capability", d))
        return specs[gpus[d.index]]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(("init", a)))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    name, (major, minor) = gpus[local_rank], specs[gpus[local_rank]]
    with pytest.raises(ConfigError, match=rf"cuda:{local_rank} \(Tesla {name}, compute capability {major}\.{minor}\)"):
        distributed.init(C.parse(["--bf16"]))
    mine = torch.device("cuda", local_rank)
    assert calls == [("set_device", mine), ("capability", mine)]


def test_bf16_accepted_on_ampere(monkeypatch):
    from megalite import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(a[0]))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init(C.parse(["--bf16"])) == torch.device("cuda", 0) and calls == ["nccl"]


def test_gpu_launch_mistakes_are_refused(monkeypatch):
    from megalite import distributed
    from megalite.parallel.parallelize import validate_layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    with pytest.raises(ConfigError, match="local rank 1 but only 1 GPUs are visible"):
        distributed.resolve_device(C.parse([]), 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="gloo cannot run"):
        distributed.init(C.parse(["--distributed-backend", "gloo"]))
    with pytest.raises(ConfigError, match="context parallel on CUDA needs --bf16"):
        validate_layout(C.parse(["--context-parallel-size", "2"]), 1, 2)
    validate_layout(C.parse(["--context-parallel-size", "2", "--bf16"]), 1, 2)


BOOL_FIELDS = [(sec, f) for sec, cls in C._sections() for f in C.dataclasses.fields(cls) if C._is_bool(f)]


@pytest.mark.parametrize("section, field", BOOL_FIELDS, ids=[f.name for _, f in BOOL_FIELDS])
def test_every_boolean_can_be_set_both_ways_from_flags_and_files(tmp_path, monkeypatch, section, field):
    monkeypatch.setattr(config_checks, "validate", lambda cfg: None)  # parsing only: some values need companion flags
    flag, negative = field.metadata["flag"], "--no-" + field.metadata["flag"][2:]

    def value(cfg):
        return getattr(getattr(cfg, section), field.name)

    assert value(C.parse([])) is field.default
    assert value(C.parse([flag])) is True and value(C.parse([negative])) is False
    assert value(C.parse([flag, negative])) is False and value(C.parse([negative, flag])) is True  # last wins
    for val in (True, False):
        js, toml = tmp_path / "c.json", tmp_path / "c.toml"
        js.write_text(json.dumps({field.metadata["flag"]: val}))
        toml.write_text(f"{field.name} = {str(val).lower()}\n")
        for path in (js, toml):
            assert value(C.parse(["--config", str(path)])) is val, path.read_text()
            assert value(C.parse(["--config", str(path), negative if val else flag])) is (not val)  # flags win


def test_megatron_negative_spellings():
    assert C.parse(["--disable-bias-linear"]).model.add_bias_linear is False
    assert C.parse(["--bf16", "--no-bf16"]).train.bf16 is False


def test_lr_of_iteration_k_is_schedule_k():
    """The step producing iteration k runs at schedule(k): warmup starts at lr/warmup, not 0 (Megatron's)."""
    from megalite.training.optim import lr_at

    t = C.parse(
        [
            "--lr",
            "1.0",
            "--min-lr",
            "0.1",
            "--lr-warmup-iters",
            "4",
            "--lr-decay-iters",
            "8",
            "--lr-decay-style",
            "linear",
            "--train-iters",
            "10",
        ]
    ).train
    assert [lr_at(k, t) for k in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]
    assert (
        lr_at(6, t) == pytest.approx(0.55) and lr_at(8, t) == pytest.approx(0.1) and lr_at(10, t) == pytest.approx(0.1)
    )
    assert (
        lr_at(
            7,
            C.parse(
                ["--lr", "1.0", "--lr-warmup-iters", "4", "--lr-decay-iters", "4", "--lr-decay-style", "constant"]
            ).train,
        )
        == 1.0
    )


HIER = ["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hierarchical-context-parallel-sizes", "2", "2"], "given with --cp-comm-type p2p; add --cp-comm-type a2a"),
        (HIER, r"a2a\+p2p needs --hierarchical-context-parallel-sizes A P .* = --context-parallel-size 4"),
        (HIER + ["--hierarchical-context-parallel-sizes", "2", "3"], "A x P = 6 must equal --context-parallel-size 4"),
        (HIER + ["--hierarchical-context-parallel-sizes", "0", "4"], "A x P = 0 must equal"),
    ],
)
def test_hierarchical_cp_flags_must_agree(argv, message):
    with pytest.raises(ConfigError, match=message):
        C.parse(argv)


def test_hierarchical_cp_flags_and_heads(tmp_path):
    from megalite.parallel.parallelize import validate_layout

    cfg = C.parse(HIER + ["--hierarchical-context-parallel-sizes", "2", "2"])
    assert cfg.parallel.hierarchical_context_parallel_sizes == [2, 2]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cp-comm-type": "a2a+p2p", "hierarchical-context-parallel-sizes": [1, 2]}))
    assert C.parse(
        ["--config", str(path), "--context-parallel-size", "2"]
    ).parallel.hierarchical_context_parallel_sizes == [1, 2]
    path.write_text(json.dumps({"hierarchical-context-parallel-sizes": 2}))
    with pytest.raises(ConfigError, match="hierarchical-context-parallel-sizes must be a non-empty list or a string"):
        C.parse(["--config", str(path)])
    # Query heads per TP rank must split over A: 4 heads / TP 2 = 2 per rank, not divisible by A = 4.
    tp2 = ["--tensor-parallel-size", "2", "--num-attention-heads", "4", "--bf16"]
    validate_layout(C.parse(tp2 + HIER + ["--hierarchical-context-parallel-sizes", "2", "2"]), 2, 4)
    with pytest.raises(ConfigError, match=r"query heads per TP rank \(2\) must be divisible by A"):
        validate_layout(C.parse(tp2 + HIER + ["--hierarchical-context-parallel-sizes", "4", "1"]), 2, 4)
