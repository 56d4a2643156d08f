"""Configuration checks that need no world size, run by ``config.parse`` before any collective.

Each raises ConfigError naming the flag to fix. Checks that need the world size or the device
live in ``ParallelDims.build`` and ``parallelize.validate_layout``.
"""

from __future__ import annotations

from .config import Config, ConfigError, ModelConfig, ParallelConfig


def validate(cfg: Config) -> None:
    """Checks that need no world size. Raises ConfigError naming the flag to fix."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.group_query_attention:
        if m.num_query_groups is None:
            raise ConfigError("--group-query-attention needs --num-query-groups")
    elif m.num_query_groups not in (None, m.num_attention_heads):
        raise ConfigError("--num-query-groups given without --group-query-attention; add the flag")
    groups = m.num_kv_heads
    if m.num_attention_heads % groups:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups {groups}"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
            f"{m.num_attention_heads}; set --kv-channels"
        )
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if m.use_flash_attn:
        if not t.bf16:
            raise ConfigError("--use-flash-attn needs --bf16: flash-attn kernels run in fp16/bf16 only")
        from .ops import attention  # imported here: torch is not needed to parse flags

        if not attention.flash_attn_available():
            raise ConfigError(
                f"--use-flash-attn given but flash-attn is not installed or cannot be used "
                f"({attention.flash_attn_problem()}); pip install flash-attn 2.5-2.8 built for this torch, "
                "or drop the flag to use torch kernels"
            )
        if not attention.fused_head_dim_ok(m.head_dim):
            raise ConfigError(
                f"--use-flash-attn needs a head dim that is a multiple of 8 and <= 256 (got {m.head_dim}); "
                "change --kv-channels (or --hidden-size / --num-attention-heads), or drop the flag"
            )
    tp = p.tensor_parallel_size
    for name, val in [
        ("--tensor-parallel-size", tp),
        ("--context-parallel-size", p.context_parallel_size),
        ("--micro-batch-size", t.micro_batch_size),
        ("--train-iters", t.train_iters),
        ("--num-layers", m.num_layers),
        ("--seq-length", m.seq_length),
    ]:
        if val < 1:
            raise ConfigError(f"{name} must be >= 1 (got {val})")
    if m.position_embedding_type == "rope" and m.head_dim % 2:
        raise ConfigError(
            f"RoPE rotates pairs of channels: head dim {m.head_dim} must be even "
            "(set --kv-channels or --hidden-size / --num-attention-heads accordingly)"
        )
    if cfg.logging.log_interval < 1:
        raise ConfigError(f"--log-interval must be >= 1 (got {cfg.logging.log_interval})")
    if t.max_skipped_steps < 0:
        raise ConfigError(f"--max-skipped-steps must be >= 0, 0 meaning never stop (got {t.max_skipped_steps})")
    if t.global_batch_size is not None and t.global_batch_size < 1:
        raise ConfigError(f"--global-batch-size must be >= 1 (got {t.global_batch_size})")
    if t.lr_warmup_iters > t.train_iters and t.train_iters > 0:
        raise ConfigError(f"--lr-warmup-iters {t.lr_warmup_iters} exceeds --train-iters {t.train_iters}")
    if t.lr_decay_iters is not None and t.lr_decay_iters < 1:
        raise ConfigError(f"--lr-decay-iters must be >= 1 (got {t.lr_decay_iters})")
    horizon = t.lr_decay_iters or t.train_iters
    if t.lr_decay_style != "constant" and t.lr_warmup_iters and horizon <= t.lr_warmup_iters:
        # The decay runs from the end of warmup to the horizon; an empty span is a mistake (Megatron refuses it too).
        given = (
            f"--lr-decay-iters {horizon}"
            if t.lr_decay_iters
            else f"--train-iters {horizon} (the default --lr-decay-iters)"
        )
        raise ConfigError(
            f"{given} must exceed --lr-warmup-iters {t.lr_warmup_iters}: the {t.lr_decay_style} decay "
            "runs between them; raise it, shorten the warmup, or use --lr-decay-style constant"
        )
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save:
        raise ConfigError("--save-interval given without --save DIR")
    from .data.blend import check_data_flags  # numpy only

    problem = check_data_flags(cfg)
    if problem:
        raise ConfigError(problem)
    ck = cfg.checkpoint
    chosen = {"--finetune": ck.finetune, "--no-load-optim": not ck.load_optim, "--no-load-rng": not ck.load_rng}
    given = [flag for flag, on in chosen.items() if on]
    if given and not ck.load:
        raise ConfigError(f"{', '.join(given)} given without --load DIR (they choose what --load restores)")
    if t.eval_sample_prompt and p.sequence_parallel and p.tensor_parallel_size > 1:
        raise ConfigError(
            "--eval-sample-prompt does not run under --sequence-parallel (one new token cannot be split over "
            "the TP ranks); drop one of them"
        )
    from .rope import validate_rope  # its own module: RoPE variants are a unit

    validate_rope(m)
    from .parallel.sharding import validate_sharding

    validate_sharding(p)
    validate_memory(m)
    validate_hierarchical_cp(p)


def validate_memory(m: ModelConfig) -> None:
    """Long-context memory flags (the device check for --cpu-offloading is in validate_layout)."""
    for flag, val in [("--loss-chunk-size", m.loss_chunk_size), ("--mlp-tile-size", m.mlp_tile_size)]:
        if val < 0:
            raise ConfigError(f"{flag} must be >= 0, 0 meaning off (got {val})")
    n = m.cpu_offloading_num_layers
    if not m.cpu_offloading:
        if n is not None:
            raise ConfigError("--cpu-offloading-num-layers given without --cpu-offloading; add the flag")
        return
    if m.recompute_granularity != "full":
        raise ConfigError(
            "--cpu-offloading moves the inputs that full activation recompute keeps per layer to host "
            "memory: add --recompute-granularity full"
        )
    if n is not None and not 1 <= n <= m.num_layers:
        raise ConfigError(f"--cpu-offloading-num-layers must be between 1 and --num-layers {m.num_layers} (got {n})")


def validate_hierarchical_cp(p: ParallelConfig) -> None:
    """--cp-comm-type a2a+p2p and --hierarchical-context-parallel-sizes go together, and A x P = CP."""
    sizes, flag = p.hierarchical_context_parallel_sizes, "--hierarchical-context-parallel-sizes"
    if p.cp_comm_type != "a2a+p2p":
        if sizes is not None:
            raise ConfigError(f"{flag} given with --cp-comm-type {p.cp_comm_type}; add --cp-comm-type a2a+p2p")
        return
    if sizes is None:
        raise ConfigError(
            f"--cp-comm-type a2a+p2p needs {flag} A P (all-to-all group size, ring size; "
            f"A x P = --context-parallel-size {p.context_parallel_size})"
        )
    a, q = sizes
    if a < 1 or q < 1 or a * q != p.context_parallel_size:
        raise ConfigError(
            f"{flag} {a} {q}: A x P = {a * q} must equal --context-parallel-size {p.context_parallel_size} "
            "(both >= 1); A ranks share an all-to-all (one node), P groups form the ring"
        )
