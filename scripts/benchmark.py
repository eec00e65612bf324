#!/usr/bin/env python
"""Measure tinyt's training and decoding speed on this machine; print JSON and a table.

    python scripts/benchmark.py [--config configs/multi30k_de_en.yaml]
        [--data-dir ../shared/data/multi30k] [--run runs/NAME] [--json bench.json]

Training: after warm-up steps, the steady-state speed of real optimisation steps on the
config's model and token batches (target tokens/s, source+target tokens/s, padding share).
Decoding: greedy and beam search over the validation split, and a full `tinyt evaluate`-style
pass (loss + beam search + BLEU) over the test split. Decoding uses the weights of `--run` when
given (a trained model stops at realistic lengths); without one, it uses the briefly trained
benchmark model, whose hypotheses mostly run to the length limit (a pessimistic number).
Bound: the machine's own matrix-multiply throughput at the model's linear-layer shapes (fp32,
and bf16 on a GPU or a CPU with bf16 instructions), timed in the same run, and training's
achieved FLOP/s as a share of it, so numbers from different machines compare.
Profile (--profile STEPS): torch.profiler over that many more training steps, the operators
taking the most time and the matrix multiplies' share of it.
Memory: peak resident set size of the process; on CUDA also peak GPU memory and the achieved
TFLOP/s of training, counted from the model's shapes (padded positions included).
Engines (with --run, when CTranslate2 is installed): the run's best.pt decoded over the whole
test split by tinyt's own search and by its CTranslate2 exports (float32 and int8), greedy and
beam 5, each engine in a fresh process: sentences/s, test BLEU and peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyt.allocator import reuse_freed_memory  # noqa: E402
from tinyt.checkpoint import load_trained  # noqa: E402
from tinyt.config import Config, ModelConfig, load_config  # noqa: E402
from tinyt.data import collate, load_split, make_batches, tokenize  # noqa: E402
from tinyt.evaluation import score_translations, teacher_forced_nll  # noqa: E402
from tinyt.hardware import cpu_has_native_bf16, resolve_device, set_threads  # noqa: E402
from tinyt.loading import load_translator  # noqa: E402
from tinyt.tokenizer import train_or_load  # noqa: E402
from tinyt.training import Trainer  # noqa: E402
from tinyt.translation import Translator  # noqa: E402


def forward_flops(m: ModelConfig, vocab: int, batch: int, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs of one forward pass over a padded (batch, src_len) x (batch, tgt_len)
    batch: projections, attention scores and mixing, FFN, output layer (2 FLOPs a MAC)."""
    d, f = m.d_model, m.d_ff
    s_tok, t_tok = batch * src_len, batch * tgt_len
    enc = m.enc_layers * (s_tok * (2 * d * 3 * d + 2 * d * d + 4 * d * f) + 4 * s_tok * src_len * d)
    dec_self = t_tok * (2 * d * 3 * d + 2 * d * d) + 4 * t_tok * tgt_len * d
    dec_cross = t_tok * 4 * d * d + s_tok * 4 * d * d + 4 * t_tok * src_len * d
    dec = m.dec_layers * (dec_self + dec_cross + t_tok * 4 * d * f)
    return enc + dec + t_tok * 2 * d * vocab


def linear_shapes(m: ModelConfig, vocab: int) -> list[tuple[int, int, int]]:
    """(in, out, how many) of every linear layer a training step runs, encoder and decoder:
    the matrix multiplies that dominate its FLOPs (attention's own products are left out)."""
    d, f = m.d_model, m.d_ff
    encoder = [(d, 3 * d, 1), (d, d, 1), (d, f, 1), (f, d, 1)]
    decoder = [(d, 3 * d, 1), (d, d, 3), (d, 2 * d, 1), (d, f, 1), (f, d, 1)]  # self, cross
    shapes = [(i, o, n * m.enc_layers) for i, o, n in encoder]
    shapes += [(i, o, n * m.dec_layers) for i, o, n in decoder]
    return shapes + [(d, vocab, 1)]


