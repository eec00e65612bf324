"""The `tinyt` command line: parses arguments, calls the library, prints results.

Every user-fixable problem surfaces as one `error: ...` line on stderr and exit code 2;
`tinyt --verbose COMMAND` (or TINYT_TRACEBACK=1) adds the traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, List, Optional

import typer

try:  # typer vendors its own click, whose exceptions are the ones its commands raise
    from typer._click import exceptions as click_errors
except ImportError:  # an older typer on the real click
    from click import exceptions as click_errors

from tinyt import __version__
from tinyt.allocator import reuse_freed_memory
from tinyt.config import MAX_BEAM_SIZE
from tinyt.errors import MainProcessFailed, TinytError
from tinyt.writing import write_error

app = typer.Typer(
    name="tinyt", no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train, evaluate and use small encoder-decoder Transformer translation models.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _rank_prefix() -> str:
    """'rank N: ' in a torchrun worker other than rank 0, so its lines can be told apart."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return "" if rank == "0" else f"rank {rank}: "


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# Set by the top-level --verbose option for the command being run.
_session = {"verbose": False}


def _verbose() -> bool:
    return _session["verbose"] or bool(os.environ.get("TINYT_TRACEBACK"))


class OutputFailed(TinytError):
    """Standard output could not be written: a full disk behind `> file`, or a pipe whose
    reader has gone (`| head`), which is not worth a message."""

    def __init__(self, exc: OSError):
        self.broken_pipe = exc.errno == errno.EPIPE
        super().__init__(str(write_error(exc, "standard output")))


class _GuardedOutput:
    """sys.stdout of the `tinyt` program: a write or flush that fails raises OutputFailed
    (and is remembered, see `silence`)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.failed = False

    def _failed(self, exc: OSError) -> OutputFailed:
        self.failed = True
        return OutputFailed(exc)

    def silence(self) -> None:
        """Point the file descriptor at /dev/null, so that the output still buffered cannot
        fail again when Python flushes it at exit (a second message, with a traceback)."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise self._failed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer, ...
        return getattr(self._stream, name)


