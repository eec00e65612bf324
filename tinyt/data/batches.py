"""Token ids to batches: which pairs train, which pairs share a batch, and the padded tensors
the model reads.

In: a `TokenizedText`. `trainable_indices` gives the (M,) int64 indices of the pairs fit to
train on; `make_batches` splits indices into length-bucketed batches under a token budget, a
list of index tensors; `collate` turns one of them into a `Batch` of padded tensors, src
(B, S) and tgt_in/tgt_out (B, T), padding (PAD_ID) on the right. Only index tensors live in
memory between the steps: the ids stay where `TokenizedText` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyt.data.token_ids import TokenizedText
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def trainable_indices(data: TokenizedText, max_len: int) -> torch.Tensor:
    """Indices of pairs with 1..max_len tokens on both sides (empty or overlong ones are
    dropped from training)."""
    src_len, tgt_len = data.src_lengths, data.tgt_lengths
    keep = (src_len >= 1) & (tgt_len >= 1) & (src_len <= max_len) & (tgt_len <= max_len)
    return keep.nonzero().flatten()


def make_batches(data: TokenizedText, indices: torch.Tensor, batch_tokens: int,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Split `indices` into batches of similar-length pairs, each with at most `batch_tokens`
    padded tokens on its larger side (a single overlong pair still gets a batch of its own).

    With a generator, ties in length are broken randomly and the batch order is shuffled, so
    every epoch sees different batches; without one, the result is deterministic (evaluation).
    """
    if indices.numel() == 0:
        return []
    src_len = data.src_lengths[indices] + 1  # + <eos>
    tgt_len = data.tgt_lengths[indices] + 1  # + <bos> (decoder input) or <eos> (target)
    order = (torch.randperm(indices.numel(), generator=generator) if generator is not None
             else torch.arange(indices.numel()))
    # Sort by the longer side (what the budget counts), then target, then source length; the
    # stable sorts keep the random order of exact ties.
    longer = torch.maximum(src_len, tgt_len)
    for key in (src_len, tgt_len, longer):
        order = order[torch.sort(key[order], stable=True).indices]
    src_sorted, tgt_sorted = src_len[order].tolist(), tgt_len[order].tolist()
    batches: list[torch.Tensor] = []
    start, max_s, max_t = 0, 0, 0
    for i, (s, t) in enumerate(zip(src_sorted, tgt_sorted)):
        new_s, new_t = max(max_s, s), max(max_t, t)
        if i > start and (i - start + 1) * max(new_s, new_t) > batch_tokens:
            batches.append(indices[order[start:i]])
            start, new_s, new_t = i, s, t
        max_s, max_t = new_s, new_t
    batches.append(indices[order[start:]])
    if generator is not None:
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return batches


@dataclass
class Batch:
    """Padded tensors for one batch (padding id 0, on the right).

    src: (B, S) source ids + <eos>; tgt_in: (B, T) <bos> + target ids; tgt_out: (B, T) target
    ids + <eos>; n_tokens: number of non-padding positions in tgt_out.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_tokens: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.src.to(device, non_blocking=non_blocking),
                     self.tgt_in.to(device, non_blocking=non_blocking),
                     self.tgt_out.to(device, non_blocking=non_blocking), self.n_tokens)

    def pin_memory(self) -> Batch:
        return Batch(self.src.pin_memory(), self.tgt_in.pin_memory(), self.tgt_out.pin_memory(),
                     self.n_tokens)


def _gather_padded(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   width: int) -> torch.Tensor:
    """(B, width) int64: row b holds flat[starts[b]: starts[b] + lengths[b]], then padding.
    One gather for the whole batch: a Python loop over sentences costs more than a GPU step."""
    if flat.numel() == 0:
        return torch.full((starts.numel(), width), PAD_ID, dtype=torch.long)
    positions = torch.arange(width)
    real = positions[None, :] < lengths[:, None]
    index = (starts[:, None] + positions[None, :]).clamp_(max=flat.numel() - 1)
    return torch.where(real, flat[index].long(), PAD_ID)


def collate(data: TokenizedText, indices: torch.Tensor) -> Batch:
    """Build the padded tensors for the pairs `indices` of `data`."""
    rows = torch.arange(indices.numel())
    src_len, tgt_len = data.src_lengths_at(indices), data.tgt_lengths_at(indices)
    src = _gather_padded(data.src_ids, data.src_offsets[indices], src_len, int(src_len.max()) + 1)
    src[rows, src_len] = EOS_ID
    # body: y1 … yn then padding, one column wider than the longest target
    body = _gather_padded(data.tgt_ids, data.tgt_offsets[indices], tgt_len, int(tgt_len.max()) + 1)
    tgt_in = torch.cat([torch.full((rows.numel(), 1), BOS_ID, dtype=torch.long), body[:, :-1]], 1)
    body[rows, tgt_len] = EOS_ID
    return Batch(src, tgt_in, body, int(tgt_len.sum()) + rows.numel())
