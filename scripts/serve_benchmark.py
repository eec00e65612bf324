#!/usr/bin/env python
"""Measure `tinyt serve` under load against `tinyt translate --input FILE` on the same sentences.

    python scripts/serve_benchmark.py [--run runs/NAME | --model PATH] [--ctranslate2-int8]
        [--requests 2000] [--clients 1,8,32] [--beam K] [--max-wait-ms MS] [--json OUT]

Sentences: the source side of a Multi30k split (--data-dir, --split, --src-lang), cycled to
--requests, one sentence a request. For each engine (the run or model; with
--ctranslate2-int8 also the run exported to a temporary CTranslate2 int8 folder), one after
the other so that nothing else runs while one is timed:

1. Offline baseline. `tinyt translate --input FILE --output OUT` over the N sentences in a
   subprocess (wall time: interpreter start, model load and decoding), the same over a one-line
   file (start-up and load alone), and, in another subprocess, the Python API's
   `translator.translate(lines)` timed around the call alone ("decode only": the basis of the
   server's throughput ratio, since the server has its model loaded already). That subprocess
   also decodes the first sentences in batches of each client count in request order (the
   batches C closed-loop clients can form at best, with the server's call, translate_nbest),
   then times --alone sentences decoded alone, one `translator.translate([s])` each, and
   `translate_nbest([s], 1)` each (the call the server makes).
2. The server: `tinyt serve --port 0` in a subprocess (stdout and stderr to a file; its URL
   read from there), run through this script's `_serve` mode, which is `tinyt serve` itself
   with the DynamicBatcher's decode call wrapped to record each batch (requests, sentences,
   tokens, decode time, queue wait) and one extra route, GET /_bench/batches, that returns
   them (--plain-server runs `python -m tinyt serve` unchanged, without batch statistics).
3. Load. A closed-loop generator: C clients, each on its own HTTP/1.1 keep-alive connection
   (raw asyncio streams, Content-Length framing), sends a JSON POST /translate
   (LibreTranslate's API) and its next request when the answer arrives, until N requests have
   been answered. Warm-up requests first at each level. Every answer must be 200 and equal the
   offline file's translation of that sentence (mismatches are counted and shown). Reported:
   sentences/s, p50/p90/p99 latency, the ratio to the offline throughput, the generator's own
   CPU time, the server's CPU time (its event-loop thread apart: HTTP, JSON, tokenizing,
   batching), the batches formed, and the server's RSS (VmRSS) after warm-up, at the end of
   each level and its peak (sampled every 0.2 s). The largest level is run once more
   (--rss-repeats) to see whether RSS still grows. Then an "overhead" level: requests whose
   text is a blank, which go through HTTP, JSON and the batcher but never reach the model.
4. The server is stopped with SIGTERM; it must exit 0 having answered every request sent.

The goals checked (from the dynamic-batching issue): at the largest client count, at least
70 % of the offline decode-only throughput; at 1 client, p50 latency at most 1.3x that of one
sentence decoded alone (on the same sentences). Prints markdown tables; --json writes
everything. Numbers mean something only on an otherwise idle machine: --wait-idle MINUTES
waits, before each timed phase, while a `pytest` or `tinyt train` process runs (at most that
long in all); the CPU that other processes took during each timed phase (/proc/stat) and the
load average before and after are recorded, and a share over 5 % is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "m30k_cpu12"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "multi30k"
CLK_TCK = os.sysconf("SC_CLK_TCK")
THROUGHPUT_GOAL = 0.70  # server sentences/s at the most clients / offline decode-only
LATENCY_GOAL = 1.30  # 1-client p50 / p50 of one sentence decoded alone


# -- small helpers ---------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, linearly interpolated (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(sum(ms) / len(ms), 2) if ms else float("nan"),
            "max_ms": round(max(ms), 2) if ms else float("nan")}


def read_lines(data_dir: Path, split: str, lang: str) -> list[str]:
    path = data_dir / f"{split}.{lang}.gz"
    if not path.is_file():
        path = data_dir / f"{split}.{lang}"
    if not path.is_file():
        raise SystemExit(f"error: no {split}.{lang}[.gz] in {data_dir}; pass --data-dir/--split")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = [line.rstrip("\n").rstrip("\r") for line in f]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise SystemExit(f"error: {path} holds no sentences")
    return lines


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads, seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16",
                                                         "amx_bf16", "amx_tile"))
    except OSError:
        pass
    return []


def busy_processes() -> list[str]:
    """Other processes that would disturb the timing: pytest and tinyt training."""
    found = []
    for pattern in ("pytest", "tinyt train"):
        result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True,
                                check=False)
        for line in result.stdout.splitlines():
            pid = int(line.split()[0])
            if pid not in (os.getpid(), os.getppid()) and "pgrep" not in line:
                found.append(line[:160])
    return found


class IdleWaiter:
    """Before each timed phase, waits (polling every 15 s) while a `pytest` or `tinyt train`
    process runs, for at most `minutes` in all; records each wait and what was still busy."""

    def __init__(self, minutes: float):
        self.budget = minutes * 60
        self.waited = 0.0
        self.log: list[dict[str, Any]] = []

    def __call__(self, phase: str) -> None:
        if self.budget <= 0:
            return
        start = time.monotonic()
        busy = busy_processes()
        while busy and self.waited + time.monotonic() - start < self.budget:
            progress(f"waiting for an idle machine before {phase} ({len(busy)} busy: "
                     f"{busy[0][:70]} ...)")
            time.sleep(15)
            busy = busy_processes()
        waited = time.monotonic() - start
        self.waited += waited
        if waited > 1 or busy:
            self.log.append({"phase": phase, "waited_s": round(waited, 1),
                             "still_busy": busy})


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: user, nice,
    system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def tinyt_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyt", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1"}


OTHER_CPU: dict[str, float] = {}  # phase: CPU share of the machine other processes took


def run_timed(command: list[str], log: Path, phase: str | None = None) -> float:
    """Run command (output to log); its wall time. Fails with the log's tail. With `phase`,
    records in OTHER_CPU the share of the machine's CPU that other processes took meanwhile."""
    busy, children = machine_busy_s(), children_cpu_s()
    start = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False,
                              stdin=subprocess.DEVNULL, env=child_env(), cwd=REPO).returncode
    wall = time.perf_counter() - start
    if phase is not None:
        other = (machine_busy_s() - busy) - (children_cpu_s() - children)
        OTHER_CPU[phase] = round(max(0.0, other) / wall / (os.cpu_count() or 1), 3)
    if code != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with {code}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return wall


