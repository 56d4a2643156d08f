"""End-to-end training: DP parity, bitwise resume, pretrain.py under torchrun, input errors."""

import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch.distributed as dist
from pretrain_utils import ROOT, TINY, losses, run_pretrain, train

from megalite.config import ConfigError
from megalite.data import indexed
from megalite.data.tokenizer import train_tokenizer
from megalite.training.main import main


def test_dp2_loss_curve_equals_dp1(tmp_path, corpus):
    common = corpus + ["--train-iters", "5", "--global-batch-size", "4", "--micro-batch-size", "2"]
    one = train(tmp_path, "dp1", 1, common)
    two = train(tmp_path, "dp2", 2, common)
    assert [r["iteration"] for r in one] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"]
    assert "valid_loss" in one[2] and one[2]["valid_loss"] == pytest.approx(two[2]["valid_loss"], rel=1e-5)


def test_resume_is_bitwise_identical(tmp_path, corpus):
    common = corpus + [
        "--train-iters",
        "6",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--hidden-dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
    ]
    full = train(tmp_path, "full", 2, common)
    ck = str(tmp_path / "ck")
    first = train(tmp_path, "first", 2, common + ["--save", ck, "--exit-interval", "3"])
    assert [r["iteration"] for r in first] == [1, 2, 3]
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000003"
    rest = train(tmp_path, "rest", 2, common + ["--load", ck])
    assert [r["iteration"] for r in rest] == [4, 5, 6]
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in full]  # bitwise
    assert [r["grad_norm"] for r in first + rest] == [r["grad_norm"] for r in full]
    with pytest.raises(ConfigError, match="holds a different model.*hidden_size"):
        main(TINY + corpus + ["--load", ck, "--hidden-size", "32"])


def test_pretrain_py_under_torchrun_default_corpus(tmp_path):
    save = tmp_path / "save"
    proc = run_pretrain(
        tmp_path, 2, ["--train-iters", "3", "--save", str(save)], MEGALITE_CACHE=str(tmp_path / "cache")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "default corpus" in proc.stdout + proc.stderr
    records = losses(save)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r) for r in records)
    assert all(r["tflops_per_device_full_attn"] > r["tflops_per_device"] > 0 for r in records)
    assert "lm loss:" in proc.stdout and "tokens/s:" in proc.stdout and "MFU peak unknown on cpu" in proc.stdout
    assert sorted(os.listdir(save / "iter_0000003")) == ["meta.json", "rank_00000.pt", "rank_00001.pt"]


def test_bad_data_and_vocab_fail_before_training(tmp_path, corpus):
    with pytest.raises(Exception, match="nope.idx|nope.bin"):
        main(TINY + ["--data-path", str(tmp_path / "nope"), "--tokenizer-model", corpus[3]])
    with pytest.raises(ConfigError, match="tokenizer has 512 tokens but --vocab-size is 100"):
        main(TINY + corpus + ["--vocab-size", "100"])
    with pytest.raises(ConfigError, match="no such directory"):
        main(TINY + corpus + ["--load", str(tmp_path / "missing")])
    assert not glob.glob(str(tmp_path / "*.jsonl"))


def _broken_copy(tmp_path, corpus, fault):
    """The test corpus copied with one fault; returns (data flags, the copy's prefix)."""
    prefix, tok = str(tmp_path / "data"), corpus[3]
    for ext in (".bin", ".idx"):
        shutil.copy(corpus[1] + ext, prefix + ext)
    if fault == "truncated-bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    elif fault == "corrupt-idx":  # the second document's offset overwritten
        with open(prefix + ".idx", "r+b") as f:
            f.seek(indexed.HEADERS[indexed.VERSION].size + 8)
            f.write(np.int64(1).tobytes())
    else:  # a tokenizer of the same size trained on other text
        text = tmp_path / "other.txt"
        text.write_text(pathlib.Path(sysconfig.get_paths()["stdlib"], "string.py").read_text() * 3)
        tok = train_tokenizer([str(text)], str(tmp_path / "other"), 512)
    return ["--data-path", prefix, "--tokenizer-model", tok], prefix


@pytest.mark.fault("bad-data")
@pytest.mark.parametrize(
    "fault, message",
    [
        ("truncated-bin", r"data\.bin is \d+ bytes but .*data\.idx describes .*truncated"),
        ("corrupt-idx", r"data\.idx has document offsets/sizes that do not tile"),
        ("other-tokenizer", r"data\.idx was written by another tokenizer than .*other\.model"),
    ],
)
def test_bad_data_fails_naming_file_and_fix_before_any_collective(tmp_path, corpus, fault, message, record_property):
    data, prefix = _broken_copy(tmp_path, corpus, fault)
    rebuild = r"python -m megalite\.data\.preprocess --input FILES --tokenizer-model \S+ --output-prefix "
    with pytest.raises(indexed.DatasetFormatError, match=message + ".*" + rebuild + re.escape(prefix)) as err:
        main(TINY + data + ["--log-dir", str(tmp_path / "log")])
    assert not dist.is_initialized() and not (tmp_path / "log").exists()
    named = re.search(r"data\.(bin|idx)", str(err.value)).group(0)
    record_property("observed", f"{fault}: error names {named} and the rebuild command")


def test_too_few_ranks_prints_the_torchrun_command_that_works():
    flags = ["--context-parallel-size", "2", "--tensor-parallel-size", "2", "--seq-length", "64"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run(
        [sys.executable, "pretrain.py", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world size 1 is not divisible by tensor-parallel-size 2 x context-parallel-size 2" in proc.stderr
    assert "\n  on one node run: torchrun --nproc-per-node 4 pretrain.py " + " ".join(flags) + "\n" in proc.stderr
