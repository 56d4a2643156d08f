"""Long-context memory techniques on one device: the token-tiled output layer + loss, the
sequence-tiled MLP and activation offload (its copy schedule, with a stand-in for the device
copies). Each must give the plain path's loss and every gradient. The TP / CP forms are checked
in test_model_tp.py / test_model_cp.py, the training curves in test_parallel_training.py."""

import pytest
import torch
import torch.nn.functional as F
from parity import VARIANTS, VOCAB, assert_rel, make_batches, masked_loss, model_cfg

from megalite import config as C
from megalite.config import ConfigError
from megalite.model import GPT, MLP
from megalite.ops.fused_loss import fused_linear_cross_entropy
from megalite.ops.offload import Offloader, offloaded_layers
from megalite.parallel.parallelize import validate_layout


def _plain(hidden, weight, labels, mask, vocab_size):
    logits = (hidden @ weight.t()).float()
    logits[:, vocab_size:] = float("-inf")  # padded columns
    loss = F.cross_entropy(logits, labels, reduction="none")
    return (loss * mask).sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_loss_equals_plain_fp32(chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v, real = 64, 24, 40, 37  # 3 padded columns
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, real, (n,), generator=g)
    labels[::5] = -100  # ignored
    mask = (torch.rand(n, generator=g) > 0.3).float()
    want = _plain(hidden, weight, labels, mask, real)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = fused_linear_cross_entropy(hidden, weight, labels, mask, chunk, vocab_size=real)
    assert got.dtype == torch.float32
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight))  # a scalar upstream gradient scales both
    assert_rel(got, want, msg="loss")
    for a, b, name in zip(got_grads, want_grads, ("hidden", "weight")):
        assert_rel(a, 3.0 * b, msg=name)
    assert not got_grads[1][real:].any(), "padded vocabulary rows get no gradient"
    with torch.no_grad():  # evaluation: losses only
        assert_rel(fused_linear_cross_entropy(hidden, weight, labels, mask, chunk, vocab_size=real), want)