def gemm_bound_gflops(m: ModelConfig, vocab: int, tokens: int, dtype: torch.dtype,
                      device: torch.device, repeats: int = 3) -> float:
    """This machine's matrix-multiply throughput (GFLOP/s) at the training step's own shapes,
    in `dtype`: each linear layer's forward product and its two backward ones (the input's and
    the weight's gradients), in the memory layouts nn.Linear and autograd use (the weight is
    (out, in): x @ W^T, dy @ W, dy^T @ x; a BLAS can be a third slower in one layout than
    another at the same sizes), weighted by how often a step does them. The speed a training
    step could reach if it did nothing but its matrix multiplies: the bound its achieved
    TFLOP/s is a share of."""
    total_flops = total_seconds = 0.0
    for n_in, n_out, count in linear_shapes(m, vocab):
        x = torch.randn(tokens, n_in, device=device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype)
        dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
        products = [lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x]
        for product in products:
            product()  # warm-up: first-call costs (allocation, kernel choice) are not the bound
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            for product in products:
                product()
        sync(device)
        total_seconds += (time.perf_counter() - start) * count
        total_flops += repeats * len(products) * 2 * tokens * n_in * n_out * count
    return total_flops / total_seconds / 1e9


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU, or a CPU with bf16
    instructions. Elsewhere bf16 is emulated, dozens of times slower than fp32 (2.8 against
    175 GFLOP/s on a 2-core AVX2 EPYC), and not worth timing."""
    return device.type == "cuda" or cpu_has_native_bf16()


def bound_gflops(results: dict, dtype: torch.dtype, config: Config, vocab: int,
                 device: torch.device) -> float:
    """The matrix-multiply bound in `dtype` (`gemm_bound_gflops`), measured once per run and
    kept in `results` as gemm_bound_gflops_<dtype>."""
    key = "gemm_bound_gflops_" + str(dtype).removeprefix("torch.")
    if key not in results:
        results[key] = round(gemm_bound_gflops(config.model, vocab, config.train.batch_tokens,
                                               dtype, device), 1)
    return results[key]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_training(config: Config, trainer: Trainer, warmup: int, steps: int) -> dict:
    data = trainer.train_data
    generator = torch.Generator().manual_seed(config.train.seed)
    batches = make_batches(data, trainer.train_indices, config.train.batch_tokens, generator)
    # Padding over a whole epoch's batches, as training sees it.
    real_src = real_tgt = slots_src = slots_tgt = 0
    for idx in batches:
        s = data.src_lengths_at(idx) + 1
        t = data.tgt_lengths_at(idx) + 1
        real_src += int(s.sum()); real_tgt += int(t.sum())
        slots_src += len(idx) * int(s.max()); slots_tgt += len(idx) * int(t.max())
    device = trainer.device
    trainer.model.train()
    chosen = batches[: warmup + steps]
    for idx in chosen[:warmup]:
        trainer.train_step(collate(data, idx).to(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    tgt_tokens = src_tokens = 0
    flops = 0.0
    start = time.perf_counter()
    for idx in chosen[warmup:]:
        batch = collate(data, idx)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        trainer.train_step(batch)
        tgt_tokens += batch.n_tokens
        src_tokens += int((batch.src != 0).sum())
        flops += 3 * forward_flops(config.model, trainer.model.tgt_vocab_size, *batch.src.shape,
                                   batch.tgt_in.size(1))
    sync(device)
    seconds = time.perf_counter() - start
    result = {
        "train_steps_timed": len(chosen) - warmup,
        "train_seconds": round(seconds, 2),
        "train_tgt_tokens_per_s": round(tgt_tokens / seconds, 1),
        "train_src_tgt_tokens_per_s": round((src_tokens + tgt_tokens) / seconds, 1),
        "train_batches_per_s": round((len(chosen) - warmup) / seconds, 2),
        "batches_per_epoch": len(batches),
        "padding_share_src": round(1 - real_src / slots_src, 4),
        "padding_share_tgt": round(1 - real_tgt / slots_tgt, 4),
        "padding_share": round(1 - (real_src + real_tgt) / (slots_src + slots_tgt), 4),
        "train_mflop_per_tgt_token": round(flops / tgt_tokens / 1e6, 1),
        "train_achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    if device.type == "cuda":
        result["train_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def profile_training(config: Config, trainer: Trainer, steps: int, top: int = 15) -> dict:
    """Where a training step's time goes: torch.profiler over `steps` real steps (after the
    timed ones, so warm), operators by self time on the CPU (on CUDA: by time on the GPU).
    Returns the matrix multiplies' share of all profiled time and the `top` operators, each
    with its milliseconds a step, share of the total and calls a step."""
    from torch.profiler import ProfilerActivity, profile

    data = trainer.train_data
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    batches = make_batches(data, trainer.train_indices, config.train.batch_tokens,
                           generator)[:steps]
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for idx in batches:
            trainer.train_step(collate(data, idx).to(trainer.device))
        sync(trainer.device)
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    # (microseconds, operator, calls), the costliest first
    ops = sorted(((getattr(e, attribute), e.key, e.count) for e in profiler.key_averages()
                  if getattr(e, attribute) > 0), reverse=True)
    total = sum(us for us, _, _ in ops)
    matmul = sum(us for us, op, _ in ops if op in MATMUL_OPS)
    n = len(batches)
    return {
        "steps": n, "time": "gpu" if cuda else "cpu self",
        "ms_per_step": round(total / 1000 / n, 1),
        "matmul_share": round(matmul / total, 4),
        "top": [{"op": op, "ms_per_step": round(us / 1000 / n, 2), "share": round(us / total, 4),
                 "calls_per_step": round(calls / n, 1)} for us, op, calls in ops[:top]],
    }


def print_profile(profiled: dict) -> None:
    print(f"\nprofile of {profiled['steps']} training steps ({profiled['time']} time, "
          f"{profiled['ms_per_step']} ms a step); matrix multiplies "
          f"{profiled['matmul_share']:.1%} of it:")
    print("| operator | ms a step | share | calls a step |")
    print("| --- | --- | --- | --- |")
    for row in profiled["top"]:
        print(f"| {row['op']} | {row['ms_per_step']} | {row['share']:.1%} | "
              f"{row['calls_per_step']:g} |")


def bench_decoding(translator: Translator, sentences: list[str], beam: int, label: str) -> dict:
    src_ids = translator.tokenizers.encode_src(sentences)
    translator.translate_ids(src_ids[:64], beam_size=beam)  # warm-up
    sync(translator.device)
    start = time.perf_counter()
    out = translator.translate_ids(src_ids, beam_size=beam)
    sync(translator.device)
    seconds = time.perf_counter() - start
    generated = sum(len(o) + 1 for o in out)
    return {f"{label}_seconds": round(seconds, 2),
            f"{label}_sentences_per_s": round(len(sentences) / seconds, 1),
            f"{label}_tokens_per_s": round(generated / seconds, 1),
            f"{label}_mean_output_tokens": round(generated / len(sentences), 1)}


def bench_engine(engine: str, model_path: str, sources: list[str], references: list[str],
                 num_threads: int, device: str, reuse_memory: bool) -> dict:
    """Greedy and beam-5 speed and test BLEU of one decoding engine over the whole test set,
    and the peak resident memory of the process doing it. Run in a fresh process (see
    `compare_engines`) so the peak memory is the engine's own.

    engine: "tinyt" (tinyt's PyTorch search over `model_path`, a run directory) or
    "ctranslate2" (`model_path`: a folder made by tinyt export --format ctranslate2).
    """
    set_threads(num_threads)
    if reuse_memory:
        reuse_freed_memory()
    translator = load_translator(model_path, device=device)
    src_ids = translator.tokenizers.encode_src(sources)
    result: dict = {"engine": engine}
    for beam in (1, 5):
        label = "greedy" if beam == 1 else "beam5"
        translator.translate_ids(src_ids[:64], beam_size=beam)  # warm-up
        start = time.perf_counter()
        out = translator.translate_ids(src_ids, beam_size=beam)
        seconds = time.perf_counter() - start
        hyps = translator.tokenizers.decode_tgt(out)
        result[f"{label}_seconds"] = round(seconds, 2)
        result[f"{label}_sentences_per_s"] = round(len(sources) / seconds, 1)
        result[f"{label}_bleu"] = score_translations(
            hyps, references, translator.decoding.bleu_tokenize)["bleu"]
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM where Linux has it: ru_maxrss survives
    exec, so in a child process started by fork + exec (multiprocessing's spawn) it would
    report the parent's peak when that is higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _engine_worker(queue, *args) -> None:
    try:
        queue.put(bench_engine(*args))
    except Exception as exc:  # reported by the parent, which goes on with the other engines
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def compare_engines(run: str, sources: list[str], references: list[str], num_threads: int,
                    device: str, reuse_memory: bool) -> list[dict]:
    """tinyt's own search, CTranslate2 float32 and CTranslate2 int8 on the same trained model
    (best.pt of `run`) and the same sentences, each in its own process."""
    import multiprocessing
    import tempfile

    from tinyt.ctranslate2_model import export_ctranslate2

    results = []
    with tempfile.TemporaryDirectory(prefix="tinyt-bench-ct2-") as folder:
        engines = [("tinyt float32", "tinyt", run)]
        for quantization in ("float32", "int8"):
            path = export_ctranslate2(run, Path(folder) / quantization,
                                      quantization=None if quantization == "float32"
                                      else quantization)
            engines.append((f"CTranslate2 {quantization}", "ctranslate2", str(path)))
        context = multiprocessing.get_context("spawn")
        for name, engine, path in engines:
            print(f"decoding the test split with {name} ...", file=sys.stderr)
            queue = context.Queue()
            worker = context.Process(target=_engine_worker,
                                     args=(queue, engine, path, sources, references,
                                           num_threads, device, reuse_memory))
            worker.start()
            result = queue.get()
            worker.join()
            results.append({**result, "engine": name})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/multi30k_de_en.yaml")
    parser.add_argument("--model-config",
                        help="take the model, tokenizer and batch size from this config (e.g. "
                             "configs/wmt14_en_de_base.yaml) and the data from --config")
    parser.add_argument("--data-dir", default="../shared/data/multi30k")
    parser.add_argument("--run", help="trained run whose weights the decoding benchmark uses")
    parser.add_argument("--cache-dir", default="runs/benchmark",
                        help="where the benchmark keeps its tokenizer and token ids")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: config's)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compare-settings", action="store_true",
                        help="also time training under fp32 and bf16 autocast, each with "
                             "torch.compile off and on, in this run")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is instead of keeping freed memory for "
                             "reuse as tinyt does (tinyt.allocator), to measure the difference")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many training steps (torch.profiler) and print "
                             "the operators that take the most time")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-engines", action="store_true",
                        help="skip the tinyt vs CTranslate2 decoding comparison (needs --run)")
    args = parser.parse_args()

    config = load_config(args.config, check_paths=False)
    if args.model_config:
        sized = load_config(args.model_config, check_paths=False)
        config.model, config.tokenizer = sized.model, sized.tokenizer
        config.train.batch_tokens = sized.train.batch_tokens
    config.data.dir = args.data_dir
    config.run_dir = args.cache_dir
    if args.device:
        config.train.device = args.device
    if args.compile:
        config.train.compile = True
    config.validate()
    threads = set_threads(config.train.num_threads)
    reused = not args.default_malloc and reuse_freed_memory()
    torch.manual_seed(config.train.seed)

    started = time.perf_counter()
    cache = Path(args.cache_dir)
    train_text = load_split(config.data, "train")
    valid_text = load_split(config.data, "valid")
    test_text = load_split(config.data, "test")
    tokenizers = train_or_load(config.tokenizer, train_text.src, train_text.tgt,
                               cache / "tokenizer", config.train.seed)
    train_data = tokenize(train_text, tokenizers, cache / "cache")
    valid_data = tokenize(valid_text, tokenizers, cache / "cache")
    trainer = Trainer(config, tokenizers, train_data, valid_data, valid_text.tgt,
                      progress_bars=False)
    results: dict = {"config": args.config, "model_config": args.model_config or args.config,
                     "vocab_size": tokenizers.tgt_vocab_size, "device": str(trainer.device),
                     "torch": torch.__version__, "threads": threads,
                     "parameters": trainer.model.num_parameters(),
                     "amp": str(trainer.amp).replace("torch.", "") if trainer.amp else "none",
                     "compile": config.train.compile,
                     "malloc": "freed memory reused" if reused else "system default",
                     "setup_seconds": round(time.perf_counter() - started, 1)}
    if trainer.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(trainer.device)
    print(f"training {args.warmup_steps}+{args.train_steps} steps ...", file=sys.stderr)
    results.update(bench_training(config, trainer, args.warmup_steps, args.train_steps))
    print("measuring the machine's matrix-multiply bound at the model's shapes ...",
          file=sys.stderr)
    bound_dtypes = [torch.float32] + ([torch.bfloat16] if bf16_is_native(trainer.device) else [])
    for dtype in bound_dtypes:
        bound_gflops(results, dtype, config, tokenizers.tgt_vocab_size, trainer.device)
    # Training's share of the bound of the precision it ran in (autocast: bf16's).
    trained_in = torch.bfloat16 if trainer.amp == torch.bfloat16 else torch.float32
    if trained_in in bound_dtypes:
        bound = bound_gflops(results, trained_in, config, tokenizers.tgt_vocab_size,
                             trainer.device)
        results["train_share_of_gemm_bound"] = round(
            results["train_achieved_tflops"] * 1000 / bound, 3)

    if args.profile > 0:
        print(f"profiling {args.profile} training steps ...", file=sys.stderr)
        results["profile"] = profile_training(config, trainer, args.profile)

    if args.compare_settings:
        results["settings"] = compare_settings(config, tokenizers, train_data, valid_data,
                                               valid_text.tgt, args.warmup_steps,
                                               args.train_steps, results)

    if args.run:
        run_config, run_tokenizers, model, _ = load_trained(args.run)
        translator = Translator(model, run_tokenizers, run_config.decoding, trainer.device,
                                run_config.train.amp)
        results["decoding_weights"] = args.run
    else:
        translator = Translator(trainer.model, tokenizers, config.decoding, trainer.device,
                                config.train.amp)
        results["decoding_weights"] = "benchmark model (untrained: outputs run long)"
    print("decoding validation split (greedy, beam 5) ...", file=sys.stderr)
    results.update(bench_decoding(translator, valid_text.src, 1, "greedy"))
    results.update(bench_decoding(translator, valid_text.src, 5, "beam5"))

    print("evaluating the test split ...", file=sys.stderr)
    sync(translator.device)
    start = time.perf_counter()
    test_data = tokenize(test_text, translator.tokenizers)
    nll, _ = teacher_forced_nll(translator.model, test_data, config.train.batch_tokens,
                                translator.device, translator.score_amp_dtype)
    hyps = translator.translate(test_text.src, beam_size=5)
    scores = score_translations(hyps, test_text.tgt)
    results["test_eval_seconds"] = round(time.perf_counter() - start, 2)
    results["test_bleu_beam5"] = scores["bleu"]
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if trainer.device.type == "cuda":
        results["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    engines = []
    if args.run and not args.no_engines:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            print("CTranslate2 is not installed: no engine comparison (pip install "
                  "'tinyt[ctranslate2]')", file=sys.stderr)
        else:
            engines = compare_engines(args.run, test_text.src, test_text.tgt,
                                      config.train.num_threads, str(trainer.device),
                                      reused)
            results["engines"] = engines
    results["total_seconds"] = round(time.perf_counter() - started, 1)

    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [
        ("device", f"{results['device']} ({results.get('gpu', f'{threads} threads')})"),
        ("malloc", results["malloc"]),
        ("training tgt tokens/s", results["train_tgt_tokens_per_s"]),
        ("training src+tgt tokens/s", results["train_src_tgt_tokens_per_s"]),
        ("padding share (src/tgt)",
         f"{results['padding_share_src']:.1%} / {results['padding_share_tgt']:.1%}"),
        ("training TFLOP/s", results["train_achieved_tflops"]),
        ("matmul bound GFLOP/s (fp32" + (", bf16)" if "gemm_bound_gflops_bfloat16" in results
                                         else ")"),
         " / ".join(str(results[k]) for k in ("gemm_bound_gflops_float32",
                                              "gemm_bound_gflops_bfloat16") if k in results)),
        ("training share of that bound", f"{results.get('train_share_of_gemm_bound', 0):.0%}"),
        ("greedy sentences/s (tokens/s)",
         f"{results['greedy_sentences_per_s']} ({results['greedy_tokens_per_s']})"),
        ("beam-5 sentences/s (tokens/s)",
         f"{results['beam5_sentences_per_s']} ({results['beam5_tokens_per_s']})"),
        ("test evaluation (1,000 sent.) s", results["test_eval_seconds"]),
        ("peak RSS MiB", results["peak_rss_mib"]),
    ]
    if "peak_gpu_mib" in results:
        rows.append(("peak GPU MiB", results["peak_gpu_mib"]))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if "profile" in results:
        print_profile(results["profile"])
    if "settings" in results:
        print_settings_table(results["settings"])
    if engines:
        print_engine_table(engines, len(test_text))


def compare_settings(config: Config, tokenizers, train_data, valid_data, valid_refs,
                     warmup: int, steps: int, results: dict) -> list[dict]:
    """Training speed under each of fp32 / bf16 autocast x torch.compile off / on, a fresh
    Trainer each (same seed, same batches), with its share of the bound of its precision
    (bf16's measured here too when the device has none in `results`). Where bf16 is not
    native (`bf16_is_native`) the bf16 rows are skipped, with the reason: timing emulated bf16
    would take most of an hour and say only that."""
    rows = []
    native_bf16 = bf16_is_native(resolve_device(config.train.device))
    for amp in ("none", "bf16"):
        for compiled in (False, True):
            if amp == "bf16" and not native_bf16:
                rows.append({"amp": amp, "compile": compiled,
                             "skipped": "no bf16 instructions on this CPU (bf16 is emulated)"})
                continue
            trial = copy.deepcopy(config)
            trial.train.amp, trial.train.compile = amp, compiled
            torch.manual_seed(config.train.seed)
            print(f"training under amp={amp}, compile={compiled} ...", file=sys.stderr)
            try:
                trainer = Trainer(trial, tokenizers, train_data, valid_data, valid_refs,
                                  progress_bars=False)
                timed = bench_training(trial, trainer, warmup + (3 if compiled else 0), steps)
            except Exception as exc:  # e.g. torch.compile without a C++ compiler
                rows.append({"amp": amp, "compile": compiled,
                             "error": " ".join(str(exc).split())[:120]})
                continue
            bound = bound_gflops(results, torch.bfloat16 if amp == "bf16" else torch.float32,
                                 config, tokenizers.tgt_vocab_size, trainer.device)
            rows.append({"amp": amp, "compile": compiled,
                         "tgt_tokens_per_s": timed["train_tgt_tokens_per_s"],
                         "tflops": timed["train_achieved_tflops"],
                         "share_of_bound": round(timed["train_achieved_tflops"] * 1000
                                                 / bound, 3)})
    return rows


def print_settings_table(rows: list[dict]) -> None:
    """Training speed by precision and compilation; the share is of that precision's bound."""
    print("\n| amp | compile | target tokens/s | TFLOP/s | share of its matmul bound |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['amp']} | {row['compile']} | failed: {row['error']} | | |")
        elif "skipped" in row:
            print(f"| {row['amp']} | {row['compile']} | skipped: {row['skipped']} | | |")
        else:
            print(f"| {row['amp']} | {row['compile']} | {row['tgt_tokens_per_s']:,.0f} | "
                  f"{row['tflops']} | {row['share_of_bound']:.0%} |")


def print_engine_table(engines: list[dict], sentences: int) -> None:
    """One row per decoding engine; speed-ups are against tinyt's own search (the first)."""
    print(f"\ndecoding the test set ({sentences:,} sentences), same model, same process "
          "limits:")
    header = ("engine", "greedy sent/s", "beam-5 sent/s", "beam-5 speed-up", "BLEU greedy",
              "BLEU beam-5", "peak RSS MiB")
    rows = []
    base = engines[0].get("beam5_sentences_per_s")
    for e in engines:
        if "error" in e:
            rows.append((e["engine"], f"failed: {e['error']}", "", "", "", "", ""))
            continue
        speedup = f"{e['beam5_sentences_per_s'] / base:.2f}x" if base else "-"
        rows.append((e["engine"], e["greedy_sentences_per_s"], e["beam5_sentences_per_s"],
                     speedup, e["greedy_bleu"], e["beam5_bleu"], e["peak_rss_mib"]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
