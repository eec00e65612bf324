"""`tinyt serve` (tinyt.server): LibreTranslate's API as its own client sees it, tinyt's API,
refusals of hostile input (4xx with one message, never 5xx), API keys, several models, start-up
errors, draining on SIGTERM, and the OpenAPI schema fuzzed by Schemathesis."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tinyt.config import config_from_dict
from tinyt.errors import TinytError
from tinyt.loading import load_model
from tinyt.server import create_app
from tinyt.serving import ServeSettings
from tinyt.training import train

SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest."]


@pytest.fixture(scope="module")
def loaded(served_run):
    return load_model([served_run], device="cpu")


@pytest.fixture(scope="module")
def client(loaded):
    settings = ServeSettings(char_limit=300, batch_limit=8, body_limit=20_000)
    with TestClient(create_app([loaded], settings)) as test_client:
        yield test_client


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- LibreTranslate's API -------------------------------------------------------------------------

def test_translate_gives_tinyts_translation_as_json_and_as_a_form(client, loaded):
    expected = loaded.translator.translate(SENTENCES)
    as_json = client.post("/translate", json={"q": SENTENCES[0], "source": "de",
                                              "target": "en"})
    assert as_json.status_code == 200
    assert as_json.json() == {"translatedText": expected[0]}
    as_form = client.post("/translate", data={"q": SENTENCES[0], "source": "de",
                                              "target": "en", "format": "text"})
    assert as_form.json() == {"translatedText": expected[0]}
    a_list = client.post("/translate", json={"q": SENTENCES, "source": "de", "target": "en"})
    assert a_list.json() == {"translatedText": expected}


def test_alternatives_are_the_next_best_hypotheses(client, loaded):
    nbest = loaded.translator.translate_nbest([SENTENCES[1]], 3, beam_size=3)[0]
    response = client.post("/translate", json={"q": SENTENCES[1], "source": "de",
                                               "target": "en", "alternatives": 2}).json()
    assert response["translatedText"] == nbest[0][0]
    assert response["alternatives"] == [text for text, _ in nbest[1:] if text != nbest[0][0]]


def test_each_line_is_a_sentence_and_empty_lines_stay(client, loaded):
    text = f"{SENTENCES[0]}\n\n{SENTENCES[2]}\r\n"
    expected = loaded.translator.translate([SENTENCES[0], "", SENTENCES[2], ""])
    response = client.post("/translate", json={"q": text, "source": "de", "target": "en"})
    assert response.json()["translatedText"] == "\n".join(expected)


def test_languages_and_source_auto(client):
    assert client.get("/languages").json() == [{"code": "de", "name": "German",
                                                "targets": ["en"]}]
    response = client.post("/translate", json={"q": SENTENCES[0], "source": "auto",
                                               "target": "en"}).json()
    assert response["detectedLanguage"] == {"confidence": 100.0, "language": "de"}
    assert client.post("/detect", data={"q": SENTENCES[0]}).json() == \
        [{"language": "de", "confidence": 100.0}]


def test_libretranslatepy_gets_the_translation_of_tinyt_translate(served_run, serve_process,
                                                                   tmp_path):
    """The real client against a real `tinyt serve`, and the CLI on the same sentence."""
    from libretranslatepy import LibreTranslateAPI

    server = serve_process("--run", str(served_run), "--device", "cpu", log_dir=tmp_path)
    try:
        api = LibreTranslateAPI(server.url)
        assert api.languages() == [{"code": "de", "name": "German", "targets": ["en"]}]
        theirs = api.translate(SENTENCES[0], "de", "en")
        assert api.detect(SENTENCES[0]) == [{"language": "de", "confidence": 100.0}]
    finally:
        assert server.stop() == 0, server.output()
    cli = subprocess.run([sys.executable, "-m", "tinyt", "translate", "--run", str(served_run),
                          "--device", "cpu", SENTENCES[0]], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert theirs == cli.stdout.rstrip("\n") != ""


# -- tinyt's own API ------------------------------------------------------------------------------

def test_api_translate_gives_nbest_with_the_search_scores(client, loaded):
    expected = loaded.translator.translate_nbest([SENTENCES[2]], 3, beam_size=4,
                                                 length_penalty=0.6)[0]
    body = client.post("/api/translate", json={"q": [SENTENCES[2]], "source": "de",
                                                "target": "en", "beam": 4, "nbest": 3,
                                                "length_penalty": 0.6}).json()
    assert (body["model"], body["beam"], body["length_penalty"]) == ("de-en", 4, 0.6)
    hyps = body["results"][0]["hypotheses"]
    assert [h["text"] for h in hyps] == [text for text, _ in expected]
    assert [h["score"] for h in hyps] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_api_score_is_forced_decoding(client, loaded):
    (ids, logps), = loaded.translator.score([SENTENCES[0]], ["A man rides a bike."])
    body = client.post("/api/score", json={"q": SENTENCES[0], "translation":
                                            "A man rides a bike.", "source": "de",
                                            "target": "en", "tokens": True}).json()
    result = body["results"][0]
    assert result["tokens"] == len(logps) == len(ids) + 1
    assert result["logprob"] == pytest.approx(sum(logps), abs=1e-4)
    assert result["token_logprobs"] == pytest.approx(logps, abs=1e-5)
    assert result["pieces"][-1] == "</s>"


def test_api_attention_covers_every_layer_and_head_of_the_chosen_translation(client, loaded):
    alternative = loaded.translator.translate_nbest([SENTENCES[1]], 2, beam_size=2)[0][1][0]
    body = client.post("/api/attention", json={"q": SENTENCES[1], "source": "de",
                                                "target": "en", "translation": alternative}
                       ).json()
    config = loaded.config.model
    assert body["translation"] == alternative
    assert (body["layers"], body["heads"]) == (config.dec_layers, config.n_heads)
    rows, cols = len(body["target_pieces"]), len(body["source_pieces"])
    assert body["source_pieces"][-1] == body["target_pieces"][-1] == "</s>"
    assert len(body["source_words"]) == cols and len(body["target_words"]) == rows
    for layer in body["cross"]:
        for head in layer:
            assert len(head) == rows and all(len(row) == cols for row in head)
            assert all(abs(sum(row) - 1) < 5e-3 for row in head)
    # Without a translation it shows the best one.
    best = client.post("/api/attention", json={"q": SENTENCES[1], "source": "de",
                                                "target": "en"}).json()
    assert best["translation"] == loaded.translator.translate([SENTENCES[1]])[0]


def test_models_lists_the_served_model(client, loaded):
    body = client.get("/api/models").json()
    (model,) = body["models"]
    assert model["id"] == "de-en" and model["attention"] is True and model["engine"] == "tinyt"
    assert model["beam_size"] == loaded.config.decoding.beam_size
    assert body["limits"]["char_limit"] == 300


# -- refusals: 4xx with one message, never a 5xx --------------------------------------------------

HOSTILE = [
    # (path, how the body is sent, body, status, words the message must hold)
    ("/translate", "json", {"q": "x", "source": "fr", "target": "en"}, 400, "fr is not"),
    ("/translate", "json", {"q": "x", "source": "de", "target": "xx"}, 400, "xx is not"),
    ("/translate", "json", {"source": "de", "target": "en"}, 400, "missing q"),
    ("/translate", "json", {"q": "", "source": "de", "target": "en"}, 400, "missing q"),
    ("/translate", "json", {"q": 5, "source": "de", "target": "en"}, 400, "string"),
    ("/translate", "json", {"q": ["a", 1], "source": "de", "target": "en"}, 400, "string"),
    ("/translate", "json", {"q": "x", "source": ["de"], "target": "en"}, 400, "language"),
    ("/translate", "json", {"q": "x" * 301, "source": "de", "target": "en"}, 400, "text limit"),
    ("/translate", "json", {"q": "a\n" * 9, "source": "de", "target": "en"}, 400,
     "batch limit"),
    ("/translate", "json", {"q": "x", "source": "de", "target": "en", "format": "html"}, 400,
     "html format"),
    ("/translate", "json", {"q": "x", "source": "de", "target": "en", "alternatives": "x"},
     400, "not a number"),
    ("/translate", "json", {"q": "x", "source": "de", "target": "en", "alternatives": 99},
     400, "alternatives"),
    ("/translate", "raw-json", b'{"q": "x", "source": "de", "target": "en", "alternatives": '
                               b'1e400}', 400, "not a number"),
    ("/translate", "raw-json", b'{"q": "x", "source": "de", "target": "en", "alternatives": '
                               b'NaN}', 400, "not a number"),
    ("/translate", "raw-json", b'{"q": "x", "source": "de"', 400, "JSON"),
    ("/translate", "raw-json", b'["q"]', 400, "JSON object"),
    ("/translate", "raw-json", b'{"q": "\xff\xfe", "source": "de", "target": "en"}', 400,
     "UTF-8"),
    ("/translate", "raw-form", b"q=%FF%FE&source=de&target=en", 400, "UTF-8"),
    ("/translate", "raw-form", b"q=" + b"x" * 30_000, 413, "larger than"),
    ("/translate", "raw-multipart", b"--x\r\nbroken", 400, "missing q"),
    # Text that is not UTF-8 is refused in every channel, not read as latin-1 or U+FFFD.
    ("/translate", "raw-multipart", b'--x\r\nContent-Disposition: form-data; name="q"\r\n\r\n'
                                    b"\xff\xfe\r\n--x--\r\n", 400, "not UTF-8"),
    ("/translate", "raw-multipart", b'--x\r\nContent-Disposition: form-data; name="q"; '
                                    b'filename="a.txt"\r\n\r\nhi\r\n--x--\r\n', 400, "file"),
    ("/translate?q=%FF&source=de&target=en", "raw-form", b"", 400, "query string"),
    # Nesting deeper than Python's recursion limit.
    ("/translate", "raw-json", b'{"q": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", 400, "JSON"),
    ("/api/translate", "raw-json", b'{"q": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", 400,
     "JSON"),
    ("/detect", "json", {}, 400, "missing q"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en", "beam": 0}, 422,
     "beam"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en", "nbest": 99}, 400,
     "limit of 16"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en", "nbest": 101}, 422,
     "nbest"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en", "beam": 17}, 400,
     "limit of 16"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en", "colour": 1}, 422,
     "colour"),
    ("/api/translate", "json", {"q": {"a": 1}, "source": "de", "target": "en"}, 422, "q"),
    ("/api/translate", "raw-json", b"{not json", 422, "not valid JSON"),
    ("/api/translate", "raw-json", b'{"q": "\xc3", "source": "de", "target": "en"}', 400,
     "UTF-8"),
    ("/api/translate", "json", {"q": "x", "source": "de", "target": "en",
                                "length_penalty": 1e308}, 422, "length_penalty"),
    ("/api/score", "json", {"q": ["a", "b"], "translation": ["a"], "source": "de",
                            "target": "en"}, 400, "one translation"),
    ("/api/score", "json", {"q": "a", "translation": "b " * 200, "source": "de",
                            "target": "en"}, 400, "text limit"),
    ("/api/attention", "json", {"q": "  ", "source": "de", "target": "en"}, 422, "q:"),
    ("/api/attention", "json", {"q": "Ein Hund.\nEine Katze.", "source": "de", "target": "en"},
     422, "q:"),
    ("/api/attention", "json", {"q": "Ein Hund.", "source": "de", "target": "en",
                                "translation": "a " * 140}, 400, "tokens"),
    ("/nowhere", "json", {}, 404, "does not exist"),
]


@pytest.mark.parametrize("path,kind,body,status,words", HOSTILE,
                         ids=[f"{p}-{i}" for i, (p, *_rest) in enumerate(HOSTILE)])
def test_hostile_requests_are_refused_with_a_message(client, path, kind, body, status, words):
    if kind == "json":
        response = client.post(path, json=body)
    else:
        content_type = {"raw-json": "application/json",
                        "raw-form": "application/x-www-form-urlencoded",
                        "raw-multipart": "multipart/form-data; boundary=x"}[kind]
        response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and "\n" not in message and words in message
    assert client.get("/health").json()["status"] == "ok"  # still serving


@pytest.mark.parametrize("path", ["/translate", "/api/translate", "/api/score",
                                  "/api/attention"])
def test_a_lone_surrogate_is_read_as_a_replacement_character(client, loaded, path):
    """JSON's \\uD800 escape carries a lone surrogate, which no encoder takes: it is read as
    U+FFFD, as undecodable bytes are elsewhere, not a 500."""
    raw = b'{"q": "Ein \\ud800 Hund.", "source": "de", "target": "en"'
    raw += b', "translation": "A \\udfff dog."}' if path == "/api/score" else b"}"
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    if path == "/translate":
        expected = loaded.translator.translate(["Ein \ufffd Hund."])[0]
        assert response.json()["translatedText"] == expected


def test_wrong_method_is_405_with_a_message(client):
    response = client.get("/translate")
    assert response.status_code == 405 and "not allowed" in response.json()["error"]


def test_api_keys_missing_is_400_wrong_is_403_right_translates(loaded):
    settings = ServeSettings(api_keys=frozenset({"secret-1"}))
    with TestClient(create_app([loaded], settings)) as keyed:
        body = {"q": SENTENCES[0], "source": "de", "target": "en"}
        missing = keyed.post("/translate", json=body)
        wrong = keyed.post("/translate", data={**body, "api_key": "guess"})
        right = keyed.post("/translate", data={**body, "api_key": "secret-1"})
        api = keyed.post("/api/translate", json={**body, "api_key": "guess"})
    assert missing.status_code == 400 and "API key" in missing.json()["error"]
    assert wrong.status_code == 403 and wrong.json() == {"error": "Invalid API key"}
    assert right.status_code == 200 and right.json()["translatedText"]
    assert api.status_code == 403


def test_a_request_that_outlives_the_time_limit_is_408(loaded):
    with TestClient(create_app([loaded], ServeSettings(request_timeout=1e-9))) as slow:
        response = slow.post("/translate", json={"q": SENTENCES[0], "source": "de",
                                                 "target": "en"})
    assert response.status_code == 408 and "--request-timeout" not in response.json()["error"]
    assert "longer than" in response.json()["error"]


# -- several models, start-up errors --------------------------------------------------------------

@pytest.fixture(scope="module")
def reverse_run(module_small_corpus, tiny_config_for, tmp_path_factory):
    """A tiny en->de run (a few updates: only its language pair matters here)."""
    raw = tiny_config_for(module_small_corpus, tmp_path_factory.mktemp("en_de") / "run")
    raw["data"].update(src_lang="en", tgt_lang="de")
    raw["train"].update(max_steps=4, valid_every=4, valid_bleu=False)
    train(config_from_dict(raw), progress_bars=False)
    return Path(raw["run_dir"])


def test_several_models_one_per_language_pair(loaded, reverse_run):
    other = load_model([reverse_run], device="cpu")
    with TestClient(create_app([loaded, other])) as both:
        languages = both.get("/languages").json()
        to_german = both.post("/translate", json={"q": "A dog.", "source": "en",
                                                  "target": "de"})
        to_english = both.post("/translate", json={"q": SENTENCES[0], "source": "de",
                                                   "target": "en"})
        unsupported = both.post("/translate", json={"q": "x", "source": "de", "target": "de"})
    assert languages == [{"code": "de", "name": "German", "targets": ["en"]},
                         {"code": "en", "name": "English", "targets": ["de"]}]
    assert to_german.json()["translatedText"] == other.translator.translate(["A dog."])[0]
    assert to_english.json()["translatedText"] == loaded.translator.translate(SENTENCES[:1])[0]
    assert unsupported.status_code == 400 and "not available" in unsupported.json()["error"]
    with TestClient(create_app([loaded, other])) as both:
        german = both.post("/detect", json={"q": "Ein Hund läuft über die Wiese."}).json()
        english = both.post("/detect", json={"q": "A dog runs across the meadow."}).json()
        auto = both.post("/translate", json={"q": "Ein Hund läuft über die Wiese.",
                                             "source": "auto", "target": "en"}).json()
    assert german[0]["language"] == "de" and german[0]["confidence"] > 50
    assert english[0]["language"] == "en" and english[0]["confidence"] > 50
    assert sum(d["confidence"] for d in german) == pytest.approx(100, abs=0.1)
    assert auto["detectedLanguage"]["language"] == "de"
    with pytest.raises(TinytError, match="one model per language pair"):
        create_app([loaded, load_model([loaded.run], device="cpu")])


def test_a_bundle_is_served_with_its_attention(served_run, loaded, tmp_path):
    from tinyt.bundle import export_bundle

    bundle = load_model([], [export_bundle(served_run, tmp_path / "model.tinyt")], device="cpu")
    with TestClient(create_app([bundle])) as served:
        translated = served.post("/translate", json={"q": SENTENCES, "source": "de",
                                                     "target": "en"}).json()
        attention = served.post("/api/attention", json={"q": SENTENCES[0], "source": "de",
                                                        "target": "en"})
    assert translated["translatedText"] == loaded.translator.translate(SENTENCES)
    assert attention.status_code == 200 and attention.json()["layers"] == 2


def test_a_ctranslate2_int8_export_is_served(served_run, tmp_path):
    pytest.importorskip("ctranslate2")
    from tinyt.ctranslate2_model import export_ctranslate2

    folder = export_ctranslate2(served_run, tmp_path / "ct2", quantization="int8")
    exported = load_model([], [folder], device="cpu")
    with TestClient(create_app([exported])) as ct2:
        translated = ct2.post("/translate", json={"q": SENTENCES, "source": "de",
                                                  "target": "en", "alternatives": 1})
        models = ct2.get("/api/models").json()["models"]
        attention = ct2.post("/api/attention", json={"q": SENTENCES[0], "source": "de",
                                                     "target": "en"})
    assert translated.json()["translatedText"] == exported.translator.translate(SENTENCES)
    assert models[0]["engine"] == "ctranslate2" and models[0]["attention"] is False
    assert attention.status_code == 400 and "CTranslate2" in attention.json()["error"] \
        or "ctranslate2" in attention.json()["error"]


@pytest.mark.parametrize("args,words", [
    (["--run", "does/not/exist"], "does not exist"),
    (["--model", "nothing.tinyt"], "does not exist"),
    (["--host", "no.such.host.invalid"], "--host"),
    (["--api-keys", "missing-keys.txt"], "--api-keys"),
])
def test_start_up_problems_are_one_error_line_and_exit_2(served_run, serve_process, tmp_path,
                                                        args, words):
    if args[0] in ("--host", "--api-keys"):
        args = ["--run", str(served_run), *args]
    server = serve_process(*args, log_dir=tmp_path, wait=False)
    assert server.process.wait(300) == 2
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_a_damaged_model_is_one_error_line_and_exit_2(served_run, serve_process, tmp_path):
    damaged = tmp_path / "damaged.tinyt"
    damaged.write_bytes(b"not a bundle at all")
    server = serve_process("--model", str(damaged), log_dir=tmp_path, wait=False)
    assert server.process.wait(300) == 2
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_a_port_in_use_is_one_error_line_and_exit_2(served_run, serve_process, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        process = subprocess.run(
            [sys.executable, "-m", "tinyt", "serve", "--run", str(served_run), "--port",
             str(port)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert process.stderr.strip().startswith("error: cannot listen on")
    assert len(process.stderr.strip().splitlines()) == 1


# -- draining on SIGTERM --------------------------------------------------------------------------

# `tinyt serve` whose decoding waits until a gate file exists: a test can hold a request in
# flight for as long as it needs, whatever the machine's speed.
GATED_SERVE = """
import pathlib, sys, time
from tinyt.translation import Translator
gate = pathlib.Path(sys.argv.pop(1))
decode = Translator.translate_nbest
def held(self, *args, **kwargs):
    while not gate.exists():
        time.sleep(0.01)
    return decode(self, *args, **kwargs)