def friendly_errors(command):
    """Turn TinytError into one line and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TinytError as exc:
            if _verbose():
                traceback.print_exc()
            if isinstance(exc, MainProcessFailed):
                raise typer.Exit(2)  # a torchrun worker: rank 0 has printed the reason
            if isinstance(exc, OutputFailed) and exc.broken_pipe:
                raise typer.Exit(1)  # the reader stopped reading: nothing to say
            _fail(_rank_prefix() + str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line, with a way to see more
            if _verbose():
                traceback.print_exc()
            _fail(f"unexpected {type(exc).__name__}: {_first_line(exc)} (run with --verbose for "
                  "the traceback, and please report it)", code=1)

    return wrapper


SET_HELP = "Override a config value, e.g. --set train.lr=0.001 (repeatable; YAML values)."

# Options several commands share, declared once so their flags and help read the same everywhere.
RUN_OPTION = typer.Option(None, "--run", help="Run directory (default: latest).")
CHECKPOINT_OPTION = typer.Option("best.pt", "--checkpoint", help="Checkpoint file in the run.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu or cuda.")
SET_OPTION = typer.Option(None, "--set", help=SET_HELP)
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Write here.")
MODEL_OPTION = typer.Option(
    None, "--model", "-m",
    help="Model bundle or CTranslate2 folder (from tinyt export) instead of --run.")
# translate, evaluate and score take several models: they decode as an ensemble.
RUNS_OPTION = typer.Option(
    None, "--run",
    help="Run directory (default: latest). Several --run (and --model bundles) decode as an "
         "ensemble, averaging their log-probabilities; they need the same vocabularies.")
MODELS_OPTION = typer.Option(
    None, "--model", "-m",
    help="Model bundle or CTranslate2 folder (from tinyt export) instead of --run; several "
         "bundles make an ensemble.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tinyt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the traceback along with an error."),
) -> None:
    """Train, evaluate and use small encoder-decoder Transformer translation models.

    Example: tinyt train --config configs/multi30k_de_en.yaml --data-dir ../shared/data/multi30k
    """
    _session["verbose"] = verbose


def _find_run(run: Optional[Path]) -> Path:
    """The run to use: the one given, else the most recently trained run under ./runs."""
    if run is not None:
        return run
    candidates = sorted(Path("runs").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise TinytError("no --run given and no trained run under ./runs; pass --run runs/NAME")
    chosen = candidates[-1].parent
    typer.echo(f"using run {chosen}", err=True)
    return chosen


@app.command()
@friendly_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Override the config's run_dir."),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="Read the corpus from this folder instead of the hub."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start an existing run over."),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes", help="Wall-clock training budget (overrides train.max_minutes)."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from",
        help="Fine-tune: start from this trained run's weights and vocabulary, with a fresh "
             "optimizer and schedule (sets train.init_from). Example: --init-from "
             "runs/multi30k_de_en"),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint",
        help="Checkpoint of the --init-from run to start from (default best.pt; sets "
             "train.init_checkpoint). Example: --checkpoint averaged.pt"),
    overrides: Optional[List[str]] = SET_OPTION,
) -> None:
    """Train a model from a YAML config.

    Example: tinyt train --config configs/multi30k_de_en.yaml --data-dir ../shared/data/multi30k

    or fine-tune a trained run: tinyt train --config my_data.yaml --init-from runs/multi30k_de_en
    """
    from tinyt.config import ConfigError, load_config, override_config
    from tinyt.evaluation import format_evaluation
    from tinyt.training import TrainingInterrupted, train as run_training

    if resume is not None:
        if config is not None:
            raise TinytError("--resume uses the run's own config.yaml; drop --config")
        cfg = load_config(resume / "config.yaml", check_paths=False) if resume.is_dir() else None
        if cfg is None:
            raise TinytError(f"cannot resume: {resume} is not a run directory")
        cfg.run_dir = str(resume)
        _check_resume_start(cfg, resume, init_from, checkpoint)
    elif config is None:
        raise TinytError("pass --config FILE (or --resume runs/NAME)")
    else:
        cfg = load_config(config, check_paths=False)  # paths checked after the overrides
    cfg = override_config(cfg, overrides or [], check_paths=False)
    if run_dir is not None:
        cfg.run_dir = run_dir
    if data_dir is not None:
        cfg.data.dir = data_dir
    if max_minutes is not None:
        cfg.train.max_minutes = max_minutes
    if init_from is not None and resume is None:
        cfg.train.init_from = str(init_from)
    if checkpoint is not None and resume is None:
        if cfg.train.init_from is None:
            raise TinytError(f"--checkpoint {checkpoint} picks the checkpoint of the --init-from "
                             "run that fine-tuning starts from; add --init-from runs/NAME (to "
                             "continue a run from its last.pt, use --resume runs/NAME)")
        cfg.train.init_checkpoint = checkpoint
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{config or resume / 'config.yaml'}: {exc}") from None
    try:
        summary = run_training(cfg, overwrite=overwrite, resume=resume is not None)
    except TrainingInterrupted as stop:
        if not _rank_prefix():
            typer.echo(f"interrupted by {stop}", err=True)
        raise typer.Exit(128 + stop.signum)
    if summary["rank"] != 0:
        return  # under torchrun, rank 0 reports for every process
    processes = (f" x {summary['processes']} processes ({summary['backend']})"
                 if summary["backend"] else "")
    typer.echo(
        f"done: {summary['stop_reason']}; {summary['steps']} steps, {summary['epochs']} epochs, "
        f"{summary['minutes']:.1f} min; best valid loss {summary['best_valid_loss']:.3f} at step "
        f"{summary['best_step']}; {summary['parameters']:,} parameters on {summary['device']}"
        f"{processes}, {summary['tokens_per_s']:,.0f} target tokens/s")
    final = summary.get("final_eval")
    if isinstance(final, dict):
        typer.echo(f"test split ({final['sentences']} sentences, best.pt step {final['step']}, "
                   f"beam {final['beam']}):")
        typer.echo(format_evaluation(final))
    elif final is not None:
        typer.echo(f"final evaluation {final}", err=True)
    typer.echo(f"next: tinyt translate --run {summary['run_dir']} \"a sentence to translate\"")


def _check_resume_start(cfg, resume: Path, init_from: Optional[Path],
                        checkpoint: Optional[str]) -> None:
    """--init-from and --checkpoint with --resume: a resume continues from the run's own
    last.pt, so they may only repeat what the run was started from (`cfg` is its config)."""
    started, started_checkpoint = cfg.train.init_from, cfg.train.init_checkpoint
    options = [f"{flag} {value}" for flag, value in (("--init-from", init_from),
                                                     ("--checkpoint", checkpoint))
               if value is not None]
    if not options:
        return
    given, them = " ".join(options), "them" if len(options) > 1 else "it"
    if started is None:
        raise TinytError(f"{given} with --resume {resume}: that run was not started from "
                         "another run (its config.yaml has no train.init_from), and a resume "
                         f"continues from its own last.pt; drop {them} to resume it, or "
                         "fine-tune into a new run: tinyt train --config NEW.yaml --init-from "
                         "RUN --run-dir runs/NEW")
    if (init_from is not None and init_from.resolve() != Path(started).resolve()) or (
            checkpoint is not None and checkpoint != started_checkpoint):
        raise TinytError(f"{given} with --resume {resume}: that run was started from "
                         f"{Path(started) / started_checkpoint}, and a resume continues from "
                         f"its own last.pt; drop {them} to resume it, or fine-tune into a new "
                         "run (--run-dir runs/NEW)")


@app.command()
@friendly_errors
def evaluate(
    run: Optional[List[Path]] = RUNS_OPTION,
    split: str = typer.Option("test", "--split", help="train, valid, test or a split name."),
    beam: Optional[int] = typer.Option(None, "--beam", min=1, max=MAX_BEAM_SIZE,
                                       help="Beam size (1: greedy)."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", min=0.0),
    checkpoint: str = CHECKPOINT_OPTION,
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Corpus folder override."),
    device: str = DEVICE_OPTION,
    overrides: Optional[List[str]] = SET_OPTION,
    model_file: Optional[List[Path]] = MODELS_OPTION,
) -> None:
    """Loss, perplexity, BLEU and chrF of a trained run on a split.

    Several --run (or --model bundles) are scored as an ensemble; the results go into the
    first one's folder.

    Example: tinyt evaluate --run runs/multi30k_de_en --split test --beam 5

    Example (an ensemble): tinyt evaluate --run runs/a --run runs/b --split test
    """
    from tinyt.evaluation import evaluate_split, format_evaluation
    from tinyt.hardware import set_threads

    loaded = _load_for_command(run, model_file, checkpoint, overrides, device)
    run, model_file, config, payload = loaded.run, loaded.model_file, loaded.config, loaded.payload
    set_threads(config.train.num_threads)
    if data_dir is not None:
        config.data.dir = data_dir
    if config.data.dir is not None:
        config.data.validate()
    # Results go into the run directory; for a bundle, into a folder beside it (model.tinyt.eval/).
    out_root = run if model_file is None else model_file.with_name(model_file.name + ".eval")
    if "members" in payload:
        checkpoint = "ensemble of " + " + ".join(payload["members"])
    elif model_file is not None:
        checkpoint = f"{model_file.name} ({payload['source']['checkpoint']})"
    result = evaluate_split(config, loaded.tokenizers, loaded.translator, split,
                            loaded.translator.device, out_root, beam,
                            length_penalty, checkpoint=checkpoint,
                            step=payload["progress"]["step"])
    typer.echo(f"{model_file or run} {split} ({result['sentences']} sentences, {checkpoint} "
               f"step {result['step']}, beam {result['beam']})")
    typer.echo(format_evaluation(result))


def _load_for_command(runs: Optional[List[Path]], model_files: Optional[List[Path]],
                      checkpoint: str, overrides: Optional[List[str]], device: str = "auto"):
    """`tinyt.loading.load_model` of evaluate/translate/score's --run and --model options:
    without either, the latest run under ./runs."""
    from tinyt.loading import load_model

    runs, model_files = list(runs or []), list(model_files or [])
    if not model_files and len(runs) <= 1:
        runs = [_find_run(runs[0] if runs else None)]
    return load_model(runs, model_files, checkpoint, overrides or [], _device(device))


def _device(name: str):
    from tinyt.hardware import resolve_device

    return resolve_device(name)


def _read_text_lines(stream) -> list[str]:
    """Lines of a binary stream as text; bytes that are not UTF-8 become U+FFFD."""
    data = stream.read()
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _argument_text(arg: str) -> str:
    """A command-line argument as text: bytes that are not UTF-8, which Python keeps in argv
    as lone surrogates (U+DC80..U+DCFF), become U+FFFD, as they do in files and stdin."""
    try:
        raw = arg.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates (not from argv)
        raw = arg.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", errors="replace")


def _stdin_lines():
    """Lines of stdin as they arrive; bytes that are not UTF-8 become U+FFFD."""
    for raw in sys.stdin.buffer:
        yield raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")


def stream_translations(translator, lines, out, beam: Optional[int],
                        length_penalty: Optional[float], nbest: Optional[int] = None,
                        scores: bool = False, output_format: str = "text",
                        sampling: Optional[dict[str, Any]] = None) -> None:
    """Translate each line as soon as it arrives and write it at once (interactive use).
    Sampling, line `index` draws as it would as line `index` of a file."""
    for index, line in enumerate(lines):
        if nbest is None and not scores and output_format == "text" and sampling is None:
            out.write(translator.translate([line], beam_size=beam,
                                           length_penalty=length_penalty)[0] + "\n")
        else:
            if sampling is not None:
                # Seeded as line `index` of a file, so interactive draws match `-i FILE`'s.
                hyps = translator.sample([line], nbest or 1, length_penalty=length_penalty,
                                         start=index, **sampling)[0]
            else:
                hyps = translator.translate_nbest([line], nbest or 1, beam_size=beam,
                                                  length_penalty=length_penalty)[0]
            out.write(format_hypotheses(index, hyps, output_format, scores))
        out.flush()


OUTPUT_FORMATS = ("text", "tsv", "jsonl")


def format_hypotheses(index: int, hyps: list[tuple[str, float]], output_format: str,
                      scores: bool) -> str:
    """The lines `tinyt translate` writes for input `index` (from 0) and its scored
    hypotheses, best first: text, one a line ("score<TAB>text" with `scores`); tsv,
    "index<TAB>rank<TAB>score<TAB>text" a hypothesis (rank from 1); jsonl, one object."""
    if output_format == "jsonl":
        return json.dumps({"index": index, "hypotheses": [
            {"text": text, "score": round(score, 6)} for text, score in hyps]},
            ensure_ascii=False) + "\n"
    if output_format == "tsv":
        return "".join(f"{index}\t{rank}\t{score:.4f}\t{text}\n"
                       for rank, (text, score) in enumerate(hyps, start=1))
    return "".join((f"{score:.4f}\t{text}\n" if scores else text + "\n") for text, score in hyps)


def _write_output(output_file: Optional[Path], body: str) -> None:
    """`body` into `output_file` (replaced whole) or, without one, to stdout."""
    from tinyt.writing import atomic_write_text, writing

    if output_file is not None and (output_file.is_symlink() or (
            output_file.exists() and not output_file.is_file())):
        # a link (/dev/stdout), device or pipe: written into, not replaced by a new file
        with writing(output_file):
            with open(output_file, "w", encoding="utf-8") as f:
                f.write(body)
    elif output_file is not None:
        atomic_write_text(output_file, body)
    else:
        sys.stdout.write(body)
        sys.stdout.flush()


def _check_output_file(output_file: Optional[Path]) -> None:
    """Refuse an --output that cannot be written, before the work rather than after."""
    from tinyt.writing import check_writable_dir

    if output_file is not None and output_file.is_dir():
        raise TinytError(f"--output {output_file} is a folder; pass a file path")
    if output_file is not None and not output_file.exists():
        check_writable_dir(output_file.parent, create=False)


def _read_lines_file(path: Path, option: str) -> list[str]:
    if not path.is_file():
        raise TinytError(f"{option} file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return _read_text_lines(f)
    except OSError as exc:
        raise TinytError(f"cannot read {path}: {exc.strerror or exc}") from None


@app.command()
@friendly_errors
def translate(
    text: Optional[List[str]] = typer.Argument(
        None, help="Sentences to translate; '-' (or nothing, with piped input) reads stdin."),
    run: Optional[List[Path]] = RUNS_OPTION,
    beam: Optional[int] = typer.Option(None, "--beam", min=1, max=MAX_BEAM_SIZE,
                                       help="Beam size (1: greedy)."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", min=0.0),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="File to translate."),
    output_file: Optional[Path] = OUTPUT_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    device: str = DEVICE_OPTION,
    overrides: Optional[List[str]] = SET_OPTION,
    model_file: Optional[List[Path]] = MODELS_OPTION,
    nbest: Optional[int] = typer.Option(
        None, "--nbest", "-n", min=1, max=MAX_BEAM_SIZE,
        help="Write the K best translations of each input, best first (K lines an input in "
             "text); at most --beam. Example: tinyt translate --beam 5 --nbest 3 --scores "
             "\"Ein Hund läuft.\""),
    scores: bool = typer.Option(
        False, "--scores",
        help="Prefix each text line with its score and a tab: the log-probability (<eos> "
             "included) / length ** length_penalty that beam search ranks by. Example: tinyt "
             "translate --scores \"Ein Hund läuft.\""),
    output_format: str = typer.Option(
        "text", "--format", "-f",
        help="text (a line a translation), tsv (input_index, rank, score, text) or jsonl (an "
             "object an input: index, hypotheses with text and score). Example: tinyt "
             "translate --nbest 3 --beam 5 --format jsonl -i sentences.de"),
    sample: bool = typer.Option(
        False, "--sample",
        help="Draw random translations instead of searching (back-translation, data "
             "augmentation); --nbest K draws K an input. Seeded: the same --seed gives the same "
             "draws. Example: tinyt translate --sample --top-p 0.9 --seed 7 -i mono.en"),
    temperature: Optional[float] = typer.Option(
        None, "--temperature",
        help="With --sample: divide log-probabilities by this (> 0; < 1 sharper, > 1 flatter; "
             "default 1). Example: tinyt translate --sample --temperature 0.7 \"Ein Hund.\""),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="With --sample: draw among the K most probable tokens (default 0: "
        "all). Example: tinyt translate --sample --top-k 10 \"Ein Hund.\""),
    top_p: Optional[float] = typer.Option(
        None, "--top-p", help="With --sample: draw among the fewest most probable tokens whose "
        "probability reaches P (default 1: all). Example: tinyt translate --sample --top-p 0.9 "
        "\"Ein Hund.\""),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="With --sample: the draws' seed (default 1)."),
) -> None:
    """Translate sentences, one output line per input line.

    Sentences come from the arguments, --input FILE, or stdin ('-' or a pipe). Typed at a
    terminal, each line is translated as soon as it is entered. --nbest K writes the K best
    translations of each input, best first; --scores and --format tsv/jsonl add their scores.

    Example: tinyt translate "Ein Hund läuft über die Wiese." --run runs/multi30k_de_en

    Example: tinyt translate --beam 5 --nbest 3 --format tsv -i sentences.de -o nbest.tsv

    Example (an ensemble): tinyt translate --run runs/a --run runs/b -i test.de -o test.en
    """
    if input_file is not None and text:
        raise TinytError("give either sentences or --input FILE, not both")
    if input_file is not None and not input_file.is_file():
        raise TinytError(f"input file {input_file} does not exist")
    if output_format not in OUTPUT_FORMATS:
        raise TinytError(f"--format {output_format} is not an output format; use one of "
                         f"{', '.join(OUTPUT_FORMATS)}")
    sampling = _sampling_options(sample, beam, temperature, top_k, top_p, seed)
    _check_output_file(output_file)  # before translating, not after
    interactive = input_file is None and text in (None, [], ["-"]) and sys.stdin.isatty()
    loaded = _load_for_command(run, model_file, checkpoint, overrides, device)
    translator, config = loaded.translator, loaded.config
    beam_size = config.decoding.beam_size if beam is None else beam
    if nbest is not None and nbest > beam_size and sampling is None:
        raise TinytError(f"--nbest {nbest} needs a beam of at least {nbest}, and the beam is "
                         f"{beam_size}; raise --beam to {nbest} or more")
    plain = nbest is None and not scores and output_format == "text" and sampling is None
    if interactive:
        typer.echo("Type one sentence a line; Ctrl-D ends.", err=True)
        stream_translations(translator, _stdin_lines(), sys.stdout, beam, length_penalty,
                            nbest, scores, output_format, sampling)
        return
    if input_file is not None:
        try:
            with open(input_file, "rb") as f:
                lines = _read_text_lines(f)
        except OSError as exc:
            raise TinytError(f"cannot read {input_file}: {exc.strerror or exc}") from None
    elif text and text != ["-"]:
        lines = [_argument_text(sentence) for sentence in text]
    else:
        lines = _read_text_lines(sys.stdin.buffer)
    if plain:
        outputs = translator.translate(lines, beam_size=beam, length_penalty=length_penalty,
                                       progress=len(lines) > 100)
        body = "".join(line + "\n" for line in outputs)
    else:
        nbests = _hypotheses(translator, lines, nbest, beam, length_penalty, sampling,
                             progress=len(lines) > 100)
        body = "".join(format_hypotheses(i, hyps, output_format, scores)
                       for i, hyps in enumerate(nbests))
    _write_output(output_file, body)


def _sampling_options(sample: bool, beam: Optional[int], temperature: Optional[float],
                      top_k: Optional[int], top_p: Optional[float], seed: Optional[int]
                      ) -> Optional[dict[str, Any]]:
    """translate's sampling options as `Translator.sample` arguments (None without --sample),
    checked: each needs --sample, and --sample takes no --beam."""
    given = {"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--seed": seed}
    if not sample:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            several = len(stray) > 1
            raise TinytError(f"{', '.join(stray)} {'apply' if several else 'applies'} only to "
                             f"sampling; add --sample (or drop {'them' if several else 'it'})")
        return None
    if beam is not None:
        raise TinytError("--beam and --sample exclude each other: sampling draws one token at a "
                         "time; drop one of them")
    from tinyt.search import check_sampling

    options = {"temperature": 1.0 if temperature is None else temperature,
               "top_k": top_k or 0, "top_p": 1.0 if top_p is None else top_p,
               "seed": 1 if seed is None else seed}
    check_sampling(options["temperature"], options["top_k"], options["top_p"],
                   ("--temperature", "--top-k", "--top-p"))
    if not 0 <= options["seed"] < 2**63:
        raise TinytError(f"--seed {seed} is impossible; use a number in [0, 2^63)")
    return options


def _hypotheses(translator, lines: list[str], nbest: Optional[int], beam: Optional[int],
                length_penalty: Optional[float], sampling: Optional[dict[str, Any]],
                progress: bool = False) -> list[list[tuple[str, float]]]:
    """Each line's scored hypotheses: its --nbest best, or, sampling, --nbest draws."""
    if sampling is not None:
        return translator.sample(lines, nbest or 1, length_penalty=length_penalty,
                                 progress=progress, **sampling)
    return translator.translate_nbest(lines, nbest or 1, beam_size=beam,
                                      length_penalty=length_penalty, progress=progress)


