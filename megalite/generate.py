"""``megalite-generate --load CKPT_DIR --prompt TEXT``: sample from a checkpoint in one process.

A KV cache through the model's own seam: each block's ``attention.core_attention`` is swapped
for ``CachedAttention``, which appends the new keys and values to its cache and attends the new
queries to everything cached. The prompt runs once (causal over itself); each new token then
costs one position. Position ids continue from the prompt, so RoPE and its scaling see true
positions. Sampling: temperature (0 = greedy), then top-k, then top-p (nucleus).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ConfigError


class CachedAttention(nn.Module):
    """(b, s_new, h, d) queries against all cached + new keys/values (b, t, kv_heads, d)."""

    def __init__(self):
        super().__init__()
        self.k = self.v = None

    def forward(self, q, k, v, document_ids=None):  # the seam's signature; generate() never passes ids
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        s, t = q.shape[1], self.k.shape[1]
        # The new queries are the last s of t positions: query i sees keys up to t - s + i.
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s) if s > 1 else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
        return out.transpose(1, 2)


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits [b, V] -> next ids [b]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=1234,
    eos_id=None,
    vocab_limit=None,
    gather=None,
) -> list[int]:
    """New token ids after ``prompt`` (stops early at ``eos_id``). ``model``: a GPT, single-device or
    tensor-parallel without SP (then every TP rank calls this and ``gather`` joins the vocabulary
    shards of the logits). ``vocab_limit``: never emit ids from it on (a model's vocabulary may
    outsize its tokenizer's)."""
    if not prompt:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    device = next(model.parameters()).device
    originals = [layer.attention.core_attention for layer in model.layers]
    for layer in model.layers:
        layer.attention.core_attention = CachedAttention()
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens, out = torch.tensor([prompt], device=device), []
    try:
        for _ in range(max_new_tokens):
            start = len(prompt) + len(out) - tokens.shape[1]
            pos = torch.arange(start, start + tokens.shape[1], device=device)[None]
            logits = model(tokens, pos)[:, -1]
            logits = (gather(logits) if gather else logits)[:, :vocab_limit]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            out.append(int(nxt))
            if eos_id is not None and out[-1] == eos_id:
                break
            tokens = nxt[:, None]
    finally:
        for layer, attn in zip(model.layers, originals):
            layer.attention.core_attention = attn
        model.train(was_training)
    return out


def eval_sample(model, tokenizer, prompt: str, dims, bf16: bool, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` by the training model (FSDP2 wraps it in place), called by every
    rank. CP ranks hold whole layers, so each decodes alone (the cache replaces the CP attention);
    TP ranks decode together, joining the logits' vocabulary shards."""

    def gather(x):  # [b, V / tp] on each TP rank -> [b, V]
        parts = [torch.empty_like(x) for _ in range(dims.tp)]
        dist.all_gather(parts, x.contiguous(), group=dims.tp_group)
        return torch.cat(parts, dim=-1)

    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        ids = generate(
            model,
            tokenizer.encode(prompt),
            max_new_tokens,
            eos_id=tokenizer.eod,
            vocab_limit=tokenizer.vocab_size,
            gather=gather if dims.tp > 1 else None,
        )
    return tokenizer.decode(ids)


def main(argv=None) -> int:
    from .data.tokenizer import Tokenizer
    from .hf.ckpt_io import find_checkpoint, load_gpt

    p = argparse.ArgumentParser("megalite-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (or one iter_* in it)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer-model", help="sentencepiece .model (default: tokenizer.model in --load)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the model in bf16")
    a = p.parse_args(argv)
    try:
        tok_path = a.tokenizer_model or os.path.join(a.load, "tokenizer.model")
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
        if tokenizer is None:
            raise ConfigError(f"no tokenizer: {tok_path} does not exist; pass --tokenizer-model")
        model, _ = load_gpt(find_checkpoint(a.load), a.device)
        if a.bf16:
            model.to(torch.bfloat16)
        t0 = time.perf_counter()
        ids = generate(
            model,
            tokenizer.encode(a.prompt),
            a.max_new_tokens,
            a.temperature,
            a.top_k,
            a.top_p,
            a.seed,
            tokenizer.eod,
            tokenizer.vocab_size,
        )
        dt = time.perf_counter() - t0
    except (ConfigError, FileNotFoundError) as exc:
        print(f"megalite-generate: error: {exc}", file=sys.stderr)
        return 2
    print(a.prompt + tokenizer.decode(ids))
    print(f"megalite-generate: {len(ids)} tokens in {dt:.2f} s, {len(ids) / dt:.1f} tokens/s", file=sys.stderr)
    print("ids:", ids, file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
