"""The planner's FLOP and memory models against measurements, its search and its command line."""

import dataclasses
import json
import shlex
import statistics

import pytest
import torch
from plan_measure import storage_bytes
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalite import config as C
from megalite.model import GPT
from megalite.plan import cli, hardware, published
from megalite.plan.calibrate import OpCounter
from megalite.plan.flops import attention_flops, step_model_flops
from megalite.plan.live_bytes import LiveBytes
from megalite.plan.memory import breakdown
from megalite.plan.options import job_from
from megalite.plan.search import layouts, predict
from megalite.plan.spec import Job, Layout
from megalite.plan.timing import LAYER_OPS, STEP_OPS
from megalite.training.metrics import flops_per_token
from megalite.training.optim import build_optimizer

VOCAB = 50


def _counted(model, batch, seq):
    tokens = torch.randint(0, VOCAB, (batch, seq))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, torch.arange(seq).expand(batch, seq), tokens).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counts.get("aten.mm", 0) + counts.get("aten.addmm", 0), counts.get("aten.bmm", 0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(untie_embeddings_and_output_weights=True, swiglu=True, group_query_attention=True, num_query_groups=2),
        dict(kv_channels=6, ffn_hidden_size=40, add_bias_linear=False),
    ],
    ids=["gelu-mha-tied", "swiglu-gqa-untied", "odd-dims"],
)
def test_step_flops_equal_torch_flop_counter(kw):
    """Linear layers and output layer exactly as torch counts them; attention's products over the
    full square as the math kernel computes them; the causal count is half of that square."""
    cfg = C.ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, make_vocab_size_divisible_by=8, **kw
    )
    batch, seq = 3, cfg.seq_length
    linear, attention = _counted(GPT(cfg, VOCAB), batch, seq)
    full = step_model_flops(cfg, VOCAB, seq, batch, full_square=True)
    assert full == linear + attention
    causal = step_model_flops(cfg, VOCAB, seq, batch)
    assert causal == linear + attention / 2
    n_matmul = GPT(cfg, VOCAB).num_params(matmul_only=True)
    assert causal == flops_per_token(cfg, n_matmul, seq) * batch * seq  # the MFU line's count


@pytest.mark.parametrize("swiglu", [False, True])
def test_op_counts_equal_dispatched_ops(swiglu):
    """The host's per-op cost is charged per aten op: the planner's counts are what the one-rank
    model dispatches in forward and in backward, per layer and once per micro-batch."""
    for layers in (1, 3):
        cfg = C.ModelConfig(
            num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=16, swiglu=swiglu,
            make_vocab_size_divisible_by=8,
        )  # fmt: skip
        model, tokens = GPT(cfg, VOCAB), torch.randint(0, VOCAB, (2, 16))
        with OpCounter() as fwd:
            loss = model(tokens, torch.arange(16).expand(2, 16), tokens).sum()
        with OpCounter() as bwd:
            loss.backward()
        per_layer, step = LAYER_OPS[swiglu], STEP_OPS
        assert (fwd.ops, bwd.ops) == tuple(s + layers * n for s, n in zip(step, per_layer))


def test_document_masked_attention_flops_equal_documents_run_alone():
    """Under --reset-attention-mask a sample of documents of length L costs what running each
    document as its own sequence costs (torch's count of each, halved for causality)."""
    cfg = C.ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=48)
    doc, docs = 12, 4
    _, per_doc = _counted(GPT(C.ModelConfig(**{**cfg.__dict__, "seq_length": doc}), VOCAB), 1, doc)
    forward = attention_flops(cfg, cfg.seq_length, doc_length=doc) * cfg.num_layers
    assert 3 * forward == docs * per_doc / 2


def _job(cfg, vocab, batch, bf16=False):
    """The planner's job for ``cfg`` as pretrain.py would build it (model options such as a fused
    loss follow the config), with this test's precision: the model run under autocast."""
    run = C.Config(model=cfg, train=C.TrainConfig(micro_batch_size=batch, global_batch_size=batch))
    job = job_from(run, vocab)  # called with labels alone, the model runs the plain output layer and loss
    return dataclasses.replace(job, precision="bf16-autocast" if bf16 else "fp32", loss_chunk=None)