@app.command()
@friendly_errors
def score(
    source: Path = typer.Option(..., "--source", "-s", help="Source sentences, one a line."),
    target: Path = typer.Option(..., "--target", "-t",
                                help="Their translations to score, one a line."),
    run: Optional[List[Path]] = RUNS_OPTION,
    tokens: bool = typer.Option(
        False, "--tokens",
        help="Also write each token's log-probability and the target's pieces (<eos> last). "
             "Example: tinyt score --tokens -s test.de -t test.en"),
    output_file: Optional[Path] = OUTPUT_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    device: str = DEVICE_OPTION,
    overrides: Optional[List[str]] = SET_OPTION,
    model_file: Optional[List[Path]] = MODELS_OPTION,
) -> None:
    """Score given translations (forced decoding): log-probability of each target line given
    its source line.

    Writes one line a pair, "logprob<TAB>per_token_logprob<TAB>tokens": the sum of the
    teacher-forced log-probabilities of the target's tokens and of <eos>, that sum over the
    token count, and the count (<eos> included, so an empty target scores <eos> alone). With
    --tokens, two more columns: the tokens' log-probabilities and the pieces, space-separated.

    Example: tinyt score --run runs/multi30k_de_en --source test.de --target test.en
    """
    from tinyt.tokenizer import EOS_ID

    sources = _read_lines_file(source, "--source")
    targets = _read_lines_file(target, "--target")
    if len(sources) != len(targets):
        raise TinytError(f"--source {source} has {len(sources)} lines but --target {target} "
                         f"has {len(targets)}; give one target line a source line")
    _check_output_file(output_file)
    loaded = _load_for_command(run, model_file, checkpoint, overrides, device)
    scorer, tokenizers = loaded.translator, loaded.tokenizers
    lines = []
    for ids, logps in scorer.score(sources, targets):
        total = sum(logps)
        line = f"{total:.6f}\t{total / len(logps):.6f}\t{len(logps)}"
        if tokens:
            pieces = [tokenizers.tgt.id_to_piece(i) for i in ids + [EOS_ID]]
            line += "\t" + " ".join(f"{x:.6f}" for x in logps) + "\t" + " ".join(pieces)
        lines.append(line + "\n")
    _write_output(output_file, "".join(lines))


