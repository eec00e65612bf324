"""Ensembles (`tinyt translate --run R1 --run R2`): the members' log-probabilities are averaged
at every step and in forced decoding; members must share vocabularies and languages."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from test_nbest_and_scoring import pairs, trained
from test_search import LENGTHS, make_model, make_sources
from typer.testing import CliRunner

from tinyt.cli import app
from tinyt.config import TokenizerConfig
from tinyt.ensemble import Ensemble, check_same_vocabularies
from tinyt.errors import TinytError
from tinyt.loading import load_translator
from tinyt.search import beam_search, max_output_lengths, nbest_search
from tinyt.tokenizer import BOS_ID, train_or_load
from tinyt.translation import Translator

__all__ = ["pairs", "trained"]  # fixtures, imported for the tests below
runner = CliRunner()


def test_an_ensemble_averages_its_members_log_probabilities():
    a, b = make_model(seed=0), make_model(seed=1)
    ensemble = Ensemble([a, b]).eval()
    src = make_sources(LENGTHS)
    tgt_in = torch.tensor([[BOS_ID, 5, 6, 7]] * len(LENGTHS))
    with torch.no_grad():
        assert torch.allclose(ensemble.log_probs(src, tgt_in),
                              (a.log_probs(src, tgt_in) + b.log_probs(src, tgt_in)) / 2)
        state, sa, sb = (m.start_decoding(src) for m in (ensemble, a, b))
        prefix = tgt_in[:, :1]
        for step in range(3):
            mean = (a.decode_step(prefix, sa) + b.decode_step(prefix, sb)) / 2
            assert torch.allclose(ensemble.decode_step(prefix, state), mean, atol=1e-6)
            # Reordering hypotheses reorders every member's state alike.
            rows = torch.arange(len(LENGTHS)).flip(0)
            state, sa, sb = state.select(rows), sa.select(rows), sb.select(rows)
            prefix = torch.cat([prefix[rows], mean[rows].argmax(-1, keepdim=True)], dim=1)


def test_an_ensemble_of_one_model_twice_searches_as_the_model():
    model = make_model()
    ensemble = Ensemble([model, model]).eval()
    src = make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    assert beam_search(ensemble, src, max_len, 4) == beam_search(model, src, max_len, 4)
    one = nbest_search(model, src, max_len, 3, 3)
    two = nbest_search(ensemble, src, max_len, 3, 3)
    for x, y in zip(one, two):
        assert [t for t, _ in x] == [t for t, _ in y]
        assert [s for _, s in x] == pytest.approx([s for _, s in y], abs=1e-5)


def test_members_must_share_vocabularies(tmp_path):
    text = ["ein Hund läuft", "zwei Katzen schlafen", "a dog runs", "two cats sleep"] * 20
    small = train_or_load(TokenizerConfig(vocab_size=40), text, text, tmp_path / "a")
    same = train_or_load(TokenizerConfig(vocab_size=40), text, text, tmp_path / "b")
    other_text = ["drei Vögel singen", "three birds sing"] * 40
    other = train_or_load(TokenizerConfig(vocab_size=40), other_text, other_text, tmp_path / "c")
    check_same_vocabularies([small, same], ["a", "b"])
    with pytest.raises(TinytError, match="c has another source vocabulary than a"):
        check_same_vocabularies([small, same, other], ["a", "b", "c"])
    with pytest.raises(TinytError, match="vocabularies of different sizes"):
        Ensemble([make_model(vocab=40), make_model(vocab=41)])


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_translates_scores_and_evaluates_with_an_ensemble(trained, pairs, tmp_path):
    # A second member: the same run with other weights (noise added), so the ensemble
    # differs from each member.
    second = tmp_path / "second"
    shutil.copytree(trained, second)
    payload = torch.load(second / "best.pt", weights_only=False)
    torch.manual_seed(0)
    for name, tensor in payload["model"].items():
        if tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    torch.save(payload, second / "best.pt")

    sources = list(pairs[0][:8])
    members = [load_translator(r, device="cpu") for r in (trained, second)]
    ensemble = Translator(Ensemble([m.model for m in members]), members[0].tokenizers,
                          members[0].decoding, "cpu")
    source = tmp_path / "in.de"
    source.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    out = invoke("translate", "--run", trained, "--run", second, "-i", source, "--beam", "3")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ensemble.translate(sources, beam_size=3)
    api = load_translator([trained, second], device="cpu")
    assert api.translate(sources, beam_size=3) == out.stdout.splitlines()
    assert api.translate(sources, beam_size=3) != members[1].translate(sources, beam_size=3)

    target = tmp_path / "ref.en"
    target.write_text("".join(t + "\n" for t in pairs[1][:8]), encoding="utf-8")
    scored = invoke("score", "--run", trained, "--run", second, "-s", source, "-t", target)
    assert scored.exit_code == 0, scored.output
    one = [m.score(sources, list(pairs[1][:8])) for m in members]
    for line, (_, a), (_, b) in zip(scored.stdout.splitlines(), one[0], one[1]):
        assert float(line.split("\t")[0]) == pytest.approx((sum(a) + sum(b)) / 2, abs=1e-4)

    result = invoke("evaluate", "--run", trained, "--run", second, "--split", "valid",
                    "--beam", "2")
    assert result.exit_code == 0, result.output
    assert "ensemble of" in result.output and "BLEU" in result.output


def test_cli_refuses_mismatched_members(trained, tmp_path):
    other_pair = tmp_path / "fr"
    shutil.copytree(trained, other_pair)
    config = yaml.safe_load((other_pair / "config.yaml").read_text())
    config["data"]["tgt_lang"] = "fr"
    (other_pair / "config.yaml").write_text(yaml.safe_dump(config))
    result = invoke("translate", "--run", trained, "--run", other_pair, "Ein Hund.")
    assert result.exit_code == 2
    assert "translate different languages" in result.output
    assert result.output.count("\n") == 1

    folder = tmp_path / "plain-folder"
    folder.mkdir()
    result = invoke("translate", "--run", trained, "--model", folder, "Ein Hund.")
    assert result.exit_code == 2 and "an ensemble is made of runs" in result.output
