"""`tinyt serve`: trained models behind LibreTranslate's HTTP API, tinyt's own API and a web page.

One FastAPI application (run by uvicorn) serves one model per language pair:

    GET  /                   the web page (tinyt/web/, nothing fetched from the internet)
    GET  /languages          LibreTranslate (tinyt.libretranslate_api): each source language
    POST /translate            and its targets; translate q (a string or a list), with
    POST /detect               alternatives; detect the language; limits and languages for
    GET  /frontend/settings    its front-ends; 200 while serving
    GET  /health
    GET  /api/models         tinyt (tinyt.tinyt_api): the models served; n-best with scores;
    POST /api/translate        forced decoding; a translation's cross-attention, every layer
    POST /api/score            and head
    POST /api/attention
    GET  /docs, /openapi.json  the OpenAPI schema FastAPI generates from the routes

Translation requests go through each model's `DynamicBatcher` (tinyt.batching), so
concurrent requests share decoding batches off the event loop.

Every refusal is a 4xx with a JSON body {"error": "..."} naming what is wrong and how to fix it,
as LibreTranslate's are: 400 bad values and limits, 403 a wrong API key, 404 an unknown path,
405 a wrong method, 408 a request that outlived --request-timeout, 413 a body over the size
limit, 422 a tinyt API body of the wrong shape, 429 a full queue.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyt import __version__
from tinyt.batching import DynamicBatcher, decoding_thread
from tinyt.errors import TinytError
from tinyt.libretranslate_api import add_libretranslate_routes
from tinyt.loading import LoadedModel
from tinyt.serving import ApiError, ServedModel, ServeSettings
from tinyt.tinyt_api import add_tinyt_routes

WEB_DIR = Path(__file__).parent / "web"


# -- the application ------------------------------------------------------------------------------

def create_app(models: Sequence[LoadedModel], settings: ServeSettings = ServeSettings(),
               thread: ThreadPoolExecutor | None = None) -> FastAPI:
    """The server's ASGI application for `models` (one per language pair, else TinytError),
    decoding in `thread` (see `tinyt.batching.decoding_thread`; default: one of its own)."""
    served: dict[tuple[str, str], ServedModel] = {}
    for loaded in models:
        pair = (loaded.config.data.src_lang, loaded.config.data.tgt_lang)
        if pair in served:
            raise TinytError(f"{served[pair].loaded.name} and {loaded.name} both translate "
                             f"{pair[0]}->{pair[1]}; serve one model per language pair")
        if thread is None:
            thread = decoding_thread()
        batcher = DynamicBatcher(loaded.translator, settings.batch_tokens,
                                 settings.max_wait_ms / 1000, settings.max_queued, thread)
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
        thread.shutdown(wait=True)

    app = FastAPI(title="tinyt", version=__version__, lifespan=lifespan,
                  description="Translation with tinyt models: LibreTranslate's API and tinyt's "
                              "own (n-best with scores, forced decoding, attention).")
    app.state.served = served
    app.state.settings = settings
    app.state.detector = None
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    add_libretranslate_routes(app, served, settings)
    add_tinyt_routes(app, served, settings)
    _add_page(app)
    _describe_server(app, served, settings)
    return app


def _describe_server(app: FastAPI, served: dict, settings: ServeSettings) -> None:
    """Make the OpenAPI schema say what this server accepts, not only what a model accepts:
    `source` and `target` are the served languages (LibreTranslate's source also `auto`),
    LibreTranslate's q is never empty, and a beam or n-best is at most --max-beam. FastAPI
    builds the schema from static models; this adds the server's own values to it once, when
    it is first asked for."""
    sources = sorted({s for s, _ in served})
    targets = sorted({t for _, t in served})
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        tinyt_bodies = [schema["components"]["schemas"][name]
                        for name in ("TranslateRequest", "ScoreRequest", "AttentionRequest")]
        libretranslate_bodies = [media["schema"] for path in ("/translate", "/detect")
                                 for media in schema["paths"][path]["post"]["requestBody"]
                                 ["content"].values()]
        for body in tinyt_bodies:
            _narrow(body["properties"], sources, targets, settings.max_beam)
        for body in libretranslate_bodies:
            properties = body["properties"]
            _narrow(properties, sources + ["auto"], targets, settings.max_beam)
            if "alternatives" in properties:
                properties["alternatives"]["maximum"] = settings.max_beam - 1
            for option in properties["q"].get("anyOf", [properties["q"]]):  # never empty
                option.update({"minLength": 1} if option.get("type") == "string"
                              else {"minItems": 1})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _narrow(properties: dict[str, Any], sources: list[str], targets: list[str],
            max_beam: int) -> None:
    """A request body's schema narrowed to this server: its languages and --max-beam."""
    if "source" in properties:
        properties["source"]["enum"] = sources
    if "target" in properties:
        properties["target"]["enum"] = targets
    for name in ("beam", "nbest"):
        for option in properties.get(name, {}).get("anyOf", [properties.get(name, {})]):
            if option.get("type") == "integer":  # pydantic leaves ge/le as they are
                option.pop("ge", None), option.pop("le", None)
                option.update(minimum=1, maximum=max_beam)


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
    if error.get("type") == "string_pattern_mismatch":  # the one pattern: a single line
        return f"{where}: must be one line of text, not blank"
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
          settings: ServeSettings = ServeSettings(), on_ready=None, on_stop=None,
          thread: ThreadPoolExecutor | None = None) -> dict[str, dict[str, int]]:
    """Serve `models` on host:port until SIGTERM or Ctrl-C, then drain: requests in flight are
    answered, new connections refused. Returns the requests and sentences answered per model
    id. `on_ready(url)` is called once the server accepts connections, `on_stop(sentences)`
    when a signal stops it, with the sentences still queued or being decoded. `thread`: the
    decoding thread the models were loaded in (`tinyt.batching.decoding_thread`)."""
    import signal

    import uvicorn

    app = create_app(models, settings, thread)
    sock = _listen(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.request_timeout + 5)
    bound_host, bound_port = sock.getsockname()[:2]
    # Listening on every interface, the page is still opened through this machine's loopback.
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound_port}"

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