@app.command()
@friendly_errors
def plot(
    run: Optional[Path] = RUN_OPTION,
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PNG to write (default: RUN/curves.png)."),
) -> None:
    """Learning curves of a run from its metrics.jsonl: loss, perplexity, BLEU, learning rate.

    Example: tinyt plot --run runs/multi30k_de_en -o curves.png
    """
    from tinyt.plotting import plot_learning_curves

    run = _find_run(run)
    typer.echo(f"wrote {plot_learning_curves(run, output or run / 'curves.png')}")


@app.command()
@friendly_errors
def attention(
    sentence: str = typer.Argument(..., help="Source sentence to translate and picture."),
    run: Optional[Path] = RUN_OPTION,
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PNG to write (default: RUN/attention.png)."),
    layer: int = typer.Option(-1, "--layer", help="Decoder layer from 0; negative: from the end."),
    head: int = typer.Option(0, "--head", help="Attention head, from 0."),
    beam: int = typer.Option(1, "--beam", min=1, max=MAX_BEAM_SIZE,
                              help="Beam size of the translation (1: greedy)."),
    checkpoint: str = CHECKPOINT_OPTION,
    device: str = typer.Option("cpu", "--device", help="auto, cpu or cuda."),
) -> None:
    """Translate one sentence and draw a decoder layer/head's cross- and self-attention.

    Example: tinyt attention "Ein Hund läuft." --run runs/multi30k_de_en --layer -1 --head 0
    """
    from tinyt.loading import load_translator
    from tinyt.plotting import plot_attention

    run = _find_run(run)
    translator = load_translator(run, checkpoint=checkpoint, device=device)
    path = plot_attention(translator, _argument_text(sentence), output or run / "attention.png",
                          layer=layer, head=head, beam_size=beam)
    typer.echo(f"wrote {path}")


