"""What every route of `tinyt serve` shares: the server's settings and limits, the models it
serves (one per language pair, each with its `DynamicBatcher`), refusals (`ApiError`: a 4xx
with {"error": "..."}), and a request's text turned into lines, checked against the limits and
translated through the batcher.

Text is translated a line at a time (a model learned sentences, not pages): each line of a
request's text is a sentence, and empty lines stay empty.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, Union

from tinyt.batching import DynamicBatcher, Hypotheses, SearchSettings, ServerBusy
from tinyt.errors import TinytError
from tinyt.loading import LoadedModel
from tinyt.tokenizer import encodable

T = TypeVar("T")

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

    @property
    def engine(self) -> str:
        return {"run": "tinyt", "bundle": "tinyt", "ensemble": "tinyt ensemble",
                "ctranslate2": "ctranslate2"}[self.loaded.kind]

    @property
    def has_attention(self) -> bool:
        """Whether its attention can be shown: one tinyt model (not an ensemble or an export)."""
        return self.loaded.kind in ("run", "bundle")

    def describe(self) -> dict[str, Any]:
        translator, config = self.loaded.translator, self.loaded.config
        attention = self.has_attention
        model = getattr(translator, "model", None)
        return {
            "id": self.id, "source": self.source, "target": self.target,
            "source_name": language_name(self.source), "target_name": language_name(self.target),
            "engine": self.engine,
            "path": " + ".join(Path(part).name for part in self.loaded.name.split(" + ")),
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



Text = Union[str, list[str]]

ERROR_RESPONSE = {"description": "Refused: what is wrong and how to fix it.",
                  "content": {"application/json": {"schema": {
                      "type": "object", "properties": {"error": {"type": "string"}},
                      "required": ["error"]}}}}
ERRORS = {status: ERROR_RESPONSE for status in (400, 403, 408, 413, 422, 429)}



def check_key(settings: ServeSettings, key: Any) -> None:
    """LibreTranslate's answers: a missing key is 400, a wrong one 403."""
    if key is not None and not isinstance(key, str):
        raise ApiError(400, "Invalid request: api_key must be a string")
    if not settings.api_keys:
        return
    if key is None or key == "":
        raise ApiError(400, "this server needs an API key: send api_key (ask the server's "
                            "operator for one)")
    if not isinstance(key, str) or key not in settings.api_keys:
        raise ApiError(403, "Invalid API key")


def model_for(served: dict[tuple[str, str], ServedModel], source: str, target: str
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


def texts_of(q: Any, name: str = "q") -> tuple[list[str], bool]:
    """(texts, whether q was a list) of a q value that must be a string or a list of them."""
    if isinstance(q, str):
        return [encodable(q)], False
    if isinstance(q, list) and all(isinstance(t, str) for t in q):
        return [encodable(t) for t in q], True
    raise ApiError(400, f"Invalid request: {name} must be a string or a list of strings")



def lines_of(texts: list[str]) -> list[list[str]]:
    """Each text's lines (\\r\\n and \\r count as \\n): the sentences to translate."""
    return [t.replace("\r\n", "\n").replace("\r", "\n").split("\n") for t in texts]


def check_limits(settings: ServeSettings, texts: list[str], lines: list[list[str]]) -> None:
    chars = sum(len(t) for t in texts)
    if chars > settings.char_limit:
        raise ApiError(400, f"Invalid request: request ({chars} characters) exceeds text limit "
                            f"({settings.char_limit}); send less text per request")
    sentences = sum(len(ls) for ls in lines)
    if sentences > settings.batch_limit:
        raise ApiError(400, f"Invalid request: request ({sentences} lines) exceeds batch limit "
                            f"({settings.batch_limit}); send fewer lines per request")


async def within_time_limit(settings: ServeSettings, work: Awaitable[T], what: str) -> T:
    """`work`'s result, or the refusal that fits: 408 past --request-timeout, 429 when the
    queue is full, 400 for a TinytError (a translation too long for the model, say)."""
    try:
        return await asyncio.wait_for(work, settings.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"{what} took longer than the server's limit of "
                            f"{settings.request_timeout:g} s; send less text per request, or "
                            "try again when the server is less busy") from None
    except ServerBusy as exc:
        raise ApiError(429, f"Slowdown: {exc}") from None
    except TinytError as exc:
        raise ApiError(400, str(exc)) from None


def in_decoding_thread(model: ServedModel, function: Callable[..., T], *args: Any
                       ) -> Awaitable[T]:
    """`function(*args)` run in the model's decoding thread (a teacher-forced pass, say), one
    at a time with its batches and off the event loop."""
    return asyncio.get_running_loop().run_in_executor(model.batcher.thread, function, *args)


async def translate_lines(model: ServedModel, settings: ServeSettings, lines: list[list[str]],
                          search: SearchSettings) -> list[list[Hypotheses]]:
    """Each text's lines' hypotheses (an empty line: [("", 0.0)]), within the time limit."""
    flat = [line for text in lines for line in text]
    hyps = await within_time_limit(settings, model.batcher.translate(flat, search),
                                   "the translation")
    model.stats["requests"] += 1
    model.stats["sentences"] += len(flat)
    out, start = [], 0
    for text in lines:
        out.append(hyps[start: start + len(text)])
        start += len(text)
    return out


def search_settings(model: ServedModel, settings: ServeSettings, beam: int | None,
                     nbest: int, length_penalty: float | None) -> SearchSettings:
    """The search a request asks for: its beam (default the model's), grown to `nbest`. What a
    request asks for must be within the server's --max-beam; the model's own beam is used as
    it is."""
    decoding = model.loaded.config.decoding
    asked = max(beam or 0, nbest)
    if asked > settings.max_beam and asked != decoding.beam_size:
        raise ApiError(400, f"Invalid request: a beam of {asked} ({nbest} hypotheses) is over "
                            f"this server's limit of {settings.max_beam}; ask for fewer")
    beam = max(decoding.beam_size if beam is None else beam, nbest)
    penalty = decoding.length_penalty if length_penalty is None else length_penalty
    if not math.isfinite(penalty):
        raise ApiError(400, "Invalid request: length_penalty must be a finite number")
    return SearchSettings(beam, nbest, float(penalty))
