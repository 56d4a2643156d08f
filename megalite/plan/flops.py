"""FLOPs of a megalite training step, counted the way the MFU line counts them.

Model FLOPs are the matmuls of forward and backward (2 per multiply-add forward, twice that
backward): the linear layers (GQA: the q, k and v projections have their own widths), the output
layer, and attention's score and context products over the pairs (query, key) the mask allows:
the causal triangle (s^2 / 2), or under ``--reset-attention-mask`` only the pairs inside one
document (s * mean_document_length / 2 for documents of equal mean length). ``full_square``
counts s^2 instead: the Megatron-LM / PaLM convention published TFLOP/s figures use.

Executed FLOPs, what the hardware runs, add recomputation (a second forward of each layer under
full recompute, of attention under selective) and the flash backward's recomputed scores
(attention backward runs 5 products against the forward's 2, not 4).
"""

from __future__ import annotations

from ..config import ModelConfig, padded_vocab_size


def layer_weights(m: ModelConfig) -> int:
    """Weights of one layer that multiply activations (q/k/v, output projection, MLP)."""
    d, n, g, h = m.head_dim, m.num_attention_heads, m.num_kv_heads, m.hidden_size
    mlp = (3 if m.swiglu else 2) * h * m.ffn_size
    return h * (n + 2 * g) * d + n * d * h + mlp


def output_weights(m: ModelConfig, vocab: int, tp: int = 1) -> int:
    return padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp) * m.hidden_size


def attention_pairs(seq: int, doc_length: float | None = None, full_square: bool = False) -> float:
    """(query, key) pairs one sequence's attention computes."""
    if full_square:
        return float(seq) * seq
    span = seq if doc_length is None else min(float(doc_length), seq)
    return seq * span / 2


def attention_flops(m: ModelConfig, seq: int, doc_length=None, full_square=False) -> float:
    """Forward FLOPs of one layer's attention products for one sequence: 2 products of
    2 * pairs * heads * head_dim."""
    return 4.0 * attention_pairs(seq, doc_length, full_square) * m.num_attention_heads * m.head_dim


def forward_flops(m: ModelConfig, vocab: int, seq: int, doc_length=None, full_square=False, tp: int = 1) -> float:
    """Model forward FLOPs of one sequence (every layer, and the output layer)."""
    per_layer = 2.0 * seq * layer_weights(m) + attention_flops(m, seq, doc_length, full_square)
    return m.num_layers * per_layer + 2.0 * seq * output_weights(m, vocab, tp)


def step_model_flops(m: ModelConfig, vocab: int, seq: int, sequences: int, doc_length=None, full_square=False):
    """Model FLOPs of a training step of ``sequences`` sequences: 3 x forward (backward = 2 x)."""
    return 3.0 * sequences * forward_flops(m, vocab, seq, doc_length, full_square)