@app.command()
@friendly_errors
def serve(
    run: Optional[List[Path]] = typer.Option(
        None, "--run", help="Run directory to serve (repeatable: one model per language pair; "
                            "default: the latest run)."),
    model_file: Optional[List[Path]] = typer.Option(
        None, "--model", "-m",
        help="Model bundle or CTranslate2 folder to serve (repeatable, with --run too)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(5000, "--port", "-p", min=0, max=65535,
                             help="Port to listen on (0: any free port)."),
    checkpoint: str = CHECKPOINT_OPTION,
    device: str = DEVICE_OPTION,
    overrides: Optional[List[str]] = SET_OPTION,
    char_limit: int = typer.Option(5000, "--char-limit", min=1,
                                   help="Characters of text one request may carry."),
    batch_limit: int = typer.Option(128, "--batch-limit", min=1,
                                    help="Lines (sentences) one request may carry."),
    max_beam: int = typer.Option(16, "--max-beam", min=1, max=MAX_BEAM_SIZE,
                                 help="The largest beam (alternatives + 1) a request may ask "
                                      "for."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", min=0.001,
                                          help="Seconds one translation may take, queue "
                                               "included."),
    api_keys: Optional[Path] = typer.Option(
        None, "--api-keys",
        help="File of API keys, one a line: requests must carry one (api_key)."),
    max_wait_ms: float = typer.Option(3.0, "--max-wait-ms", min=0.0, max=1000.0,
                                      help="Milliseconds a batch may wait for more requests."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", min=1,
                                     help="Source tokens one decoding batch may hold."),
) -> None:
    """Serve models over HTTP: LibreTranslate's API (its clients work unchanged), tinyt's own
    API (n-best with scores, forced decoding, attention; documented at /docs) and a web page
    at /. Concurrent requests are decoded together. SIGTERM or Ctrl-C answers the requests in
    flight, then stops.

    Example: tinyt serve --run runs/multi30k_de_en   (then open http://127.0.0.1:5000/)

    Example (two language pairs): tinyt serve --run runs/de_en --model en_de-ct2 --port 8080
    """
    from tinyt.loading import load_model

    try:
        from tinyt.batching import decoding_thread
        from tinyt.server import serve as run_server
        from tinyt.serving import ServeSettings
    except ImportError as exc:  # the serve extra is not installed
        raise TinytError(f"tinyt serve needs {exc.name or 'FastAPI and uvicorn'}: pip install "
                         "'tinyt[serve]'") from None

    runs, model_files = list(run or []), list(model_file or [])
    if not runs and not model_files:
        runs = [_find_run(None)]
    keys = _read_api_keys(api_keys) if api_keys is not None else frozenset()
    settings = ServeSettings(char_limit=char_limit, batch_limit=batch_limit, max_beam=max_beam,
                             request_timeout=request_timeout, api_keys=keys,
                             batch_tokens=batch_tokens, max_wait_ms=max_wait_ms)
    resolved = _device(device)
    thread = decoding_thread()  # the models are loaded where they will decode (see its doc)
    each = [([r], []) for r in runs] + [([], [m]) for m in model_files]  # a model apiece
    try:
        models = [thread.submit(load_model, r, m, checkpoint, overrides or [], resolved).result()
                  for r, m in each]
    except BaseException:
        thread.shutdown(wait=False)
        raise

    def ready(url: str) -> None:
        for loaded in models:
            config = loaded.config
            typer.echo(f"serving {config.data.src_lang}->{config.data.tgt_lang} ({loaded.name}, "
                       f"{loaded.kind})", err=True)
        if host in ("0.0.0.0", "::"):
            typer.echo(f"listening on every interface ({host}): other machines can connect",
                       err=True)
        typer.echo(f"open {url}/ in a browser (API: {url}/docs); Ctrl-C stops", err=True)

    def stopping(sentences: int) -> None:
        typer.echo(f"stopping: no new connections; answering the requests in flight "
                   f"({sentences} sentences queued or decoding)", err=True)

    stats = run_server(models, host, port, settings, on_ready=ready, on_stop=stopping,
                       thread=thread)
    answered = sum(s["requests"] for s in stats.values())
    sentences = sum(s["sentences"] for s in stats.values())
    typer.echo(f"stopped: answered {answered} translation requests ({sentences} sentences)",
               err=True)


