"""tinyt's own HTTP API on a `tinyt serve` application, documented by the OpenAPI schema FastAPI
generates from it (/docs): GET /api/models, POST /api/translate (n-best with scores, beam and
length penalty per request), POST /api/score (forced decoding) and POST /api/attention (a
translation's cross-attention, every layer and head: what the web page draws).

Bodies are JSON objects checked against the models below; one of the wrong shape is a 422.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tinyt.config import MAX_BEAM_SIZE
from tinyt.loading import LoadedModel
from tinyt.serving import (ERRORS, ApiError, ServedModel, ServeSettings, Text, check_key,
                           check_limits, in_decoding_thread, lines_of, model_for,
                           search_settings, texts_of, translate_lines, within_time_limit)
from tinyt.tokenizer import EOS_ID, encodable
from tinyt.translation import Attention


def _json_integer(value: Any) -> Any:
    """A JSON number that is an integer (2 or 2.0, as JSON Schema has it), as an int; anything
    else is left to the strict int check to refuse (true, "2", 2.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _encodable(value: Any) -> Any:
    """A string's lone surrogates as U+FFFD (`tinyt.tokenizer.encodable`), before a pattern
    is matched: the regex engine refuses a string that holds one."""
    return encodable(value) if isinstance(value, str) else value


# One sentence: a line of text, not blank. (The schema is given the pattern by hand: pydantic
# leaves out of it a constraint that follows a BeforeValidator.)
SENTENCE = r"^[^\r\n]*\S[^\r\n]*$"
Sentence = Annotated[str, BeforeValidator(_encodable), Field(pattern=SENTENCE)]

# A beam size or hypothesis count: 1 to MAX_BEAM_SIZE (the server's --max-beam is checked apart).
BeamSize = Annotated[int, BeforeValidator(_json_integer), Field(ge=1, le=MAX_BEAM_SIZE)]


class TranslateRequest(BaseModel):
    """POST /api/translate."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "1" for 1, false for 0
    q: Text = Field(description="Text to translate: a string or a list; each line a sentence.")
    source: str = Field(description="Source language code.")
    target: str = Field(description="Target language code.")
    beam: BeamSize | None = Field(None,
                             description="Beam size (1: greedy); default the model's.")
    nbest: BeamSize = Field(1,
                       description="Hypotheses a line, best first; the beam grows to fit.")
    length_penalty: float | None = Field(None, ge=0.0, le=10.0,
                                         description="Score / length ** this; default the "
                                                     "model's.")
    api_key: str | None = None


class ScoreRequest(BaseModel):
    """POST /api/score: forced decoding of given translations."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "1" for 1, false for 0
    q: Text = Field(description="Source sentences: a string or a list.")
    translation: Text = Field(description="Their translations, one a source.")
    source: str
    target: str
    tokens: bool = Field(False, description="Also give each token's piece and log-probability.")
    api_key: str | None = None


class AttentionRequest(BaseModel):
    """POST /api/attention: the attention of one sentence's translation."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "1" for 1, false for 0
    q: Sentence = Field(description="One source sentence: one line, not blank.",
                        json_schema_extra={"pattern": SENTENCE})
    source: str
    target: str
    translation: str | None = Field(None, description="The translation to look at (an "
                                                      "alternative, say); default the best.")
    beam: BeamSize | None = None
    length_penalty: float | None = Field(None, ge=0.0, le=10.0)
    api_key: str | None = None


def add_tinyt_routes(app: FastAPI, served: dict[tuple[str, str], ServedModel],
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
        check_key(settings, body.api_key)
        model = model_for(served, body.source, body.target)
        texts, _ = texts_of(body.q)
        lines = lines_of(texts)
        check_limits(settings, texts, lines)
        search = search_settings(model, settings, body.beam, body.nbest,
                                  body.length_penalty)
        results = await translate_lines(model, settings, lines, search)
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
        check_key(settings, body.api_key)
        model = model_for(served, body.source, body.target)
        sources, _ = texts_of(body.q)
        targets, _ = texts_of(body.translation, "translation")
        if len(sources) != len(targets):
            raise ApiError(400, f"{len(sources)} texts in q but {len(targets)} in translation; "
                                "give one translation a text")
        check_limits(settings, sources + targets, lines_of(sources + targets))
        scored = await within_time_limit(
            settings, in_decoding_thread(model, model.loaded.translator.score, sources, targets),
            "scoring")
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
        check_key(settings, body.api_key)
        model = model_for(served, body.source, body.target)
        given = [] if body.translation is None else [body.translation]
        check_limits(settings, [body.q] + given, [[body.q]])
        if not model.has_attention:
            raise ApiError(400, f"attention weights come from tinyt's own model; the {model.id} "
                                f"model is served by {model.engine}: serve the run or bundle "
                                "it was made from to see them")
        search = search_settings(model, settings, body.beam, 1, body.length_penalty)
        maps = await within_time_limit(
            settings, in_decoding_thread(model, model.loaded.translator.attention, body.q.strip(),
                                         body.translation, search.beam, search.length_penalty),
            "the attention")
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
    """The word number of each piece: the first piece, one starting with ▁, and <eos> (the last)
    each begin a word."""
    numbers, word = [], -1
    for i, piece in enumerate(pieces):
        if i == 0 or i == len(pieces) - 1 or piece.startswith("\u2581"):
            word += 1
        numbers.append(word)
    return numbers