MEMORY_CASES = {
    "fp32": (dict(), False),
    "bf16-swiglu-gqa-untied": (
        dict(swiglu=True, group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True),
        True,
    ),
    "selective": (dict(recompute_granularity="selective"), False),
    "full-bf16": (dict(recompute_granularity="full"), True),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_equals_measured_tensor_bytes(case):
    """Weights, gradients and AdamW state from their storage; saved activations (checkpointed
    inputs included) and the peak from every storage ops create while a step runs."""
    kw, bf16 = MEMORY_CASES[case]
    cfg = C.ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=96, norm_impl="torch", loss_chunk_size=0, **kw
    )  # the plain loss: the model is called for per-token losses
    vocab, batch = 300, 2
    model = GPT(cfg, vocab)
    optimizer = build_optimizer(model, C.TrainConfig())
    tokens = torch.randint(0, vocab, (batch, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).expand(batch, -1)
    for _ in range(2):  # the second step runs with optimizer state allocated and gradients freed
        with LiveBytes() as live:
            live.ignore(model.parameters())  # weights existed before; not new storage
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens, positions, tokens).mean()
            saved = live.now
            loss.backward()
            del loss
        grads = storage_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    pred = breakdown(_job(cfg, vocab, batch, bf16), Layout())
    assert pred["weights"] == storage_bytes(model.parameters())
    assert grads == storage_bytes(model.parameters())  # fp32 gradients, one per weight
    state = storage_bytes(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert pred["optimizer"] == state
    assert pred["activations"] == pytest.approx(saved, rel=0.05)
    dynamic = pred["total"] - pred["weights"] - pred["optimizer"]
    assert dynamic == pytest.approx(live.peak, rel=0.05)


def test_published_runs_within_the_targets():
    """Megatron-LM's weak-scaling TFLOP/s (H100) and Korthikanti et al.'s iteration times (A100),
    from the hardware presets as shipped: mean absolute error <= 10%, worst row <= 20%."""
    h100, a100 = hardware.load("h100-sxm"), hardware.load("a100-80gb")
    assert len(h100.fitted) + len(a100.fitted) <= 2  # constants fitted to published rows, each naming its row
    rows = published.rows(h100, a100)
    assert len(rows) == len(published.MEGATRON_WEAK_SCALING) + 2 * len(published.KORTHIKANTI_TABLE5)
    errors = [abs(r["error"]) for r in rows]
    assert statistics.mean(errors) <= 0.10, rows
    assert max(errors) <= 0.20, rows


def test_pipeline_bubble_and_interleaving():
    """1F1B costs (p - 1) / (v m) of the useful time on top; more virtual stages, less bubble."""
    job = Job(model=C.ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=4), vocab_size=1000,
              seq_length=256, global_batch_size=8)  # fmt: skip
    hw = hardware.load("h100-sxm")
    one = predict(job, Layout(pp=4), hw, 8)
    two = predict(job, Layout(pp=4, vpp=2), hw, 8)
    useful = one.step_time_s - one.bubble_s - one.exposed_comm_s - one.optimizer_s
    assert one.bubble_s == pytest.approx(useful * 3 / 8, rel=0.01)
    assert two.bubble_s == pytest.approx(one.bubble_s / 2, rel=0.01)


def test_search_keeps_megalite_rules_and_fixed_sizes():
    m = C.ModelConfig(num_layers=4, hidden_size=96, num_attention_heads=6, group_query_attention=True,
                      num_query_groups=3, seq_length=96)  # fmt: skip
    job = Job(model=m, vocab_size=1000, seq_length=96, global_batch_size=4)
    found = layouts(job, 12, 4, {"pp": 1})
    assert found and all(lay.gpus == 12 and lay.tp <= 4 and 3 % lay.tp == 0 for _, lay in found)
    assert all(96 % (2 * lay.cp * lay.tp) == 0 for _, lay in found if lay.cp > 1)
    assert all(4 % lay.dp == 0 for _, lay in found)
    assert {lay.tp for _, lay in layouts(job, 12, 4, {"pp": 1, "tp": 3})} == {3}


