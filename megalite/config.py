"""Command-line configuration with Megatron-LM flag names, parsed into nested dataclasses.

Each dataclass field carries its flag in ``metadata``; the parser is generated from the
fields, so a flag is declared exactly once. Every boolean takes ``--flag`` and ``--no-flag``
(plus Megatron's spelling of the negative where it has one: ``--disable-bias-linear``).
``--config FILE`` (JSON or TOML) supplies defaults that explicit flags override; keys are flag
names with or without dashes, booleans are true/false.
``config_checks.validate`` (run by ``parse``) checks everything that does not need the world
size; ``ParallelDims.build`` checks the rest. Both run before any collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration a user must fix; the message says what and how."""


def _f(default, flag, help, **kw):
    return field(default=default, metadata={"flag": flag, "help": help, **kw})


@dataclass
class ModelConfig:
    num_layers: int = _f(4, "--num-layers", "transformer layers")
    hidden_size: int = _f(256, "--hidden-size", "model width")
    ffn_hidden_size: int | None = _f(None, "--ffn-hidden-size", "MLP width (default 4h, or 8h/3 rounded with --swiglu)")
    num_attention_heads: int = _f(4, "--num-attention-heads", "attention heads")
    group_query_attention: bool = _f(False, "--group-query-attention", "use GQA with --num-query-groups KV heads")
    num_query_groups: int | None = _f(None, "--num-query-groups", "KV heads under GQA")
    kv_channels: int | None = _f(None, "--kv-channels", "head dim (default hidden/heads)")
    seq_length: int = _f(256, "--seq-length", "training sequence length")
    max_position_embeddings: int | None = _f(
        None, "--max-position-embeddings", "learned position table size / RoPE limit (default seq length)"
    )
    normalization: str = _f("LayerNorm", "--normalization", "norm type", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5, "--norm-epsilon", "norm epsilon")
    norm_impl: str = _f(
        "auto",
        "--norm-impl",
        "norm kernel: auto = Triton on CUDA when importable, else torch",
        choices=["auto", "triton", "apex", "torch"],
    )
    swiglu: bool = _f(False, "--swiglu", "SwiGLU MLP instead of GELU")
    position_embedding_type: str = _f(
        "rope", "--position-embedding-type", "positions", choices=["rope", "learned_absolute"]
    )
    rotary_base: float = _f(10000.0, "--rotary-base", "RoPE base")
    untie_embeddings_and_output_weights: bool = _f(
        False, "--untie-embeddings-and-output-weights", "separate output layer"
    )
    add_bias_linear: bool = _f(True, "--add-bias-linear", "biases in linear layers", negative="--disable-bias-linear")
    add_qkv_bias: bool = _f(
        False, "--add-qkv-bias", "bias in the QKV projection even with --disable-bias-linear (Qwen2)"
    )
    use_rope_scaling: bool = _f(False, "--use-rope-scaling", "Llama 3.1 RoPE frequency scaling (context extension)")
    rope_scaling_factor: float = _f(8.0, "--rope-scaling-factor", "Llama 3.1 scaling: long-wavelength divisor")
    rope_scaling_low_freq_factor: float = _f(
        1.0, "--rope-scaling-low-freq-factor", "Llama 3.1 scaling: low_freq_factor"
    )
    rope_scaling_high_freq_factor: float = _f(
        4.0, "--rope-scaling-high-freq-factor", "Llama 3.1 scaling: high_freq_factor"
    )
    rope_scaling_original_max_position_embeddings: int = _f(
        8192, "--rope-scaling-original-max-position-embeddings", "Llama 3.1 scaling: the original context length"
    )
    rotary_seq_len_interpolation_factor: float | None = _f(
        None, "--rotary-seq-len-interpolation-factor", "linear RoPE position interpolation: positions / factor"
    )
    init_method_std: float = _f(0.02, "--init-method-std", "init std of weights")
    attention_dropout: float = _f(0.0, "--attention-dropout", "attention probability dropout")
    hidden_dropout: float = _f(0.0, "--hidden-dropout", "residual-branch dropout")
    vocab_size: int | None = _f(None, "--vocab-size", "vocabulary size (default: the tokenizer's)")
    make_vocab_size_divisible_by: int = _f(
        128, "--make-vocab-size-divisible-by", "pad vocab to a multiple of this x TP"
    )
    recompute_granularity: str | None = _f(
        None, "--recompute-granularity", "activation recompute", choices=["full", "selective"]
    )
    use_flash_attn: bool = _f(False, "--use-flash-attn", "require flash-attn (error when missing)")
    loss_chunk_size: int = _f(
        1024,
        "--loss-chunk-size",
        "tokens per chunk of the fused output layer + cross entropy (0 = plain path: all logits at once)",
    )
    mlp_tile_size: int = _f(
        0, "--mlp-tile-size", "tokens per MLP tile; each tile's intermediates are recomputed in backward (0 = off)"
    )
    cpu_offloading: bool = _f(
        False,
        "--cpu-offloading",
        "CUDA: keep the recompute inputs of --cpu-offloading-num-layers layers in pinned host memory "
        "(needs --recompute-granularity full)",
    )
    cpu_offloading_num_layers: int | None = _f(
        None, "--cpu-offloading-num-layers", "layers offloaded, counted from the first (default: all but the last)"
    )

    @property
    def num_kv_heads(self) -> int:
        """KV heads: --num-query-groups under GQA, else one per attention head."""
        return (
            self.num_query_groups if self.group_query_attention and self.num_query_groups else self.num_attention_heads
        )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """MLP width: --ffn-hidden-size, else 4h, or with SwiGLU 8h/3 rounded up to 64 (about the
        parameter count of the 4h GELU MLP, rounded like Llama)."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:
            return 64 * ((int(8 * self.hidden_size / 3) + 63) // 64)
        return 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = _f(1, "--tensor-parallel-size", "TP group size")
    context_parallel_size: int = _f(1, "--context-parallel-size", "CP group size")
    sequence_parallel: bool = _f(False, "--sequence-parallel", "Megatron sequence parallel (needs TP > 1)")
    cp_comm_type: str = _f(
        "p2p", "--cp-comm-type", "context-parallel attention", choices=["p2p", "all_gather", "a2a", "a2a+p2p"]
    )
    hierarchical_context_parallel_sizes: list[int] | None = _f(
        None,
        "--hierarchical-context-parallel-sizes",
        "A P for --cp-comm-type a2a+p2p: all-to-all inside groups of A consecutive CP ranks, ring over P groups",
        nargs=2,
    )
    distributed_backend: str | None = _f(
        None, "--distributed-backend", "default: nccl on CUDA, gloo on CPU", choices=["nccl", "gloo"]
    )
    distributed_timeout_minutes: float = _f(10.0, "--distributed-timeout-minutes", "bound on every collective")
    use_distributed_optimizer: bool = _f(
        False, "--use-distributed-optimizer", "shard optimizer state over DP x CP (sharding strategy at least optim)"
    )
    data_parallel_sharding_strategy: str | None = _f(
        None,
        "--data-parallel-sharding-strategy",
        "what FSDP2 shards over DP x CP (default no_shard, or optim with --use-distributed-optimizer)",
        choices=["no_shard", "optim", "optim_grads", "optim_grads_params"],
    )
    overlap_grad_reduce: bool = _f(False, "--overlap-grad-reduce", "reduce gradients per bucket during the backward")
    overlap_param_gather: bool = _f(
        False, "--overlap-param-gather", "gather the next bucket's parameters ahead of its forward"
    )
    ddp_bucket_size: int | None = _f(
        None, "--ddp-bucket-size", "parameters per overlapped bucket (whole layers; default one layer)"
    )
    accumulate_allreduce_grads_in_fp32: bool = _f(
        True, "--accumulate-allreduce-grads-in-fp32", "with --bf16, reduce and accumulate gradients in fp32"
    )


@dataclass
class TrainConfig:
    micro_batch_size: int = _f(4, "--micro-batch-size", "sequences per rank per micro step")
    global_batch_size: int | None = _f(None, "--global-batch-size", "sequences per step (default micro x DP)")
    train_iters: int = _f(20, "--train-iters", "optimizer steps")
    lr: float = _f(1e-3, "--lr", "peak learning rate")
    min_lr: float = _f(0.0, "--min-lr", "final learning rate")
    lr_decay_style: str = _f("cosine", "--lr-decay-style", "decay", choices=["cosine", "linear", "constant"])
    lr_warmup_iters: int = _f(0, "--lr-warmup-iters", "linear warmup steps")
    lr_decay_iters: int | None = _f(None, "--lr-decay-iters", "decay horizon (default train iters)")
    weight_decay: float = _f(0.01, "--weight-decay", "AdamW weight decay (not on norms/biases)")
    adam_beta1: float = _f(0.9, "--adam-beta1", "AdamW beta1")
    adam_beta2: float = _f(0.999, "--adam-beta2", "AdamW beta2")
    adam_eps: float = _f(1e-8, "--adam-eps", "AdamW eps")
    clip_grad: float = _f(1.0, "--clip-grad", "global grad-norm clip (0 = off)")
    max_skipped_steps: int = _f(
        5, "--max-skipped-steps", "stop after N consecutive steps skipped for a non-finite loss or gradient (0 = never)"
    )
    bf16: bool = _f(False, "--bf16", "bf16 compute parameters, fp32 master weights (FSDP2 mixed precision)")
    seed: int = _f(1234, "--seed", "seed for init, data order and dropout")
    eval_interval: int = _f(1000, "--eval-interval", "evaluate every N steps")
    eval_iters: int = _f(10, "--eval-iters", "global batches per evaluation")
    eval_sample_prompt: str | None = _f(
        None, "--eval-sample-prompt", "every --eval-interval, print a 32-token greedy continuation of this text"
    )
    exit_interval: int | None = _f(None, "--exit-interval", "stop after this iteration (saving with --save)")
    peak_tflops: float | None = _f(None, "--peak-tflops", "device peak for MFU (default: known GPUs)")
    device: str | None = _f(None, "--device", "cuda or cpu (default: cuda when available)")


@dataclass
class DataConfig:
    data_path: list[str] | None = _f(
        None,
        "--data-path",
        "dataset PREFIX (of PREFIX.bin/.idx), or WEIGHT PREFIX pairs to blend; default: embedded corpus",
        nargs="+",
    )
    train_data_path: list[str] | None = _f(
        None, "--train-data-path", "training PREFIX or WEIGHT PREFIX pairs (instead of --data-path)", nargs="+"
    )
    valid_data_path: list[str] | None = _f(
        None, "--valid-data-path", "validation PREFIX or WEIGHT PREFIX pairs (with --train-data-path)", nargs="+"
    )
    split: str = _f("969,30,1", "--split", "train,valid,test weights")
    tokenizer_model: str | None = _f(None, "--tokenizer-model", "sentencepiece .model")
    data_prefetch: bool = _f(True, "--data-prefetch", "gather the next step's batches in a background thread")
    reset_position_ids: bool = _f(False, "--reset-position-ids", "positions restart at 0 after each EOD")
    reset_attention_mask: bool = _f(
        False, "--reset-attention-mask", "attend only within a document (packed samples: EOD ends one)"
    )
    eod_mask_loss: bool = _f(False, "--eod-mask-loss", "no loss where the input token is EOD")


@dataclass
class CheckpointConfig:
    save: str | None = _f(None, "--save", "checkpoint directory")
    load: str | None = _f(None, "--load", "checkpoint directory to resume from")
    save_interval: int | None = _f(None, "--save-interval", "save every N steps")
    finetune: bool = _f(
        False, "--finetune", "--load only the weights: iteration, optimizer, RNG and data position start fresh"
    )
    load_optim: bool = _f(True, "--load-optim", "--load the optimizer state (--no-load-optim: fresh AdamW moments)")
    load_rng: bool = _f(True, "--load-rng", "--load the RNG streams (--no-load-rng: reseed from --seed)")
    exit_signal_handler: bool = _f(False, "--exit-signal-handler", "on SIGTERM save and exit")


@dataclass
class LoggingConfig:
    log_interval: int = _f(1, "--log-interval", "console line every N steps")
    log_dir: str | None = _f(None, "--log-dir", "where metrics.jsonl goes (default --save or runs/)")
    wandb_project: str | None = _f(None, "--wandb-project", "log to wandb (offline without an API key)")
    wandb_exp_name: str | None = _f(None, "--wandb-exp-name", "wandb run name")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _sections():
    return [(f.name, f.type if isinstance(f.type, type) else f.default_factory) for f in dataclasses.fields(Config)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("megalite", description="Pretrain a GPT/Llama-style model.")
    p.add_argument("--config", help="JSON or TOML file of flag defaults")
    for _, cls in _sections():
        g = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            md = f.metadata
            if _is_bool(f):  # --flag / --no-flag, plus the Megatron spelling of the negative if any
                g.add_argument(
                    md["flag"],
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=f"{md['help']} (default: {'on' if f.default else 'off'})",
                )
                if "negative" in md:
                    g.add_argument(
                        md["negative"],
                        dest=f.name,
                        action="store_false",
                        default=None,
                        help=f"same as --no-{md['flag'][2:]} (Megatron-LM spelling)",
                    )
                continue
            g.add_argument(
                md["flag"],
                dest=f.name,
                type=_value_type(f),
                default=None,
                choices=md.get("choices"),
                nargs=md.get("nargs"),
                help=md["help"],
            )
    return p


def _value_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "list[str]": str, "list[int]": int}[
        str(f.type).removesuffix(" | None")
    ]


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in ("bool", bool)


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    toml = path.endswith(".toml")
    if toml and sys.version_info < (3, 11):
        raise ConfigError(f"--config {path}: TOML needs Python 3.11 or newer (tomllib); use a JSON file")
    with open(path, "rb") as fh:
        try:
            if toml:
                import tomllib

                raw = tomllib.load(fh)
            else:
                raw = json.load(fh)
        except ValueError as exc:  # both decoders' errors are ValueErrors
            raise ConfigError(f"--config {path} is not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold one object of flag names and values, not a {type(raw).__name__}")
    return raw


def _file_argv(raw: dict, path: str) -> list[str]:
    """A --config file as flags, each value checked here so the error names the key and the file."""
    fields = {f.name: f for _, cls in _sections() for f in dataclasses.fields(cls)}
    name = {key: key.lstrip("-").replace("-", "_") for key in raw}
    unknown = [key for key in raw if name[key] not in fields]
    if unknown:
        flags = [f.metadata["flag"] for f in fields.values()]
        hints = [
            repr(k)
            + "".join(
                f" (did you mean {m}?)" for m in difflib.get_close_matches("--" + name[k].replace("_", "-"), flags, n=1)
            )
            for k in unknown
        ]
        raise ConfigError(f"--config {path}: unknown key {', '.join(hints)}; keys are flag names (see --help)")
    argv = []
    for key, val in raw.items():
        f, where = fields[name[key]], f"--config {path}: {key}"
        if _is_bool(f):
            if not isinstance(val, bool):
                raise ConfigError(f"{where} must be true or false (got {val!r})")
            argv.append(f.metadata["flag"] if val else "--no-" + f.metadata["flag"][2:])
        elif val is not None and f.metadata.get("nargs"):  # a list, or one string of words
            words = val.split() if isinstance(val, str) else val
            if not isinstance(words, list) or not words:
                raise ConfigError(f"{where} must be a non-empty list or a string (got {val!r})")
            argv += [f.metadata["flag"], *(_file_value(where, w, f) for w in words)]
        elif val is not None:
            argv += [f.metadata["flag"], _file_value(where, val, f)]
    return argv


def _file_value(where: str, val, f: dataclasses.Field) -> str:
    """``val`` as the flag's text, after the checks argparse would make (type, choices)."""
    typ, choices = _value_type(f), f.metadata.get("choices")
    if isinstance(val, (bool, list, dict)) or not _parses(typ, str(val)):
        kind = {int: "an integer", float: "a number", str: "a string"}[typ]
        raise ConfigError(f"{where} must be {kind} (got {val!r})")
    if choices and str(val) not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)} (got {val!r})")
    return str(val)


def _parses(typ: type, text: str) -> bool:
    try:
        typ(text)
    except ValueError:
        return False
    return True


def parse(argv=None) -> Config:
    """Parse flags (and an optional --config file of defaults) into a validated Config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_file = parser.parse_known_args(argv)[0].config
    from_file = _file_argv(_load_file(config_file), config_file) if config_file else []
    ns = vars(parser.parse_args(from_file + argv))  # later flags win
    cfg = Config()
    for name, _ in _sections():
        sec = getattr(cfg, name)
        for f in dataclasses.fields(sec):
            if ns.get(f.name) is not None:
                setattr(sec, f.name, ns[f.name])
    from .config_checks import validate  # the checks import this module's dataclasses

    try:
        validate(cfg)
    except ConfigError as exc:
        # A flag the message names that only the file set: say where it came from.
        named = set(re.findall(r"--[a-z0-9-]+", str(exc)))
        origin = sorted(named & set(from_file) - {a.split("=")[0] for a in argv})
        if origin:
            raise ConfigError(f"{exc} ({', '.join(origin)} set in --config {config_file})") from None
        raise
    return cfg


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    mult = divisible_by * tp
    return ((vocab + mult - 1) // mult) * mult
