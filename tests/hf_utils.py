"""Tiny random transformers checkpoints, built offline, for the Hugging Face interop tests."""

import torch
from safetensors.torch import load_file

# Shapes match pretrain_utils.TINY (2 layers, hidden 64, 4 heads), so pretrain.py runs can load them.
BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def hf_config(arch: str, vocab: int = 203, **kw):
    import transformers

    if arch == "mistral":
        kw.setdefault("sliding_window", None)
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[arch]
    return getattr(transformers, cls)(**{**BASE, "vocab_size": vocab, **kw})


def make_hf(path, arch: str, seed: int = 0, vocab: int = 203, **kw):
    """Save a tiny random ``arch`` model with O(1)-scale weights to ``path``; returns it (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, vocab, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[1] ** -0.5)
            else:  # norm gains around 1, biases around 0
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.save_pretrained(path)
    return model


def safetensors_dir(path):
    """Every tensor of a saved transformers directory (one file or shards)."""
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
