"""Autoregressive decoding: batched greedy and beam search.

Both work on a batch of source sentences at once and use the model's incremental interface
(`start_decoding` / `decode_step`), which caches decoder self-attention keys/values and computes
cross-attention keys/values once per sentence. A sentence whose search is over leaves the batch,
so finished work is never recomputed. Results are token ids without <bos>/<eos>.
"""

from __future__ import annotations

import math

import torch

from tinyt.model import Transformer
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def max_output_lengths(src: torch.Tensor, ratio: float, offset: int, cap: int) -> torch.Tensor:
    """(B,) longest output (in tokens, <eos> included) allowed for each source (B, S):
    ratio * source length + offset, at most `cap` (the model's max positions)."""
    return output_length_limits((src != PAD_ID).sum(dim=1), ratio, offset, cap)


def output_length_limits(src_len: torch.Tensor, ratio: float, offset: int, cap: int
                         ) -> torch.Tensor:
    """`max_output_lengths` from the (B,) source lengths (<eos> included)."""
    return (torch.ceil(src_len.float() * ratio) + offset).clamp(1, cap).long()


@torch.no_grad()
def greedy_search(model: Transformer, src: torch.Tensor, max_len: torch.Tensor,
                  use_cache: bool = True) -> list[list[int]]:
    """Most probable next token at every step. src: (B, S); max_len: (B,)."""
    batch = src.size(0)
    state = model.start_decoding(src, use_cache=use_cache)
    prefix = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
    rows = torch.arange(batch, device=src.device)  # original sentence of each active row
    limit = max_len.to(src.device)
    results: list[list[int]] = [[] for _ in range(batch)]
    for step in range(int(limit.max())):
        next_token = model.decode_step(prefix, state).argmax(dim=-1)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        done = (next_token == EOS_ID) | (limit <= step + 1)
        if not bool(done.any()):
            continue
        for r in done.nonzero().flatten().tolist():
            # The last token is <eos>, or stands where the length limit forces <eos>: as in
            # beam search, a hypothesis has at most max_len - 1 tokens before its <eos>.
            results[int(rows[r])] = prefix[r, 1:-1].tolist()
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        prefix, rows, limit = prefix[keep], rows[keep], limit[keep]
        state = state.select(keep)
    return results


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, max_len: torch.Tensor, beam_size: int,
                length_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Beam search over the whole batch at once. src: (B, S); max_len: (B,).

    Each step scores K x V continuations of every sentence's K hypotheses and takes the 2K best:
    those ending in <eos> among the top K are finished (score = log-prob / length **
    length_penalty), and the best K that do not end in <eos> go on. A sentence stops when it has
    K finished hypotheses or reaches its length limit (where <eos> is forced), and its rows then
    leave the batch. Returns the best finished hypothesis of each sentence.
    """
    if beam_size == 1:
        return greedy_search(model, src, max_len, use_cache=use_cache)
    batch, k = src.size(0), beam_size
    device = src.device
    state = model.start_decoding(src, use_cache=use_cache)
    state = state.select(torch.arange(batch, device=device).repeat_interleave(k))
    prefix = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)
    # All K beams start as the same <bos> hypothesis: only beam 0 is live at the first step.
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0
    sentences = list(range(batch))  # original index of each active sentence
    limit = max_len.to(device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    for step in range(int(limit.max())):
        active = len(sentences)
        logp = model.decode_step(prefix, state).view(active, k, -1)  # (b, K, V)
        vocab = logp.size(-1)
        at_limit = limit <= step + 1
        if bool(at_limit.any()):
            forced = torch.full_like(logp, -math.inf)
            forced[..., EOS_ID] = logp[..., EOS_ID]
            logp = torch.where(at_limit[:, None, None], forced, logp)
        candidates = (scores[:, :, None] + logp).view(active, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # (b, 2K)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == EOS_ID

        final = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
        if bool(final.any()):
            length_norm = (step + 1) ** length_penalty
            for row, j in final.nonzero().tolist():
                sent = sentences[row]
                if len(finished[sent]) < k:
                    tokens = prefix[row * k + int(top_beam[row, j]), 1:].tolist()
                    finished[sent].append((float(top_scores[row, j]) / length_norm, tokens))

        # The K best candidates that do not end in <eos> (at most K of the 2K do).
        rank = torch.arange(2 * k, device=device) + is_eos.long() * 2 * k
        go_on = rank.argsort(dim=1)[:, :k]
        next_scores = top_scores.gather(1, go_on)
        next_beam = top_beam.gather(1, go_on)
        next_token = top_token.gather(1, go_on)

        done = torch.tensor([len(finished[s]) >= k for s in sentences], device=device) | at_limit
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        rows = (torch.arange(active, device=device)[:, None] * k + next_beam)  # (b, K)
        if keep.numel() < active:
            rows = rows[keep]
            state = state.select(rows.flatten(), cross=True)
            sentences = [sentences[i] for i in keep.tolist()]
            limit = limit[keep]
        else:
            state = state.select(rows.flatten(), cross=False)
        rows = rows.flatten()
        prefix = torch.cat([prefix[rows], next_token[keep].reshape(-1, 1)], dim=1)
        scores = next_scores[keep]

    return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]
