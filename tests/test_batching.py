"""Dynamic batching (tinyt.batching): concurrent requests share decoding batches, each is
answered with its own sentences' hypotheses, the token bound splits batches, a lone request is
decoded at once, and close() answers what is queued."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tinyt.batching import DynamicBatcher, SearchSettings, ServerBusy
from tinyt.errors import TinytError
from tinyt.loading import load_translator

SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest.",
             "Kinder spielen im Park.", "Ein Mann mit Hut.", "Ein Hund rennt.",
             "Drei Personen sitzen auf einer Bank.", "Eine Gruppe von Menschen."]
GREEDY = SearchSettings(beam=1, nbest=1, length_penalty=1.0)


class GatedTranslator:
    """A translator whose first translate_nbest call waits until `release` is set, recording
    the sentences of every call: lets a test queue requests while a batch is decoding."""

    def __init__(self, translator):
        self.inner = translator
        self.tokenizers = translator.tokenizers
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def translate_nbest(self, sentences, nbest, beam_size, length_penalty):
        self.calls.append(list(sentences))
        self.started.set()
        self.release.wait(600)  # a hang guard: the test releases it
        return self.inner.translate_nbest(sentences, nbest, beam_size, length_penalty)


async def start_gated(translator, first: int = 1, **options):
    """(batcher, gated translator, the task of a first request of `first` sentences) with that
    request's batch decoding and held at the gate: whatever is sent now queues behind it."""
    gated = GatedTranslator(translator)
    batcher = DynamicBatcher(gated, **options)
    await batcher.start()
    task = asyncio.create_task(batcher.translate(SENTENCES[:first], GREEDY))
    await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 600)
    return batcher, gated, task


@pytest.fixture(scope="module")
def translator(served_run):
    return load_translator(served_run, device="cpu")


def run(coroutine):
    return asyncio.run(coroutine)


def assert_same_hypotheses(got, expected):
    """The same texts in the same order, scores equal up to float32 noise (a batch's padding
    changes the sums in the last bits)."""
    assert [[text for text, _ in hyps] for hyps in got] == \
        [[text for text, _ in hyps] for hyps in expected]
    for hyps, other in zip(got, expected):
        assert [score for _, score in hyps] == pytest.approx([s for _, s in other], abs=1e-5)


def test_requests_that_arrive_while_a_batch_decodes_form_the_next_batch(translator):
    async def scenario():
        batcher, gated, first = await start_gated(translator, max_wait=0.0)
        rest = [asyncio.create_task(batcher.translate([s], GREEDY)) for s in SENTENCES[1:]]
        await asyncio.sleep(0)  # let them queue behind the decoding batch
        while batcher.queued_sentences < len(SENTENCES):
            await asyncio.sleep(0.001)
        gated.release.set()
        results = [await first] + [await task for task in rest]
        await batcher.close()
        return batcher, gated, results

    batcher, gated, results = run(scenario())
    assert gated.calls == [SENTENCES[:1], SENTENCES[1:]]  # one batch of 1, one of 7
    assert (batcher.batches, batcher.requests, batcher.sentences) == (2, 8, 8)
    # Each request gets its own sentence's hypotheses: what decoding it alone gives.
    alone = [translator.translate_nbest([s], 1, 1)[0] for s in SENTENCES]
    assert_same_hypotheses([r[0] for r in results], alone)
    assert batcher.queued_sentences == 0


def test_a_batch_holds_at_most_max_tokens_source_tokens(translator):
    tokens = [len(ids) for ids in translator.tokenizers.encode_src(SENTENCES)]
    limit = tokens[1] + tokens[2]  # room for two of the queued requests, not three

    async def scenario():
        batcher, gated, first = await start_gated(translator, max_tokens=limit, max_wait=0.0)
        rest = [asyncio.create_task(batcher.translate([s], GREEDY)) for s in SENTENCES[1:5]]
        while batcher.queued_sentences < 5:
            await asyncio.sleep(0.001)
        gated.release.set()
        await asyncio.gather(first, *rest)
        await batcher.close()
        return gated

    gated = run(scenario())
    assert gated.calls[0] == SENTENCES[:1]
    for call in gated.calls[1:]:
        assert sum(len(ids) for ids in translator.tokenizers.encode_src(call)) <= limit \
            or len(call) == 1
    assert [s for call in gated.calls for s in call] == SENTENCES[:5]  # in arrival order


def test_requests_with_other_settings_are_decoded_apart_in_one_batch(translator):
    async def scenario():
        batcher = DynamicBatcher(translator)
        await batcher.start()
        beam = SearchSettings(beam=3, nbest=2, length_penalty=0.6)
        out = await asyncio.gather(batcher.translate(SENTENCES[:2], GREEDY),
                                   batcher.translate(SENTENCES[2:4], beam))
        await batcher.close()
        return out

    greedy, beamed = run(scenario())
    assert_same_hypotheses(greedy, translator.translate_nbest(SENTENCES[:2], 1, 1, 1.0))
    assert_same_hypotheses(beamed, translator.translate_nbest(SENTENCES[2:4], 2, 3, 0.6))


def test_a_lone_request_does_not_wait(translator):
    """One client's request is decoded as soon as it arrives: even a huge max_wait adds
    nothing when requests are not arriving together."""
    async def scenario():
        batcher = DynamicBatcher(translator, max_wait=3600.0)
        await batcher.start()
        for sentence in SENTENCES[:3]:  # one after another, as one client sends them
            await asyncio.wait_for(batcher.translate([sentence], GREEDY), 600)
        await batcher.close()
        return batcher

    assert run(scenario()).batches == 3


def test_close_answers_what_is_queued_and_failures_reach_their_request(translator):
    class Failing(GatedTranslator):
        def translate_nbest(self, sentences, nbest, beam_size, length_penalty):
            if any("kaputt" in s for s in sentences):
                raise TinytError("this batch failed")
            return self.inner.translate_nbest(sentences, nbest, beam_size, length_penalty)

    async def scenario():
        batcher = DynamicBatcher(Failing(translator))
        await batcher.start()
        good = asyncio.create_task(batcher.translate(SENTENCES[:1], GREEDY))
        bad = asyncio.create_task(batcher.translate(["kaputt"], SearchSettings(2, 1, 1.0)))
        await asyncio.sleep(0)
        await batcher.close()  # the queued requests are answered before it returns
        return good.result(), bad.exception()

    good, error = run(scenario())
    assert_same_hypotheses(good, translator.translate_nbest(SENTENCES[:1], 1, 1))
    assert isinstance(error, TinytError) and "failed" in str(error)


def test_a_full_queue_refuses_with_server_busy(translator):
    async def scenario():
        batcher, gated, first = await start_gated(translator, max_queued=3, first=2)
        with pytest.raises(ServerBusy, match="try again"):
            await batcher.translate(SENTENCES[2:4], GREEDY)
        gated.release.set()
        await first
        await batcher.close()

    run(scenario())
