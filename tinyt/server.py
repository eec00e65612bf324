"""`tinyt serve`: trained models behind LibreTranslate's HTTP API, tinyt's own API and a web page.

One FastAPI application (run by uvicorn) serves one model per language pair:

    GET  /                   the web page (tinyt/web/, nothing fetched from the internet)
    GET  /languages          LibreTranslate: each source language and its targets
    POST /translate          LibreTranslate: q (a string or a list), source, target, format,
                             alternatives, api_key; JSON, form or multipart bodies
    POST /detect             LibreTranslate: the likeliest served source languages of q
    GET  /frontend/settings  LibreTranslate: limits and languages, for its front-ends
    GET  /health             200 while serving
    GET  /api/models         tinyt: each model, its languages, engine and decoding settings
    POST /api/translate      tinyt: n-best with scores, beam and length penalty per request
    POST /api/score          tinyt: forced decoding, log-probabilities of given translations
    POST /api/attention      tinyt: cross-attention of a translation, every layer and head
    GET  /docs, /openapi.json  the OpenAPI schema FastAPI generates from the routes below

Text is translated a line at a time (a model learned sentences, not pages): each line of `q`
is a sentence, empty lines stay empty. Translation requests go through the model's
`DynamicBatcher`, so concurrent requests share decoding batches off the event loop.

Every refusal is a 4xx with a JSON body {"error": "..."} naming what is wrong and how to fix it,
as LibreTranslate's are: 400 bad values and limits, 403 a wrong API key, 404 an unknown path,
405 a wrong method, 408 a request that outlived --request-timeout, 413 a body over the size
limit, 422 a tinyt API body of the wrong shape, 429 a full queue.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyt.batching import DynamicBatcher, Hypotheses, SearchSettings, ServerBusy
from tinyt.config import MAX_BEAM_SIZE
from tinyt.errors import TinytError
from tinyt.loading import LoadedModel
from tinyt.tokenizer import EOS_ID
from tinyt.translation import Attention, encodable

WEB_DIR = Path(__file__).parent / "web"

# English names of the language codes LibreTranslate and Argos Translate models use; a code
# not listed is shown as itself.
LANGUAGE_NAMES = {
    "ar": "Arabic", "az": "Azerbaijani", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan",
    "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "ga": "Irish", "gl": "Galician", "he": "Hebrew",
    "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "ms": "Malay", "nb": "Norwegian",
    "nl": "Dutch", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "sk": "Slovak", "sl": "Slovenian", "sq": "Albanian", "sv": "Swedish", "th": "Thai",
    "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh": "Chinese", "zh-Hans": "Chinese (simplified)", "zh-Hant": "Chinese (traditional)",
    "cmn": "Chinese", "zt": "Chinese (traditional)",
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of a server. char_limit: characters of text a request may carry
    (all of q); batch_limit: lines (sentences) a request may carry; max_beam: the largest beam
    (and so hypotheses, alternatives + 1) a request may ask for; request_timeout: seconds a
    translation may take, queueing included; body_limit: bytes of a request body;
    api_keys: keys a request must carry (none: no key needed); batch_tokens / max_wait_ms /
    max_queued: the DynamicBatcher's bounds."""

    char_limit: int = 5000
    batch_limit: int = 128
    max_beam: int = 16
    request_timeout: float = 60.0
    body_limit: int = 1 << 20
    api_keys: frozenset[str] = frozenset()
    batch_tokens: int = 4096
    max_wait_ms: float = 3.0
    max_queued: int = 8192


