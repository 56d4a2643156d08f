"""Hugging Face interop: import Llama / Mistral / Qwen2 checkpoints, export to transformers.

- ``mapping``: model configs and tensor names in both directions, refusing anything that has no
  exact equivalent;
- ``ckpt_io``: megalite checkpoints (model only) written and read in one process, no process group;
- ``import_hf`` / ``export_hf``: the ``megalite-import-hf`` / ``megalite-export-hf`` commands.

Needs ``safetensors`` (import and export) and ``transformers`` (export): ``pip install megalite[hf]``.
"""


def run_cli(prog: str, call) -> int:
    """Exit status of a command: 0, or 2 after printing a configuration/input error (no traceback)."""
    import sys

    from ..config import ConfigError

    try:
        call()
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def require(*modules: str) -> None:
    """A ConfigError naming the extra to install when an optional dependency is missing."""
    import importlib.util

    from ..config import ConfigError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install 'megalite[hf]'")
