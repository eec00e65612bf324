"""The training loop: teacher forcing, label-smoothed cross-entropy, Adam with linear warmup
then ReduceLROnPlateau on validation loss, gradient clipping, periodic validation, checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyt.checkpoint import (build_model, load_checkpoint, prune_validation_checkpoints,
                              save_checkpoint, validation_checkpoint_name)
from tinyt.config import Config, save_config
from tinyt.data import (Batch, TokenizedText, collate, load_split, make_batches, tokenize,
                        trainable_indices)
from tinyt.errors import TinytError
from tinyt.evaluation import evaluate_split, perplexity, score_translations, teacher_forced_nll
from tinyt.hardware import (amp_dtype, autocast, configure_backends, resolve_device,
                            set_threads)
from tinyt.model import Transformer
from tinyt.tokenizer import PAD_ID, Tokenizers, train_or_load
from tinyt.translation import Translator


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a run can resume exactly."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    best_valid_loss: float = math.inf
    best_step: int = 0
    validations_since_best: int = 0
    window_loss: float = 0.0  # summed training loss since the last validation
    window_tokens: int = 0  # target tokens behind window_loss
    nonfinite_steps: int = 0  # updates skipped because the loss or gradients were not finite
    nonfinite_in_a_row: int = 0


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step was finished and last.pt saved."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}, saved {run_dir / 'last.pt'}; "
                         f"continue with: tinyt train --resume {run_dir}")


class _SignalFlag:
    """While active, SIGINT and SIGTERM only set `received`, so the loop can finish its step
    and save before leaving. A second Ctrl-C falls back to the default behaviour."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        self.received = signum

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _warmup_lr(config: Config, step: int) -> float | None:
    """The learning rate during linear warmup at `step` (1-based), or None once it is over."""
    warmup = config.train.warmup_steps
    if warmup and step <= warmup:
        return config.train.lr * step / warmup
    return None


