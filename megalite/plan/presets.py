"""Model presets as pretrain.py flags (explicit flags given after them win)."""

from __future__ import annotations

_LLAMA3 = [
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--rotary-base", "500000",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
    "--num-query-groups", "8", "--vocab-size", "128256", "--bf16",
]  # fmt: skip

MODELS = {
    "llama3-8b": [
        "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
        "--num-attention-heads", "32", "--seq-length", "8192", *_LLAMA3,
    ],
    "llama3-70b": [
        "--num-layers", "80", "--hidden-size", "8192", "--ffn-hidden-size", "28672",
        "--num-attention-heads", "64", "--seq-length", "8192", *_LLAMA3,
    ],
    "gpt3-175b": [
        "--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
        "--position-embedding-type", "learned_absolute", "--vocab-size", "51200", "--bf16",
    ],
}  # fmt: skip