# -- the offline baseline --------------------------------------------------------------------------

def decode_mode(argv: list[str]) -> None:
    """`_decode`: in a fresh process, load the model, time translate(lines) and sentences
    decoded alone; write the translations and a JSON of the times."""
    parser = argparse.ArgumentParser(prog="serve_benchmark.py _decode")
    parser.add_argument("--path", required=True)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--beam", type=int)
    parser.add_argument("--alone", type=int, default=100)
    parser.add_argument("--chunks", default="", help="batch sizes to time, e.g. 8,32")
    parser.add_argument("--chunk-sentences", type=int, default=384)
    parser.add_argument("--chunk-min-s", type=float, default=3.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from tinyt.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the tinyt program does, before anything else
    start = time.perf_counter()
    import torch

    from tinyt.loading import load_translator

    translator = load_translator(args.path, device=args.device)
    load_s = time.perf_counter() - start
    beam = args.beam or translator.decoding.beam_size
    lines = args.input.read_text(encoding="utf-8").split("\n")[:-1]
    translator.translate(lines[: min(32, max(4, len(lines) // 8))], beam_size=beam)  # warm-up
    start = time.perf_counter()
    outputs = translator.translate(lines, beam_size=beam)
    decode_s = time.perf_counter() - start
    write_lines(args.output, outputs)
    alone, alone_nbest = [], []
    for sentence in lines[: args.alone]:
        start = time.perf_counter()
        translator.translate([sentence], beam_size=beam)
        alone.append(time.perf_counter() - start)
        start = time.perf_counter()
        translator.translate_nbest([sentence], 1, beam_size=beam)
        alone_nbest.append(time.perf_counter() - start)
    # The server's call on batches of C consecutive sentences (as C closed-loop clients'
    # requests arrive), to separate what batch size costs from what serving costs.
    chunked = {}
    for size in [int(c) for c in args.chunks.split(",") if c]:
        part = lines[: max(size, args.chunk_sentences // size * size)]
        translator.translate_nbest(part[:size], 1, beam_size=beam)
        start, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - start < args.chunk_min_s:  # whole passes
            for first in range(0, len(part), size):
                translator.translate_nbest(part[first: first + size], 1, beam_size=beam)
            done += len(part)
        chunked[str(size)] = {"sentences": done,
                              "sentences_per_s": done / (time.perf_counter() - start)}
    amp = getattr(translator, "amp_dtype", None)
    engine = getattr(translator, "engine", None)  # CTranslate2's: replicas x 1 thread each
    threads = (f"CTranslate2 {engine.num_translators} x 1 threads" if engine is not None
               else f"{torch.get_num_threads()} torch threads")
    args.json.write_text(json.dumps({
        "load_s": load_s, "decode_s": decode_s, "sentences": len(lines), "beam": beam,
        "alone_s": alone, "alone_nbest_s": alone_nbest, "chunked": chunked, "threads": threads,
        "dtype": "fp32" if amp is None else str(amp).replace("torch.", ""),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def offline_baseline(engine: dict[str, Any], lines: list[str], work: Path, args) -> dict:
    """Time `tinyt translate --input FILE`, the same on one line, and the Python API."""
    source = write_lines(work / "requests.src", lines)
    output = work / "file.out"
    beam = ["--beam", str(args.beam)] if args.beam else []
    model = [engine["flag"], str(engine["path"])]
    command = tinyt_command("translate", *model, "--device", args.device, *beam)
    args.idle(f"{engine['name']}'s file run")
    cli_wall = run_timed([*command, "--input", str(source), "--output", str(output)],
                         work / "translate.log", "cli")
    translations = output.read_text(encoding="utf-8").split("\n")[:-1]
    if len(translations) != len(lines):
        raise SystemExit(f"error: tinyt translate wrote {len(translations)} lines for "
                         f"{len(lines)} inputs")
    one_line_wall = None
    if not args.quick:
        one = write_lines(work / "one.src", lines[:1])
        one_line_wall = run_timed([*command, "--input", str(one), "--output",
                                   str(work / "one.out")], work / "translate-one.log", "one")
    progress("  the Python API: decode only, and sentences alone ...")
    args.idle(f"{engine['name']}'s decode-only run")
    times = work / "decode.json"
    run_timed([sys.executable, str(Path(__file__).resolve()), "_decode", "--path",
               str(engine["path"]), "--input", str(source), "--output", str(work / "api.out"),
               "--json", str(times), "--alone", str(args.alone), "--device", args.device,
               "--chunks", ",".join(str(c) for c in args.clients if c > 1),
               "--chunk-sentences", str(args.chunk_sentences),
               "--chunk-min-s", "0" if args.quick else "3",
               *beam], work / "decode.log", "api")
    decoded = json.loads(times.read_text())
    api_out = (work / "api.out").read_text(encoding="utf-8").split("\n")[:-1]
    n = len(lines)
    file = {
        "sentences": n,
        "cli_wall_s": round(cli_wall, 3),
        "cli_sentences_per_s": round(n / cli_wall, 2),
        "cli_one_line_wall_s": None if one_line_wall is None else round(one_line_wall, 3),
        "cli_minus_one_line_sentences_per_s": (
            None if one_line_wall is None or cli_wall <= one_line_wall
            else round(n / (cli_wall - one_line_wall), 2)),
        "load_s": round(decoded["load_s"], 3),
        "decode_s": round(decoded["decode_s"], 3),
        "decode_sentences_per_s": round(n / decoded["decode_s"], 2),
        "api_differs_from_cli": sum(a != b for a, b in zip(api_out, translations)),
        "peak_rss_mib": round(decoded["peak_rss_mib"], 1),
        "in_batches_of": {size: {"sentences": c["sentences"],
                                 "sentences_per_s": round(c["sentences_per_s"], 2)}
                          for size, c in decoded["chunked"].items()},
        "other_processes_cpu_share": {"cli": OTHER_CPU.get("cli"), "one_line": OTHER_CPU.get(
            "one"), "api": OTHER_CPU.get("api")},
    }
    alone = {"sentences": len(decoded["alone_s"]), **latency_summary(decoded["alone_s"]),
             "nbest_call": latency_summary(decoded["alone_nbest_s"])}
    return {"file": file, "alone": alone, "translations": translations,
            "beam": decoded["beam"], "threads": decoded["threads"],
            "dtype": decoded["dtype"]}


# -- the server --------------------------------------------------------------------------------

def serve_mode(argv: list[str]) -> None:
    """`_serve`: `tinyt serve ARGS` with each decoding batch recorded (GET /_bench/batches)."""
    sys.path.insert(0, str(REPO))
    import threading

    import torch

    from tinyt import server
    from tinyt.batching import DynamicBatcher

    records: list[list[float]] = []
    batchers: list[DynamicBatcher] = []
    lock = threading.Lock()
    decode, init = DynamicBatcher._decode, DynamicBatcher.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        batchers.append(self)

    def recording_decode(self, batch):
        start = time.monotonic()
        result = decode(self, batch)
        end = time.monotonic()
        with lock:
            records.append([round(start, 6), round(end - start, 6), len(batch),
                            sum(len(p.sentences) for p in batch), sum(p.tokens for p in batch),
                            round(start - min(p.queued_at for p in batch), 6)])
        return result

    DynamicBatcher.__init__, DynamicBatcher._decode = recording_init, recording_decode
    create_app = server.create_app

    def instrumented_app(*a, **k):
        app = create_app(*a, **k)

        @app.get("/_bench/batches", include_in_schema=False)
        async def batches(since: int = 0) -> dict[str, Any]:
            with lock:
                chosen = records[since:]
            return {"count": since + len(chosen), "records": chosen,
                    "fields": ["start", "decode_s", "requests", "sentences", "tokens",
                               "oldest_wait_s"],
                    "counters": [{"batches": b.batches, "requests": b.requests,
                                  "sentences": b.sentences} for b in batchers],
                    "max_tokens": [b.max_tokens for b in batchers],
                    "max_wait": [b.max_wait for b in batchers],
                    "torch_threads": torch.get_num_threads()}
        return app

    server.create_app = instrumented_app
    from tinyt.cli import main

    main(["serve", *argv])


class Server:
    """A `tinyt serve` subprocess on a free loopback port for one engine: through this script's
    `_serve` mode (each batch recorded, GET /_bench/batches), or plain with --plain-server. Its
    output goes to a file, not a pipe nobody reads."""

    def __init__(self, engine: dict[str, Any], work: Path, args):
        self.instrumented = not args.plain_server
        options = ["--port", "0", engine["flag"], str(engine["path"]), "--device", args.device]
        if args.beam:
            options += ["--set", f"decoding.beam_size={args.beam}"]
        if args.max_wait_ms is not None:
            options += ["--max-wait-ms", str(args.max_wait_ms)]
        if args.batch_tokens is not None:
            options += ["--batch-tokens", str(args.batch_tokens)]
        command = ([sys.executable, str(Path(__file__).resolve()), "_serve", *options]
                   if self.instrumented else tinyt_command("serve", *options))
        env = child_env()
        self.log = work / "serve.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        self.pid = self.process.pid
        deadline = time.monotonic() + 600  # a hang guard, not a speed check
        while True:
            found = re.search(r"open (http://\S+?)/ in a browser", self.output())
            if found:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit(f"error: tinyt serve did not start:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.url = found.group(1)
        address = urllib.parse.urlsplit(self.url)
        self.host, self.port = address.hostname, address.port

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=600) as response:
            return json.loads(response.read())

    def batch_records(self, since: int) -> dict[str, Any] | None:
        return self.get(f"/_bench/batches?since={since}") if self.instrumented else None

    def stop(self) -> tuple[int, int | None]:
        """SIGTERM, then (exit status, the requests it says it answered)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(600)
        answered = re.search(r"answered (\d+) translation requests", self.output())
        return code, int(answered.group(1)) if answered else None


# -- the load generator ------------------------------------------------------------------------

class LoadResult:
    def __init__(self, n: int):
        self.latency = [0.0] * n
        self.status = [0] * n
        self.body: list[bytes] = [b""] * n
        self.done = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = None, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(length), close


async def _client(server: Server, requests: list[bytes], result: LoadResult,
                  cursor: list[int]) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        while cursor[0] < len(requests):
            i = cursor[0]
            cursor[0] += 1
            start = time.perf_counter()
            writer.write(requests[i])
            status, body, close = await _read_response(reader)
            result.latency[i] = time.perf_counter() - start
            result.status[i], result.body[i] = status, body
            result.done += 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(server.host, server.port)
    finally:
        writer.close()


async def _sample_rss(pid: int, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_kib(pid)["VmRSS"])
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass


async def _load(server: Server, requests: list[bytes], clients: int,
                rss_samples: list[int]) -> LoadResult:
    result = LoadResult(len(requests))
    cursor = [0]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server.pid, rss_samples, stop))
    try:
        await asyncio.gather(*(_client(server, requests, result, cursor)
                               for _ in range(min(clients, len(requests)))))
    finally:
        stop.set()
        await sampler
    return result


def http_request(server: Server, body: bytes) -> bytes:
    return (f"POST /translate HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("ascii") + body


def run_level(server: Server, requests: list[bytes], clients: int
              ) -> tuple[LoadResult, dict[str, Any]]:
    """Send requests with `clients` closed-loop clients; the result and what it cost."""
    main_tid = server.pid
    before = {"wall": time.perf_counter(), "gen_cpu": time.process_time(),
              "machine": machine_busy_s(),
              "server_cpu": cpu_seconds(server.pid),
              "loop_cpu": cpu_seconds(server.pid, main_tid)}
    rss_samples: list[int] = []
    result = asyncio.run(_load(server, requests, clients, rss_samples))
    wall = time.perf_counter() - before["wall"]
    cost = {"wall_s": wall, "generator_cpu_s": time.process_time() - before["gen_cpu"],
            "server_cpu_s": cpu_seconds(server.pid) - before["server_cpu"],
            "event_loop_cpu_s": cpu_seconds(server.pid, main_tid) - before["loop_cpu"],
            "rss_samples_kib": rss_samples}
    other = (machine_busy_s() - before["machine"] - cost["generator_cpu_s"]
             - cost["server_cpu_s"])
    cost["other_cpu_share"] = round(max(0.0, other) / wall / (os.cpu_count() or 1), 3)
    return result, cost


def batch_summary(records: list[list[float]], wall: float) -> dict[str, Any]:
    if not records:
        return {"batches": 0}
    requests = [r[2] for r in records]
    sentences = [r[3] for r in records]
    decode = [r[1] for r in records]
    histogram: dict[str, int] = {}
    for size in requests:
        bucket = next(f"{low}-{high}" if low != high else str(low)
                      for low, high in ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63),
                                        (64, 127), (128, 10**9)) if size <= high)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return {"batches": len(records), "requests": sum(requests), "sentences": sum(sentences),
            "mean_requests": round(sum(requests) / len(records), 2),
            "max_requests": max(requests),
            "mean_tokens": round(sum(r[4] for r in records) / len(records), 1),
            "size_histogram": histogram,
            "decode_s": round(sum(decode), 3),
            "decode_busy_share": round(sum(decode) / wall, 3),
            "mean_decode_ms": round(1000 * sum(decode) / len(records), 2),
            "decode_ms_per_sentence": round(1000 * sum(decode) / sum(sentences), 3),
            "mean_oldest_wait_ms": round(1000 * sum(r[5] for r in records) / len(records), 2)}


def check_answers(result: LoadResult, indices: list[int], expected: list[str]
                  ) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    mismatches, examples = 0, []
    for k, i in enumerate(indices):
        statuses[str(result.status[k])] = statuses.get(str(result.status[k]), 0) + 1
        if result.status[k] != 200:
            if len(examples) < 3:
                examples.append({"request": k, "status": result.status[k],
                                 "body": result.body[k][:200].decode(errors="replace")})
            continue
        text = json.loads(result.body[k])["translatedText"]
        if text != expected[i]:
            mismatches += 1
            if len(examples) < 3:
                examples.append({"sentence": i, "server": text, "file": expected[i]})
    return {"statuses": statuses, "non_200": len(indices) - statuses.get("200", 0),
            "mismatches": mismatches, "examples": examples}


def load_levels(engine: dict[str, Any], server: Server, lines: list[str],
                expected: list[str], source: str, target: str, args) -> dict[str, Any]:
    bodies = [http_request(server, json.dumps({"q": s, "source": source, "target": target},
                                               ensure_ascii=False).encode("utf-8"))
              for s in lines]
    offline = engine["file"]["decode_sentences_per_s"]
    levels, sent = [], 0
    rss_start = rss_peak = None
    cores = os.cpu_count() or 1
    seen = server.batch_records(0)["count"] if server.instrumented else 0
    plan = [(c, False) for c in args.clients] + [(max(args.clients), True)] * args.rss_repeats
    rss_marks: dict[str, int] = {}
    for clients, repeat in plan:
        if repeat and "after_levels" not in rss_marks:
            rss_marks["after_levels"] = rss_kib(server.pid)["VmRSS"]
        n = args.requests_at_1 if clients == 1 and args.requests_at_1 else args.requests
        n = min(n, len(lines))
        warm = min(len(lines), args.warmup if args.warmup is not None else max(16, 2 * clients))
        warm_result, _ = run_level(server, bodies[:warm], clients)
        warm_check = check_answers(warm_result, list(range(warm)), expected)
        sent += warm
        rss_after_warmup = rss_kib(server.pid)["VmRSS"]
        if rss_start is None:
            rss_start = rss_after_warmup
        if server.instrumented:
            seen = server.batch_records(seen)["count"]
        args.idle(f"{engine['name']} at {clients} clients")
        progress(f"{engine['name']}: {clients} client(s), {n} requests"
                 f"{' (repeated, for RSS)' if repeat else ''} ...")
        result, cost = run_level(server, bodies[:n], clients)
        sent += n
        rss_end = rss_kib(server.pid)["VmRSS"]
        rss_peak = max([rss_peak or 0, rss_end, *cost["rss_samples_kib"]])
        check = check_answers(result, list(range(n)), expected)
        wall = cost["wall_s"]
        level = {
            "clients": clients, "repeat": repeat, "requests": n, "warmup_requests": warm,
            "warmup_non_200": warm_check["non_200"],
            "wall_s": round(wall, 3), "sentences_per_s": round(n / wall, 2),
            "ratio_to_file_decode": round(n / wall / offline, 3),
            "ratio_to_file_cli": round(n / wall / engine["file"]["cli_sentences_per_s"], 3),
            "ratio_to_file_in_batches_of_clients": (
                round(n / wall / engine["file"]["in_batches_of"][str(clients)]["sentences_per_s"],
                      3) if str(clients) in engine["file"]["in_batches_of"] else None),
            **latency_summary(result.latency),
            "statuses": check["statuses"], "non_200": check["non_200"],
            "mismatches": check["mismatches"], "mismatch_examples": check["examples"],
            "generator_cpu_s": round(cost["generator_cpu_s"], 3),
            "generator_cpu_share_of_one_core": round(cost["generator_cpu_s"] / wall, 3),
            "generator_cpu_share_of_machine": round(cost["generator_cpu_s"] / wall / cores, 3),
            "server_cpu_s": round(cost["server_cpu_s"], 2),
            "server_cpu_share_of_machine": round(cost["server_cpu_s"] / wall / cores, 3),
            "other_processes_cpu_share": cost["other_cpu_share"],
            "event_loop_cpu_s": round(cost["event_loop_cpu_s"], 2),
            "event_loop_cpu_ms_per_request": round(1000 * cost["event_loop_cpu_s"] / n, 3),
            "rss_mib": {"after_warmup": round(rss_after_warmup / 1024, 1),
                        "end": round(rss_end / 1024, 1),
                        "peak": round(max([rss_end, *cost["rss_samples_kib"]]) / 1024, 1),
                        "samples": len(cost["rss_samples_kib"])},
        }
        if clients == 1 and not repeat:
            # The same sentences as those decoded alone (the first `alone` of the list).
            alone_n = engine["alone"]["sentences"]
            matched = [result.latency[k] for k in range(n) if k % args.base_len < alone_n]
            level["matched_p50_ms"] = round(1000 * percentile(matched, 50), 2)
        if server.instrumented:
            got = server.batch_records(seen)
            seen = got["count"]
            level["batching"] = batch_summary(got["records"], wall)
            level["batcher_counters"] = got["counters"]
        levels.append(level)
    rss_marks["after_repeats"] = rss_kib(server.pid)["VmRSS"]
    overhead = None
    if args.overhead_requests:
        progress(f"{engine['name']}: blank-text requests (overhead) ...")
        blank = http_request(server, json.dumps({"q": " ", "source": source,
                                                 "target": target}).encode())
        overhead = {}
        for clients in sorted({1, max(args.clients)}):
            n = args.overhead_requests
            run_level(server, [blank] * min(n, 20), clients)  # warm-up
            result, cost = run_level(server, [blank] * n, clients)
            sent += n + min(n, 20)
            overhead[str(clients)] = {
                "requests": n, "non_200": sum(s != 200 for s in result.status),
                "requests_per_s": round(n / cost["wall_s"], 1),
                **latency_summary(result.latency),
                "server_cpu_ms_per_request": round(1000 * cost["server_cpu_s"] / n, 3),
                "event_loop_cpu_ms_per_request": round(1000 * cost["event_loop_cpu_s"] / n, 3),
                "generator_cpu_ms_per_request": round(1000 * cost["generator_cpu_s"] / n, 3)}
    rss_final = rss_kib(server.pid)
    def mib(kib: int) -> float:
        return round(kib / 1024, 1)
    after_levels = rss_marks.get("after_levels", rss_final["VmRSS"])
    after_repeats = rss_marks.get("after_repeats", rss_final["VmRSS"])
    rss = {"start_mib": mib(rss_start), "after_levels_mib": mib(after_levels),
           "after_repeats_mib": mib(after_repeats),
           "repeat_growth_mib": mib(after_repeats - after_levels),
           "end_mib": mib(rss_final["VmRSS"]),
           "peak_during_load_mib": round(rss_peak / 1024, 1),
           "growth_mib": round((rss_final["VmRSS"] - rss_start) / 1024, 1),
           "process_peak_vmhwm_mib": round(rss_final["VmHWM"] / 1024, 1)}
    return {"levels": levels, "overhead": overhead, "rss": rss, "requests_sent": sent}


# -- one engine, and the whole run ---------------------------------------------------------------

def benchmark_engine(engine: dict[str, Any], lines: list[str], work: Path, args
                     ) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    progress(f"{engine['name']}: offline baseline ...")
    baseline = offline_baseline(engine, lines, work, args)
    translations = baseline.pop("translations")
    engine.update(baseline)
    progress(f"{engine['name']}: server ...")
    server = Server(engine, work, args)
    try:
        models = server.get("/api/models")["models"]
        model = models[0]
        if model["source"] != args.src_lang:
            raise SystemExit(f"error: the model translates from {model['source']}, not "
                             f"--src-lang {args.src_lang}")
        if model["beam_size"] != engine["beam"]:
            raise SystemExit(f"error: the server decodes with beam {model['beam_size']}, the "
                             f"baseline with {engine['beam']}")
        engine["server"] = {"url": server.url, "engine": model["engine"],
                            "instrumented": server.instrumented}
        if server.instrumented:
            info = server.batch_records(0)
            engine["server"].update(torch_threads=info["torch_threads"],
                                    max_tokens=info["max_tokens"][0],
                                    max_wait_ms=1000 * info["max_wait"][0])
        engine.update(load_levels(engine, server, lines, translations, model["source"],
                                  model["target"], args))
    finally:
        code, answered = server.stop()
        progress(f"{engine['name']}: server stopped ({code})")
    engine["server_exit_code"] = code
    engine["server_answered"] = answered
    levels = [level for level in engine["levels"] if not level["repeat"]]
    top = max(levels, key=lambda level: level["clients"])
    one = next((level for level in levels if level["clients"] == 1), None)
    engine["goals"] = {
        "throughput_clients": top["clients"],
        "throughput_ratio": top["ratio_to_file_decode"],
        "throughput_ratio_to_batches_of_clients": top["ratio_to_file_in_batches_of_clients"],
        "throughput_goal": THROUGHPUT_GOAL,
        "throughput_met": top["ratio_to_file_decode"] >= THROUGHPUT_GOAL,
        "p50_ratio_at_1": None if one is None else round(
            one["p50_ms"] / engine["alone"]["p50_ms"], 3),
        "p50_ratio_at_1_same_sentences": None if one is None else round(
            one["matched_p50_ms"] / engine["alone"]["p50_ms"], 3),
        "latency_goal": LATENCY_GOAL,
        # Judged on the same sentences (those decoded alone): sentence lengths vary.
        "latency_met": None if one is None else one["matched_p50_ms"] / engine["alone"]["p50_ms"]
        <= LATENCY_GOAL,
    }
    return engine


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _table_row(rows: list[str], base: float, what: str, clients: Any, rate: float | None,
               p: dict[str, float] | None = None, batch: float | None = None,
               mismatches: Any = None, rss: str | None = None) -> None:
    p = p or {}
    rows.append(f"| {what} | {clients} | {_num(rate)} | "
                f"{'–' if rate is None else f'{rate / base:.2f}'} | "
                f"{_num(p.get('p50_ms'))} | {_num(p.get('p90_ms'))} | "
                f"{_num(p.get('p99_ms'))} | {_num(batch)} | "
                f"{'–' if mismatches is None else mismatches} | {rss or '–'} |")


def markdown(results: dict[str, Any]) -> str:
    """The load table (one per engine) and a summary of what explains it."""
    out = []
    for e in results["engines"]:
        f, a = e["file"], e["alone"]
        base = f["decode_sentences_per_s"]
        rows = [(f"{e['name']} (beam {e['beam']}, {e['threads']}, "
                 f"{f['sentences']} sentences)"), "",
                ("| run | clients | sentences/s | vs file (decode only) | p50 ms | p90 ms | "
                 "p99 ms | mean batch | mismatches | RSS MiB |"),
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        row = functools.partial(_table_row, rows, base)
        row("file: `tinyt translate` wall (start and load included)", "–",
            f["cli_sentences_per_s"])
        if f["cli_minus_one_line_sentences_per_s"]:
            row("file: wall minus a 1-line run's", "–", f["cli_minus_one_line_sentences_per_s"])
        row("file: decode only (Python API)", "–", base,
            mismatches=f"{f['api_differs_from_cli']} vs CLI",
            rss=f"{f['peak_rss_mib']:,.0f} peak")
        for size, c in f["in_batches_of"].items():
            row(f"file: decode only, batches of {size} in request order "
                f"({c['sentences']} sentences)", "–", c["sentences_per_s"])
        row(f"one sentence alone (Python API, {a['sentences']} sentences)", 1,
            1000 / a["mean_ms"], a)
        for level in e["levels"]:
            what = (f"server, {level['requests']} requests"
                    + (" (repeated, for RSS)" if level["repeat"] else ""))
            row(what, level["clients"], level["sentences_per_s"], level,
                level.get("batching", {}).get("mean_requests"), level["mismatches"],
                f"{level['rss_mib']['after_warmup']:,.0f} → {level['rss_mib']['end']:,.0f}")
        out += rows + [""]
        g, rss = e["goals"], e["rss"]
        notes = [
            f"- {g['throughput_clients']} clients: {100 * g['throughput_ratio']:.0f} % of the "
            f"file's decode-only throughput (goal ≥ {100 * g['throughput_goal']:.0f} %: "
            f"{'met' if g['throughput_met'] else 'missed'})"
            + ("" if g["throughput_ratio_to_batches_of_clients"] is None else
               f"; {100 * g['throughput_ratio_to_batches_of_clients']:.0f} % of the file "
               f"decoded in batches of {g['throughput_clients']}")]
        if g["p50_ratio_at_1"] is not None:
            notes.append(
                f"- 1 client: p50 on the sentences decoded alone "
                f"{g['p50_ratio_at_1_same_sentences']:.2f}× theirs alone (goal ≤ "
                f"{g['latency_goal']}×: {'met' if g['latency_met'] else 'missed'}); over all "
                f"requests {g['p50_ratio_at_1']:.2f}×")
        repeats = sum(level["repeat"] for level in e["levels"])
        notes.append(
            f"- RSS {rss['start_mib']:,.0f} MiB after the first warm-up, "
            f"{rss['after_levels_mib']:,.0f} after the levels"
            + (f", {rss['after_repeats_mib']:,.0f} after {repeats} more run(s) at "
               f"{g['throughput_clients']} clients ({rss['repeat_growth_mib']:+,.1f})"
               if repeats else "")
            + f", peak {rss['peak_during_load_mib']:,.0f}; server exit {e['server_exit_code']}, "
              f"answered {e['server_answered']} of {e['requests_sent']} requests")
        others = [("file run", share) for share in f["other_processes_cpu_share"].values()
                  if share] + [(f"{level['clients']} clients", level["other_processes_cpu_share"])
                               for level in e["levels"]]
        busy = [f"{name} {100 * share:.0f} %" for name, share in others if share > 0.05]
        if busy:
            notes.append(f"- warning: other processes took CPU meanwhile: {', '.join(busy)} "
                         "of the machine")
        for level in e["levels"]:
            b = level.get("batching")
            notes.append(
                f"- {level['clients']} clients: generator CPU "
                f"{100 * level['generator_cpu_share_of_one_core']:.1f} % of a core, server "
                f"{100 * level['server_cpu_share_of_machine']:.0f} % of the machine, its event "
                f"loop {level['event_loop_cpu_ms_per_request']:.2f} ms CPU a request"
                + ("" if not b else
                   f"; {b['batches']} batches (mean {b['mean_requests']} requests, max "
                   f"{b['max_requests']}), decode thread busy {100 * b['decode_busy_share']:.0f} "
                   f"%, {b['decode_ms_per_sentence']:.2f} ms of decoding a sentence"))
        for clients, o in (e.get("overhead") or {}).items():
            notes.append(f"- blank-text requests (HTTP, JSON and batcher, no model), {clients} "
                         f"clients: {o['requests_per_s']:,.0f} requests/s, p50 "
                         f"{o['p50_ms']:.2f} ms, server CPU {o['server_cpu_ms_per_request']:.2f} "
                         "ms a request")
        out += notes + [""]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", type=Path, help=f"run directory (default {DEFAULT_RUN})")
    which.add_argument("--model", type=Path, help="model bundle or CTranslate2 export folder")
    parser.add_argument("--ctranslate2-int8", action="store_true",
                        help="also export the run to a temporary CTranslate2 int8 folder and "
                             "benchmark that")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--src-lang", default="de")
    parser.add_argument("--requests", type=int, help="requests per level (default 2000)")
    parser.add_argument("--requests-at-1", type=int,
                        help="requests of the 1-client level (default: --requests)")
    parser.add_argument("--clients", help="client counts (default 1,8,32)")
    parser.add_argument("--beam", type=int, help="beam size (default: the model's)")
    parser.add_argument("--max-wait-ms", type=float, help="the server's (default: its own)")
    parser.add_argument("--batch-tokens", type=int, help="the server's (default: its own)")
    parser.add_argument("--alone", type=int,
                        help="sentences decoded alone for the latency basis (default 200)")
    parser.add_argument("--chunk-sentences", type=int,
                        help="sentences the offline run decodes in batches of each client "
                             "count, to compare (default 384)")
    parser.add_argument("--rss-repeats", type=int,
                        help="runs of the largest client count repeated at the end, to see "
                             "whether RSS keeps growing (default 1)")
    parser.add_argument("--warmup", type=int,
                        help="warm-up requests before each level (default max(16, 2 x clients))")
    parser.add_argument("--overhead-requests", type=int,
                        help="blank-text requests of the overhead level (default 500; 0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plain-server", action="store_true",
                        help="run `tinyt serve` unmodified (no batch statistics)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MINUTES",
                        help="first wait up to this long for no pytest / tinyt train process")
    parser.add_argument("--work-dir", type=Path, help="keep the files here (default: a "
                                                       "temporary folder, removed)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny numbers for a test: 40 requests at 1 and 4 clients")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"requests": 40 if quick else 2000, "clients": "1,4" if quick else "1,8,32",
                "alone": 10 if quick else 200, "overhead_requests": 20 if quick else 500,
                "chunk_sentences": 8 if quick else 384, "rss_repeats": 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.warmup is None:
        args.warmup = 4
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients takes positive counts, e.g. 1,8,32")
    if args.run is None and args.model is None:
        if not (DEFAULT_RUN / "best.pt").is_file():
            parser.error(f"pass --run RUN or --model PATH ({DEFAULT_RUN} has no best.pt)")
        args.run = DEFAULT_RUN
    if args.ctranslate2_int8 and args.run is None:
        parser.error("--ctranslate2-int8 exports a run: pass --run")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.idle = IdleWaiter(args.wait_idle)
    args.idle("the start")
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags()},
        "load_average_before": os.getloadavg(),
        "busy_before": busy_processes() if not args.quick else [],
        "settings": {"split": args.split, "src_lang": args.src_lang,
                     "requests": args.requests, "requests_at_1": args.requests_at_1,
                     "clients": args.clients, "beam": args.beam, "device": args.device,
                     "max_wait_ms": args.max_wait_ms, "batch_tokens": args.batch_tokens,
                     "alone": args.alone, "quick": args.quick},
        "engines": []}
    base = read_lines(args.data_dir, args.split, args.src_lang)
    args.base_len = len(base)
    lines = [base[i % len(base)] for i in range(max(args.requests, args.requests_at_1 or 0))]
    results["settings"]["distinct_sentences"] = len(set(lines))
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        engines = []
        if args.run is not None:
            engines.append({"name": "tinyt", "flag": "--run", "path": args.run.resolve()})
        else:
            engines.append({"name": "model", "flag": "--model", "path": args.model.resolve()})
        if args.ctranslate2_int8:
            folder = work / "ct2-int8"
            progress("exporting to CTranslate2 int8 ...")
            run_timed(tinyt_command("export", "--run", str(args.run.resolve()), "--format",
                                    "ctranslate2", "--quantize", "int8", "-o", str(folder)),
                      work / "export.log")
            engines.append({"name": "CTranslate2 int8", "flag": "--model", "path": folder})
        for k, engine in enumerate(engines):
            result = benchmark_engine(engine, lines, work / f"engine-{k}", args)
            if result["name"] == "tinyt":
                result["name"] = f"tinyt {result['dtype']}"
            elif result["name"] == "model":
                kind = result["server"]["engine"]
                result["name"] = (f"{kind} ({Path(result['path']).name})" if kind != "tinyt"
                                  else f"tinyt {result['dtype']} ({Path(result['path']).name})")
            result["path"] = str(result.pop("path"))
            result.pop("flag")
            results["engines"].append(result)
    results["load_average_after"] = os.getloadavg()
    results["idle_waits"] = args.idle.log
    if not args.quick:
        results["busy_after"] = busy_processes()
    table = markdown(results)
    results["table"] = table
    print(f"\n{table}\n")
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load "
          f"average before {results['load_average_before']}, after "
          f"{results['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                             encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_decode":
        decode_mode(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_mode(sys.argv[2:])
    else:
        main(sys.argv[1:])