class ApiError(Exception):
    """A refusal: HTTP `status` with the body {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServedModel:
    """A loaded model, its language pair and its batcher."""

    loaded: LoadedModel
    batcher: DynamicBatcher
    source: str
    target: str
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "sentences": 0})

    @property
    def id(self) -> str:
        return f"{self.source}-{self.target}"

    def describe(self) -> dict[str, Any]:
        translator, config = self.loaded.translator, self.loaded.config
        attention = self.loaded.kind in ("run", "bundle")
        model = getattr(translator, "model", None)
        return {
            "id": self.id, "source": self.source, "target": self.target,
            "source_name": language_name(self.source), "target_name": language_name(self.target),
            "engine": {"run": "tinyt", "bundle": "tinyt", "ensemble": "tinyt ensemble",
                       "ctranslate2": "ctranslate2"}[self.loaded.kind],
            "path": self.loaded.name,
            "step": (self.loaded.payload.get("progress") or {}).get("step"),
            "beam_size": config.decoding.beam_size,
            "length_penalty": config.decoding.length_penalty,
            "attention": attention,
            "layers": config.model.dec_layers if attention else 0,
            "heads": config.model.n_heads if attention else 0,
            "parameters": model.num_parameters() if model is not None else None,
        }


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


# -- request bodies (their JSON schemas are the OpenAPI schema) -----------------------------------

Text = Union[str, list[str]]


class LibreTranslateRequest(BaseModel):
    """POST /translate, as LibreTranslate takes it (JSON, or the same fields as a form)."""

    q: Text = Field(description="Text to translate: a string, or a list of strings.")
    source: str = Field(description="Source language code, or auto to detect it.")
    target: str = Field(description="Target language code.")
    format: Literal["text", "html"] = Field("text", description="Only text is translated.")
    alternatives: int = Field(0, ge=0, description="How many alternative translations to add.")
    api_key: str | None = Field(None, description="The API key, when the server has keys.")


class DetectRequest(BaseModel):
    q: str = Field(description="Text whose language to detect.")
    api_key: str | None = None


class TranslateRequest(BaseModel):
    """POST /api/translate."""

    model_config = ConfigDict(extra="forbid")
    q: Text = Field(description="Text to translate: a string or a list; each line a sentence.")
    source: str = Field(description="Source language code.")
    target: str = Field(description="Target language code.")
    beam: int | None = Field(None, ge=1, le=MAX_BEAM_SIZE,
                             description="Beam size (1: greedy); default the model's.")
    nbest: int = Field(1, ge=1, le=MAX_BEAM_SIZE,
                       description="Hypotheses a line, best first; the beam grows to fit.")
    length_penalty: float | None = Field(None, ge=0.0, le=10.0,
                                         description="Score / length ** this; default the "
                                                     "model's.")
    api_key: str | None = None


class ScoreRequest(BaseModel):
    """POST /api/score: forced decoding of given translations."""

    model_config = ConfigDict(extra="forbid")
    q: Text = Field(description="Source sentences: a string or a list.")
    translation: Text = Field(description="Their translations, one a source.")
    source: str
    target: str
    tokens: bool = Field(False, description="Also give each token's piece and log-probability.")
    api_key: str | None = None


class AttentionRequest(BaseModel):
    """POST /api/attention: the attention of one sentence's translation."""

    model_config = ConfigDict(extra="forbid")
    q: str = Field(description="One source sentence.")
    source: str
    target: str
    translation: str | None = Field(None, description="The translation to look at (an "
                                                      "alternative, say); default the best.")
    beam: int | None = Field(None, ge=1, le=MAX_BEAM_SIZE)
    length_penalty: float | None = Field(None, ge=0.0, le=10.0)
    api_key: str | None = None


ERROR_RESPONSE = {"description": "Refused: what is wrong and how to fix it.",
                  "content": {"application/json": {"schema": {
                      "type": "object", "properties": {"error": {"type": "string"}},
                      "required": ["error"]}}}}
ERRORS = {status: ERROR_RESPONSE for status in (400, 403, 408, 413, 422, 429)}


# -- the application ------------------------------------------------------------------------------

def create_app(models: Sequence[LoadedModel], settings: ServeSettings = ServeSettings()
               ) -> FastAPI:
    """The server's ASGI application for `models` (one per language pair, else TinytError)."""
    served: dict[tuple[str, str], ServedModel] = {}
    for loaded in models:
        pair = (loaded.config.data.src_lang, loaded.config.data.tgt_lang)
        if pair in served:
            raise TinytError(f"{served[pair].loaded.name} and {loaded.name} both translate "
                             f"{pair[0]}->{pair[1]}; serve one model per language pair")
        batcher = DynamicBatcher(loaded.translator, settings.batch_tokens,
                                 settings.max_wait_ms / 1000, settings.max_queued)
        served[pair] = ServedModel(loaded, batcher, *pair)
    if not served:
        raise TinytError("no model to serve; pass --run runs/NAME or --model FILE")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in served.values():
            await model.batcher.start()
        yield
        for model in served.values():  # in-flight requests are answered first
            await model.batcher.close()

    app = FastAPI(title="tinyt", version=_version(), lifespan=lifespan,
                  description="Translation with tinyt models: LibreTranslate's API and tinyt's "
                              "own (n-best with scores, forced decoding, attention).")
    app.state.served = served
    app.state.settings = settings
    app.state.detector = None
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    _add_libretranslate_routes(app, served, settings)
    _add_tinyt_routes(app, served, settings)
    _add_page(app)
    return app


