"""`pretrain.py` entry: parse, validate, start the grid, build model and data, train.

Everything a user can get wrong is checked before the first collective, on every rank, so a
bad flag or file fails fast with the same message everywhere instead of hanging.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import traceback

import torch

from .. import config as C
from .. import distributed
from ..config import ConfigError
from ..data.blend import blend_change, blend_flags, build_blends, describe
from ..data.documents import attended_document_length, pack_documents
from ..data.indexed import DatasetFormatError, IndexedDataset
from ..data.tokenizer import Tokenizer
from ..model import GPT
from ..parallel.dims import ParallelDims, check_layout
from ..parallel.parallelize import parallelize, validate_layout
from ..plan.runtime import PlanCheck
from . import checkpoint
from .loop import TrainSetup, TrainState, train
from .metrics import MetricsLogger, flops_per_token, peak_tflops
from .optim import build_optimizer


def launch_hint(cfg: C.Config, world: int, argv) -> str:
    """Fewer ranks than TP x CP is nearly always torchrun's default of one process per node:
    the launch command that works, with the user's own flags (else "")."""
    need = cfg.parallel.tensor_parallel_size * cfg.parallel.context_parallel_size
    if world >= need:
        return ""
    script, args = (sys.argv[0], sys.argv[1:]) if argv is None else ("pretrain.py", argv)
    return f"\n  on one node run: torchrun --nproc-per-node {need} {shlex.join([script, *args])}"


def validate_world(cfg: C.Config, world: int) -> int:
    """Layout checks that need the world size. Returns DP."""
    p, t = cfg.parallel, cfg.train
    dp = check_layout(world, p.tensor_parallel_size, p.context_parallel_size)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by "
            f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}"
        )
    validate_layout(cfg, p.tensor_parallel_size, p.context_parallel_size)
    return dp


def resolve_data(cfg: C.Config, rank: int) -> tuple[str | None, str]:
    """(the default corpus prefix, or None when data flags are given; tokenizer model). Builds the
    embedded default corpus when no data path is given; checks every given dataset's files."""
    d = cfg.data
    if d.data_path is None and d.train_data_path is None:
        from ..data.default_corpus import ensure_default_corpus

        prefix, tok = ensure_default_corpus(log=print if rank == 0 else (lambda *a: None))
        return prefix, d.tokenizer_model or tok
    if not os.path.isfile(d.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: no such file")
    for blend in blend_flags(d).values():
        for _, prefix in blend or []:
            IndexedDataset(prefix)  # raises naming the missing or inconsistent file
    return None, d.tokenizer_model


def vocab_size_for(cfg: C.Config, tokenizer: Tokenizer) -> int:
    given = cfg.model.vocab_size
    if given is None:
        return tokenizer.vocab_size
    if tokenizer.vocab_size > given:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but --vocab-size is {given}; "
            f"raise --vocab-size to at least {tokenizer.vocab_size} or drop it"
        )
    return given


