"""n-best translation with scores (search, Translator, CTranslate2, CLI) and forced decoding
(`tinyt score`): the scores are the ones beam search ranks by, and the log-probabilities of
given translations are tinyt's teacher-forced ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_search import LENGTHS, make_model, make_sources
from typer.testing import CliRunner

from tinyt.checkpoint import load_trained
from tinyt.cli import app
from tinyt.errors import TinytError
from tinyt.loading import load_translator
from tinyt.search import beam_search, greedy_search, max_output_lengths, nbest_search
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tinyt.translation import Translator

runner = CliRunner()


def invoke(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def forced_log_probs(model, src: list[int], tgt: list[int]) -> torch.Tensor:
    """(len(tgt) + 1,) log p of each target token and <eos>, from tinyt's teacher-forced
    logits of this one pair (no padding). `src` is without <eos>."""
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([src + [EOS_ID]]),
                                    torch.tensor([[BOS_ID] + tgt])))
    logp = torch.log_softmax(logits.float(), dim=-1)[0]
    return logp[torch.arange(len(tgt) + 1), torch.tensor(tgt + [EOS_ID])]


# -- the search ------------------------------------------------------------------------------

@pytest.mark.parametrize("beam,nbest,penalty", [(1, 1, 1.0), (4, 1, 1.0), (4, 4, 0.6),
                                                (5, 3, 1.0)])
def test_nbest_search_scores_are_normalised_log_probs_best_first(beam, nbest, penalty):
    model = make_model()
    src = make_sources(LENGTHS)
    max_len = max_output_lengths(src, 1.5, 3, 100)
    best = beam_search(model, src, max_len, beam, penalty)
    got = nbest_search(model, src, max_len, beam, nbest, penalty)
    assert len(got) == len(LENGTHS)
    for row, (n, hyps) in enumerate(zip(LENGTHS, got)):
        assert 1 <= len(hyps) <= nbest
        assert hyps[0][0] == best[row]  # the same search: its best is beam_search's output
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        assert len({tuple(tokens) for tokens, _ in hyps}) == len(hyps)
        for tokens, score in hyps:
            assert len(tokens) < int(max_len[row])
            logp = forced_log_probs(model, src[row, :n].tolist(), tokens)
            expected = float(logp.sum()) / (len(tokens) + 1) ** penalty
            assert score == pytest.approx(expected, abs=1e-4)


def test_greedy_nbest_is_greedy_search_with_its_score():
    model = make_model(seed=3)
    src = make_sources(LENGTHS, seed=3)
    max_len = max_output_lengths(src, 1.0, 1, 100)  # tight: some reach the limit
    got = nbest_search(model, src, max_len, 1, 1)
    assert [hyps[0][0] for hyps in got] == greedy_search(model, src, max_len)
    assert all(len(hyps) == 1 for hyps in got)


def test_nbest_larger_than_the_beam_is_refused():
    model = make_model()
    src = make_sources([3])
    with pytest.raises(TinytError, match="raise the beam"):
        nbest_search(model, src, torch.tensor([5]), 2, 3)


# -- one trained model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(module_small_corpus, overfit_run, tmp_path_factory) -> Path:
    return overfit_run(module_small_corpus, tmp_path_factory.mktemp("nbest") / "run",
                       d_model=64, layers=1, steps=200)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    pytest.importorskip("ctranslate2")
    from tinyt.ctranslate2_model import export_ctranslate2

    return export_ctranslate2(trained, tmp_path_factory.mktemp("nbest-ct2") / "model")


@pytest.fixture(scope="module")
def pairs(module_small_corpus) -> tuple[list[str], list[str]]:
    """The 50 validation pairs (German, English)."""
    return tuple((module_small_corpus / f"val.{lang}").read_text(encoding="utf-8").splitlines()
                 for lang in ("de", "en"))


def test_translate_nbest_starts_with_translate_and_keeps_order(trained, pairs):
    translator = load_translator(trained, device="cpu")
    lines = [pairs[0][0], "", pairs[0][1], "  ", pairs[0][2]]
    got = translator.translate_nbest(lines, 3, beam_size=4)
    assert len(got) == len(lines)
    assert got[1] == got[3] == [("", 0.0)]
    assert [hyps[0][0] for hyps in got] == translator.translate(lines, beam_size=4)
    for i in (0, 2, 4):
        assert len(got[i]) == 3 and all(isinstance(s, float) and s < 0 for _, s in got[i])
    with pytest.raises(TinytError, match="raise the beam size"):
        translator.translate_nbest(lines, 5, beam_size=4)


def test_ctranslate2_nbest_lists_and_scores_equal_tinyts(trained, exported, pairs):
    from tinyt.ctranslate2_model import CTranslate2Translator

    config, tokenizers, model, _ = load_trained(trained)
    ours = Translator(model, tokenizers, config.decoding, "cpu")
    theirs = load_translator(exported, device="cpu")
    assert isinstance(theirs, CTranslate2Translator)
    src_ids = tokenizers.encode_src(pairs[0])
    src = torch.full((len(src_ids), max(map(len, src_ids)) + 1), PAD_ID)
    for row, ids in enumerate(src_ids):
        src[row, : len(ids) + 1] = torch.tensor(ids + [EOS_ID])
    limits = max_output_lengths(src, config.decoding.max_len_ratio,
                                config.decoding.max_len_offset,
                                config.model.max_positions - 1).tolist()
    for beam, nbest in ((1, 1), (4, 3)):
        a = ours.translate_nbest_ids(src_ids, nbest, beam_size=beam)
        b = theirs.translate_nbest_ids(src_ids, nbest, beam_size=beam)
        # Only a search that reaches the length limit may differ (see ctranslate2_model).
        free = [i for i in range(len(a))
                if max(len(t) for t, _ in a[i] + b[i]) < limits[i] - 1]
        assert len(free) >= 0.8 * len(a)
        for i in free:
            assert [t for t, _ in a[i]] == [t for t, _ in b[i]]
            assert all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a[i], b[i]))
    with pytest.raises(TinytError, match="raise the beam"):
        theirs.translate_nbest_ids(src_ids, 3, beam_size=2)


# -- tinyt translate --nbest / --scores / --format -------------------------------------------

def test_cli_nbest_text_tsv_and_jsonl(trained, pairs, tmp_path):
    translator = load_translator(trained, device="cpu")
    lines = pairs[0][:3]
    expected = translator.translate_nbest(lines, 3, beam_size=3)
    infile = tmp_path / "in.de"
    infile.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = invoke("translate", "--run", trained, "--beam", 3, "--nbest", 3, "-i", infile)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [t for hyps in expected for t, _ in hyps]

    result = invoke("translate", "--run", trained, "--beam", 3, "--nbest", 3, "--scores",
                    input="\n".join(lines) + "\n")  # stdin
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [r[1] for r in rows] == [t for hyps in expected for t, _ in hyps]
    assert [float(r[0]) for r in rows] == pytest.approx(
        [s for hyps in expected for _, s in hyps], abs=1e-4)

    out = tmp_path / "nbest.tsv"
    result = invoke("translate", "--run", trained, "--beam", 3, "--nbest", 2, "--format", "tsv",
                    "-i", infile, "-o", out)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(int(r[0]), int(r[1]), r[3]) for r in rows] == [
        (i, rank, t) for i, hyps in enumerate(expected)
        for rank, (t, _) in enumerate(hyps[:2], start=1)]

    result = invoke("translate", "--run", trained, "--beam", 3, "--nbest", 3, "--format",
                    "jsonl", "-i", infile)
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["index"] for o in objects] == [0, 1, 2]
    assert [[h["text"] for h in o["hypotheses"]] for o in objects] == [
        [t for t, _ in hyps] for hyps in expected]

    # --scores alone: the best translation with its score.
    result = invoke("translate", "--run", trained, "--beam", 3, "--scores", lines[0])
    assert result.exit_code == 0, result.output
    score, text = result.stdout.rstrip("\n").split("\t")
    assert text == expected[0][0][0] and float(score) == pytest.approx(expected[0][0][1],
                                                                       abs=1e-4)


def test_cli_nbest_from_a_bundle_and_a_ctranslate2_folder(trained, exported, pairs, tmp_path):
    bundle = tmp_path / "model.tinyt"
    assert invoke("export", "--run", trained, "-o", bundle).exit_code == 0
    outputs = []
    for model in (trained, bundle, exported):
        option = "--run" if model == trained else "--model"
        result = invoke("translate", option, model, "--device", "cpu", "--beam", 1,
                        "--format", "tsv", pairs[0][0], pairs[0][1])
        assert result.exit_code == 0, result.output
        outputs.append([line.split("\t") for line in result.stdout.splitlines()])
    # Greedy search is the same algorithm in CTranslate2, length limit included.
    assert [[r[3] for r in rows] for rows in outputs] == [[r[3] for r in outputs[0]]] * 3
    for rows in outputs[1:]:
        assert [float(r[2]) for r in rows] == pytest.approx([float(r[2]) for r in outputs[0]],
                                                            abs=1e-3)


@pytest.mark.parametrize("args,expected", [
    (["--beam", 2, "--nbest", 3], "raise --beam to 3"),
    (["--nbest", 3], "raise --beam to 3"),  # the config's beam is 2
    (["--format", "xml"], "--format xml is not an output format"),
])
def test_bad_translate_options_are_one_line(trained, args, expected):
    result = invoke("translate", "--run", trained, *args, "Ein Hund.")
    assert result.exit_code == 2
    assert expected in result.output and len(result.output.strip().splitlines()) == 1


# -- tinyt score -----------------------------------------------------------------------------

def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_score_is_the_teacher_forced_log_probability(trained, pairs, tmp_path):
    src, tgt = pairs[0][:20] + [pairs[0][20]], pairs[1][:20] + [""]  # an empty target
    source, target = write_lines(tmp_path / "s.de", src), write_lines(tmp_path / "t.en", tgt)
    # float32 scores, as the reference's: on a CPU with native bf16, amp "auto" scores in bf16.
    result = invoke("score", "--run", trained, "--device", "cpu", "-s", source, "-t", target,
                    "--tokens", "--set", "train.amp=none")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == len(src)
    config, tokenizers, model, _ = load_trained(trained)
    model.eval()
    src_ids, tgt_ids = tokenizers.encode_src(src), tokenizers.encode_tgt(tgt)
    assert tgt_ids[-1] == []
    for row, s, t in zip(rows, src_ids, tgt_ids):
        logp = forced_log_probs(model, s, t)
        assert float(row[0]) == pytest.approx(float(logp.sum()), abs=1e-4)
        assert int(row[2]) == len(t) + 1
        assert float(row[1]) == pytest.approx(float(logp.sum()) / (len(t) + 1), abs=1e-4)
        assert [float(x) for x in row[3].split(" ")] == pytest.approx(logp.tolist(), abs=1e-4)
        assert row[4].split(" ") == [tokenizers.tgt.id_to_piece(i) for i in t + [EOS_ID]]
    assert rows[-1][4] == tokenizers.tgt.id_to_piece(EOS_ID)  # the empty target: <eos> alone

    out = tmp_path / "scores.tsv"
    result = invoke("score", "--run", trained, "-s", source, "-t", target, "-o", out,
                    "--set", "train.amp=none")
    assert result.exit_code == 0, result.output
    assert [line.split("\t") for line in out.read_text().splitlines()] == [r[:3] for r in rows]


def test_score_with_a_ctranslate2_export_is_ctranslate2s(trained, exported, pairs, tmp_path):
    from tinyt.ctranslate2_model import CTranslate2Translator

    src, tgt = pairs[0][:20], pairs[1][:20]
    source, target = write_lines(tmp_path / "s.de", src), write_lines(tmp_path / "t.en", tgt)
    result = invoke("score", "--model", exported, "--device", "cpu", "-s", source, "-t", target)
    assert result.exit_code == 0, result.output
    ours = invoke("score", "--run", trained, "--device", "cpu", "-s", source, "-t", target,
                  "--set", "train.amp=none")  # float32, as the export's (not bf16 autocast)
    translator = CTranslate2Translator(exported)
    tokenizers = translator.tokenizers
    expected = translator.token_log_probs(tokenizers.encode_src(src), tokenizers.encode_tgt(tgt))
    got = [float(line.split("\t")[0]) for line in result.stdout.splitlines()]
    assert got == pytest.approx([sum(x) for x in expected], abs=1e-4)
    assert got == pytest.approx([float(line.split("\t")[0])
                                 for line in ours.stdout.splitlines()], abs=1e-3)


def test_score_refuses_files_of_different_lengths_in_one_line(trained, tmp_path):
    source = write_lines(tmp_path / "s.de", ["Ein Hund.", "Zwei Katzen.", "Ein Mann."])
    target = write_lines(tmp_path / "t.en", ["A dog.", "Two cats."])
    result = invoke("score", "--run", trained, "-s", source, "-t", target)
    assert result.exit_code == 2
    assert "has 3 lines" in result.output and "has 2" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("score", "--run", trained, "-s", tmp_path / "missing.de", "-t", target)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_help_shows_examples_of_the_new_options():
    result = invoke("translate", "--help")
    assert result.exit_code == 0
    for option in ("--nbest", "--scores", "--format"):
        assert option in result.output
    result = invoke("score", "--help")
    assert result.exit_code == 0 and "Example: tinyt score" in result.output
    assert "--tokens" in result.output


def test_interactive_translation_writes_each_inputs_hypotheses_at_once(trained):
    import io

    from tinyt.cli import stream_translations

    translator = load_translator(trained, device="cpu")
    out = io.StringIO()
    stream_translations(translator, iter(["Ein Hund.", "Zwei Katzen."]), out, 3, None, nbest=2,
                        output_format="tsv")
    rows = [line.split("\t") for line in out.getvalue().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert [r[3] for r in rows] == [t for hyps in translator.translate_nbest(
        ["Ein Hund.", "Zwei Katzen."], 2, beam_size=3) for t, _ in hyps]