def _version() -> str:
    from tinyt import __version__
    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_describe_problem(e) for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"{request.url.path} does not exist; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path}; see /docs"
                   }.get(exc.status_code, str(exc.detail))
        if exc.status_code == 400 and "parsing the body" in message:  # FastAPI's own words
            message = "the body cannot be read as JSON in UTF-8; send a JSON object"
        return JSONResponse({"error": message}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def _describe_problem(error: dict[str, Any]) -> str:
    """One pydantic validation error as "field: what is wrong"."""
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    if error.get("type") == "json_invalid":
        return "the body is not valid JSON; send a JSON object"
    message = str(error.get("msg", "invalid value"))
    return f"{where}: {message}" if where else message


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is
    read whole (by its Content-Length, or as it streams in without one)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    return await _send_error(send, 413, self._message())
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, self._message())

    def _message(self) -> str:
        return (f"the request body is larger than the server's limit of {self.limit:,} bytes; "
                "send less text per request")


class _BodyTooLarge(Exception):
    pass


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- shared request handling ----------------------------------------------------------------------

def _check_key(settings: ServeSettings, key: Any) -> None:
    """LibreTranslate's answers: a missing key is 400, a wrong one 403."""
    if not settings.api_keys:
        return
    if key is None or key == "":
        raise ApiError(400, "this server needs an API key: send api_key (ask the server's "
                            "operator for one)")
    if not isinstance(key, str) or key not in settings.api_keys:
        raise ApiError(403, "Invalid API key")


def _model_for(served: dict[tuple[str, str], ServedModel], source: str, target: str
               ) -> ServedModel:
    if (source, target) in served:
        return served[(source, target)]
    sources = {s for s, _ in served}
    targets = {t for _, t in served}
    pairs = ", ".join(f"{s}->{t}" for s, t in sorted(served))
    if source not in sources:
        raise ApiError(400, f"{source} is not supported as a source language; this server "
                            f"translates {pairs}")
    if target not in targets:
        raise ApiError(400, f"{target} is not supported as a target language; this server "
                            f"translates {pairs}")
    raise ApiError(400, f"{language_name(target)} ({target}) is not available as a target "
                        f"language from {language_name(source)} ({source}); this server "
                        f"translates {pairs}")


def _texts(q: Any, name: str = "q") -> tuple[list[str], bool]:
    """(texts, whether q was a list) of a q value that must be a string or a list of them."""
    if isinstance(q, str):
        return [encodable(q)], False
    if isinstance(q, list) and all(isinstance(t, str) for t in q):
        return [encodable(t) for t in q], True
    raise ApiError(400, f"Invalid request: {name} must be a string or a list of strings")



def _lines(texts: list[str]) -> list[list[str]]:
    """Each text's lines (\\r\\n and \\r count as \\n): the sentences to translate."""
    return [t.replace("\r\n", "\n").replace("\r", "\n").split("\n") for t in texts]


def _check_limits(settings: ServeSettings, texts: list[str], lines: list[list[str]]) -> None:
    chars = sum(len(t) for t in texts)
    if chars > settings.char_limit:
        raise ApiError(400, f"Invalid request: request ({chars} characters) exceeds text limit "
                            f"({settings.char_limit}); send less text per request")
    sentences = sum(len(ls) for ls in lines)
    if sentences > settings.batch_limit:
        raise ApiError(400, f"Invalid request: request ({sentences} lines) exceeds batch limit "
                            f"({settings.batch_limit}); send fewer lines per request")
    if any("\x00" in t for t in texts):
        raise ApiError(400, "Invalid request: the text holds a NUL character; send plain text")


async def _translate_lines(model: ServedModel, settings: ServeSettings, lines: list[list[str]],
                           search: SearchSettings) -> list[list[Hypotheses]]:
    """Each text's lines' hypotheses (an empty line: [("", 0.0)]), within the time limit."""
    flat = [line for text in lines for line in text]
    try:
        hyps = await asyncio.wait_for(model.batcher.translate(flat, search),
                                      settings.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the translation took longer than the server's limit of "
                            f"{settings.request_timeout:g} s; send less text per request, or "
                            "try again when the server is less busy") from None
    except ServerBusy as exc:
        raise ApiError(429, f"Slowdown: {exc}") from None
    except TinytError as exc:
        raise ApiError(400, str(exc)) from None
    model.stats["requests"] += 1
    model.stats["sentences"] += len(flat)
    out, start = [], 0
    for text in lines:
        out.append(hyps[start: start + len(text)])
        start += len(text)
    return out


