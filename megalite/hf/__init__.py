"""Hugging Face interop: import Llama / Mistral / Qwen2 checkpoints, export to transformers.

- ``mapping``: model configs and tensor names in both directions, refusing anything that has no
  exact equivalent;
- ``ckpt_io``: megalite checkpoints (model only) written and read in one process, no process group;
- ``import_hf`` / ``export_hf``: the ``megalite-import-hf`` / ``megalite-export-hf`` commands.

Needs ``safetensors`` (import and export) and ``transformers`` (export): ``pip install megalite[hf]``.
"""
