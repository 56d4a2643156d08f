"""flash-attn 2.5 to 2.8 and broken installs, without a GPU: CPU stand-in ``flash_attn`` packages
put in sys.modules. Each stand-in's ``flash_attn_func`` and ``_flash_attn_backward`` take exactly
the parameters of that release (2.7+: a (*args, **kwargs) wrapper, like the torch custom op, that
binds to them strictly) and compute with the math backend, so the flash-attn block backend is
checked against the math backend, outputs and gradients."""

import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import types

import pytest
import torch

from megalite import config as C
from megalite.config import ConfigError
from megalite.ops import attention

MATH = attention.MathBackend()

# The keyword parameters after (dropout_p, softmax_scale, causal) of _flash_attn_backward, per release.
BACKWARD_TAIL = {
    "2.5.9": "window_size, alibi_slopes, deterministic, rng_state=None",
    "2.6.3": "window_size, softcap, alibi_slopes, deterministic, rng_state=None",
    "2.7.0.post2": "window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None",
    "2.8.3": "window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None",
}


def _strict(version, tail, body):
    """A function with the release's exact parameters that checks the values megalite must pass."""
    src = f"def f(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, {tail}):\n"
    src += "    return body(locals())\n"
    scope = {"body": body}
    exec(src, scope)  # noqa: S102 - builds the per-release signature
    fn = scope["f"]
    if version >= "2.7":  # custom op: the Python signature hides the parameters, the schema still binds them

        def op(*args, **kwargs):
            return fn(*inspect.signature(fn).bind(*args, **kwargs).args)

        return op
    return fn


def stand_in(version):
    """A flash_attn package of the given release, computing on CPU."""

    def backward(a):
        assert a["dropout_p"] == 0.0 and a["alibi_slopes"] is None and not a["deterministic"]
        assert a.get("window_size", (-1, -1)) == (-1, -1) and a.get("softcap", 0.0) == 0.0
        assert a.get("window_size_left", -1) == -1 and a.get("window_size_right", -1) == -1
        grads = MATH.backward(*(a[n] for n in ("dout", "q", "k", "v", "out", "softmax_lse", "causal", "softmax_scale")))
        for buf, g in zip((a["dq"], a["dk"], a["dv"]), grads):
            buf.copy_(g)  # flash-attn writes into the caller's buffers

    softcap = "" if version.startswith("2.5") else "softcap=0.0, "
    src = (
        "def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
        f"{softcap}alibi_slopes=None, deterministic=False, return_attn_probs=False):\n"
        "    out, lse = fwd(q, k, v, causal, softmax_scale)\n"
        "    return (out, lse, None) if return_attn_probs else out\n"
    )
    scope = {"fwd": MATH.forward}
    exec(src, scope)  # noqa: S102 - builds the per-release signature
    pkg = types.ModuleType("flash_attn")
    pkg.__version__, pkg.flash_attn_func = version, scope["flash_attn_func"]
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_backward = _strict(version, BACKWARD_TAIL[version], backward)
    pkg.flash_attn_interface = iface
    return {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface}


@pytest.fixture
def probe(monkeypatch):
    """Fresh probes, and no flash_attn module left over from the machine or another test."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    attention.flash_attn_problem.cache_clear()
    attention.flash_attn_available.cache_clear()
    yield monkeypatch
    attention.flash_attn_problem.cache_clear()
    attention.flash_attn_available.cache_clear()


@pytest.mark.parametrize("version", sorted(BACKWARD_TAIL))
def test_each_release_matches_the_math_backend(probe, version):
    for name, mod in stand_in(version).items():
        probe.setitem(sys.modules, name, mod)
    assert attention.flash_attn_available()
    if version >= "2.7":  # the stand-in hides its parameters as the real custom op does
        assert str(inspect.signature(sys.modules["flash_attn.flash_attn_interface"]._flash_attn_backward)) == (
            "(*args, **kwargs)"
        )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 4, 8, dtype=torch.float64, generator=gen)
    k, v, dout = (torch.randn(2, 16, s, 8, dtype=torch.float64, generator=gen) for s in (2, 2, 4))
    results = []
    for backend in (attention.FlashAttnBackend(), MATH):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention.block_attention(*leaves, causal=True, backend=backend)
        out.backward(dout)
        results.append([out, *(t.grad for t in leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_backward_keywords_per_release():
    assert set(attention.flash_attn_backward_kwargs((2, 5))) == {
        "window_size",
        "alibi_slopes",
        "deterministic",
        "rng_state",
    }
    assert set(attention.flash_attn_backward_kwargs((2, 6))) == {
        "window_size",
        "softcap",
        "alibi_slopes",
        "deterministic",
        "rng_state",
    }
    for version in ((2, 7), (2, 8)):
        assert set(attention.flash_attn_backward_kwargs(version)) == {
            "window_size_left",
            "window_size_right",
            "softcap",
            "alibi_slopes",
            "deterministic",
            "rng_state",
        }


class _FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``flash_attn`` and raises while executing it, like a build for another torch/CUDA."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "flash_attn" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


def _cute_only(probe):
    """flash-attn-4 installed alone: a flash_attn package holding only flash_attn.cute."""
    pkg, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    pkg.__path__, pkg.cute = [], cute
    probe.setitem(sys.modules, "flash_attn", pkg)
    probe.setitem(sys.modules, "flash_attn.cute", cute)


def _old_release(probe):
    for name, mod in stand_in("2.6.3").items():
        probe.setitem(sys.modules, name, mod)
    probe.setattr(sys.modules["flash_attn"], "__version__", "2.4.2")


BROKEN = {
    "cute only": (_cute_only, "flash_attn_func"),
    "ImportError": (
        lambda p: p.setattr(
            sys, "meta_path", [_FailingImport(ImportError("undefined symbol: _ZN3c10")), *sys.meta_path]
        ),
        "undefined symbol",
    ),
    "OSError": (
        lambda p: p.setattr(
            sys, "meta_path", [_FailingImport(OSError("libcudart.so.12: cannot open")), *sys.meta_path]
        ),
        "libcudart",
    ),
    "too old": (_old_release, "2.4.2 found"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_unusable_install_falls_back_with_one_log_line(probe, caplog, case):
    install, reason = BROKEN[case]
    install(probe)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        picks = {attention.choose_backend("cuda", torch.bfloat16, 64, need_lse=n) for n in (True, False)}
    assert picks == {"torch_cuda", "sdpa"}
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()
    assert "torch's kernels" in caplog.records[0].getMessage()
    # ... and --use-flash-attn stays an error, naming why
    with pytest.raises(ConfigError, match=f"flash-attn is not installed or cannot be used.*{reason}"):
        C.parse(["--use-flash-attn", "--bf16"])
    with pytest.raises(RuntimeError, match=reason):
        attention.get_backend("flash_attn", "cuda", torch.bfloat16, 64)


@pytest.mark.parametrize("head_dim", [12, 264])
def test_use_flash_attn_refuses_head_dims_it_cannot_run(monkeypatch, head_dim):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    argv = ["--use-flash-attn", "--bf16", "--kv-channels", str(head_dim)]
    with pytest.raises(ConfigError, match=f"multiple of 8 and <= 256 \\(got {head_dim}\\)"):
        C.parse(argv)
    with pytest.raises(ValueError, match=f"got {head_dim}"):
        attention.get_backend("flash_attn", "cuda", torch.bfloat16, head_dim)
    assert C.parse(["--use-flash-attn", "--bf16", "--kv-channels", "256"]).model.use_flash_attn