def _search_settings(model: ServedModel, settings: ServeSettings, beam: int | None,
                     nbest: int, length_penalty: float | None) -> SearchSettings:
    """The search a request asks for: its beam (default the model's), grown to `nbest`. What a
    request asks for must be within the server's --max-beam; the model's own beam is used as
    it is."""
    decoding = model.loaded.config.decoding
    asked = max(beam or 0, nbest)
    if asked > settings.max_beam:
        raise ApiError(400, f"Invalid request: a beam of {asked} ({nbest} hypotheses) is over "
                            f"this server's limit of {settings.max_beam}; ask for fewer")
    beam = max(decoding.beam_size if beam is None else beam, nbest)
    penalty = decoding.length_penalty if length_penalty is None else length_penalty
    if not math.isfinite(penalty):
        raise ApiError(400, "Invalid request: length_penalty must be a finite number")
    return SearchSettings(beam, nbest, float(penalty))


# -- LibreTranslate's API -------------------------------------------------------------------------

def _libretranslate_body(schema: dict[str, Any]) -> dict[str, Any]:
    """openapi_extra of a route that takes `schema` as JSON or as a form, as LibreTranslate's
    routes do (the route parses the body itself)."""
    form = {**schema, "properties": {
        name: ({"type": "string"} if "anyOf" in prop or prop.get("type") == "array" else prop)
        for name, prop in schema.get("properties", {}).items()}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": form}}}}


async def _request_fields(request: Request) -> dict[str, Any]:
    """The fields of a LibreTranslate request: a JSON object, a urlencoded or multipart form;
    query parameters fill in what the body lacks (LibreTranslate reads both)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    fields: dict[str, Any] = {}
    if ctype == "application/json" or (not ctype and body.lstrip()[:1] in (b"{", b"[")):
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "Invalid JSON format: the body is not a JSON object in UTF-8")
        if not isinstance(value, dict):
            raise ApiError(400, "Invalid JSON format: send a JSON object with q, source and "
                                "target")
        fields = value
    elif ctype == "multipart/form-data":
        try:
            form = await request.form()
        except Exception:  # noqa: BLE001 - python-multipart's parse errors vary by version
            raise ApiError(400, "Invalid request: the multipart form cannot be read") from None
        for name, value in form.multi_items():
            if not isinstance(value, str):
                raise ApiError(400, f"Invalid request: {name} must be a text field, not a file")
            fields.setdefault(name, value)
    elif body:
        try:
            text = body.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                              encoding="utf-8", errors="strict", max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "Invalid request: the form is not URL-encoded UTF-8 text") \
                from None
        for name, value in pairs:
            fields.setdefault(name, value)
    for name, value in request.query_params.multi_items():
        fields.setdefault(name, value)
    return fields


def _add_libretranslate_routes(app: FastAPI, served: dict[tuple[str, str], ServedModel],
                               settings: ServeSettings) -> None:
    @app.get("/languages", tags=["LibreTranslate"], summary="Languages and their targets")
    async def languages() -> list[dict[str, Any]]:
        targets: dict[str, list[str]] = {}
        for source, target in sorted(served):
            targets.setdefault(source, []).append(target)
        return [{"code": source, "name": language_name(source), "targets": codes}
                for source, codes in targets.items()]

    @app.post("/translate", tags=["LibreTranslate"], summary="Translate text",
              responses=ERRORS,
              openapi_extra=_libretranslate_body(LibreTranslateRequest.model_json_schema()))
    async def translate(request: Request) -> dict[str, Any]:
        fields = await _request_fields(request)
        _check_key(settings, fields.get("api_key"))
        for name in ("q", "source", "target"):
            if fields.get(name) in (None, "", []):
                raise ApiError(400, f"Invalid request: missing {name} parameter")
        texts, is_list = _texts(fields["q"])
        source, target = fields["source"], fields["target"]
        if not isinstance(source, str) or not isinstance(target, str):
            raise ApiError(400, "Invalid request: source and target must be language codes")
        text_format = fields.get("format") or "text"
        if text_format != "text":
            raise ApiError(400, f"{text_format} format is not supported; send format=text "
                                "(tinyt translates plain text)")
        try:
            alternatives = max(0, int(fields.get("alternatives") or 0))
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "Invalid request: alternatives parameter is not a number") \
                from None
        if alternatives + 1 > settings.max_beam:
            raise ApiError(400, f"Invalid request: alternatives parameter must be <= "
                                f"{settings.max_beam - 1}")
        lines = _lines(texts)
        _check_limits(settings, texts, lines)
        detected = None
        if source == "auto":
            source, confidence = _detect(app, served, "\n".join(texts), target)
            detected = {"confidence": confidence, "language": source}
        model = _model_for(served, source, target)
        search = _search_settings(model, settings, None, alternatives + 1, None)
        results = await _translate_lines(model, settings, lines, search)
        translated, alternates = [], []
        for text_hyps in results:
            best = "\n".join(h[0][0] for h in text_hyps)
            translated.append(best)
            others = []
            for rank in range(1, alternatives + 1):
                joined = "\n".join(h[min(rank, len(h) - 1)][0] for h in text_hyps)
                if joined != best and joined not in others:
                    others.append(joined)
            alternates.append(others)
        response: dict[str, Any] = {"translatedText": translated if is_list else translated[0]}
        if alternatives > 0:
            response["alternatives"] = alternates if is_list else alternates[0]
        if detected is not None:
            response["detectedLanguage"] = [detected] * len(texts) if is_list else detected
        return response

    @app.post("/detect", tags=["LibreTranslate"], summary="Detect the language of text",
              responses=ERRORS,
              openapi_extra=_libretranslate_body(DetectRequest.model_json_schema()))
    async def detect(request: Request) -> list[dict[str, Any]]:
        fields = await _request_fields(request)
        _check_key(settings, fields.get("api_key"))
        q = fields.get("q")
        if q in (None, ""):
            raise ApiError(400, "Invalid request: missing q parameter")
        texts, _ = _texts(q)
        _check_limits(settings, texts, _lines(texts))
        return [{"language": code, "confidence": confidence}
                for code, confidence in _rank_languages(app, served, "\n".join(texts))]

    @app.get("/frontend/settings", tags=["LibreTranslate"], summary="Front-end settings")
    async def frontend_settings() -> dict[str, Any]:
        source, target = sorted(served)[0]
        return {"charLimit": settings.char_limit, "frontendTimeout": 500,
                "apiKeys": bool(settings.api_keys), "keyRequired": bool(settings.api_keys),
                "suggestions": False, "filesTranslation": False, "supportedFilesFormat": [],
                "language": {"source": {"code": source, "name": language_name(source)},
                             "target": {"code": target, "name": language_name(target)}}}

    @app.get("/health", tags=["LibreTranslate"], summary="Whether the server is up")
    async def health() -> dict[str, Any]:
        """LibreTranslate's {"status": "ok"}, and the sentences waiting or being decoded."""
        return {"status": "ok",
                "queued_sentences": sum(m.batcher.queued_sentences for m in served.values())}


def _rank_languages(app: FastAPI, served: dict[tuple[str, str], ServedModel], text: str
                    ) -> list[tuple[str, float]]:
    """The served source languages, likeliest first, with confidences in percent (py3langid,
    which ships its model; restricted to the languages this server translates from)."""
    sources = sorted({s for s, _ in served})
    if len(sources) == 1:
        return [(sources[0], 100.0)]
    detector = app.state.detector
    if detector is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise ApiError(400, "detecting the language needs py3langid on the server (pip "
                                "install 'tinyt[serve]'); send the source language instead "
                                "of auto") from None
        detector = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        known = set(detector.nb_classes)
        usable = [s for s in sources if s in known]
        if not usable:
            raise ApiError(400, f"the served source languages ({', '.join(sources)}) cannot be "
                                "detected; send the source language instead of auto")
        detector.set_languages(usable)
        app.state.detector = detector
    ranked = detector.rank(text)
    return [(code, round(100 * float(p), 2)) for code, p in ranked]


def _detect(app: FastAPI, served: dict[tuple[str, str], ServedModel], text: str, target: str
            ) -> tuple[str, float]:
    """(source language, confidence) for source=auto: the likeliest source that has a model
    into `target`."""
    into_target = {s for s, t in served if t == target}
    if not into_target:
        _model_for(served, next(iter(served))[0], target)  # raises: an unknown target
    for code, confidence in _rank_languages(app, served, text):
        if code in into_target:
            return code, confidence
    return sorted(into_target)[0], 0.0


# -- tinyt's own API ------------------------------------------------------------------------------

def _add_tinyt_routes(app: FastAPI, served: dict[tuple[str, str], ServedModel],
                      settings: ServeSettings) -> None:
    @app.get("/api/models", tags=["tinyt"], summary="The models served")
    async def models() -> dict[str, Any]:
        return {"models": [m.describe() for m in served.values()],
                "limits": {"char_limit": settings.char_limit,
                           "batch_limit": settings.batch_limit,
                           "max_beam": settings.max_beam,
                           "request_timeout": settings.request_timeout,
                           "api_key_required": bool(settings.api_keys)}}

    @app.post("/api/translate", tags=["tinyt"], responses=ERRORS,
              summary="Translate, with n-best hypotheses and their scores")
    async def translate(body: TranslateRequest) -> dict[str, Any]:
        """Each line of each text is translated; a result per text holds `nbest` hypotheses
        (fewer when the search finished fewer), best first, each with its score: the
        log-probability (with <eos>) / length ** length_penalty that beam search ranks by.
        For several lines, a hypothesis joins the lines' hypotheses of that rank."""
        _check_key(settings, body.api_key)
        model = _model_for(served, body.source, body.target)
        texts, _ = _texts(body.q)
        lines = _lines(texts)
        _check_limits(settings, texts, lines)
        search = _search_settings(model, settings, body.beam, body.nbest,
                                  body.length_penalty)
        results = await _translate_lines(model, settings, lines, search)
        out = []
        for text_hyps in results:
            count = max(len(h) for h in text_hyps)
            hypotheses = []
            for rank in range(count):
                picks = [h[min(rank, len(h) - 1)] for h in text_hyps]
                hypotheses.append({"text": "\n".join(text for text, _ in picks),
                                   "score": round(sum(score for _, score in picks), 6)})
            out.append({"hypotheses": hypotheses})
        return {"model": model.id, "beam": search.beam, "length_penalty": search.length_penalty,
                "results": out}

    @app.post("/api/score", tags=["tinyt"], responses=ERRORS,
              summary="Forced decoding: the log-probability of given translations")
    async def score(body: ScoreRequest) -> dict[str, Any]:
        """For each (q, translation) pair: the sum of the teacher-forced log-probabilities of
        the translation's tokens and <eos>, that sum per token, and the token count (<eos>
        included); with `tokens`, each token's piece and log-probability."""
        _check_key(settings, body.api_key)
        model = _model_for(served, body.source, body.target)
        sources, _ = _texts(body.q)
        targets, _ = _texts(body.translation, "translation")
        if len(sources) != len(targets):
            raise ApiError(400, f"{len(sources)} texts in q but {len(targets)} in translation; "
                                "give one translation a text")
        _check_limits(settings, sources + targets, _lines(sources + targets))
        translator = model.loaded.translator
        try:
            scored = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(
                    model.batcher.thread, translator.score, sources, targets),
                settings.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"scoring took longer than the server's limit of "
                                f"{settings.request_timeout:g} s; send less text") from None
        except TinytError as exc:
            raise ApiError(400, str(exc)) from None
        results = []
        for ids, logps in scored:
            total = sum(logps)
            result: dict[str, Any] = {"logprob": round(total, 6),
                                      "per_token_logprob": round(total / len(logps), 6),
                                      "tokens": len(logps)}
            if body.tokens:
                pieces = [model.loaded.tokenizers.tgt.id_to_piece(i) for i in ids + [EOS_ID]]
                result["pieces"] = pieces
                result["token_logprobs"] = [round(x, 6) for x in logps]
            results.append(result)
        return {"model": model.id, "results": results}

    @app.post("/api/attention", tags=["tinyt"], responses=ERRORS,
              summary="Cross-attention of a translation, every decoder layer and head")
    async def attention(body: AttentionRequest) -> dict[str, Any]:
        """The translation (the given one, else the search's best) is run through the model
        teacher-forced. `cross[layer][head][i][j]` is how much target piece i (`target_pieces`,
        <eos> last) attended to source piece j (`source_pieces`, <eos> last); each row sums to
        1. `source_words[j]` / `target_words[i]` number the word each piece belongs to."""
        _check_key(settings, body.api_key)
        model = _model_for(served, body.source, body.target)
        _check_limits(settings, [body.q] + ([body.translation] if body.translation else []),
                      [[body.q]])
        if not model.describe()["attention"]:
            raise ApiError(400, f"attention weights come from tinyt's own model; the {model.id} "
                                f"model is served by {model.describe()['engine']}: serve the "
                                "run or bundle it was made from to see them")
        if not body.q.strip():
            raise ApiError(400, "Invalid request: q is empty; send a sentence")
        search = _search_settings(model, settings, body.beam, 1, body.length_penalty)
        translator = model.loaded.translator
        try:
            maps = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(
                    model.batcher.thread, lambda: translator.attention(
                        encodable(body.q.replace("\n", " ")),
                        None if body.translation is None else encodable(body.translation),
                        search.beam, search.length_penalty)),
                settings.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, "the attention took longer than the server's limit of "
                                f"{settings.request_timeout:g} s") from None
        except TinytError as exc:
            raise ApiError(400, str(exc)) from None
        return {"model": model.id, **_attention_json(model.loaded, maps)}


