"""The web page of `tinyt serve` (tinyt/web/) in a real, headless browser: Debian's Chromium
(/usr/bin/chromium) driven by Playwright's sync API, against a real server of a small trained
model. The page's answers are checked against the server's own API (POST /api/translate,
POST /api/attention) with the same settings.

Every wait is on the page's state (Playwright's auto-waiting `expect`), never a fixed sleep;
the 60 s timeouts are fail-safes against a hang, not speed checks.

Without /usr/bin/chromium (or the playwright package) the tests skip, saying how to install
it, except under CI=true, where they fail. TINYT_SCREENSHOT=1 also writes the screenshot of the
page to docs/serve-page.png (it always goes to pytest's tmp folder); TINYT_SCREENSHOT_RUN=RUN
takes that screenshot of another run (a real model) instead of the tests' small one."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # a fail-safe: every wait below ends as soon as the page is ready

# A Multi30k-style caption, and lines 59 and 1 of the training slice the served model has seen.
SENTENCE = "Ein Mann fährt Fahrrad."
SECOND_SENTENCE = "Ein Hund rennt im Schnee."
LONG_SENTENCE = "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
# For a screenshot of a real model (TINYT_SCREENSHOT_RUN): its alternatives tell a story.
SCREENSHOT_SENTENCE = "Eine Frau mit rotem Hut spielt Gitarre auf der Straße."

# Counts the page's calls of each /api/ path (window.__apiCalls), so that a test can see
# whether an action sent a request at the moment it returns.
COUNT_CALLS = """
(() => {
  const original = window.fetch.bind(window);
  window.__apiCalls = {};
  window.fetch = (input, init) => {
    const path = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
    window.__apiCalls[path] = (window.__apiCalls[path] || 0) + 1;
    return original(input, init);
  };
})();
"""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(message: str):
    """Skip with `message`; under CI=true, fail: CI must run these tests."""
    if _in_ci():
        pytest.fail(f"{message} (CI=true: the browser tests must run in CI)", pytrace=False)
    pytest.skip(message)


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def browser_installed() -> None:
    """Skip (fail under CI) before anything costly, such as training the served model: pytest
    sets up session-scoped fixtures first, autouse ones first among them."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        _missing(f"{CHROMIUM} not found: install Debian's browser with "
                 "`apt-get install chromium` to run the web page tests")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed: `pip install playwright` (no "
                 "browser download needed: the tests use /usr/bin/chromium)")


@pytest.fixture(scope="module")
def browser(browser_installed):
    """Headless Chromium (the system's, not Playwright's own download)."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                              timeout=TIMEOUT_MS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def server(browser, served_run: Path, serve_process, tmp_path_factory: pytest.TempPathFactory):
    """One `tinyt serve` of the small trained run for the module; it must exit 0 on SIGTERM."""
    process = serve_process("--run", str(served_run), "--device", "cpu",
                            log_dir=tmp_path_factory.mktemp("web"))
    try:
        yield process
    finally:
        status = process.stop()
        assert status == 0, f"tinyt serve exited with {status} on SIGTERM:\n{process.output()}"


@pytest.fixture(scope="module")
def model(server) -> dict[str, Any]:
    """The served model's /api/models entry (its default beam and length penalty)."""
    models = call(server, "/api/models")["models"]
    assert len(models) == 1
    return models[0]


