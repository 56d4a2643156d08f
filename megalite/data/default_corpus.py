"""The embedded default corpus: the Python standard library's own sources, tokenized once and cached.

Every machine that runs megalite has these files, so training works offline with no data flags.
The corpus is the sorted list of the stdlib's ``.py`` files (tests and site-packages left out),
taken in order until ``max_bytes`` (one file = one document). A SentencePiece BPE tokenizer is
trained on them and they are preprocessed into ``corpus.bin``/``.idx`` with EOD after each file.
The same Python version gives the same corpus; another version gives a slightly different one.

Cache: ``$MEGALITE_CACHE/default-corpus-v1``, else ``~/.cache/megalite/default-corpus-v1``. It is
built in a temporary sibling directory and renamed into place in one step, so no process ever
sees half a cache; when two processes build at once the first rename wins and the other uses
its result. A lock file beside the cache makes processes that start together (every rank of a
launch) wait for one builder instead of all building; the rename alone keeps it correct where
the file system has no locks. ``manifest.json`` records what was built; a cache built with other parameters is an
error, not a silent rebuild.
"""

import fcntl
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable

from .preprocess import write_dataset
from .tokenizer import Tokenizer, train_tokenizer

NAME = "default-corpus-v1"
DEFAULT_MAX_BYTES = 4_000_000  # ~1.4M tokens; builds in a few seconds
DEFAULT_VOCAB_SIZE = 2048
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> str:
    root = os.environ.get("MEGALITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megalite")
    return os.path.join(root, NAME)


def stdlib_sources(max_bytes: int) -> list[str]:
    """Paths of the stdlib ``.py`` files in sorted order, stopping before ``max_bytes`` is exceeded."""
    root = sysconfig.get_paths()["stdlib"]
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    chosen, total = [], 0
    for name in sorted(rel):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib files test other encodings on purpose
        if total + len(data) > max_bytes:
            break
        chosen.append(path)
        total += len(data)
    if not chosen:
        raise RuntimeError(
            f"no Python standard library sources of at most {max_bytes} bytes found under {root}; "
            f"pass --data-path and --tokenizer-model instead"
        )
    return chosen


def ensure_default_corpus(
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> tuple[str, str]:
    """Build the default corpus unless cached; returns (data prefix, tokenizer .model path)."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    params = {"max_bytes": max_bytes, "vocab_size": vocab_size}
    os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
    with open(cache_dir + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system: concurrent builds stay safe through the rename
        if not os.path.isdir(cache_dir) or not os.listdir(cache_dir):
            _build(cache_dir, params, log)
        else:
            log(f"default corpus: using the cache at {cache_dir}")
    return _check(cache_dir, params)


def _build(cache_dir: str, params: dict, log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    files = stdlib_sources(params["max_bytes"])
    log(f"default corpus: building it once from {len(files)} Python standard library files into {cache_dir}")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_dir)}.tmp-", dir=os.path.dirname(cache_dir))
    try:
        model = train_tokenizer(files, os.path.join(tmp, "tokenizer"), params["vocab_size"])
        docs, tokens = write_dataset((_read(p) for p in files), Tokenizer(model), os.path.join(tmp, "corpus"))
        manifest = {
            **params,
            "documents": docs,
            "tokens": tokens,
            "source": sysconfig.get_paths()["stdlib"],
            "python": sys.version.split()[0],
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp, cache_dir)  # atomic; fails if another process published first
        except OSError:
            if not os.path.isfile(os.path.join(cache_dir, "manifest.json")):
                raise
            log(f"default corpus: another process built {cache_dir} first; using that one")
            return
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    log(
        f"default corpus: {docs} documents, {tokens} tokens, vocab {params['vocab_size']}, "
        f"built in {time.perf_counter() - start:.1f}s"
    )


def _read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _check(cache_dir: str, params: dict) -> tuple[str, str]:
    manifest_path = os.path.join(cache_dir, "manifest.json")
    prefix, model = os.path.join(cache_dir, "corpus"), os.path.join(cache_dir, "tokenizer.model")
    missing = [p for p in (manifest_path, model, prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(
            f"default corpus cache {cache_dir} is incomplete ({missing[0]} missing); "
            f"delete the directory and it is rebuilt on the next run"
        )
    with open(manifest_path) as f:
        manifest = json.load(f)
    built = {k: manifest.get(k) for k in params}
    if built != params:
        raise RuntimeError(
            f"default corpus cache {cache_dir} was built with {built}, this run asks for {params}; "
            f"delete the directory or pass another cache directory ($MEGALITE_CACHE)"
        )
    return prefix, model
