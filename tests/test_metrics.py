import glob
import json

from megalite import config as C
from megalite.training.metrics import MetricsLogger, format_line


def record(i):
    return {"iteration": i, "train_iters": 10, "consumed_samples": 8 * i, "loss": 5.0 - i, "lr": 1e-3,
            "grad_norm": 1.5, "tokens_per_sec": 1234.0, "step_time": 0.25, "tflops_per_device": 0.5,
            "mfu": 0.25, "mem_gib": 1.0, "eta_s": 30.0}


def test_jsonl_one_object_per_iteration_and_wandb_offline_without_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = C.parse(["--wandb-project", "megalite-test", "--wandb-exp-name", "t"])
    logger = MetricsLogger(str(tmp_path), cfg, {"a": 1})
    for i in (1, 2, 3):
        logger.log(record(i), line=i == 3)
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 2.0
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*")), "wandb must fall back to an offline run"
    out = capsys.readouterr().out
    assert out.count("lm loss:") == 1 and "lm loss: 2.000000E+00" in out and "MFU: 25.0%" in out


def test_console_line_without_mfu():
    line = format_line(dict(record(4), mfu=None, valid_loss=3.5))
    assert "MFU" not in line and "valid loss: 3.500000E+00" in line and "ETA: 00:00:30" in line
