"""An imported transformers model trained by pretrain.py at TP2 x CP2 (--finetune), then exported:
the first loss equals transformers' on the same batch, and the export computes what megalite does."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402
from hf_utils import LLAMA3, make_hf  # noqa: E402
from pretrain_utils import train  # noqa: E402

from megalite.data.gpt_dataset import build_datasets  # noqa: E402
from megalite.data.tokenizer import Tokenizer  # noqa: E402
from megalite.generate import generate  # noqa: E402
from megalite.hf.ckpt_io import find_checkpoint, load_gpt  # noqa: E402
from megalite.hf.export_hf import export_hf  # noqa: E402
from megalite.hf.import_hf import import_hf  # noqa: E402

VOCAB = 515  # above the corpus tokenizer's 512 and not a multiple of the padding: padded rows are exercised


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf(d / "hf", "llama", vocab=VOCAB, num_key_value_heads=2, rope_parameters=LLAMA3)
    import_hf(str(d / "hf"), str(d / "ck"), log=lambda *a: None)
    return hf, d / "ck"


def first_batch(corpus, seq=32, n=4):
    prefix, tok = corpus[1], Tokenizer(corpus[3])
    train_set = build_datasets(prefix, "969,30,1", seq, 1234, tok.eod, tokenizer=tok)[0]
    return torch.stack([train_set[i]["tokens"] for i in range(n)]), torch.stack(
        [train_set[i]["labels"] for i in range(n)]
    )


def run(tmp_path, corpus, ck, name, *extra):
    flags = ["--config", str(ck / "model.json"), "--load", str(ck), "--finetune", "--save", str(tmp_path / name)]
    flags += [
        "--tensor-parallel-size",
        "2",
        "--context-parallel-size",
        "2",
        "--train-iters",
        "5",
        "--eval-iters",
        "0",
        *extra,
    ]
    return train(tmp_path, name, 4, corpus + flags)


def restored(save, ck, *flags):
    """(iteration, consumed samples, optimizer state loaded?) after loading ``save`` in one process."""
    from types import SimpleNamespace

    from megalite import config as C
    from megalite.model import GPT
    from megalite.training import checkpoint
    from megalite.training.optim import build_optimizer

    cfg = C.parse(["--config", str(ck / "model.json"), "--load", str(save), *flags])
    dims = SimpleNamespace(rank=0, tp=1, cp=1, dp=1, tp_rank=0, world_size=1, dropout_seed=lambda s: s)
    model = GPT(cfg.model, VOCAB)
    opt = build_optimizer(model, cfg.train)
    meta = checkpoint.load(find_checkpoint(str(save)), model, opt, dims, cfg, log=lambda *a: None)
    return meta["iteration"], meta["consumed_samples"], bool(opt.state)


def check_export(tmp_path, name, corpus, dtype, atol):
    """Exported model's logits vs megalite's single-rank logits on the trained checkpoint; greedy tokens equal."""
    out = tmp_path / f"{name}-{dtype}"
    export_hf(str(tmp_path / name), str(out), dtype=dtype, tokenizer_model=corpus[3], log=lambda *a: None)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype).eval()
    ours, _ = load_gpt(find_checkpoint(str(tmp_path / name)))
    ours = ours.to(torch_dtype).eval()
    tokens, _ = first_batch(corpus)
    with torch.no_grad():
        mine = ours(tokens, torch.arange(32).expand_as(tokens))[..., :VOCAB].float()
    torch.testing.assert_close(hf(tokens).logits.detach().float(), mine, rtol=0, atol=atol)
    return hf, ours, out


def test_finetune_at_tp2_cp2_then_export(tmp_path, corpus, imported, capsys):
    hf, ck = imported
    tokens, labels = first_batch(corpus)
    with torch.no_grad():
        hf_loss = F.cross_entropy(hf(tokens).logits.reshape(-1, VOCAB), labels.reshape(-1)).item()
    records = run(tmp_path, corpus, ck, "fp32", "--eval-sample-prompt", "import os\n", "--eval-interval", "5")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert abs(records[0]["loss"] - hf_loss) < 1e-4, (records[0]["loss"], hf_loss)
    assert records[-1]["loss"] < records[0]["loss"]

    assert restored(tmp_path / "fp32", ck) == (5, 20, True)  # a resume: iteration, data position, AdamW moments
    assert restored(tmp_path / "fp32", ck, "--no-load-optim") == (5, 20, False)
    assert restored(tmp_path / "fp32", ck, "--finetune") == (0, 0, False)

    hf_out, ours, out = check_export(tmp_path, "fp32", corpus, "fp32", atol=1e-4)
    tok = Tokenizer(corpus[3])
    text = "def split(s, comments=False):\n\treturn  list(s)  # café\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    prompt = tok.encode("import os\n")
    theirs = hf_out.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert generate(ours, prompt, 12) == theirs[0, len(prompt) :].tolist()
    from megalite.generate import main as generate_cli

    argv = ["--load", str(tmp_path / "fp32"), "--prompt", "import os\n", "--tokenizer-model", corpus[3]]
    assert generate_cli(argv + ["--max-new-tokens", "12"]) == 0
    err = capsys.readouterr().err
    ids = [int(x) for x in err.split("ids: [")[1].split("]")[0].split(",")]
    assert "tokens/s" in err and ids == generate(ours, prompt, 12, eos_id=tok.eod, vocab_limit=tok.vocab_size)
    # --eval-sample-prompt: the TP2 x CP2 model decoded (TP ranks together) what one rank decodes
    sample = generate(ours, prompt, 32, eos_id=tok.eod, vocab_limit=tok.vocab_size)
    assert [r.get("sample") for r in records] == [None] * 4 + [tok.decode(sample)]


def test_bf16_training_exports_in_both_dtypes(tmp_path, corpus, imported):
    _, ck = imported
    records = run(tmp_path, corpus, ck, "bf16", "--bf16")
    assert len(records) == 5
    hf, ours, _ = check_export(tmp_path, "bf16", corpus, "fp32", atol=1e-4)  # fp32 master weights: exact
    prompt = [5, 17, 99, 42]  # no pad id (3): transformers' generate would mask it out
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert generate(ours, prompt, 12) == theirs[0, len(prompt) :].tolist()
    # bf16 weights and compute in both: each lands about 0.1 from the fp32 logits (|logits| ~ 5), and
    # from each other by about as much (measured 0.11): the stated tolerance is 0.25
    check_export(tmp_path, "bf16", corpus, "bf16", atol=0.25)