def _read_api_keys(path: Path) -> frozenset[str]:
    """The keys of an --api-keys file: one a line, blank lines and # comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TinytError(f"cannot read --api-keys {path}: {getattr(exc, 'strerror', None) or exc}"
                         "; pass a UTF-8 text file with one key a line") from None
    keys = frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise TinytError(f"--api-keys {path} holds no key; write one key a line")
    return keys


config_app = typer.Typer(no_args_is_help=True, help="Check and show config files.")
app.add_typer(config_app, name="config")


def _load_config_with_overrides(path: Path, overrides: Optional[List[str]]):
    from tinyt.config import ConfigError, load_config, override_config

    config = load_config(path, check_paths=False)
    config = override_config(config, overrides or [], check_paths=False)
    try:
        config.validate()  # now with the paths, as train would
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


@config_app.command("validate")
@friendly_errors
def config_validate(
    path: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = SET_OPTION,
) -> None:
    """Check a config file (types, values, data folder) without training.

    Example: tinyt config validate configs/multi30k_de_en.yaml --set train.lr=0.001
    """
    _load_config_with_overrides(path, overrides)
    typer.echo(f"{path}: valid")


@config_app.command("show")
@friendly_errors
def config_show(
    path: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = SET_OPTION,
) -> None:
    """Print the fully resolved config: every key, defaults included, overrides applied.

    Example: tinyt config show configs/tiny.yaml --set model.d_model=128
    """
    import yaml

    config = _load_config_with_overrides(path, overrides)
    typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), nl=False)



@app.command()
@friendly_errors
def export(
    run: Optional[Path] = RUN_OPTION,
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Bundle file (e.g. model.tinyt), or folder for --format ctranslate2."),
    checkpoint: str = typer.Option("best.pt", "--checkpoint",
                                   help="Checkpoint of the run to export (e.g. averaged.pt)."),
    export_format: str = typer.Option(
        "tinyt", "--format", "-f",
        help="tinyt: one bundle file; ctranslate2: a CTranslate2 model folder."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", "-q",
        help="CTranslate2 weight type: int8, int8_float32, float16, bfloat16, ... "
             "(default float32)."),
) -> None:
    """Write a trained model, its config and vocabularies into one file, or into a
    CTranslate2 model folder (the inference engine OpenNMT, fairseq and Marian models deploy
    with; needs pip install 'tinyt[ctranslate2]').

    Example: tinyt export --run runs/multi30k_de_en -o model.tinyt

    or: tinyt export --run runs/multi30k_de_en --format ctranslate2 --quantize int8 -o model-ct2
    """
    if export_format == "ctranslate2":
        from tinyt.ctranslate2_model import export_ctranslate2

        path = export_ctranslate2(_find_run(run), output, checkpoint, quantize)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        typer.echo(f"wrote {path}/ (CTranslate2, {quantize or 'float32'} weights, "
                   f"{size / 2**20:.1f} MiB); use it with tinyt translate --model {path}")
        return
    if export_format != "tinyt":
        raise TinytError(f"--format {export_format} is unknown; use tinyt (a bundle file) or "
                         "ctranslate2 (a CTranslate2 model folder)")
    if quantize is not None:
        raise TinytError("--quantize applies to --format ctranslate2; a tinyt bundle keeps the "
                         "checkpoint's float32 weights")
    from tinyt.bundle import export_bundle

    path = export_bundle(_find_run(run), output, checkpoint)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); use it with "
               f"tinyt translate --model {path}")


@app.command()
@friendly_errors
def average(
    run: Optional[Path] = RUN_OPTION,
    n: int = typer.Option(5, "-n", "--last", min=1, help="How many of the newest ckpt-STEP.pt."),
    output: str = typer.Option("averaged.pt", "--output", "-o",
                               help="File name of the average, inside the run directory."),
) -> None:
    """Average the weights of the last N validation checkpoints into one checkpoint.

    Example: tinyt average --run runs/multi30k_de_en -n 5
    """
    from tinyt.checkpoint import average_checkpoints, load_checkpoint

    from tinyt.rundir import RunDirLock

    run = _find_run(run)
    with RunDirLock(run, "tinyt average", create=False):
        path = average_checkpoints(run, n, output)
    steps = load_checkpoint(path)["averaged_steps"]
    typer.echo(f"wrote {path}: the average of steps {', '.join(map(str, steps))}")
    typer.echo(f"next: tinyt evaluate --run {run} --checkpoint {path.name}")


@app.command()
@friendly_errors
def info(
    run: Optional[Path] = RUN_OPTION,
    model: Optional[Path] = typer.Option(None, "--model", "-m",
                                         help="Model bundle file or CTranslate2 folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a run or a model bundle: size, vocabulary, settings, best scores, files.

    Example: tinyt info --run runs/multi30k_de_en   (or: tinyt info --model model.tinyt)
    """
    from tinyt.run_summary import format_run_info, run_info

    if run is not None and model is not None:
        raise TinytError("pass either --run or --model, not both")
    summary = run_info(model if model is not None else _find_run(run))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_run_info(summary))


