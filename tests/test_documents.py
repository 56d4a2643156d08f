"""Packed documents on one rank: Megatron's three flags give the fields Megatron gives, and a packed
sample's per-token losses (and gradients) equal running each of its documents alone."""

import itertools

import numpy as np
import pytest
import torch

from megalite import config as C
from megalite.config import ModelConfig
from megalite.data.documents import PackedDocuments, attended_document_length, document_ids, pack_documents
from megalite.data.gpt_dataset import GPTDataset
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.model import GPT

EOD, VOCAB, SEQ = 0, 50, 32


def megatron_fields(tokens, eod):
    """Megatron-LM's construction, written as a loop over the EODs: (visible [s, s], positions, loss mask)."""
    s = len(tokens)
    visible = torch.ones(s, s, dtype=torch.bool).tril()
    positions = torch.arange(s)
    prev = 0
    for i in (tokens == eod).nonzero().flatten().tolist():
        visible[i + 1 :, : i + 1] = False
        positions[i + 1 :] -= i + 1 - prev
        prev = i + 1
    return visible, positions, (tokens != eod).float()


def dataset(tmp_path, lengths, seed=0):
    """Unshuffled samples over documents of the given lengths (EOD included) of random tokens."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(tmp_path / "d"), VOCAB)
    for n in lengths:
        builder.add_document(list(rng.integers(1, VOCAB, n - 1)) + [EOD])
    builder.finalize()
    return GPTDataset(IndexedDataset(str(tmp_path / "d")), np.arange(len(lengths)), SEQ, 1, EOD, shuffle=False)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_fields_are_megatrons(tmp_path, flags):
    reset_pos, reset_mask, eod_mask = flags
    base = dataset(tmp_path, np.random.default_rng(1).integers(1, 12, 60))
    ds = PackedDocuments(
        base, EOD, reset_position_ids=reset_pos, reset_attention_mask=reset_mask, eod_mask_loss=eod_mask
    )
    assert len(ds) == len(base)
    for i in range(len(ds)):
        got, plain = ds[i], base[i]
        visible, positions, loss_mask = megatron_fields(got["tokens"], EOD)
        for key in ("tokens", "labels"):
            assert torch.equal(got[key], plain[key])
        assert torch.equal(got["position_ids"], positions if reset_pos else plain["position_ids"])
        assert torch.equal(got["loss_mask"], loss_mask if eod_mask else plain["loss_mask"])
        assert ("document_ids" in got) == reset_mask
        if reset_mask:
            ids = got["document_ids"]
            assert ids[0] == 0 and (ids.diff() >= 0).all() and ids.dtype == torch.int64
            assert torch.equal((ids[:, None] == ids[None, :]).tril(), visible)


def test_document_ids_edges():
    t = torch.tensor([[0, 0, 5, 6, 0, 7], [5, 6, 7, 8, 9, 0]])  # starts on EOD, EOD runs, one cut document
    assert document_ids(t, 0).tolist() == [[0, 1, 2, 2, 2, 3], [0, 0, 0, 0, 0, 0]]


def test_attended_document_length_counts_the_pairs_inside_documents():
    """The planner's s * L / 2 attention pairs equal the sum of L_i^2 / 2 over the sample's pieces."""
    samples = [{"tokens": torch.tensor([5, 5, 0, 5, 0, 5, 5, 5])}, {"tokens": torch.tensor([0] * 8)}]
    got = attended_document_length(PackedDocuments(samples, EOD, reset_attention_mask=True))
    assert got == (9 + 4 + 9 + 8) / 16


def test_flags_parse_and_off_means_unchanged():
    cfg = C.parse(["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"])
    assert (cfg.data.reset_position_ids, cfg.data.reset_attention_mask, cfg.data.eod_mask_loss) == (True,) * 3
    plain = object()
    assert pack_documents(plain, C.parse([]).data, EOD) is plain
    assert pack_documents(None, cfg.data, EOD) is None


MODELS = [
    dict(
        swiglu=True,
        normalization="RMSNorm",
        group_query_attention=True,
        num_query_groups=2,
        recompute_granularity="selective",
    ),
    dict(position_embedding_type="learned_absolute", recompute_granularity="full"),
    dict(),
]


@pytest.mark.parametrize("kw", MODELS)
def test_packed_sample_equals_documents_run_alone(tmp_path, kw):
    """Documents of 1 to 20 tokens; sample 1 begins and ends inside a document. A document cut at the
    sample's start begins at position 0 of the sample (as in Megatron-LM)."""
    lengths = [1, 9, 20, 4, 3, 14, 6, 2, 11, 1, 17, 5]
    ds = PackedDocuments(dataset(tmp_path, lengths), EOD, reset_position_ids=True, reset_attention_mask=True)
    samples = [ds[0], ds[1]]
    assert samples[0]["tokens"][-1] != EOD != samples[1]["tokens"][-1]  # sample 1 is cut at both edges
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, **kw)
    packed, alone = GPT(cfg, VOCAB, seed=3), GPT(cfg, VOCAB, seed=3)
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    loss = packed(batch["tokens"], batch["position_ids"], batch["labels"], batch["document_ids"])
    loss.sum().backward()
    for b, sample in enumerate(samples):
        ids = sample["document_ids"]
        for doc in ids.unique().tolist():
            (where,) = (ids == doc).nonzero(as_tuple=True)
            a, e = int(where[0]), int(where[-1]) + 1
            one = alone(sample["tokens"][None, a:e], torch.arange(e - a)[None], sample["labels"][None, a:e])
            torch.testing.assert_close(loss[b, a:e], one[0], rtol=1e-5, atol=1e-5)
            one.sum().backward()
    assert ids.unique().numel() > 3
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without document ids the same sample attends across documents: the losses differ.
    plain = packed(batch["tokens"], batch["position_ids"], batch["labels"])
    assert not torch.allclose(plain, loss)