def main(argv=None) -> int:
    cfg = C.parse(argv)
    rank, world = distributed.launch_env()
    try:
        validate_world(cfg, world)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{launch_hint(cfg, world, argv)}") from None
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    ckpt_dir = checkpoint.resolve_load_dir(cfg.checkpoint.load, log) if cfg.checkpoint.load else None
    prefix, tok_path = resolve_data(cfg, rank)
    tokenizer = Tokenizer(tok_path)
    vocab = vocab_size_for(cfg, tokenizer)
    if ckpt_dir is not None:
        checkpoint.check_compatible(checkpoint.read_meta(ckpt_dir), cfg, vocab, ckpt_dir)
    train_set, valid_set = build_blends(
        cfg.data,
        prefix,
        cfg.model.seq_length,
        cfg.train.seed,
        tokenizer.eod,
        cfg.train.global_batch_size,
        tokenizer=tokenizer,
    )
    train_set.check_nonempty()
    if cfg.train.eval_iters > 0 and cfg.train.eval_interval and valid_set is not None:
        valid_set.check_nonempty()
    else:
        valid_set = None
    train_set, valid_set = (pack_documents(d, cfg.data, tokenizer.eod) for d in (train_set, valid_set))

    device = distributed.init(cfg)
    # collectives from here on: every rank raises the same error, none is left waiting
    lock = checkpoint.lock_save_dir(cfg.checkpoint.save, log) if cfg.checkpoint.save else None
    if ckpt_dir is not None:
        ckpt_dir = checkpoint.verify_load_dir(cfg.checkpoint.load, ckpt_dir, cfg, vocab, log)
    dims = ParallelDims.build(cfg.parallel)
    doc_length = attended_document_length(train_set) if cfg.data.reset_attention_mask else None
    plan = PlanCheck(
        cfg, vocab, dims, device, torch.cuda.device_count() if device.type == "cuda" else world, doc_length
    )
    if dims.is_logger:  # before the model is allocated, so a run predicted not to fit says so first
        print(plan.startup_line(), flush=True)
        if plan.memory_warning():
            print(plan.memory_warning(), file=sys.stderr, flush=True)
    model = GPT(cfg.model, vocab, seed=cfg.train.seed)
    n_params, n_matmul = model.num_params(), model.num_params(matmul_only=True)  # before TP shards them
    model = parallelize(model, dims, cfg, device)
    torch.manual_seed(dims.dropout_seed(cfg.train.seed))
    optimizer = build_optimizer(model, cfg.train)
    state = TrainState()
    if ckpt_dir is not None:
        meta = checkpoint.load(ckpt_dir, model, optimizer, dims, cfg, log)
        state = TrainState(meta["iteration"], meta["consumed_samples"])
        finetune = cfg.checkpoint.finetune  # the data position starts at 0: no blend to continue
        change = blend_change(meta["data"], cfg.data) if "data" in meta and not finetune else None
        if change:
            log(change)

    logger = None
    if dims.is_logger:
        log_dir = cfg.logging.log_dir or cfg.checkpoint.save or "runs"
        peak, peak_source = peak_tflops(device, cfg.train.peak_tflops)
        logger = MetricsLogger(
            log_dir, cfg, {k: dataclasses.asdict(v) for k, v in vars(cfg).items()}, peak=peak, plan=plan
        )
        print(
            f"megalite: {dims.describe()} on {device.type}; model {n_params / 1e6:.1f}M params; "
            f"vocab {vocab}; data {prefix or describe(cfg.data)}; MFU peak {peak_source}; metrics -> {logger.path}"
            + (f"; resuming {ckpt_dir} at iteration {state.iteration}" if ckpt_dir else ""),
            flush=True,
        )
    setup = TrainSetup(
        model,
        optimizer,
        train_set,
        valid_set,
        dims,
        cfg,
        device,
        flops_per_token(cfg.model, n_matmul, cfg.model.seq_length),
        flops_per_token(cfg.model, n_matmul, cfg.model.seq_length, full_attention=True),
        tokenizer=tokenizer,
    )
    try:
        train(setup, state, logger)
    finally:
        if logger:
            logger.close()
        if lock:  # a failure before this try frees it as the process exits (it is an flock)
            lock.release()
    return 0


def cli() -> None:
    """Run main() and exit with its code: 0 done, 2 configuration or data error, 1 any other failure.

    Failures are reported, then dropped before the process groups are torn down: a live
    traceback would keep the model and the grid (and with them the groups) alive past
    distributed.shutdown(), into interpreter exit."""
    try:
        code = main()
    except (ConfigError, DatasetFormatError) as exc:  # the message says what to change
        print(f"megalite: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except (Exception, KeyboardInterrupt) as exc:  # reported here; the exit code carries it
        traceback.print_exc()
        sys.stderr.flush()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    distributed.shutdown()
    sys.exit(code)