@pytest.fixture
def new_page(browser, server):
    """`new_page(width=1280, height=900, url=None, before=None) -> Page`: the page of `url`
    (default: the module's server) in a fresh context (no remembered settings), ready once it
    has built itself from /api/models; `before(page)` runs before it loads (routes). Each
    page's uncaught script errors fail the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    contexts, errors = [], []

    def open_page(width: int = 1280, height: int = 900, url: str | None = None, before=None):
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(COUNT_CALLS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        if before is not None:
            before(page)
        page.goto((url or server.url) + "/")
        expect(page.get_by_test_id("model-info")).to_contain_text("de-en")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"script errors on the page: {errors}"


# -- helpers --------------------------------------------------------------------------------------

def call(server, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (no body) or POST JSON to the server; the JSON answer, or for a 4xx
    {"status": code, **answer}."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(server.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read())}


def translate(server, model: dict[str, Any], q: str, nbest: int = 1) -> list[dict[str, Any]]:
    """The hypotheses /api/translate gives for `q` with the page's settings: the model's beam
    and length penalty (the page's defaults), `nbest` alternatives."""
    answer = call(server, "/api/translate", {
        "q": q, "source": "de", "target": "en", "beam": model["beam_size"],
        "length_penalty": model["length_penalty"], "nbest": nbest})
    return answer["results"][0]["hypotheses"]


def api_calls(page, path: str) -> int:
    return page.evaluate("(path) => window.__apiCalls[path] || 0", path)


def set_alternatives(page, n: int) -> None:
    page.get_by_test_id("nbest").fill(str(n))


def cell_values(page) -> list[list[float]]:
    return page.eval_on_selector_all(
        "[data-testid=heatmap-row]",
        "rows => rows.map(r => Array.from(r.querySelectorAll('[data-testid=heatmap-cell]'),"
        " c => Number(c.dataset.value)))")


def heatmap_ready(page, layer: str, head: str, translation: str) -> None:
    """Wait until the heatmap shows `layer`/`head` of `translation`'s attention."""
    from playwright.sync_api import expect

    heatmap = page.get_by_test_id("heatmap")
    expect(heatmap).to_have_attribute("data-translation", translation)
    expect(heatmap).to_have_attribute("data-layer", layer)
    expect(heatmap).to_have_attribute("data-head", head)


def tab_to(page, selector: str, presses: int = 30) -> None:
    """Press Tab until the focused element matches `selector` (at most `presses` times)."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}; focus is on "
                         f"{page.evaluate('document.activeElement.outerHTML.slice(0, 200)')}")


# -- the tests ------------------------------------------------------------------------------------

def test_page_loads_from_the_server_alone(new_page, server):
    """The page, its script and style come from the server (nothing from the internet);
    the one language pair is shown, not offered as a choice; every control has a label."""
    from playwright.sync_api import expect

    requests: list[str] = []
    failed: list[str] = []
    page = new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.reload()  # again, with the listeners in place from the first request
    expect(page.get_by_test_id("model-info")).to_contain_text("de-en")
    expect(page.get_by_test_id("model-info")).to_contain_text("tinyt")
    outside = [u for u in requests if not (u.startswith(server.url + "/") or u.startswith("data:"))]
    assert not outside, f"the page fetched from elsewhere than its server: {outside}"
    for path in ("/", "/static/app.js", "/static/style.css", "/api/models"):
        assert server.url + path in requests, f"{path} was not requested: {requests}"
    assert not failed, f"requests that failed: {failed}"

    expect(page.get_by_test_id("pair-static")).to_have_text("German \u2192 English")
    expect(page.get_by_test_id("pair")).to_be_hidden()
    expect(page.get_by_test_id("swap")).to_be_hidden()
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page).to_have_title("tinyt \u00b7 German \u2192 English")
    assert page.get_by_role("link", name="API documentation").get_attribute("href") \
        == "/docs"
    unlabelled = page.evaluate("""() => Array.from(
        document.querySelectorAll('input, select, textarea, button'))
      .filter(e => e.offsetParent !== null)
      .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                   && !e.textContent.trim())
      .map(e => e.outerHTML.slice(0, 80))""")
    assert not unlabelled, f"controls without a label: {unlabelled}"


def test_translates_as_you_type(new_page, server, model):
    """Typing translates (debounced) to exactly what /api/translate gives; emptying the box
    clears the output without a request."""
    from playwright.sync_api import expect

    expected = translate(server, model, SENTENCE)[0]["text"]
    assert expected
    page = new_page()
    source, output = page.get_by_test_id("source"), page.get_by_test_id("output")
    source.press_sequentially(SENTENCE)
    expect(output).to_have_text(expected)
    assert output.text_content() == expected
    expect(page.get_by_test_id("status")).to_contain_text(f"beam {model['beam_size']}")
    expect(page.get_by_test_id("alternatives")).to_be_hidden()  # one hypothesis: no list
    expect(page.get_by_test_id("copy")).to_be_enabled()
    expect(page.get_by_test_id("char-count")).to_have_text(f"{len(SENTENCE)} / 5,000")

    before = api_calls(page, "/api/translate")
    source.fill("   ")
    expect(output).to_have_text("")
    expect(output).to_have_attribute("data-state", "empty")
    expect(page.get_by_test_id("copy")).to_be_disabled()
    assert api_calls(page, "/api/translate") == before, "blank text was sent to the server"


def test_a_slow_old_answer_never_overwrites_a_newer_one(new_page, server, model):
    """The answer to an older request, arriving after a newer request was sent, is dropped."""
    from playwright.sync_api import expect

    expected = translate(server, model, SENTENCE)[0]["text"]
    page = new_page()
    held = []

    def hold_the_first(route):
        if not held and json.loads(route.request.post_data)["q"] == "Ein Hund":
            held.append(route)  # answered below, after the newer request's answer
        else:
            route.continue_()

    page.route("**/api/translate", hold_the_first)
    source = page.get_by_test_id("source")
    with page.expect_request("**/api/translate"):
        source.fill("Ein Hund")
        page.get_by_test_id("translate").click()
    source.fill(SENTENCE)
    page.get_by_test_id("translate").click()
    expect(page.get_by_test_id("output")).to_have_text(expected)
    try:  # the page aborted the old request: fulfilling it may be refused, which is fine
        held[0].fulfill(status=200, content_type="application/json", body=json.dumps({
            "model": "de-en", "beam": 2, "length_penalty": 1.0,
            "results": [{"hypotheses": [{"text": "STALE ANSWER", "score": 0.0}]}]}))
    except Exception:
        pass
    page.evaluate("fetch('/api/models').then(r => r.json())")  # a round trip after it
    expect(page.get_by_test_id("output")).to_have_text(expected)
    expect(page.get_by_test_id("error")).to_be_hidden()


def test_alternatives_with_scores_and_choosing_one(new_page, server, model):
    """Three alternatives, best first, with /api/translate's texts and scores; clicking the
    second (or Space on the third) makes it the output, marked with aria-pressed."""
    from playwright.sync_api import expect

    hyps = translate(server, model, SENTENCE, nbest=3)
    assert len(hyps) == 3
    page = new_page()
    page.get_by_test_id("source").fill(SENTENCE)
    set_alternatives(page, 3)
    alternatives = page.get_by_test_id("alternative")
    expect(alternatives).to_have_count(3)
    expect(page.get_by_test_id("alternative-text")).to_have_text([h["text"] for h in hyps])
    scores = [float(alternatives.nth(i).get_attribute("data-score")) for i in range(3)]
    assert scores == [h["score"] for h in hyps]
    shown = page.get_by_test_id("alternative-score").all_text_contents()
    assert shown == [f"{h['score']:.3f}".replace("-", "\u2212") for h in hyps]
    expect(page.get_by_test_id("output")).to_have_text(hyps[0]["text"])
    expect(alternatives.nth(0)).to_have_attribute("aria-pressed", "true")

    alternatives.nth(1).click()
    expect(page.get_by_test_id("output")).to_have_text(hyps[1]["text"])
    expect(alternatives.nth(1)).to_have_attribute("aria-pressed", "true")
    expect(alternatives.nth(0)).to_have_attribute("aria-pressed", "false")
    expect(page.get_by_test_id("chosen-note")).to_contain_text("Alternative 2 of 3")

    alternatives.nth(2).focus()
    page.keyboard.press("Space")
    expect(page.get_by_test_id("output")).to_have_text(hyps[2]["text"])
    expect(alternatives.nth(2)).to_have_attribute("aria-pressed", "true")
    expect(alternatives.nth(1)).to_have_attribute("aria-pressed", "false")


def test_attention_heatmap_of_the_chosen_translation(new_page, server, model, tmp_path):
    """The attention view of the chosen alternative: a column per source piece, a row per
    target piece, the cells /api/attention's weights for the layer and head chosen; another
    head changes the cells; words merge pieces. Saves the page's screenshot."""
    from playwright.sync_api import expect

    hyps = translate(server, model, SENTENCE, nbest=3)
    chosen = hyps[1]["text"]
    seen = call(server, "/api/attention", {"q": SENTENCE, "source": "de", "target": "en",
                                           "translation": chosen})
    assert seen["translation"] == chosen
    layers, heads = seen["layers"], seen["heads"]
    assert heads >= 2

    page = new_page()
    page.get_by_test_id("source").fill(SENTENCE)
    set_alternatives(page, 3)
    expect(page.get_by_test_id("alternative")).to_have_count(3)
    page.get_by_test_id("alternative").nth(1).click()
    toggle = page.get_by_test_id("attention-toggle")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(page.get_by_test_id("heatmap")).to_be_hidden()
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    # by default: the last layer, the average of its heads
    heatmap_ready(page, str(layers - 1), "avg", chosen)
    expect(page.get_by_test_id("heatmap-col")).to_have_count(len(seen["source_pieces"]))
    expect(page.get_by_test_id("heatmap-row")).to_have_count(len(seen["target_pieces"]))
    cols = page.get_by_test_id("heatmap-col").evaluate_all("e => e.map(c => c.dataset.piece)")
    rows = page.eval_on_selector_all("[data-testid=heatmap-row] th",
                                     "e => e.map(c => c.dataset.piece)")
    assert cols == seen["source_pieces"]
    assert rows == seen["target_pieces"]
    for row in cell_values(page):
        assert len(row) == len(seen["source_pieces"])
        assert sum(row) == pytest.approx(1.0, abs=2e-3)

    page.get_by_test_id("layer").select_option("0")
    page.get_by_test_id("head").select_option("0")
    heatmap_ready(page, "0", "0", chosen)
    first = cell_values(page)
    assert first == seen["cross"][0][0]
    page.get_by_test_id("head").select_option("1")
    heatmap_ready(page, "0", "1", chosen)
    second = cell_values(page)
    assert second == seen["cross"][0][1]
    assert second != first
    page.get_by_test_id("layer").select_option(str(layers - 1))
    heatmap_ready(page, str(layers - 1), "1", chosen)
    assert cell_values(page) == seen["cross"][layers - 1][1]
    cell = page.get_by_test_id("heatmap-cell").first
    assert cell.get_attribute("title").endswith(f"{seen['cross'][layers - 1][1][0][0]:.4f}")

    page.get_by_test_id("units").select_option("words")
    expect(page.get_by_test_id("heatmap")).to_have_attribute("data-units", "words")
    expect(page.get_by_test_id("heatmap-col")).to_have_count(max(seen["source_words"]) + 1)
    expect(page.get_by_test_id("heatmap-row")).to_have_count(max(seen["target_words"]) + 1)
    for row in cell_values(page):
        assert sum(row) == pytest.approx(1.0, abs=2e-3)

    # choosing another alternative shows its attention
    page.get_by_test_id("units").select_option("pieces")
    page.get_by_test_id("alternative").nth(0).click()
    heatmap_ready(page, str(layers - 1), "1", hyps[0]["text"])

    # two lines: two sentences, one at a time in the attention view
    two_lines = SENTENCE + "\n" + SECOND_SENTENCE
    both = translate(server, model, two_lines, nbest=3)
    page.get_by_test_id("source").fill(two_lines)
    expect(page.get_by_test_id("output")).to_have_text(both[0]["text"])
    line = page.get_by_test_id("attention-line")
    expect(line).to_be_visible()
    expect(line.locator("option")).to_have_count(2)
    heatmap_ready(page, str(layers - 1), "1", both[0]["text"].split("\n")[0])
    line.select_option("1")
    heatmap_ready(page, str(layers - 1), "1", both[0]["text"].split("\n")[1])