def main(argv: Optional[List[str]] = None) -> None:
    """The `tinyt` program (`argv`: its arguments, default sys.argv[1:]).

    Commands turn their own errors into one line (`friendly_errors`); this turns what happens
    outside them into one line too: usage errors (a bad option value, a missing argument) as
    `error: ...` with exit code 2 instead of click's boxed message, output that cannot be
    written (also when it is flushed at the end), and any other exception as `error:
    unexpected ...` with exit code 1 (the traceback only with --verbose or TINYT_TRACEBACK=1).
    Before any command runs, freed memory is set to be kept for reuse (tinyt.allocator).
    """
    if not isinstance(sys.stdout, _GuardedOutput):
        sys.stdout = _GuardedOutput(sys.stdout)
    reuse_freed_memory()
    try:
        code = app(args=argv, standalone_mode=False)
        sys.stdout.flush()
    except click_errors.NoArgsIsHelpError as exc:  # plain `tinyt`: typer printed the help
        code = exc.exit_code
    except click_errors.UsageError as exc:
        where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        code = _report(f"{_usage_message(exc)}{where}", 2)
    except click_errors.ClickException as exc:
        code = _report(exc.format_message(), exc.exit_code)
    except typer.Abort:
        code = _report("aborted", 1)
    except OutputFailed as exc:
        code = 1 if exc.broken_pipe else _report(str(exc), 2)
    except TinytError as exc:
        code = _report(str(exc), 2, show_traceback=True)
    except KeyboardInterrupt:
        code = _report("interrupted", 130)
    except Exception as exc:  # a bug: still one line, with a way to see more
        code = _report(f"unexpected {type(exc).__name__}: {_first_line(exc)} (run with "
                       "--verbose for the traceback, and please report it)", 1,
                       show_traceback=True)
    if isinstance(sys.stdout, _GuardedOutput) and sys.stdout.failed:
        sys.stdout.silence()
    sys.exit(code if isinstance(code, int) else 0)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _usage_message(exc: click_errors.UsageError) -> str:
    """click's message for a usage error (e.g. "Invalid value for '-n' / '--last': Input
    should be ...") on one line, starting in lower case like tinyt's own messages."""
    message = " ".join(exc.format_message().split())
    return message[0].lower() + message[1:] if message else "invalid usage"


def _report(message: str, code: int, show_traceback: bool = False) -> int:
    """Print `error: message` on stderr (and the traceback, if asked and --verbose is on);
    return `code`."""
    if show_traceback and _verbose():
        traceback.print_exc()
    try:
        typer.echo(f"error: {message}", err=True)
    except OSError:
        pass  # stderr itself is gone: the exit code is all that is left
    return code


if __name__ == "__main__":
    main()