Translator.translate_nbest = held
from tinyt.cli import main
main()
"""


def wait_until(condition, what: str, server) -> None:
    """Poll `condition()` until it holds (a hang guard of 300 s, not a speed check)."""
    deadline = time.monotonic() + 300
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened:\n{server.output()}"
        time.sleep(0.01)


def test_sigterm_answers_the_requests_in_flight_refuses_new_ones_and_exits_0(
        served_run, serve_process, tmp_path):
    script, gate = tmp_path / "gated_serve.py", tmp_path / "gate"
    script.write_text(GATED_SERVE)
    server = serve_process("--run", str(served_run), "--device", "cpu", log_dir=tmp_path,
                           program=[sys.executable, str(script), str(gate)])
    body = json.dumps({"q": "\n".join(SENTENCES), "source": "de", "target": "en"}).encode()
    answer: dict = {}

    def send() -> None:
        answer["status"], answer["body"] = post(server.url + "/api/translate", body,
                                                "application/json")

    def health() -> dict:
        with urllib.request.urlopen(server.url + "/health", timeout=60) as response:
            return json.loads(response.read())

    def refuses_connections() -> bool:
        address = urllib.parse.urlsplit(server.url)
        try:
            with socket.create_connection((address.hostname, address.port), timeout=5):
                return False
        except OSError:  # the listening socket is closed
            return True

    client = threading.Thread(target=send)
    client.start()
    wait_until(lambda: health()["queued_sentences"] == len(SENTENCES), "the request queued",
               server)
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping: no new connections" in server.output(), "the stop message",
               server)
    assert f"({len(SENTENCES)} sentences queued or decoding)" in server.output()
    wait_until(refuses_connections, "new connections refused", server)
    assert client.is_alive() and server.process.poll() is None  # the request is still held
    gate.touch()
    client.join(600)
    assert server.process.wait(600) == 0, server.output()
    assert answer["status"] == 200
    assert len(answer["body"]["results"][0]["hypotheses"][0]["text"].split("\n")) == 3
    assert f"answered 1 translation requests ({len(SENTENCES)} sentences)" in server.output()


# -- fuzzing the schema ---------------------------------------------------------------------------

def test_schemathesis_finds_no_server_error(served_run, serve_process, tmp_path):
    """Every operation of the OpenAPI schema, with generated bodies (valid and invalid, seeded):
    never a 5xx, and every refusal is JSON with an error message."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    server = serve_process("--run", str(served_run), "--device", "cpu", "--char-limit", "200",
                           log_dir=tmp_path)
    failures: list[str] = []
    tried = []
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case):
                response = case.call(timeout=120)
                tried.append(f"{case.method} {case.path}")
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path}: {response.status_code} "
                                    f"{response.text[:200]}")
                elif response.status_code >= 400 and not isinstance(
                        response.json().get("error"), str):
                    failures.append(f"{case.method} {case.path}: {response.status_code} "
                                    f"without an error message: {response.text[:200]}")

            check()
    finally:
        assert server.stop() == 0, server.output()
    assert failures == []
    assert len(set(tried)) >= 9 and len(tried) > 100
