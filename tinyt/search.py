"""Autoregressive decoding: batched greedy and beam search.

Both work on a batch of source sentences at once and use the model's incremental interface
(`start_decoding` / `decode_step`), which caches decoder self-attention keys/values and computes
cross-attention keys/values once per sentence. A sentence whose search is over leaves the batch,
so finished work is never recomputed. Results are token ids without <bos>/<eos>.

`sample_search` draws one random translation per source instead (temperature, top-k,
top-p), each row from its own seeded generator.

`nbest_search` gives, with the same search, each sentence's best finished hypotheses and their
scores: length-normalised log-probabilities, sum of token log-probs (<eos> included) / length **
length_penalty, length counting <eos>. That is the score beam search ranks hypotheses by.
"""

from __future__ import annotations

import math

import torch

from tinyt.errors import TinytError
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
    return [tokens for tokens, _ in _scored_greedy(model, src, max_len, 1.0, use_cache)]


def _scored_greedy(model: Transformer, src: torch.Tensor, max_len: torch.Tensor,
                   length_penalty: float, use_cache: bool) -> list[tuple[list[int], float]]:
    """Greedy search, with each result's score (as beam search scores its hypotheses).
    src: (B, S); max_len: (B,). Returns B (tokens, score) pairs in batch order."""
    batch = src.size(0)
    state = model.start_decoding(src, use_cache=use_cache)
    prefix = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
    rows = torch.arange(batch, device=src.device)  # original sentence of each active row
    limit = max_len.to(src.device)
    total = torch.zeros(batch, dtype=torch.float64, device=src.device)  # (b,) log-prob so far
    results: list[tuple[list[int], float]] = [([], 0.0) for _ in range(batch)]
    for step in range(int(limit.max())):
        logp = model.decode_step(prefix, state)  # (b, V)
        next_token = logp.argmax(dim=-1)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        done = (next_token == EOS_ID) | (limit <= step + 1)
        if bool(done.any()):
            length_norm = (step + 1) ** length_penalty
            # A finished row ends in <eos>: chosen, or forced at the limit (so scored as <eos>).
            final = total + logp[:, EOS_ID].double()
            for r in done.nonzero().flatten().tolist():
                # The last token is <eos>, or stands where the length limit forces <eos>: as in
                # beam search, a hypothesis has at most max_len - 1 tokens before its <eos>.
                results[int(rows[r])] = (prefix[r, 1:-1].tolist(),
                                         float(final[r]) / length_norm)
        total = total + logp.gather(1, next_token[:, None])[:, 0].double()
        if not bool(done.any()):
            continue
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        prefix, rows, limit, total = prefix[keep], rows[keep], limit[keep], total[keep]
        state = state.select(keep)
    return results


@torch.no_grad()
def sample_search(model: Transformer, src: torch.Tensor, max_len: torch.Tensor,
                  seeds: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  length_penalty: float = 1.0, use_cache: bool = True
                  ) -> list[tuple[list[int], float]]:
    """One random translation of each source row, for back-translation and data augmentation.
    src: (B, S); max_len: (B,); seeds: B generator seeds.

    At each step the next token is drawn from the model's distribution with its log-
    probabilities divided by `temperature` (< 1 sharper, > 1 flatter), cut to the `top_k`
    most probable tokens (0: no cut) and to the smallest set of most probable tokens whose
    probability reaches `top_p` (nucleus sampling; 1: no cut). Row b draws from its own
    generator seeded with seeds[b], so its translation depends on its seed and source only,
    not on the rows it is batched with. Returns B (token ids without <bos>/<eos>, score)
    pairs, the score being what beam search ranks by under the model itself (temperature 1,
    no cut): sum of token log-probs (<eos> included) / length ** length_penalty.
    """
    batch = src.size(0)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    state = model.start_decoding(src, use_cache=use_cache)
    prefix = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
    rows = list(range(batch))  # original row of each active row
    limit = max_len.to(src.device)
    total = torch.zeros(batch, dtype=torch.float64, device=src.device)
    results: list[tuple[list[int], float]] = [([], 0.0) for _ in range(batch)]
    for step in range(int(limit.max())):
        logp = model.decode_step(prefix, state)  # (b, V)
        next_token = _draw(logp, [generators[r] for r in rows], temperature, top_k, top_p)
        next_token = torch.where(limit <= step + 1, EOS_ID, next_token)  # <eos> forced
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        total = total + logp.gather(1, next_token[:, None])[:, 0].double()
        done = next_token == EOS_ID
        if not bool(done.any()):
            continue
        length_norm = (step + 1) ** length_penalty
        for r in done.nonzero().flatten().tolist():
            results[rows[r]] = (prefix[r, 1:-1].tolist(), float(total[r]) / length_norm)
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        prefix, limit, total = prefix[keep], limit[keep], total[keep]
        rows = [rows[i] for i in keep.tolist()]
        state = state.select(keep)
    return results


