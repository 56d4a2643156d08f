"""Pretrain a GPT/Llama-style model.

    torchrun --nproc-per-node 4 pretrain.py --tensor-parallel-size 2 --context-parallel-size 2

With no flags it trains a small model on the embedded default corpus. See README.md.
"""

from megalite.training.main import cli

if __name__ == "__main__":
    cli()