def _attention_json(loaded: LoadedModel, seen: Attention) -> dict[str, Any]:
    """`Translator.attention`'s result for the page: pieces, the word each piece starts or
    continues (SentencePiece marks a word's first piece with ▁), cross-attention rounded to
    4 decimals (rows still sum to 1 within 5e-4)."""
    tokenizers = loaded.tokenizers
    source = [tokenizers.src.id_to_piece(i) for i in seen.source_ids + [EOS_ID]]
    target = [tokenizers.tgt.id_to_piece(i) for i in seen.target_ids + [EOS_ID]]
    cross = [[[[round(float(p), 4) for p in row] for row in head] for head in layer.tolist()]
             for layer in seen.maps["cross"]]
    return {"translation": tokenizers.decode_tgt([seen.target_ids])[0],
            "source_pieces": source, "target_pieces": target,
            "source_words": _word_numbers(source), "target_words": _word_numbers(target),
            "layers": len(cross), "heads": len(cross[0]) if cross else 0, "cross": cross}


def _word_numbers(pieces: list[str]) -> list[int]:
    """The word number of each piece: a piece starting with ▁ (or the first, or <eos>) begins
    a new word."""
    numbers, word = [], -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece.startswith("\u2581") or piece == "</s>" or (i == len(pieces) - 1):
            word += 1
        numbers.append(word)
    return numbers


