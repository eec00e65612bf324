"""LibreTranslate's HTTP API on a `tinyt serve` application, so that its clients and apps work
unchanged: GET /languages, POST /translate, POST /detect, GET /frontend/settings, GET /health.

LibreTranslate reads a request's fields from a JSON object, a URL-encoded or a multipart form,
or the query string, and so does this. Its status codes are kept: 400 for a bad or missing
value and for text over the limits, 403 for a wrong API key, 429 when the server is busy.
"""

from __future__ import annotations

import email.policy
import json
from email.parser import BytesParser
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from tinyt.serving import (ERRORS, ApiError, ServedModel, ServeSettings, Text, check_key,
                           check_limits, language_name, lines_of, model_for, search_settings,
                           texts_of, translate_lines)


class LibreTranslateRequest(BaseModel):
    """POST /translate, as LibreTranslate takes it (JSON, or the same fields as a form)."""

    q: Text = Field(description="Text to translate: a string, or a list of strings.")
    source: str = Field(description="Source language code, or auto to detect it.")
    target: str = Field(description="Target language code.")
    format: Literal["text"] = Field("text", description="text: tinyt translates plain text "
                                                        "(html is refused).")
    alternatives: int | None = Field(0, description="How many alternative translations to add "
                                             "(below 0 counts as 0, as LibreTranslate has it).")
    api_key: str | None = Field(None, description="The API key, when the server has keys.")


class DetectRequest(BaseModel):
    q: str = Field(description="Text whose language to detect.")
    api_key: str | None = None


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
    query parameters fill in what the body lacks (LibreTranslate reads both). Text that is not
    UTF-8, in any of them, is refused rather than read some other way."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    fields: dict[str, Any] = {}
    if ctype == "application/json" or (not ctype and body.lstrip()[:1] in (b"{", b"[")):
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[...
            raise ApiError(400, "Invalid JSON format: the body is not a JSON object in UTF-8")
        if not isinstance(value, dict):
            raise ApiError(400, "Invalid JSON format: send a JSON object with q, source and "
                                "target")
        fields = value
    elif ctype == "multipart/form-data":
        fields = _multipart_fields(request.headers["content-type"], body)
    elif body:
        fields = _form_fields(body, "the form")
    for name, value in _form_fields(request.scope.get("query_string", b""),
                                    "the query string").items():
        fields.setdefault(name, value)
    return fields


def _form_fields(raw: bytes, what: str) -> dict[str, str]:
    """URL-encoded fields (the first of a repeated name), read as UTF-8 or refused: Starlette
    and urllib would turn bytes that are not UTF-8 into U+FFFD or latin-1 without a word."""
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, encoding="utf-8",
                          errors="strict", max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, f"Invalid request: {what} is not URL-encoded UTF-8 text") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a multipart form (the first of a repeated name), as UTF-8 or
    refused; a file is refused. Read with the standard library's MIME parser, which keeps each
    field's bytes (Starlette's reads undecodable text as latin-1)."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            raise ApiError(400, f"Invalid request: {name} must be a text field, not a file")
        try:
            value = (part.get_payload(decode=True) or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"Invalid request: the form field {name} is not UTF-8 "
                                "text") from None
        fields.setdefault(name, value)
    return fields


def add_libretranslate_routes(app: FastAPI, served: dict[tuple[str, str], ServedModel],
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
        check_key(settings, fields.get("api_key"))
        for name in ("q", "source", "target"):
            if fields.get(name) in (None, "", []):
                raise ApiError(400, f"Invalid request: missing {name} parameter")
        texts, is_list = texts_of(fields["q"])
        source, target = fields["source"], fields["target"]
        if not isinstance(source, str) or not isinstance(target, str):
            raise ApiError(400, "Invalid request: source and target must be language codes")
        text_format = fields.get("format") or "text"
        if text_format != "text":
            raise ApiError(400, f"{text_format} format is not supported; send format=text "
                                "(tinyt translates plain text)")
        try:
            given = fields.get("alternatives")
            if isinstance(given, bool) or (given is not None
                                           and not isinstance(given, (str, int, float))):
                raise TypeError(given)
            alternatives = max(0, int(given or 0))
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "Invalid request: alternatives parameter is not a number") \
                from None
        if alternatives + 1 > settings.max_beam:
            raise ApiError(400, f"Invalid request: alternatives parameter must be <= "
                                f"{settings.max_beam - 1}")
        lines = lines_of(texts)
        check_limits(settings, texts, lines)
        detected = None
        if source == "auto":
            source, confidence = _detect(app, served, "\n".join(texts), target)
            detected = {"confidence": confidence, "language": source}
        model = model_for(served, source, target)
        search = search_settings(model, settings, None, alternatives + 1, None)
        results = await translate_lines(model, settings, lines, search)
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
        check_key(settings, fields.get("api_key"))
        q = fields.get("q")
        if q in (None, "", []):
            raise ApiError(400, "Invalid request: missing q parameter")
        texts, _ = texts_of(q)
        check_limits(settings, texts, lines_of(texts))
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
        """LibreTranslate's {"status": "ok"}; the sentences waiting or being decoded; and for
        each model, the batches decoded and the requests and sentences they held."""
        return {"status": "ok",
                "queued_sentences": sum(m.batcher.queued_sentences for m in served.values()),
                "batching": {m.id: {"batches": m.batcher.batches, "requests": m.batcher.requests,
                                    "sentences": m.batcher.sentences}
                             for m in served.values()}}


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
        model_for(served, next(iter(served))[0], target)  # raises: an unknown target
    for code, confidence in _rank_languages(app, served, text):
        if code in into_target:
            return code, confidence
    return sorted(into_target)[0], 0.0