class Trainer:
    """Owns the model, optimizer, scheduler and progress of one run directory."""

    def __init__(self, config: Config, tokenizers: Tokenizers, train_data: TokenizedText,
                 valid_data: TokenizedText, valid_refs: list[str], progress_bars: bool = True):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.tokenizers = tokenizers
        self.train_data = train_data
        self.valid_data = valid_data
        self.valid_refs = valid_refs
        self.progress_bars = progress_bars
        tc = config.train
        self.device = resolve_device(tc.device)
        configure_backends(self.device)
        self.amp = amp_dtype(tc.amp, self.device)
        self.model: Transformer = build_model(config, tokenizers).to(self.device)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        # On CUDA, the fused kernel updates all parameters in a few launches instead of many.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tc.betas,
                                          eps=tc.eps, weight_decay=tc.weight_decay,
                                          fused=self.device.type == "cuda")
        if tc.warmup_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = _warmup_lr(config, 1)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience,
            min_lr=tc.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.train_indices = trainable_indices(train_data, config.data.max_len)
        if self.train_indices.numel() == 0:
            raise TinytError(f"no training pair has 1..{config.data.max_len} tokens on both "
                             "sides; check the data or raise data.max_len")
        self.progress = Progress()
        # Source ids of the validation split, for greedy decoding at every validation.
        self.valid_src_ids = [valid_data.src(i).tolist() for i in range(len(valid_data))]

    # -- checkpoints -------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": _rng_state(),
            "tokenizer_fingerprint": self.tokenizers.fingerprint,
            "config": self.config.to_dict(),
        }

    def save(self, best: bool, validation: bool = False) -> None:
        """Write last.pt (everything resume needs); if `best`, best.pt (what inference needs:
        weights and metadata, no optimizer state, a third of the size); and if `validation`
        (a save right after validating, not a periodic or signal one) the same weights as
        ckpt-STEP.pt, keeping the newest `train.keep_checkpoints` of those for averaging.

        last.pt is written last: a kill before it is renamed into place resumes from the
        previous last.pt, redoes these steps bit for bit and rewrites the other files with the
        same weights, so they never run ahead of or fall behind the resumable state.
        """
        payload = self._payload()
        weights_only = {k: payload[k] for k in ("model", "progress", "tokenizer_fingerprint",
                                                "config")}
        keep = self.config.train.keep_checkpoints
        if validation and keep:
            step = self.progress.step
            save_checkpoint(weights_only, self.run_dir / validation_checkpoint_name(step))
            prune_validation_checkpoints(self.run_dir, keep, step)
        if best:
            save_checkpoint(weights_only, self.run_dir / "best.pt")
        save_checkpoint(payload, self.run_dir / "last.pt")

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint written by `save`: weights, optimizer, schedules, RNGs
        and the position in the epoch's batch order."""
        payload = load_checkpoint(path)
        if payload.get("tokenizer_fingerprint") != self.tokenizers.fingerprint:
            raise TinytError(f"{path} was trained with another vocabulary than this run's "
                             "tokenizer; resume needs the run's original data and config")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise TinytError(f"{path} does not fit this run's model/optimizer ({first}); was "
                             "the config changed since the checkpoint was written?") from None
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        _set_rng_state(payload["rng"])

    # -- one optimisation step ---------------------------------------------------------------

    def train_step(self, batches: Batch | list[Batch]) -> tuple[torch.Tensor, bool]:
        """One update from one batch, or from several whose gradients are accumulated
        (train.accumulate_steps): the loss is normalised by the tokens of all of them, so the
        update equals that of one batch holding them all.

        Returns the summed loss (a device tensor: no host sync for it) and whether the update
        was applied: with a non-finite loss or gradient norm the update is skipped, so one bad
        batch cannot poison the weights or Adam's moments. That check is the step's one host
        sync.
        """
        if isinstance(batches, Batch):
            batches = [batches]
        n_tokens = sum(batch.n_tokens for batch in batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            with autocast(self.device, self.amp):
                hidden = self.forward(batch.src, batch.tgt_in)
                logits = self.model.logits(hidden)
            batch_loss = F.cross_entropy(
                logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                label_smoothing=self.config.train.label_smoothing, reduction="sum")
            self.scaler.scale(batch_loss / n_tokens).backward()
            loss_sum += batch_loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.config.train.clip_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler.is_enabled():
            # fp16: the scaler skips overflowing updates itself and lowers its scale; only a
            # non-finite loss counts as a bad step.
            self.scaler.step(self.optimizer)
            finite = bool(torch.isfinite(loss_sum))
        else:
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
        self.scaler.update()
        return loss_sum, finite

    # -- validation --------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        tc = self.config.train
        nll, _ = teacher_forced_nll(self.model, self.valid_data, tc.batch_tokens, self.device,
                                    self.amp)
        result: dict[str, Any] = {"valid_loss": round(nll, 4), "valid_ppl": round(perplexity(nll), 3)}
        if tc.valid_bleu:
            self.model.eval()
            translator = Translator(self.model, self.tokenizers, self.config.decoding,
                                    self.device, tc.amp)
            hyps = self.tokenizers.decode_tgt(
                translator.translate_ids(self.valid_src_ids, beam_size=1))
            result["valid_bleu"] = score_translations(hyps, self.valid_refs)["bleu"]
            self.model.train()
        return result

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train until a limit (epochs, steps, minutes, early stopping) is reached.

        Raises TrainingInterrupted on SIGINT/SIGTERM (after finishing the step and saving
        last.pt) and TinytError after too many non-finite updates in a row.
        """
        tc = self.config.train
        p = self.progress
        start = time.monotonic()
        deadline = start + tc.max_minutes * 60 if tc.max_minutes else math.inf
        stop_reason = None
        # Loss of the steps since the last progress-bar update, kept on the device.
        pending_loss, pending_tokens = torch.zeros((), device=self.device), 0
        log_time = time.monotonic()

        def flush_pending() -> None:
            nonlocal pending_tokens
            p.window_loss += float(pending_loss)
            p.window_tokens += pending_tokens
            pending_loss.zero_()
            pending_tokens = 0

        self.model.train()
        with _SignalFlag() as signals:
            while stop_reason is None and p.epoch < tc.max_epochs:
                generator = torch.Generator().manual_seed(tc.seed * 100_003 + p.epoch)
                batches = make_batches(self.train_data, self.train_indices, tc.batch_tokens,
                                       generator)
                bar = tqdm(total=len(batches), initial=p.batch_in_epoch,
                           desc=f"epoch {p.epoch + 1}", unit="batch",
                           disable=not self.progress_bars, dynamic_ncols=True)
                accumulate = tc.accumulate_steps
                for first in range(p.batch_in_epoch, len(batches), accumulate):
                    group = []
                    for idx in batches[first: first + accumulate]:
                        batch = collate(self.train_data, idx)
                        if self.device.type == "cuda":
                            batch = batch.pin_memory().to(self.device, non_blocking=True)
                        group.append(batch)
                    p.step += 1
                    warm = _warmup_lr(self.config, p.step)
                    if warm is not None:
                        for param_group in self.optimizer.param_groups:
                            param_group["lr"] = warm
                    loss, finite = self.train_step(group)
                    p.batch_in_epoch += len(group)
                    bar.update(len(group))
                    if finite:
                        p.nonfinite_in_a_row = 0
                        pending_loss += loss
                        pending_tokens += sum(b.n_tokens for b in group)
                    else:
                        p.nonfinite_steps += 1
                        p.nonfinite_in_a_row += 1
                        if p.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                            bar.close()
                            raise TinytError(
                                f"{p.nonfinite_in_a_row} updates in a row had a non-finite loss "
                                f"or gradient (at step {p.step}); stopped. The last good "
                                f"checkpoints are in {self.run_dir}; lower train.lr or raise "
                                "train.warmup_steps, then --resume or start over")
                    if p.step % tc.log_every == 0:
                        now = time.monotonic()
                        tokens = pending_tokens
                        loss_value = float(pending_loss) / max(tokens, 1)
                        flush_pending()
                        postfix = {"loss": f"{loss_value:.3f}",
                                   "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                   "tok_s": f"{tokens / max(now - log_time, 1e-9):.0f}"}
                        if p.nonfinite_steps:
                            postfix["skipped"] = p.nonfinite_steps
                        bar.set_postfix(postfix)
                        log_time = now
                    end_of_epoch = p.batch_in_epoch == len(batches)
                    if end_of_epoch:
                        p.epoch += 1
                        p.batch_in_epoch = 0
                    if tc.max_steps and p.step >= tc.max_steps:
                        stop_reason = f"reached train.max_steps={tc.max_steps}"
                    elif time.monotonic() >= deadline:
                        stop_reason = f"reached train.max_minutes={tc.max_minutes:g}"
                    due = (tc.valid_every and p.step % tc.valid_every == 0) or \
                        (not tc.valid_every and end_of_epoch)
                    if due or stop_reason is not None:
                        flush_pending()
                        stop_reason = self._validate_and_save(start, stop_reason, bar) or stop_reason
                        log_time = time.monotonic()
                    elif signals.received is not None or (
                            tc.checkpoint_every and p.step % tc.checkpoint_every == 0):
                        flush_pending()
                        self.save(best=False)
                    if signals.received is not None:
                        bar.close()
                        raise TrainingInterrupted(signals.received, p.step, self.run_dir)
                    if stop_reason is not None or end_of_epoch:
                        break
                bar.close()
        if stop_reason is None:
            stop_reason = f"reached train.max_epochs={tc.max_epochs}"
        return {"stop_reason": stop_reason, "steps": p.step, "epochs": p.epoch,
                "best_valid_loss": p.best_valid_loss, "best_step": p.best_step,
                "nonfinite_steps": p.nonfinite_steps,
                "minutes": (time.monotonic() - start) / 60}

    def _validate_and_save(self, start: float, stop_reason: str | None, bar) -> str | None:
        """Validate, log a metrics line, step the plateau schedule, save; returns a reason to
        stop early, if any."""
        tc = self.config.train
        p = self.progress
        elapsed = time.monotonic() - start
        train_loss = p.window_loss / max(p.window_tokens, 1)
        result = self.validate()
        improved = result["valid_loss"] < p.best_valid_loss
        if improved:
            p.best_valid_loss, p.best_step, p.validations_since_best = result["valid_loss"], p.step, 0
        else:
            p.validations_since_best += 1
        if _warmup_lr(self.config, p.step) is None:
            self.scheduler.step(result["valid_loss"])
        record = {"step": p.step, "epoch": p.epoch, "train_loss": round(train_loss, 4), **result,
                  "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1),
                  "best": improved}
        if p.nonfinite_steps:
            record["nonfinite_steps"] = p.nonfinite_steps
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        bleu = f", bleu {result['valid_bleu']:.2f}" if "valid_bleu" in result else ""
        message = (f"step {p.step} epoch {p.epoch}: valid loss {result['valid_loss']:.3f}, "
                   f"ppl {result['valid_ppl']:.2f}{bleu}" + (" (best)" if improved else ""))
        (bar.write if self.progress_bars else print)(message)
        p.window_loss, p.window_tokens = 0.0, 0
        self.save(best=improved, validation=True)
        if stop_reason is None and tc.early_stopping and p.validations_since_best >= tc.early_stopping:
            return f"no improvement in {tc.early_stopping} validations (train.early_stopping)"
        return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step`: a run killed between logging a validation and saving
    its checkpoint redoes that validation on resume and must not log it twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def prepare_run_dir(config: Config, overwrite: bool, resume: bool) -> Path:
    run_dir = Path(config.run_dir)
    has_state = (run_dir / "last.pt").exists() or (run_dir / "metrics.jsonl").exists()
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise TinytError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
        return run_dir
    if has_state and not overwrite:
        raise TinytError(f"run directory {run_dir} already holds a trained run; pass --resume to "
                         "continue it, --overwrite to start over, or --run-dir for a new one")
    if has_state and overwrite:
        for name in ("last.pt", "best.pt", "averaged.pt", "metrics.jsonl", "evaluations.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
        for old in run_dir.glob("ckpt-*.pt"):
            old.unlink()
        shutil.rmtree(run_dir / "translations", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(config: Config, overwrite: bool = False, resume: bool = False,
          progress_bars: bool = True) -> dict[str, Any]:
    """Train a model as `config` says, writing everything into `config.run_dir`."""
    tc = config.train
    set_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    run_dir = prepare_run_dir(config, overwrite, resume)
    # Read every split before anything else, so a data problem costs no training time.
    train_text = load_split(config.data, "train")
    valid_text = load_split(config.data, "valid")
    if len(train_text) == 0 or len(valid_text) == 0:
        raise TinytError(f"empty split: {train_text.name if not len(train_text) else valid_text.name}")
    save_config(config, run_dir / "config.yaml")
    tokenizers = train_or_load(config.tokenizer, train_text.src, train_text.tgt,
                               run_dir / "tokenizer", tc.seed)
    cache = run_dir / "cache"
    train_data = tokenize(train_text, tokenizers, cache, desc="tokenizing train")
    valid_data = tokenize(valid_text, tokenizers, cache, desc="tokenizing valid")
    trainer = Trainer(config, tokenizers, train_data, valid_data, valid_text.tgt, progress_bars)
    if resume:
        trainer.restore(run_dir / "last.pt")
        _trim_metrics(run_dir / "metrics.jsonl", trainer.progress.step)
    summary = trainer.train()
    summary.update(parameters=trainer.model.num_parameters(), train_pairs=int(
        trainer.train_indices.numel()), device=str(trainer.device), run_dir=str(run_dir))
    if tc.final_eval and _has_test_split(config):
        summary["final_eval"] = _final_evaluation(trainer, progress_bars)
    return summary


def _has_test_split(config: Config) -> bool:
    names = config.data.files if config.data.dir is not None else config.data.hub_splits
    return "test" in names


def _final_evaluation(trainer: Trainer, progress_bars: bool) -> dict[str, Any] | str:
    """Score best.pt on the test split; a problem there is reported, never fatal: the
    trained run is already safe on disk."""
    best = load_checkpoint(trainer.run_dir / "best.pt")
    trainer.model.load_state_dict(best["model"])
    trainer.model.eval()
    try:
        return evaluate_split(trainer.config, trainer.tokenizers, trainer.model, "test",
                              trainer.device, trainer.run_dir, progress=progress_bars,
                              step=best["progress"]["step"])
    except TinytError as exc:
        return f"skipped: {exc}"
