"""Single-rank training-step throughput: megalite GPT vs transformers' LlamaForCausalLM.

Same shape for both (Llama style: RMSNorm, SwiGLU, RoPE, no biases, untied output), fp32 on CPU,
2 threads, AdamW step included; measured side by side in one process, interleaved so machine
noise hits both alike. Writes benchmarks/results/vs_hf.json.

    python benchmarks/bench_vs_hf.py [--steps 6] [--hidden 256 --layers 4 --heads 4 --vocab 1000 --batch 4 --seq 512]

The ratio moves by several percent between runs on a shared machine: run it a few times on a
quiet one before comparing. Results and what bounds them: benchmarks/results/vs_hf.json and
the README's benchmark table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from megalite.config import ModelConfig
from megalite.model import GPT


def megalite_model(a):
    cfg = ModelConfig(
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        ffn_hidden_size=a.ffn,
        seq_length=a.seq,
        swiglu=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=8,
        norm_epsilon=1e-6,
    )
    model = GPT(cfg, a.vocab)
    return model, lambda x, pos, y: model(x, pos, y).mean()


def hf_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    return model, lambda x, pos, y: model(input_ids=x, labels=x).loss  # shifts labels internally


def step_fn(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, pos, y):
        loss = loss_fn(x, pos, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main():
    p = argparse.ArgumentParser()
    for name, val in [
        ("hidden", 256),
        ("layers", 4),
        ("heads", 4),
        ("vocab", 1000),
        ("batch", 4),
        ("seq", 512),
        ("steps", 6),
        ("warmup", 2),
        ("threads", 2),
    ]:
        p.add_argument(f"--{name}", type=int, default=val)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vs_hf.json"))
    a = p.parse_args()
    a.ffn = 4 * a.hidden
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    runs = {"megalite": step_fn(*megalite_model(a)), "transformers": step_fn(*hf_model(a))}
    times = {k: [] for k in runs}
    for i in range(a.warmup + a.steps):
        for name, step in runs.items():
            t0 = time.perf_counter()
            step(x, pos, y)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens_per_step = a.batch * a.seq
    result = {
        "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "vocab", "batch", "seq", "ffn")},
        "dtype": "float32",
        "threads": a.threads,
        "torch": torch.__version__,
        "machine": platform.processor(),
        "steps": a.steps,
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_step_s": med, "tokens_per_sec": tokens_per_step / med}
    import transformers

    result["transformers_version"] = transformers.__version__
    result["speedup"] = result["megalite"]["tokens_per_sec"] / result["transformers"]["tokens_per_sec"]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    for name in runs:
        r = result[name]
        print(f"{name:>12}: {r['tokens_per_sec']:8.0f} tokens/s  (median step {r['median_step_s'] * 1e3:.0f} ms)")
    print(f"speedup megalite / transformers: {result['speedup']:.2f}x  -> {a.out}")


if __name__ == "__main__":
    main()