def _add_page(app: FastAPI) -> None:
    if (WEB_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        index = WEB_DIR / "index.html"
        if not index.is_file():
            raise ApiError(404, "this tinyt installation has no web page (tinyt/web/index.html "
                                "is missing); reinstall tinyt")
        return FileResponse(index, media_type="text/html; charset=utf-8")


# -- running --------------------------------------------------------------------------------------

def serve(models: Sequence[LoadedModel], host: str = "127.0.0.1", port: int = 5000,
          settings: ServeSettings = ServeSettings(), on_ready=None, on_stop=None
          ) -> dict[str, dict[str, int]]:
    """Serve `models` on host:port until SIGTERM or Ctrl-C, then drain: requests in flight are
    answered, new connections refused. Returns the requests and sentences answered per model
    id. `on_ready(url)` is called once the server accepts connections, `on_stop(sentences)`
    when a signal stops it, with the sentences still queued or being decoded."""
    import signal

    import uvicorn

    app = create_app(models, settings)
    sock = _listen(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.request_timeout + 5)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(url)

        def handle_exit(self, sig, frame):
            if not self.should_exit and on_stop is not None:
                on_stop(sum(m.batcher.queued_sentences for m in app.state.served.values()))
            super().handle_exit(sig, frame)

    stops: list[int] = []
    # uvicorn re-raises the signal that stopped it once it has drained, with the handlers it
    # found in place: these record it instead, so that a drained server exits with status 0.
    previous = {sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return {m.id: dict(m.stats) for m in app.state.served.values()}


def _listen(host: str, port: int):
    """A listening socket on host:port, or TinytError naming why there cannot be one."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        raise TinytError(f"--host {host} is not an address this machine has ({exc}); use "
                         "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise TinytError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another "
                         "--port, or stop what is using it") from None
    sock.set_inheritable(True)
    return sock
