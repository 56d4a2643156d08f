"""A decoder-only GPT/Llama-style transformer in plain PyTorch.

Layout: activations between blocks are [seq, batch, hidden] (Megatron's), so sequence-parallel
scatter/gather works on the contiguous first dim. The attention core sees
(batch, seq, heads, head_dim).

Parallelism never appears here; megalite.parallel applies it from outside, through these seams
and no others (each replacement keeps the call signature of what it replaces):

- ``embedding.word``, ``embedding.position``: modules mapping ids [s, b] to [s, b, h] (or this
  rank's sequence shard of it);
- each block's ``attention.qkv``, ``attention.proj``, ``mlp.fc1``, ``mlp.gate``, ``mlp.fc2`` and
  ``output_layer``: linear-like modules, which may hold only part of the output (or input)
  features; a forward pre-hook may be registered on ``mlp``. Attention reads its local head
  count from the qkv output (viewed with -1), so sharding whole query groups needs no edit;
- each block's ``attention.core_attention``: any module (q, k, v, document_ids=None) -> (b, s, h, d),
  q/k/v (b, s, heads, d), document_ids None or (b, s) in the same layout as the tokens;
- ``loss_fn(logits [s, b, V_local], labels [s, b]) -> [s, b]``;
- ``fused_loss_fn(hidden [s, b, h], weight, labels [s, b], loss_mask [s, b], chunk_size, *,
  vocab_start, vocab_size) -> masked loss sum`` (megalite.ops.fused_loss's signature): the output
  layer and loss tiled over tokens, used when a loss mask is given and --loss-chunk-size > 0;
- ``mlp.fc2.finish(y)``: what fc2 does after its matmul (bias add; under TP also the reduction),
  so a sequence-tiled MLP runs the matmul per tile and finishes once;
- ``offloader``: None, or a megalite.ops.offload.Offloader moving recomputed layers' inputs to
  host memory;
- ``vocab_start``: the global vocabulary id of this rank's first logit column (0 unless the
  output layer is split over the vocabulary);
- ``pad_vocab_to(multiple)``, called before sharding the vocabulary;
- parameter attributes: parallel code may tag parameters (``tp_split_dim``,
  ``sequence_parallel``) and register gradient hooks on them.

``VOCAB_PARAMETERS`` names the parameters whose dim 0 is the padded vocabulary: init draws only
their real rows and checkpoints store only those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, padded_vocab_size
from .ops.attention import causal_attention
from .ops.fused_loss import fused_linear_cross_entropy
from .ops.norm import build_norm
from .ops.offload import CudaMover, Offloader, offloaded_checkpoint, offloaded_layers
from .rope import inv_frequencies, plain_inv_frequencies


def rope_tables(position_ids, dim: int, base: float, inv_freq=None):
    """cos/sin of shape (b, s, 1, dim) for rotate-half RoPE, computed in fp32. ``inv_freq`` [dim/2]
    replaces the plain frequencies of ``base`` (context-extension scaling, megalite.rope)."""
    if inv_freq is None:
        inv_freq = plain_inv_frequencies(dim, base, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (b, s, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (b, s, heads, d); rotate-half convention (GPT-NeoX / Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CoreAttention(nn.Module):
    """Causal softmax attention over the local sequence: (b, s, h, d) -> (b, s, h, d), within each
    document when ``document_ids`` (b, s) is given. The kernel is chosen by
    megalite.ops.attention.choose_backend (--use-flash-attn forces flash-attn)."""

    def __init__(self, dropout: float = 0.0, use_flash_attn: bool = False):
        super().__init__()
        self.dropout, self.use_flash_attn = dropout, use_flash_attn

    def forward(self, q, k, v, document_ids=None):
        p = self.dropout if self.training else 0.0
        return causal_attention(q, k, v, dropout_p=p, require_flash_attn=self.use_flash_attn, document_ids=document_ids)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        heads, groups = cfg.num_attention_heads, cfg.num_kv_heads
        self.heads_per_group, self.head_dim = heads // groups, cfg.head_dim
        self.selective_recompute = cfg.recompute_granularity == "selective"
        # Rows grouped per query group: [q heads of g0, k0, v0 | q heads of g1, k1, v1 | ...],
        # so a contiguous row block (one TP rank's) holds whole groups.
        qkv_out = (heads + 2 * groups) * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.add_bias_linear or cfg.add_qkv_bias)
        self.proj = nn.Linear(heads * self.head_dim, cfg.hidden_size, bias=cfg.add_bias_linear)
        self.core_attention = CoreAttention(cfg.attention_dropout, cfg.use_flash_attn)

    def forward(self, x, rope, document_ids=None):
        qkv = self.qkv(x)  # [s, b, groups * (per_group + 2) * d]; s is the full local sequence under SP
        s, b = qkv.shape[:2]
        per_group, d = self.heads_per_group, self.head_dim
        # One cheap copy to batch-major memory: attention kernels stream along the sequence, and a
        # [s, b]-major stride makes them markedly slower. split (not slicing) keeps the backward one cat.
        # -1 = the query groups this module holds: all of them, or a TP rank's share.
        qkv = qkv.transpose(0, 1).contiguous().view(b, s, -1, per_group + 2, d)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(b, s, -1, d)  # (b, s, heads, d)
        k, v = k.squeeze(3), v.squeeze(3)  # (b, s, groups, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.selective_recompute and self.training:
            out = checkpoint(self.core_attention, q, k, v.contiguous(), document_ids, use_reentrant=False)
        else:
            out = self.core_attention(q, k, v.contiguous(), document_ids)
        out = out.transpose(0, 1).reshape(s, b, -1)  # back to [s, b, heads * d]
        return self.proj(out)


class FinishedLinear(nn.Linear):
    """nn.Linear with its output step on its own: forward(x) = finish(x @ W^T) up to rounding. A
    sequence-tiled MLP runs the matmul tile by tile and ``finish`` (here the bias add, in the
    matmul's dtype as autocast would) once on the joined tiles."""

    def finish(self, y):
        return y if self.bias is None else y + self.bias.to(y.dtype)


class MLP(nn.Module):
    """With ``tile_size`` (--mlp-tile-size) the sequence is cut into tiles of that many tokens;
    each tile's intermediates ([tile, b, ffn] x 3-4) are dropped after its fc2 matmul and
    recomputed in backward, so only the input stays saved."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ffn, bias = cfg.ffn_size, cfg.add_bias_linear
        self.fc1 = nn.Linear(cfg.hidden_size, ffn, bias=bias)
        self.gate = nn.Linear(cfg.hidden_size, ffn, bias=bias) if cfg.swiglu else None
        self.fc2 = FinishedLinear(ffn, cfg.hidden_size, bias=bias)
        self.tile_size = cfg.mlp_tile_size

    def _activation(self, x):
        if self.gate is not None:
            return F.silu(self.gate(x)) * self.fc1(x)
        return F.gelu(self.fc1(x), approximate="tanh")

    def _unfinished(self, x):  # one tile: [t, b, h] -> fc2's matmul, before its bias / reduction
        return F.linear(self._activation(x), self.fc2.weight)

    def forward(self, x):
        if not self.tile_size or x.shape[0] <= self.tile_size:
            return self.fc2(self._activation(x))
        if torch.is_grad_enabled():
            tiles = [
                checkpoint(self._unfinished, t, use_reentrant=False, preserve_rng_state=False)
                for t in x.split(self.tile_size)
            ]
        else:
            tiles = [self._unfinished(t) for t in x.split(self.tile_size)]
        return self.fc2.finish(torch.cat(tiles))  # [s, b, h]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, cfg.norm_impl)
        self.attention = Attention(cfg)
        self.pre_mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, cfg.norm_impl)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, rope, document_ids=None):
        attn = self.dropout(self.attention(self.input_norm(x), rope, document_ids))
        normed, x = self.pre_mlp_norm(attn, residual=x)  # fused residual add when the kernel has one
        return x + self.dropout(self.mlp(normed))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.word = nn.Embedding(vocab, cfg.hidden_size)
        self.position = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position = nn.Embedding(cfg.max_position_embeddings or cfg.seq_length, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens, position_ids):
        x = self.word(tokens.t())  # [s, b, h]
        if self.position is not None:
            x = x + self.position(position_ids.t())
        return self.dropout(x)


def vocab_cross_entropy(logits, labels):
    """Per-token loss [s, b] in fp32 from logits [s, b, V]; label -100 gives 0."""
    s, b, v = logits.shape
    return F.cross_entropy(logits.float().view(-1, v), labels.reshape(-1), reduction="none").view(s, b)


class GPT(nn.Module):
    VOCAB_PARAMETERS = ("embedding.word.weight", "output_layer.weight")  # dim 0 = padded vocabulary

    def __init__(self, cfg: ModelConfig, vocab_size: int, seed: int = 1234):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, 1)
        self.full_recompute = cfg.recompute_granularity == "full"
        self.embedding = Embeddings(cfg, self.padded_vocab_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, cfg.norm_impl)
        self.output_layer = nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False)
        if not cfg.untie_embeddings_and_output_weights:
            self.output_layer.weight = self.embedding.word.weight
        self.loss_fn = vocab_cross_entropy
        self.fused_loss_fn = fused_linear_cross_entropy
        self.loss_chunk_size = cfg.loss_chunk_size
        self.vocab_start = 0
        self.offloader = Offloader(offloaded_layers(cfg), CudaMover()) if cfg.cpu_offloading else None
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int):
        """Same seed -> same full-size weights on every rank, whatever the parallel layout."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_method_std
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)  # residual-branch outputs, as in GPT-2/Megatron
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = out_std if name.endswith(("proj.weight", "fc2.weight")) else std
                rows = self.vocab_size if name in self.VOCAB_PARAMETERS else p.shape[0]
                p.zero_()  # padded vocabulary rows stay zero, so any padding draws the same weights
                p[:rows] = torch.randn((rows, *p.shape[1:]), generator=gen) * scale

    def pad_vocab_to(self, multiple_of_tp: int):
        """Re-pad the vocabulary for TP (called by parallelize before sharding); keeps real rows."""
        new = padded_vocab_size(self.vocab_size, self.cfg.make_vocab_size_divisible_by, multiple_of_tp)
        if new == self.padded_vocab_size:
            return
        old = self.embedding.word.weight
        like = {"dtype": old.dtype, "device": old.device}
        self.embedding.word = nn.Embedding(new, old.shape[1], **like)
        with torch.no_grad():
            self.embedding.word.weight.zero_()
            self.embedding.word.weight[: old.shape[0]] = old
            out = self.output_layer.weight
            self.output_layer = nn.Linear(old.shape[1], new, bias=False, **like)
            if self.cfg.untie_embeddings_and_output_weights:
                self.output_layer.weight.zero_()
                self.output_layer.weight[: out.shape[0]] = out
            else:
                self.output_layer.weight = self.embedding.word.weight
        self.padded_vocab_size = new

    def _mask_padding(self, logits):
        """Padded vocabulary columns are never predicted."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        cols = torch.arange(self.vocab_start, self.vocab_start + logits.shape[-1], device=logits.device)
        return logits.masked_fill(cols >= self.vocab_size, float("-inf"))

    def forward(self, tokens, position_ids, labels=None, document_ids=None, loss_mask=None):
        """tokens, position_ids, labels, loss_mask: [b, s]. Returns with labels and loss_mask the
        masked loss sum sum(loss * loss_mask) (fp32 scalar; the tiled output layer + loss when
        loss_chunk_size > 0), with labels only the per-token loss [b, s] (fp32), else logits
        [b, s, V_local]: under TP this rank's vocabulary shard, from column vocab_start.
        document_ids: None (one causal sequence), or [b, s] integers in the layout of ``tokens``,
        non-decreasing along the full sequence: a token attends only within its document."""
        x = self.embedding(tokens, position_ids)
        rope = None  # cos/sin tables, computed once per forward and shared by all layers
        if self.cfg.position_embedding_type == "rope":
            inv_freq = inv_frequencies(self.cfg, position_ids.device)
            rope = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rotary_base, inv_freq)
        for i, layer in enumerate(self.layers):
            if self.full_recompute and self.training and self.offloader and i in self.offloader.layers:
                x = offloaded_checkpoint(layer, x, rope, document_ids, self.offloader, i)
            elif self.full_recompute and self.training:
                x = checkpoint(layer, x, rope, document_ids, use_reentrant=False)
            else:
                x = layer(x, rope, document_ids)
        if labels is not None and loss_mask is not None and self.loss_chunk_size:
            return self.fused_loss_fn(
                self.final_norm(x),
                self.output_layer.weight,
                labels.t(),
                loss_mask.t(),
                self.loss_chunk_size,
                vocab_start=self.vocab_start,
                vocab_size=self.vocab_size,
            )
        # the norm's output is a temporary: under autocast the output layer keeps only its bf16 cast
        logits = self._mask_padding(self.output_layer(self.final_norm(x)))  # [s, b, V_local]
        if labels is None:
            return logits.transpose(0, 1)
        loss = self.loss_fn(logits, labels.t()).t()
        return loss if loss_mask is None else (loss * loss_mask).sum()

    def num_params(self, matmul_only: bool = False) -> int:
        """Parameter count, a tied embedding/output matrix once. ``matmul_only``: just the weights
        that multiply activations (every linear layer, the output layer included), the count
        behind the FLOPs of a token; it leaves out lookup tables (positions, and the input embedding
        when untied), norm gains and biases. Count before parallelize: under TP the layers hold shards."""
        params = [m.weight for m in self.modules() if isinstance(m, nn.Linear)] if matmul_only else self.parameters()
        return sum(p.numel() for p in params)
