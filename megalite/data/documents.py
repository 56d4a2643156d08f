"""Packed documents, with Megatron-LM's meaning of its three flags.

A sample is a window over a stream of documents, each ending with the EOD token. The EOD belongs
to the document it ends; the token after it starts the next one. Everything here is derived from
a sample's input tokens alone, so a document cut by the window's edge is just a shorter document
inside the sample: the piece cut at the start begins at position 0 under --reset-position-ids
(Megatron does the same; the window does not know where the document began).

- ``--reset-attention-mask``: the sample carries ``document_ids`` [s], local to the sample and
  non-decreasing (0, 0, 0, 1, 1, 2, ...); a token attends only to earlier tokens of its own id.
- ``--reset-position-ids``: positions restart at 0 at each document's first token.
- ``--eod-mask-loss``: no loss where the input token is EOD (the prediction of the next
  document's first token from across the boundary); the EOD is still learnt as a label.

The training loop splits these fields over CP with the same zigzag as the tokens.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Per-token document index along the last dim: the number of EODs strictly before each token."""
    ends = (tokens == eod).long()
    return ends.cumsum(-1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's offset from the first token of its document (ids non-decreasing along the last dim)."""
    index = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, index, 0).cummax(-1).values  # index of the latest document start
    return index - first


class PackedDocuments(Dataset):
    """``dataset``'s samples with the fields of the flags given (the others unchanged)."""

    def __init__(self, dataset, eod: int, *, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False):
        self.dataset, self.eod = dataset, eod
        self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss = (
            reset_position_ids,
            reset_attention_mask,
            eod_mask_loss,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[i])
        tokens = sample["tokens"]
        ids = document_ids(tokens, self.eod)
        if self.reset_attention_mask:
            sample["document_ids"] = ids
        if self.reset_position_ids:
            sample["position_ids"] = document_positions(ids)
        if self.eod_mask_loss:
            sample["loss_mask"] = sample["loss_mask"].masked_fill(tokens == self.eod, 0.0)
        return sample


def pack_documents(dataset, data_cfg, eod: int):
    """``dataset`` with the --reset-position-ids / --reset-attention-mask / --eod-mask-loss fields
    of ``data_cfg`` (a DataConfig); ``dataset`` itself when none is set, or when it is None."""
    flags = {
        "reset_position_ids": data_cfg.reset_position_ids,
        "reset_attention_mask": data_cfg.reset_attention_mask,
        "eod_mask_loss": data_cfg.eod_mask_loss,
    }
    if dataset is None or not any(flags.values()):
        return dataset
    return PackedDocuments(dataset, eod, **flags)


def attended_document_length(dataset, samples: int = 16) -> float:
    """sum(L^2) / sum(L) over the document pieces of the first ``samples`` samples: the document length
    L for which s * L / 2 is their attention pairs per sample (the planner's count)."""
    squares = total = 0
    for i in range(min(samples, len(dataset))):
        lengths = torch.unique_consecutive(document_ids(dataset[i]["tokens"], dataset.eod), return_counts=True)[1]
        squares, total = squares + int((lengths**2).sum()), total + int(lengths.sum())
    return squares / total
