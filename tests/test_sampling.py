"""Sampling (`tinyt translate --sample`): tokens are drawn from the model's distribution as
temperature, top-k and top-p shape it, each sentence from its own seeded generator; scores are
the model's own length-normalised log-probabilities."""

from __future__ import annotations

import json

import pytest
import torch
from test_nbest_and_scoring import forced_log_probs, pairs, trained
from test_search import LENGTHS, make_model, make_sources
from typer.testing import CliRunner

from tinyt.cli import app
from tinyt.errors import TinytError
from tinyt.loading import load_translator
from tinyt.search import (
    _draw,
    greedy_search,
    max_output_lengths,
    nbest_search,
    sample_search,
)

__all__ = ["pairs", "trained"]  # fixtures, imported for the tests below
runner = CliRunner()


def test_top_k_1_is_greedy_search_with_its_score():
    model, src = make_model(), make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    drawn = sample_search(model, src, max_len, list(range(len(LENGTHS))), top_k=1,
                          length_penalty=0.6)
    assert [tokens for tokens, _ in drawn] == greedy_search(model, src, max_len)
    greedy = nbest_search(model, src, max_len, 1, 1, length_penalty=0.6)
    for (_, score), [(_, expected)] in zip(drawn, greedy):
        assert score == pytest.approx(expected, rel=1e-6)


def test_a_rows_draw_depends_on_its_seed_only():
    model, src = make_model(), make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    seeds = [11, 12, 13, 14, 15, 16]
    together = sample_search(model, src, max_len, seeds)
    alone = [sample_search(model, src[i: i + 1, : LENGTHS[i] + 1], max_len[i: i + 1],
                           [seeds[i]])[0] for i in range(len(LENGTHS))]
    # Batched with others or alone, the same tokens (scores equal up to float rounding).
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [s for _, s in together] == pytest.approx([s for _, s in alone], abs=1e-5)
    assert sample_search(model, src, max_len, seeds) == together
    other = sample_search(model, src, max_len, [s + 100 for s in seeds])
    assert [t for t, _ in other] != [t for t, _ in together]


def test_scores_are_the_models_log_probabilities_of_the_draws():
    model, src = make_model(), make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    drawn = sample_search(model, src, max_len, list(range(6)), temperature=1.5, top_p=0.9,
                          length_penalty=1.0)
    for row, (tokens, score) in enumerate(drawn):
        logp = forced_log_probs(model, src[row, : LENGTHS[row]].tolist(), tokens)
        assert score == pytest.approx(float(logp.sum()) / (len(tokens) + 1), abs=1e-4)
        assert len(tokens) + 1 <= int(max_len[row])


def first_token_frequencies(logp: torch.Tensor, n: int, **options) -> torch.Tensor:
    rows = logp.expand(n, -1)
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens = _draw(rows, generators, **options)
    return torch.bincount(tokens, minlength=logp.size(-1)).double() / n


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(1, 30) * 2, dim=-1)
    freq = first_token_frequencies(logp, 20_000, temperature=temperature, top_k=0, top_p=1.0)
    expected = torch.softmax(logp[0].double() / temperature, dim=-1)
    assert (freq - expected).abs().sum() / 2 < 0.03  # total variation distance


def test_top_k_and_top_p_draw_only_from_their_sets():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(1, 30) * 2, dim=-1)
    probs = logp[0].exp()
    order = probs.argsort(descending=True)
    freq = first_token_frequencies(logp, 5_000, temperature=1.0, top_k=4, top_p=1.0)
    assert set(freq.nonzero().flatten().tolist()) == set(order[:4].tolist())
    # top_p: the fewest most probable tokens whose probability reaches 0.7.
    cumulative = probs[order].cumsum(0)
    nucleus = order[: int((cumulative < 0.7).sum()) + 1]
    freq = first_token_frequencies(logp, 5_000, temperature=1.0, top_k=0, top_p=0.7)
    assert set(freq.nonzero().flatten().tolist()) == set(nucleus.tolist())
    expected = torch.zeros(30, dtype=torch.float64)
    expected[nucleus] = probs[nucleus].double() / probs[nucleus].sum()
    assert (freq - expected).abs().sum() / 2 < 0.04


def test_translator_sample_is_reproducible_and_independent_of_batching(trained, pairs):
    sources = list(pairs[0][:12]) + ["", "   "]
    translator = load_translator(trained, device="cpu")
    first = translator.sample(sources, n=3, temperature=1.3, seed=5)
    assert len(first) == len(sources) and all(len(d) == 3 for d in first[:12])
    assert first[12:] == [[("", 0.0)], [("", 0.0)]]
    texts = lambda draws: [[text for text, _ in d] for d in draws]
    translator.decoding.batch_size = 2
    assert texts(translator.sample(sources, n=3, temperature=1.3, seed=5)) == texts(first)
    assert texts(translator.sample(sources, n=3, temperature=1.3, seed=6)) != texts(first)
    # At a low temperature every draw is the greedy translation.
    cold = translator.sample(sources[:12], n=2, temperature=1e-4, seed=5)
    assert [d[0][0] for d in cold] == translator.translate(sources[:12], beam_size=1)
    with pytest.raises(TinytError, match="temperature"):
        translator.sample(sources, temperature=0.0)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_sampling(trained, pairs, tmp_path):
    source = tmp_path / "in.de"
    source.write_text("".join(s + "\n" for s in pairs[0][:5]), encoding="utf-8")
    args = ["translate", "--run", trained, "-i", source, "--sample", "--top-p", "0.9",
            "--seed", "3"]
    plain = invoke(*args)
    assert plain.exit_code == 0, plain.output
    assert len(plain.stdout.splitlines()) == 5
    assert invoke(*args).stdout == plain.stdout
    jsonl = invoke(*args, "--nbest", "4", "--format", "jsonl")
    records = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [r["index"] for r in records] == list(range(5))
    assert all(len(r["hypotheses"]) == 4 for r in records)
    # The first draw of each input is the plain run's draw.
    assert [r["hypotheses"][0]["text"] for r in records] == plain.stdout.splitlines()
    # An ensemble samples too.
    both = invoke("translate", "--run", trained, "--run", trained, "-i", source, "--sample")
    assert both.exit_code == 0 and len(both.stdout.splitlines()) == 5


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "3"], "--top-k applies only to sampling"),
    (["--temperature", "2", "--seed", "1"], "--temperature, --seed apply only to sampling"),
    (["--sample", "--beam", "4"], "--beam and --sample exclude each other"),
    (["--sample", "--temperature", "0"], "--temperature 0.0 is impossible"),
    (["--sample", "--temperature", "nan"], "--temperature nan is impossible"),
    (["--sample", "--top-p", "0"], "--top-p 0.0 is impossible"),
    (["--sample", "--top-k", "-1"], "--top-k -1 is impossible"),
])
def test_bad_sampling_options_are_one_line(trained, extra, message):
    result = invoke("translate", "--run", trained, *extra, "Ein Hund.")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output, result.output