def test_cli_json_and_a_runnable_command(capsys):
    assert cli.main(["llama3-8b", "--gpus", "16", "--seq-length", "32768", "--micro-batch-size", "1",
                     "--global-batch-size", "16", "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert rows and {"tp", "cp", "dp", "pp", "step_time_s", "tflops_per_gpu", "mfu", "mem_gib"} <= set(rows[0])
    assert rows[0]["fits"] and rows[0]["tp"] * rows[0]["cp"] * rows[0]["dp"] * rows[0]["pp"] == 16
    assert [r["step_time_s"] for r in rows if r["fits"]] == sorted(r["step_time_s"] for r in rows if r["fits"])
    assert cli.main(["llama3-8b", "--gpus", "16", "--seq-length", "32768", "--micro-batch-size", "1",
                     "--global-batch-size", "16"]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(line)
    assert argv[:5] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8"] and argv[5] == "pretrain.py"
    cfg = C.parse(argv[6:])  # every flag printed is one pretrain.py has, once
    assert argv.count("--seq-length") == 1 and argv.count("--tensor-parallel-size") == 1
    best = (cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size, cfg.model.recompute_granularity)
    assert best == (rows[0]["tp"], rows[0]["cp"], rows[0]["recompute"]) and cfg.model.seq_length == 32768


@pytest.mark.parametrize(
    "argv,message",
    [
        (["gpt-5"], "unknown preset 'gpt-5'"),
        (["llama3-8b", "--hardware", "tpu-v9"], "--hardware tpu-v9: no such file or preset"),
        (["--num-layers", "2"], "give --vocab-size"),
        (["llama3-8b", "--reset-attention-mask"], "--reset-attention-mask needs --mean-document-length"),
        (["llama3-8b", "--pipeline-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "3"],
         "not a multiple of --num-layers-per-virtual-pipeline-stage 3"),
    ],
)  # fmt: skip
def test_cli_errors_name_the_fix(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code, err = 2, str(exc)
    else:
        err = capsys.readouterr().err
    assert code == 2 and message in err


def test_pretrain_prediction_line_warning_and_comparison(monkeypatch):
    """pretrain.py's planner hook: a start-up line, a CUDA warning when the prediction exceeds the
    device, and one predicted-vs-measured line after the warm-up iterations."""
    from types import SimpleNamespace

    from megalite.plan import runtime

    cfg = C.parse(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64"])
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    dims = SimpleNamespace(tp=1, cp=1, dp=1, sequence_parallel=False)
    check = runtime.PlanCheck(cfg, 500, dims, torch.device("cpu"), 1)
    assert "peak memory" in check.startup_line() and check.memory_warning() is None
    lines = [
        check.observe({"step_time": 1.0 + i, "mem_gib": 0.5}) for i in range(runtime.WARMUP + runtime.COMPARE_AFTER)
    ]
    assert lines[:-1] == [None] * (len(lines) - 1) and "/ 0.50 GiB" in lines[-1]
    assert check.observe({"step_time": 1.0, "mem_gib": 0.5}) is None  # said once

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=2**20))
    gpu = runtime.PlanCheck(cfg, 500, dims, torch.device("cuda", 0), 8)
    assert gpu.hw.name == "h100-sxm" and "exceeds this GPU's 0.0 GiB" in gpu.memory_warning()


@pytest.mark.parametrize(
    "fsdp,precision,sharding,d,expected",
    [
        (False, "bf16", "no_shard", 4, 18),  # Megatron: bf16 weights + fp32 grads + master, m, v
        (False, "bf16", "optim", 4, 6 + 12 / 4),  # Megatron's distributed optimizer
        (False, "fp32", "no_shard", 1, 16),  # megalite's DDP
        (True, "bf16", "optim", 4, 16 / 4),  # FSDP2: optim runs as optim_grads
        (True, "fp32", "optim_grads_params", 2, 16 / 2),
    ],
)
def test_state_bytes_per_parameter_by_strategy(fsdp, precision, sharding, d, expected):
    from megalite.plan.memory import state_bytes_per_param

    job = Job(model=C.ModelConfig(), vocab_size=100, seq_length=64, global_batch_size=1, precision=precision,
              sharding=sharding, fsdp=fsdp)  # fmt: skip
    per = state_bytes_per_param(job, d)
    assert per["weights"] + per["grads"] + per["optimizer"] == pytest.approx(expected)


def test_tiled_mlp_and_fused_loss_shrink_what_they_target():
    from megalite.plan.memory import head_bytes, layer_activation_bytes

    m = C.ModelConfig(hidden_size=256, num_attention_heads=4, swiglu=True, seq_length=4096)
    plain = Job(model=m, vocab_size=32000, seq_length=4096, global_batch_size=1)
    tiled = Job(**{**plain.__dict__, "mlp_tile": 512, "loss_chunk": 512})
    mlp = 4 * plain.act_bytes * m.ffn_size * 4096  # SwiGLU's four saved intermediates
    assert layer_activation_bytes(plain, Layout(), 4096) - layer_activation_bytes(tiled, Layout(), 4096) == mlp
    (saved, transient), (saved_t, transient_t) = head_bytes(plain, Layout(), 4096), head_bytes(tiled, Layout(), 4096)
    assert saved_t < saved / 8 and transient_t == transient * 512 / 4096 * 10 / 8


def _parallel_memory(rank, world, out):
    from megalite.parallel.apply_cp import apply_cp
    from megalite.parallel.apply_tp import apply_tp
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.zigzag import zigzag_split
    from megalite.plan.memory import stage_params

    results = {}
    for name, tp, cp, comm in [("TP2+SP", 2, 1, "p2p"), ("CP2 p2p", 1, 2, "p2p"), ("CP2 a2a", 1, 2, "a2a")]:
        dims = ParallelDims.build(C.ParallelConfig(tensor_parallel_size=tp, context_parallel_size=cp,
                                                   sequence_parallel=tp > 1))  # fmt: skip
        cfg = C.ModelConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=512, norm_impl="torch", loss_chunk_size=0
        )  # the plain loss: the model is called for per-token losses
        model = GPT(cfg, 300)
        if tp > 1:
            apply_tp(model, dims.tp_group, True)
        if cp > 1:
            apply_cp(model, dims.cp_group, comm)
        tokens = torch.randint(0, 300, (1, 512), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(512)[None]
        if cp > 1:
            tokens, positions = (zigzag_split(t, 1, cp, dims.cp_rank) for t in (tokens, positions))
        with LiveBytes() as live:
            live.ignore(model.parameters())  # weights existed before; not new storage
            loss = model(tokens, positions, tokens).mean()
            saved = live.now
            loss.backward()
        job = _job(cfg, 300, 1)
        lay = Layout(tp=tp, cp=cp, sp=tp > 1, cp_comm=comm)
        pred = breakdown(job, lay)
        # the DP wrapper's 4 bytes per parameter (DDP's buckets, FSDP2's gathered fp32 weights): none here
        ddp = 4 * stage_params(job, lay) if cp > 1 else 0
        results[name] = (
            saved,
            pred["activations"],
            live.peak,
            pred["total"] - pred["weights"] - pred["optimizer"] - ddp,
        )
    if rank == 0:
        torch.save(results, out)


def test_memory_under_tp_sp_and_cp_equals_measured(tmp_path):
    """Per-rank saved activations and peak under TP=2 with SP (the gathered linear inputs saved at
    full length) and CP=2 (ring and Ulysses), measured on 2 gloo ranks, within 5%."""
    from multiproc import run_ranks

    run_ranks(_parallel_memory, 2, tmp_path, str(tmp_path / "mem.pt"))
    for name, (saved, pred_saved, peak, pred_peak) in torch.load(tmp_path / "mem.pt").items():
        assert pred_saved == pytest.approx(saved, rel=0.05), name
        assert pred_peak == pytest.approx(peak, rel=0.05), name