def check_sampling(temperature: float, top_k: int, top_p: float,
                   names: tuple[str, str, str] = ("temperature", "top_k", "top_p")) -> None:
    """Raise TinytError, naming the setting as `names` spell them, unless `sample_search`
    can use these values."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise TinytError(f"{names[0]} {temperature} is impossible; use a number > 0 (1: the "
                         "model's own distribution)")
    if top_k < 0:
        raise TinytError(f"{names[1]} {top_k} is impossible; use 0 (all tokens) or more")
    if not 0 < top_p <= 1:
        raise TinytError(f"{names[2]} {top_p} is impossible; use a number in (0, 1] (1: all "
                         "tokens)")


def _draw(logp: torch.Tensor, generators: list[torch.Generator], temperature: float,
          top_k: int, top_p: float) -> torch.Tensor:
    """(b,) tokens drawn from logp (b, V) as `sample_search` says, row i with generators[i]:
    by inverting the cumulative distribution at a uniform number from the row's generator."""
    logits = logp.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the tokens more probable than it hold less than top_p (the most
        # probable one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)  # (b, V)
    uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                           for g in generators]).to(logp.device)
    # The first token whose cumulative probability exceeds u * total (never a token of
    # probability 0: its cumulative value equals the one before it).
    token = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(dim=-1)
    return token.clamp_(max=logp.size(-1) - 1)


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
    finished = _finished_hypotheses(model, src, max_len, beam_size, length_penalty, use_cache)
    return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


@torch.no_grad()
def nbest_search(model: Transformer, src: torch.Tensor, max_len: torch.Tensor, beam_size: int,
                 nbest: int, length_penalty: float = 1.0, use_cache: bool = True
                 ) -> list[list[tuple[list[int], float]]]:
    """The search `beam_search` does, giving each sentence's `nbest` best finished hypotheses
    as (token ids without <bos>/<eos>, score), best first. src: (B, S); max_len: (B,).

    The first hypothesis is always `beam_search`'s result (ties keep the order hypotheses
    finished in, as its max() does). A sentence has at most `nbest`, and fewer when its search
    finished fewer (a length limit reached before K beams were live). Beam 1 is greedy search:
    one hypothesis. `nbest` above `beam_size` is a TinytError: beam search keeps only K.
    """
    if not 1 <= nbest <= beam_size:
        raise TinytError(f"{nbest} best hypotheses need a beam of at least {nbest} (the beam "
                         f"is {beam_size}); raise the beam size")
    if beam_size == 1:
        return [[hyp] for hyp in _scored_greedy(model, src, max_len, length_penalty, use_cache)]
    finished = _finished_hypotheses(model, src, max_len, beam_size, length_penalty, use_cache)
    # sorted() is stable: equal scores stay in finishing order, the first being max()'s pick.
    return [[(tokens, score) for score, tokens in sorted(hyps, key=lambda h: -h[0])[:nbest]]
            for hyps in finished]


def _finished_hypotheses(model: Transformer, src: torch.Tensor, max_len: torch.Tensor,
                         beam_size: int, length_penalty: float, use_cache: bool
                         ) -> list[list[tuple[float, list[int]]]]:
    """Beam search proper (beam_size >= 2): each sentence's finished hypotheses as (score,
    token ids without <bos>/<eos>) in the order they finished: K, or more when several
    finished at the step that brought it to K (at most 2K - 1), or fewer at a length limit."""
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
            # Every hypothesis finished at the step that completes a sentence's K is kept (as
            # CTranslate2 keeps them), so that n-best lists are the K best of those: the ones
            # past the K-th are worse than the first of their step, so the best is the same.
            open_ = [len(hyps) < k for hyps in finished]
            for row, j in final.nonzero().tolist():
                sent = sentences[row]
                if open_[sent]:
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

    return finished
