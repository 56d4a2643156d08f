"""What the planner is asked about (a Job) and what it chooses (a Layout)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

SHARDING = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclass(frozen=True)
class Job:
    """A model, a batch and the options that change memory or time, independent of the layout.

    ``precision``: "fp32"; "bf16-autocast" (fp32 parameters under bf16 autocast: megalite's
    --bf16 before bf16 parameters); "bf16" (bf16 compute parameters, fp32 master weights and
    gradients, Megatron's mixed precision). ``sharding`` is Megatron's strategy names; with
    ``fsdp`` it means what megalite's FSDP2 path does with them (see memory.state_bytes_per_param).
    ``megatron``: model Megatron-LM's kernels instead of
    megalite's (fused residual/norm, activation memory of Korthikanti et al.), for published runs."""

    model: ModelConfig
    vocab_size: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int = 1
    precision: str = "bf16"
    recompute: str | None = None  # None, "selective" or "full"
    sharding: str = "no_shard"
    doc_length: float | None = None  # mean document length under --reset-attention-mask
    loss_chunk: int | None = None  # fused output layer + loss, tokens per chunk (None: plain)
    mlp_tile: int = 0  # tokens per MLP tile (sequence-tiled MLP, intermediates recomputed), 0: off
    offload_layers: int = 0  # layers whose full-recompute inputs live in host memory (CUDA)
    hier_a2a: int = 0  # a2a+p2p: all-to-all group size A (the ring spans CP / A groups)
    fsdp: bool = False  # FSDP2 data parallel (megalite's sharded path); False: DDP, or Megatron's optimizer
    overlap_grad_reduce: bool = True
    megatron: bool = False
    flash_attention: bool = True  # False: scores materialised (Megatron before flash attention)
    tp_overlap: bool = False  # Megatron's --tp-comm-overlap (published runs); megalite's TP is in line

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def param_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    sp: bool = False
    cp_comm: str = "p2p"

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def micro_batches(self, job: Job) -> int:
        return job.global_batch_size // (job.micro_batch_size * self.dp)
