"""Greedy and beam search: cached = uncached, batched = one by one, beam finds the best."""

import itertools

import pytest
import torch

from tinyt.config import ModelConfig
from tinyt.model import Transformer
from tinyt.search import beam_search, greedy_search, max_output_lengths
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def make_model(vocab: int = 40, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, d_ff=64, dropout=0.0)
    model = Transformer(config, vocab, vocab).eval()
    # Make <eos> rarer than chance so hypotheses have various lengths and some hit the limit.
    with torch.no_grad():
        model.tgt_embed.weight[EOS_ID] *= 0.5
    return model


def make_sources(lengths, vocab=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths) + 1), PAD_ID)
    for row, n in enumerate(lengths):
        src[row, :n] = torch.randint(4, vocab, (n,), generator=g)
        src[row, n] = EOS_ID
    return src


LENGTHS = [5, 1, 9, 3, 7, 2]


def test_max_output_lengths():
    src = make_sources([4, 10])
    assert max_output_lengths(src, 1.5, 2, 100).tolist() == [10, 19]
    assert max_output_lengths(src, 1.5, 2, 12).tolist() == [10, 12]


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_cached_and_uncached_decoding_agree(beam):
    model = make_model()
    src = make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    cached = beam_search(model, src, max_len, beam, 1.0, use_cache=True)
    uncached = beam_search(model, src, max_len, beam, 1.0, use_cache=False)
    assert cached == uncached
    assert any(len(h) > 0 for h in cached)


@pytest.mark.parametrize("beam", [1, 4])
def test_batched_equals_one_sentence_at_a_time(beam):
    model = make_model(seed=3)
    src = make_sources(LENGTHS, seed=5)
    max_len = max_output_lengths(src, 1.2, 2, 100)
    batched = beam_search(model, src, max_len, beam, 0.6)
    for i, n in enumerate(LENGTHS):
        alone = beam_search(model, src[i: i + 1, : n + 1], max_len[i: i + 1], beam, 0.6)
        assert alone[0] == batched[i], f"sentence {i}"


def test_outputs_respect_length_limit_and_exclude_specials():
    model = make_model(seed=1)
    src = make_sources(LENGTHS)
    max_len = torch.full((len(LENGTHS),), 4)
    for hyps in (greedy_search(model, src, max_len), beam_search(model, src, max_len, 3)):
        assert len(hyps) == len(LENGTHS)
        for hyp in hyps:
            assert len(hyp) <= 3  # 4 output positions, the last one <eos>
            assert EOS_ID not in hyp


@torch.no_grad()
def sequence_score(model, src, tokens, penalty):
    """Sum of log-probabilities of `tokens` + <eos>, over length ** penalty (exact)."""
    state = model.start_decoding(src, use_cache=False)
    prefix = torch.tensor([[BOS_ID]])
    total = 0.0
    for tok in list(tokens) + [EOS_ID]:
        total += float(model.decode_step(prefix, state)[0, tok])
        prefix = torch.cat([prefix, torch.tensor([[tok]])], dim=1)
    return total / (len(tokens) + 1) ** penalty


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_wide_beam_finds_the_exact_best_hypothesis(penalty):
    # Vocabulary of 6 (4 specials + 2 words), outputs of at most 3 tokens: 31 hypotheses in all,
    # so a beam of 50 holds every prefix and must return the exact argmax.
    model = make_model(vocab=6, seed=7)
    src = make_sources([3], vocab=6, seed=2)
    max_len = torch.tensor([3])
    got = beam_search(model, src, max_len, beam_size=50, length_penalty=penalty)[0]
    non_eos = [t for t in range(6) if t != EOS_ID]
    candidates = [list(c) for n in range(3) for c in itertools.product(non_eos, repeat=n)]
    best = max(candidates, key=lambda c: sequence_score(model, src, c, penalty))
    assert got == best
    # and greedy is never better than the exact beam
    greedy = greedy_search(model, src, max_len)[0]
    assert sequence_score(model, src, greedy, penalty) <= sequence_score(model, src, got, penalty) + 1e-6