def test_screenshot_of_the_page(new_page, server, model, serve_process, tmp_path):
    """A screenshot with a translation, its alternatives (the second chosen) and the attention
    view open: to pytest's tmp folder, and to docs/serve-page.png with TINYT_SCREENSHOT=1.
    TINYT_SCREENSHOT_RUN=runs/NAME takes it of that run (a real model) instead of the test's
    small one."""
    from playwright.sync_api import expect

    other_run = os.environ.get("TINYT_SCREENSHOT_RUN")
    shown = server
    if other_run:
        shown = serve_process("--run", other_run, "--device", "cpu", log_dir=tmp_path)
    try:
        sentence = SCREENSHOT_SENTENCE if other_run else SENTENCE
        shown_model = call(shown, "/api/models")["models"][0]
        hyps = translate(shown, shown_model, sentence, nbest=3)
        page = new_page(1280, 900, url=shown.url)
        page.get_by_test_id("source").fill(sentence)
        set_alternatives(page, 3)
        expect(page.get_by_test_id("alternative-text")).to_have_text([h["text"] for h in hyps])
        page.get_by_test_id("alternative").nth(1).click()
        page.get_by_test_id("attention-toggle").click()
        heatmap_ready(page, str(shown_model["layers"] - 1), "avg", hyps[1]["text"])
        page.mouse.move(0, 0)  # no hover or focus marks in the picture
        page.evaluate("document.activeElement.blur()")
        path = tmp_path / "serve-page.png"
        page.screenshot(path=str(path), full_page=True)
    finally:
        if shown is not server:
            assert shown.stop() == 0, shown.output()
    assert path.stat().st_size > 10_000
    if os.environ.get("TINYT_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO_ROOT / "docs" / "serve-page.png")


def test_several_pairs_swap_api_key_and_a_model_without_attention(new_page, server, model):
    """With two pairs served (en-de faked here: a CTranslate2 model, so no attention) and API
    keys required: a pair selector, a swap button that moves the translation into the source
    box, the key field (sent as api_key, remembered across reloads), and the attention view
    replaced by a note for the model without attention."""
    from playwright.sync_api import expect

    expected = translate(server, model, SENTENCE)[0]["text"]
    described = call(server, "/api/models")
    reverse = {**model, "id": "en-de", "source": "en", "target": "de", "source_name": "English",
               "target_name": "German", "engine": "ctranslate2", "attention": False,
               "layers": None, "heads": None, "path": "en_de-ct2"}
    listing = {"models": [model, reverse], "limits": {**described["limits"],
                                                      "api_key_required": True}}
    sent: list[dict[str, Any]] = []

    def fake_models(route):
        route.fulfill(status=200, content_type="application/json", body=json.dumps(listing))

    def translate_route(route):
        body = json.loads(route.request.post_data)
        sent.append(body)
        if body["source"] == "en":  # the faked model: answer for it
            route.fulfill(status=200, content_type="application/json", body=json.dumps({
                "model": "en-de", "beam": 2, "length_penalty": 1.0,
                "results": [{"hypotheses": [{"text": "Ein Mann fährt Rad.", "score": -0.5}]}]}))
        else:
            route.continue_()

    def before(page):
        page.route("**/api/models", fake_models)
        page.route("**/api/translate", translate_route)

    page = new_page(before=before)
    pair = page.get_by_test_id("pair")
    expect(pair).to_be_visible()
    expect(pair.locator("option")).to_have_text(["German \u2192 English",
                                                 "English \u2192 German"])
    expect(page.get_by_test_id("pair-static")).to_be_hidden()
    expect(page.get_by_test_id("swap")).to_be_visible()
    expect(page.get_by_test_id("attention-toggle")).to_be_visible()
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    key.fill("key-1")
    key.press("Tab")  # change event: the key is stored

    page.get_by_test_id("source").fill(SENTENCE)
    expect(page.get_by_test_id("output")).to_have_text(expected)
    assert sent[-1]["api_key"] == "key-1" and sent[-1]["source"] == "de"

    page.get_by_test_id("swap").click()
    expect(pair).to_have_value("en-de")
    expect(page.get_by_test_id("source")).to_have_value(expected)
    expect(page.get_by_test_id("output")).to_have_text("Ein Mann fährt Rad.")
    assert (sent[-1]["source"], sent[-1]["target"], sent[-1]["q"]) == ("en", "de", expected)
    expect(page.locator("#source-label")).to_have_text("English")
    expect(page.get_by_test_id("attention-toggle")).to_be_hidden()
    expect(page.get_by_test_id("attention-note")).to_contain_text("ctranslate2")
    expect(page.get_by_test_id("model-info")).to_contain_text("en-de")

    page.reload()  # the key and the pair are remembered
    expect(page.get_by_test_id("api-key")).to_have_value("key-1")
    expect(pair).to_have_value("en-de")
    pair.select_option("de-en")
    expect(page.get_by_test_id("attention-toggle")).to_be_visible()
    expect(page.get_by_test_id("attention-note")).to_be_hidden()


def test_server_errors_are_shown_in_the_page(new_page, server):
    """A refusal's error text (here: over the character limit) appears in the role=alert
    element and the output is cleared; a network failure says the server cannot be reached;
    an impossible setting is named without asking the server."""
    from playwright.sync_api import expect

    long_text = (SENTENCE + " ") * 220
    refusal = call(server, "/api/translate", {"q": long_text, "source": "de", "target": "en",
                                              "nbest": 1})
    assert refusal["status"] == 400 and "limit" in refusal["error"]

    page = new_page()
    alert = page.get_by_test_id("error")  # hidden while there is nothing to say
    expect(alert).to_have_attribute("role", "alert")
    source = page.get_by_test_id("source")
    source.fill(SENTENCE)
    expect(page.get_by_test_id("output")).not_to_have_text("")
    source.fill(long_text)
    expect(page.get_by_role("alert")).to_contain_text(refusal["error"])
    expect(page.get_by_test_id("output")).to_have_text("")
    expect(page.get_by_test_id("char-count")).to_have_class("count over")

    source.fill("")  # empty input: no request, no error, no output
    expect(alert).to_be_hidden()

    page.get_by_test_id("beam").fill("0")
    source.fill(SENTENCE)
    expect(alert).to_contain_text("Beam size must be a whole number from 1 to")
    page.get_by_test_id("beam").fill(str(2))
    expect(alert).to_be_hidden()
    expect(page.get_by_test_id("output")).not_to_have_text("")

    page.route("**/api/translate", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("translate").click()
    expect(alert).to_contain_text("the server cannot be reached", ignore_case=True)
    expect(page.get_by_test_id("output")).to_have_text("")


def test_phone_width_has_no_horizontal_page_scroll(new_page, server, model):
    """At 375 px the page is one column and never scrolls sideways; a wide heatmap scrolls
    inside its own box."""
    from playwright.sync_api import expect

    hyps = translate(server, model, LONG_SENTENCE, nbest=3)
    page = new_page(375, 740)
    page.get_by_test_id("source").fill(LONG_SENTENCE)
    set_alternatives(page, 3)
    expect(page.get_by_test_id("alternative-text")).to_have_text([h["text"] for h in hyps])
    page.get_by_test_id("attention-toggle").click()
    heatmap_ready(page, str(model["layers"] - 1), "avg", hyps[0]["text"])
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.evaluate("document.body.scrollWidth") <= 375
    source_box = page.get_by_test_id("source").bounding_box()
    output_box = page.get_by_test_id("output").bounding_box()
    assert output_box["y"] > source_box["y"] + source_box["height"]  # one column
    scroller = page.locator("#heatmap-scroll")
    assert scroller.evaluate("e => e.scrollWidth > e.clientWidth"), \
        "the long sentence's heatmap should be wider than a phone (scrolling inside its box)"


def test_keyboard_only(new_page, server, model):
    """Tab to the source box, type, set 3 alternatives with the arrow keys, Ctrl+Enter
    translates at once, Tab to the second alternative and Enter chooses it; focus is visible."""
    from playwright.sync_api import expect

    hyps = translate(server, model, SENTENCE, nbest=3)
    page = new_page()
    tab_to(page, "[data-testid=source]")
    assert page.evaluate("document.activeElement.matches(':focus-visible')")
    page.keyboard.type(SENTENCE)
    tab_to(page, "[data-testid=nbest]")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    expect(page.get_by_test_id("nbest")).to_have_value("3")
    page.keyboard.press("Control+Enter")
    expect(page.get_by_test_id("alternative-text")).to_have_text([h["text"] for h in hyps])

    # Ctrl+Enter sends a request at once (no typing since: no debounced request pending)
    before = api_calls(page, "/api/translate")
    page.keyboard.press("Control+Enter")
    assert api_calls(page, "/api/translate") == before + 1
    expect(page.get_by_test_id("status")).not_to_contain_text("Translating")
    expect(page.get_by_test_id("alternative")).to_have_count(3)

    tab_to(page, "[data-testid=alternative][data-index='1']")
    assert page.evaluate("document.activeElement.matches(':focus-visible')")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("output")).to_have_text(hyps[1]["text"])
    expect(page.get_by_test_id("alternative").nth(1)).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_test_id("alternative").nth(1)).to_be_focused()