def test_fused_loss_under_bf16_autocast_is_close_to_plain():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(48, 32, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(64, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 64, (48,), generator=g)
    mask = torch.ones(48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(hidden, weight, labels, mask, 64)
        got = fused_linear_cross_entropy(hidden, weight, labels, mask, 16)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and got_grads[1].dtype == torch.float32
    assert_rel(got, want, rel=1e-2)
    for a, b in zip(got_grads, want_grads):
        assert_rel(a, b, rel=2e-2)


def _masked_loss_and_grads(model, batches):
    return masked_loss(model, batches), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", VARIANTS)
def test_model_with_fused_loss_and_tiled_mlp_equals_plain(kw):
    """Every gradient of the whole model (both recompute kinds, ignored labels, a ragged mask)."""
    batches = make_batches(2)
    want, want_grads = _masked_loss_and_grads(GPT(model_cfg(**kw, loss_chunk_size=0), VOCAB, seed=3), batches)
    for extra in (dict(loss_chunk_size=5), dict(loss_chunk_size=5, mlp_tile_size=3)):
        model = GPT(model_cfg(**kw, **extra), VOCAB, seed=3)
        got, got_grads = _masked_loss_and_grads(model, batches)
        assert_rel(got, want, msg=str(extra))
        for name, g in got_grads.items():
            assert_rel(g, want_grads[name], msg=f"{extra} {name}")
    model.eval()
    with torch.no_grad():
        tokens, pos, labels, mask = batches[0]
        per_token = GPT(model_cfg(**kw, loss_chunk_size=0), VOCAB, seed=3).eval()(tokens, pos, labels)
        assert_rel(model(tokens, pos, labels, loss_mask=mask), (per_token * mask).sum(), msg="eval")


@pytest.mark.parametrize("swiglu", [True, False])
def test_tiled_mlp_equals_plain_and_saves_only_its_input(swiglu):
    cfg = model_cfg(hidden_size=16, ffn_hidden_size=40, swiglu=swiglu)
    plain, tiled = MLP(cfg), MLP(model_cfg(hidden_size=16, ffn_hidden_size=40, swiglu=swiglu, mlp_tile_size=4))
    tiled.load_state_dict(plain.state_dict())
    x = torch.randn(10, 3, 16, requires_grad=True)  # [s, b, h]; tiles of 4, 4, 2 tokens
    dy = torch.randn(10, 3, 16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    outs = []
    for mlp in (plain, tiled):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mlp(x)
        weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
        sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        sizes = {ptr: n for ptr, n in sizes.items() if ptr not in weights}
        outs.append((y, torch.autograd.grad(y, (x, *mlp.parameters()), dy), sum(sizes.values())))
    (y0, g0, saved0), (y1, g1, saved1) = outs
    assert_rel(y1, y0)
    for a, b in zip(g1, g0):
        assert_rel(a, b)
    assert saved1 == x.numel() * 4, "the tiled MLP keeps only its input between forward and backward"
    assert saved0 >= x.numel() * 4 * (1 + (2 + 2 * swiglu) * 40 / 16)  # input + [s, b, ffn] x 2 (GELU) or 4


class StandInMover:
    """Host copies as clones, every call logged with its layer: the schedule without a GPU."""

    def __init__(self, log):
        self.log = log

    def to_host(self, key, x):
        self.log.append(("to_host", key))
        return x.detach().clone()

    def to_device(self, key, handle):
        self.log.append(("to_device", key))
        return handle

    def wait(self, key, handle):
        self.log.append(("wait", key))
        return handle.clone()


def test_offload_schedule_and_gradients_with_a_stand_in_copy():
    kw = dict(VARIANTS[0], num_layers=4, recompute_granularity="full", hidden_dropout=0.1)
    batches = make_batches(1)
    ref = GPT(model_cfg(**kw), VOCAB, seed=3)
    torch.manual_seed(0)
    want, want_grads = _masked_loss_and_grads(ref, batches)

    cfg = model_cfg(**kw, cpu_offloading=True, cpu_offloading_num_layers=3)
    model = GPT(cfg, VOCAB, seed=3)
    log = []
    model.offloader = Offloader(offloaded_layers(cfg), StandInMover(log))
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: log.append(("run", i)))
    torch.manual_seed(0)  # the same dropout masks, replayed in recompute
    got, got_grads = _masked_loss_and_grads(model, batches)
    assert_rel(got, want)
    for name, g in got_grads.items():
        assert_rel(g, want_grads[name], msg=name)
    forward = [("to_host", 0), ("run", 0), ("to_host", 1), ("run", 1), ("to_host", 2), ("run", 2), ("run", 3)]
    backward = [
        ("run", 3),  # the last layer keeps its input on the device (torch's checkpoint)
        ("to_device", 2),  # the first offloaded layer backward meets: fetched on demand
        ("wait", 2),
        ("to_device", 1),  # prefetched while layer 2 is recomputed
        ("run", 2),
        ("wait", 1),
        ("to_device", 0),
        ("run", 1),
        ("wait", 0),
        ("run", 0),
    ]
    assert log == forward + backward
    assert not model.offloader._host and not model.offloader._coming, "nothing left behind"
    assert list(offloaded_layers(model_cfg(num_layers=4, cpu_offloading=True))) == [0, 1, 2]


def test_offload_refused_on_cpu_and_flag_checks():
    cfg = C.parse(["--recompute-granularity", "full", "--cpu-offloading", "--device", "cpu"])
    with pytest.raises(ConfigError, match="on CPU they already are in host memory"):
        validate_layout(cfg, 1, 1)
    for argv, message in [
        (["--cpu-offloading"], "add --recompute-granularity full"),
        (["--cpu-offloading-num-layers", "2"], "without --cpu-offloading"),
        (["--cpu-offloading", "--recompute-granularity", "full", "--cpu-offloading-num-layers", "9"], "between 1"),
        (["--loss-chunk-size", "-1"], "--loss-chunk-size must be >= 0"),
        (["--mlp-tile-size", "-4"], "--mlp-tile-size must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            C.parse(argv)
