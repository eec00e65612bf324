"""The training loop: teacher forcing, label-smoothed cross-entropy, Adam with linear warmup
then ReduceLROnPlateau on validation loss, gradient clipping, periodic validation, checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tinyt.checkpoint import (build_model, load_checkpoint, prune_validation_checkpoints,
                              save_checkpoint, validation_checkpoint_name)
from tinyt.config import Config, save_config
from tinyt.data import (Batch, TokenizedText, collate, make_batches, open_training_data,
                        tokenize, tokenize_corpus, trainable_indices)
from tinyt.distributed import World
from tinyt import distributed
from tinyt.errors import TinytError
from tinyt.evaluation import evaluate_split, perplexity, score_translations, teacher_forced_nll
from tinyt.hardware import (amp_dtype, autocast, configure_backends, resolve_device,
                            set_threads)
from tinyt.model import Transformer
from tinyt.rundir import (TRAINED_FILES, RunDirLock, remove_stale_temporaries,
                          trained_artefacts)
from tinyt.tokenizer import PAD_ID, Tokenizers, saved_tokenizers, train_or_load
from tinyt.translation import Translator
from tinyt.writing import append_text, atomic_write_text


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


def _rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of a rank > 0 (rank 0 keeps the run's seed, as a single process)."""
    return seed + 1_000_003 * rank


def _warmup_lr(config: Config, step: int) -> float | None:
    """The learning rate during linear warmup at `step` (1-based), or None once it is over."""
    warmup = config.train.warmup_steps
    if warmup and step <= warmup:
        return config.train.lr * step / warmup
    return None


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option for not re-broadcasting buffers before every forward: renamed in newer
    torch releases (the old name still works there, with a warning)."""
    import inspect

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {
        "broadcast_buffers": False}


class TeacherForcedLoss(nn.Module):
    """The training objective wrapped around the model, so that DistributedDataParallel and
    torch.compile see the whole computation from ids to loss.

    forward(src (B, S), tgt_in (B, T), tgt_out (B, T)) -> summed label-smoothed cross-entropy
    over the non-padding positions of tgt_out, a float32 scalar.
    """

    def __init__(self, model: Transformer, label_smoothing: float):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(self.model(src, tgt_in))
        return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(),
                               ignore_index=PAD_ID, label_smoothing=self.label_smoothing,
                               reduction="sum")


class Trainer:
    """Owns the model, optimizer, scheduler and progress of one run directory.

    Under torchrun (`world.launched`) every rank holds a replica; each step's batches are
    shared out between the ranks and DistributedDataParallel averages the gradients. Rank 0
    validates, writes checkpoints and metrics and shows progress; the others receive its
    validation results so every rank takes the same schedule and stopping decisions.
    """

    def __init__(self, config: Config, tokenizers: Tokenizers, train_data: TokenizedText | None,
                 valid_data: TokenizedText, valid_refs: list[str], progress_bars: bool = True,
                 world: World = World(), stream=None):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.tokenizers = tokenizers
        self.train_data = train_data
        self.stream = stream  # a data.StreamingCorpus when data.streaming is on, else None
        self.valid_data = valid_data
        self.valid_refs = valid_refs
        self.world = world
        self.progress_bars = progress_bars and world.is_main
        tc = config.train
        self.device = distributed.start(world, resolve_device(tc.device))
        configure_backends(self.device)
        self.amp = amp_dtype(tc.amp, self.device)
        self.model: Transformer = build_model(config, tokenizers).to(self.device)
        if world.rank > 0:
            # Same initial weights on every rank (seeded before the model was built), but
            # each rank draws its own dropout masks.
            torch.manual_seed(_rank_seed(tc.seed, world.rank))
        loss: nn.Module = TeacherForcedLoss(self.model, tc.label_smoothing)
        if world.launched:
            # Positional encodings are the only buffers and never change: no need to
            # broadcast them before every forward.
            loss = DistributedDataParallel(
                loss, device_ids=[self.device] if self.device.type == "cuda" else None,
                **_no_buffer_sync())
        self.loss = loss
        self.forward = torch.compile(loss) if tc.compile else loss
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
        self.train_indices = (trainable_indices(train_data, config.data.max_len)
                              if train_data is not None else None)
        if self.train_indices is not None and self.train_indices.numel() == 0:
            raise TinytError(f"no training pair has 1..{config.data.max_len} tokens on both "
                             "sides; check the data or raise data.max_len")
        self.progress = Progress()
        # Source ids of the validation split, for greedy decoding at every validation.
        self.valid_src_ids = [valid_data.src(i).tolist() for i in range(len(valid_data))]

    # -- checkpoints -------------------------------------------------------------------------

    def _payload(self, rng: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": rng,
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
        # Every rank's random state, so a resume with as many processes redraws the same
        # dropout masks everywhere; "rng" alone (rank 0's) is what a single process uses.
        rank_states = distributed.gather(self.world, _rng_state())
        if not self.world.is_main:
            return
        payload = self._payload(rank_states[0])
        if self.world.world_size > 1:
            payload["rng_ranks"] = rank_states
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
        rank_states = payload.get("rng_ranks")
        if rank_states is not None and len(rank_states) == self.world.world_size:
            _set_rng_state(rank_states[self.world.rank])
        elif self.world.is_main:
            _set_rng_state(payload["rng"])
        else:
            # Saved by a different number of processes: rank 0 continues the saved stream,
            # the others start fresh dropout streams of their own.
            torch.manual_seed(_rank_seed(self.config.train.seed, self.world.rank)
                              + self.progress.step)

    # -- one optimisation step ---------------------------------------------------------------

    def train_step(self, batches: Batch | list[Batch],
                   total_tokens: int | None = None) -> tuple[torch.Tensor, bool]:
        """One update from one batch, or from several whose gradients are accumulated
        (train.accumulate_steps): the loss is normalised by the tokens of all of them, so the
        update equals that of one batch holding them all.

        Under DDP `batches` are this rank's share of the step and `total_tokens` counts the
        target tokens of every rank's share; DDP averages the ranks' gradients, so each rank
        scales its loss by world_size / total_tokens and the update equals that of a single
        process accumulating all of them. Every rank must pass the same number of batches
        (a rank with fewer real ones pads with batches whose targets are all padding).

        Returns the summed loss over all ranks (a device tensor: no host sync for it) and
        whether the update was applied: with a non-finite loss or gradient norm the update is
        skipped, so one bad batch cannot poison the weights or Adam's moments. That check is
        the step's one host sync.
        """
        if isinstance(batches, Batch):
            batches = [batches]
        if total_tokens is None:
            total_tokens = sum(batch.n_tokens for batch in batches)
        scale = self.world.world_size / max(total_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # DDP averages gradients during the backward of the last micro-batch only.
            sync = (self.loss.no_sync() if self.world.launched and i < len(batches) - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast(self.device, self.amp):
                    batch_loss = self.forward(batch.src, batch.tgt_in, batch.tgt_out)
                self.scaler.scale(batch_loss * scale).backward()
            loss_sum += batch_loss.detach()
        distributed.sum_over_ranks(self.world, loss_sum)
        self.scaler.unscale_(self.optimizer)
        clip = self.config.train.clip_norm or math.inf
        # The gradients are already averaged over ranks, so every rank gets the same norm and
        # takes the same skip-or-apply decision.
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
        """Validation loss and perplexity (and greedy BLEU with train.valid_bleu), computed on
        rank 0 and handed to every rank."""
        result = self._validate() if self.world.is_main else None
        return distributed.broadcast(self.world, result)

    def _validate(self) -> dict[str, Any]:
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
            result["valid_bleu"] = score_translations(
                hyps, self.valid_refs, self.config.decoding.bleu_tokenize)["bleu"]
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
        self._trained_tokens, self._validation_seconds = 0, 0.0
        deadline = start + tc.max_minutes * 60 if tc.max_minutes else math.inf
        # A resumed run that had already reached a limit (killed during its final evaluation,
        # say) trains no further: not one step past it, no checkpoint rewritten.
        stop_reason = self.limit_reached()
        if stop_reason is not None:
            stop_reason = f"already finished ({stop_reason}); nothing more to train"
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
        world = self.world
        per_step = tc.accumulate_steps * world.world_size  # batches in one update, all ranks
        with _SignalFlag() as signals:
            while stop_reason is None and p.epoch < tc.max_epochs:
                batches, total = self._epoch_batches(p.epoch)
                batches = itertools.islice(batches, p.batch_in_epoch, None)
                bar = tqdm(total=total, initial=p.batch_in_epoch,
                           desc=f"epoch {p.epoch + 1}", unit="batch",
                           disable=not self.progress_bars, dynamic_ncols=True)
                group = list(itertools.islice(batches, per_step))
                if not group:
                    bar.close()
                    raise TinytError(f"epoch {p.epoch + 1} has no training batch: no pair has "
                                     f"1..{self.config.data.max_len} tokens on both sides; "
                                     "check the data or raise data.max_len")
                while group:
                    # Read one update ahead: a stream's end is known only when it runs dry.
                    following = list(itertools.islice(batches, per_step))
                    p.step += 1
                    warm = _warmup_lr(self.config, p.step)
                    if warm is not None:
                        for param_group in self.optimizer.param_groups:
                            param_group["lr"] = warm
                    group_tokens = sum(self._n_tokens(item) for item in group)
                    loss, finite = self.train_step(self._my_share(group), group_tokens)
                    p.batch_in_epoch += len(group)
                    self._trained_tokens += group_tokens
                    bar.update(len(group))
                    if finite:
                        p.nonfinite_in_a_row = 0
                        pending_loss += loss
                        pending_tokens += group_tokens
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
                    end_of_epoch = not following
                    if end_of_epoch:
                        p.epoch += 1
                        p.batch_in_epoch = 0
                    # A signal or the clock may reach the ranks at different steps; they
                    # agree here, so all of them stop (and save) at the same step.
                    interrupted, out_of_time = distributed.any_rank(
                        world, [signals.received is not None, time.monotonic() >= deadline],
                        self.device)
                    if tc.max_steps and p.step >= tc.max_steps:
                        stop_reason = f"reached train.max_steps={tc.max_steps}"
                    elif out_of_time:
                        stop_reason = f"reached train.max_minutes={tc.max_minutes:g}"
                    due = (tc.valid_every and p.step % tc.valid_every == 0) or \
                        (not tc.valid_every and end_of_epoch)
                    if due or stop_reason is not None:
                        flush_pending()
                        stop_reason = self._validate_and_save(start, stop_reason, bar) or stop_reason
                        log_time = time.monotonic()
                        # The clock may run out during a validation: stop at this step then,
                        # not validate again one step later (two near-identical checkpoints).
                        if stop_reason is None and distributed.any_rank(
                                world, [time.monotonic() >= deadline], self.device)[0]:
                            stop_reason = f"reached train.max_minutes={tc.max_minutes:g}"
                    elif interrupted or (
                            tc.checkpoint_every and p.step % tc.checkpoint_every == 0):
                        flush_pending()
                        self.save(best=False)
                    if interrupted:
                        bar.close()
                        raise TrainingInterrupted(signals.received or signal.SIGTERM, p.step,
                                                  self.run_dir)
                    if stop_reason is not None:
                        break
                    group = following
                bar.close()
        if stop_reason is None:
            stop_reason = f"reached train.max_epochs={tc.max_epochs}"
        return {"stop_reason": stop_reason, "steps": p.step, "epochs": p.epoch,
                "best_valid_loss": p.best_valid_loss, "best_step": p.best_step,
                "nonfinite_steps": p.nonfinite_steps,
                "minutes": (time.monotonic() - start) / 60,
                # Target tokens per second of training steps (all ranks), validation excluded.
                "tokens_per_s": self._trained_tokens / max(
                    time.monotonic() - start - self._validation_seconds, 1e-9)}

    def limit_reached(self) -> str | None:
        """Which of the run's limits its progress has reached (steps, epochs, early
        stopping), if any; the clock is not one of them: a resume gets a new time budget."""
        tc, p = self.config.train, self.progress
        if tc.max_steps and p.step >= tc.max_steps:
            return f"reached train.max_steps={tc.max_steps}"
        if p.epoch >= tc.max_epochs:
            return f"reached train.max_epochs={tc.max_epochs}"
        if tc.early_stopping and p.validations_since_best >= tc.early_stopping:
            return f"no improvement in {tc.early_stopping} validations (train.early_stopping)"
        return None

    def _epoch_batches(self, epoch: int) -> tuple[Iterator[Any], int | None]:
        """The epoch's batches in training order, the same on every rank, and their number
        (None when streaming). Items are index tensors into train_data, or, when streaming,
        ready Batches."""
        tc = self.config.train
        if self.stream is not None:
            return iter(self.stream.batches(self.tokenizers, tc.batch_tokens,
                                            self.config.data.max_len, tc.seed, epoch)), None
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        order = make_batches(self.train_data, self.train_indices, tc.batch_tokens, generator)
        return iter(order), len(order)

    def _n_tokens(self, item: Any) -> int:
        """Target tokens (+ <eos>) of a batch item, without building its tensors."""
        if isinstance(item, Batch):
            return item.n_tokens
        return int(self.train_data.tgt_lengths_at(item).sum()) + item.numel()

    def _as_batch(self, item: Any) -> Batch:
        return item if isinstance(item, Batch) else collate(self.train_data, item)

    def _my_share(self, group: list[Any]) -> list[Batch]:
        """This rank's batches of one update: every world_size-th of `group`, starting at its
        rank, padded with all-padding targets (zero loss, zero gradient) so that every rank
        runs the same number of forward/backward passes."""
        world = self.world
        batches = [self._as_batch(item) for item in group[world.rank::world.world_size]]
        missing = -(-len(group) // world.world_size) - len(batches)
        if missing:
            shape = batches[0] if batches else self._as_batch(group[0])
            padding = Batch(shape.src, shape.tgt_in, torch.full_like(shape.tgt_out, PAD_ID), 0)
            batches += [padding] * missing
        if self.device.type == "cuda":
            batches = [b.pin_memory().to(self.device, non_blocking=True) for b in batches]
        return batches

    def _validate_and_save(self, start: float, stop_reason: str | None, bar) -> str | None:
        """Validate, log a metrics line, step the plateau schedule, save; returns a reason to
        stop early, if any."""
        tc = self.config.train
        p = self.progress
        validation_start = time.monotonic()
        elapsed = validation_start - start
        train_loss = p.window_loss / max(p.window_tokens, 1)
        result = self.validate()
        self._validation_seconds += time.monotonic() - validation_start
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
        if self.world.is_main:
            append_text(self.run_dir / "metrics.jsonl", json.dumps(record) + "\n",
                        then=f"resume with: tinyt train --resume {self.run_dir}")
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
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # tinyt writes ASCII JSON: this is damage, not a kill
            raise TinytError(f"{path} line {number} is not UTF-8 text (the file is damaged); "
                             "delete that line, then resume") from None
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# What a resumed run may not change: the model's shape, the vocabulary and which pairs it trains
# on. Limits, schedule, decoding and where the data lives (data.dir) may change with --set.
_DATA_KEYS_FREE_ON_RESUME = ("dir", "num_proc", "stream_buffer")


def _changed_on_resume(saved: dict[str, Any], config: Config) -> list[str]:
    """Keys of `config` that differ from the checkpoint's config in what a resume must keep.
    A key the checkpoint's config lacks came with a later tinyt: the run used its default."""
    now = config.to_dict()
    changed = []
    for section in ("model", "tokenizer", "data"):
        before = saved.get(section, {})
        for key in sorted(set(now[section]) & set(before)):
            if section == "data" and key in _DATA_KEYS_FREE_ON_RESUME:
                continue
            if now[section][key] != before[key]:
                changed.append(f"{section}.{key}")
    return changed


def check_resumable(config: Config) -> dict[str, Any]:
    """Everything a resume needs, checked before anything is written: last.pt loads, the
    config keeps the model, vocabulary and data it was trained with, and the tokenizer that
    wrote the checkpoint is still there. Returns last.pt's payload."""
    run_dir = Path(config.run_dir)
    last = run_dir / "last.pt"
    if not last.is_file():
        raise TinytError(f"cannot resume: {last} does not exist (a run saves it at its first "
                         "validation or train.checkpoint_every); start over with --overwrite")
    payload = load_checkpoint(last)
    changed = _changed_on_resume(payload.get("config", {}), config)
    if changed:
        raise TinytError(f"cannot resume {run_dir} with {', '.join(changed)} changed: last.pt was "
                         "trained with other values; resume without changing them, or start a "
                         "new run (--run-dir, or --overwrite)")
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    if payload.get("tokenizer_fingerprint") != tokenizers.fingerprint:
        raise TinytError(f"{last} was trained with another vocabulary than {run_dir / 'tokenizer'};"
                         " restore the run's original tokenizer/ folder, or start over")
    return payload


def _clear_trained_state(run_dir: Path) -> None:
    """--overwrite: remove the old run's results (the tokenizer is kept, and reused when the
    new config and data would train the same one)."""
    for name in TRAINED_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for old in run_dir.glob("ckpt-*.pt"):
        old.unlink()
    shutil.rmtree(run_dir / "translations", ignore_errors=True)


def train(config: Config, overwrite: bool = False, resume: bool = False,
          progress_bars: bool = True) -> dict[str, Any]:
    """Train a model as `config` says, writing everything into `config.run_dir`.

    The run directory has one writer at a time (tinyt.rundir): rank 0 holds its lock for the
    whole run. Nothing in it changes until the run directory, the data and (on resume) the
    checkpoint and config have all been checked: a refused or failed start leaves it as it was.

    Under torchrun every process calls this; see tinyt.distributed. Rank 0 alone prepares the
    run directory, trains the tokenizer, caches token ids, writes files and runs the final
    evaluation; the summary it returns is the one that counts.
    """
    tc = config.train
    world = distributed.world_from_environment()
    set_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    distributed.start(world, resolve_device(tc.device))
    lock = RunDirLock(config.run_dir, "tinyt train --resume" if resume else "tinyt train")
    try:
        distributed.main_first(world, lock.__enter__, then=lambda: lock)
        summary = _train(config, overwrite, resume, progress_bars, world, lock)
        distributed.wait_for_all(world)
        return summary
    finally:
        lock.__exit__(None, None, None)
        distributed.stop(world)


def _train(config: Config, overwrite: bool, resume: bool, progress_bars: bool,
           world: World, lock: RunDirLock) -> dict[str, Any]:
    tc, dc = config.train, config.data
    run_dir = Path(config.run_dir)
    cache = run_dir / "cache"

    # Check everything before anything is written, so a refused start changes nothing.
    def check_run_dir():
        remove_stale_temporaries(run_dir)
        if resume:
            check_resumable(config)
            return
        held = trained_artefacts(run_dir)
        if held and not overwrite:
            raise TinytError(f"run directory {run_dir} already holds a run ({', '.join(held[:4])}"
                             f"{', …' if len(held) > 4 else ''}); pass --resume to continue it, "
                             "--overwrite to start over, or --run-dir for a new one")

    # Open every split before anything else, so a data problem costs no training time. The
    # training split stays on disk (memory-mapped Arrow) or, streaming, is read as needed.
    def open_data():
        # Duplicates dropped, valid/test held out (data.holdout) and written to run_dir/data/.
        corpus, valid = open_training_data(dc, run_dir, resume,
                                           report=print if world.is_main else None)
        if (not dc.streaming and len(corpus) == 0) or len(valid) == 0:
            raise TinytError(f"empty split: {valid.name if len(valid) == 0 else corpus.name}")
        return corpus, valid

    def check_and_open():  # rank 0; the others open the data once it has
        check_run_dir()
        return open_data()

    try:
        train_corpus, valid_text = distributed.main_first(world, check_and_open, then=open_data)
    except TinytError:
        if world.is_main and not resume:
            lock.discard()  # a first start that failed leaves no empty run directory behind
        raise

    def prepare_tokens():
        src, tgt = train_corpus.sample(config.tokenizer.max_sentences, tc.seed)
        if resume:  # never retrained: the checkpoint's weights belong to this vocabulary
            tokenizers = saved_tokenizers(config.tokenizer, src, tgt, run_dir / "tokenizer")
        else:
            if overwrite:
                _clear_trained_state(run_dir)
            tokenizers = train_or_load(config.tokenizer, src, tgt, run_dir / "tokenizer", tc.seed)
        save_config(config, run_dir / "config.yaml")
        del src, tgt
        return tokenizers, *tokenize_data(tokenizers)

    def tokenize_data(tokenizers: Tokenizers):
        train_data = None if dc.streaming else tokenize_corpus(
            train_corpus, tokenizers, cache, dc.tokenize_processes, desc="tokenizing train")
        return train_data, tokenize(valid_text, tokenizers, cache, desc="tokenizing valid")

    def load_prepared():  # ranks > 0: rank 0 has trained the tokenizer and cached the ids
        tokenizers = Tokenizers.load(run_dir / "tokenizer")
        return tokenizers, *tokenize_data(tokenizers)

    tokenizers, train_data, valid_data = distributed.main_first(world, prepare_tokens,
                                                                then=load_prepared)
    trainer = Trainer(config, tokenizers, train_data, valid_data, valid_text.tgt, progress_bars,
                      world, stream=train_corpus if dc.streaming else None)
    if resume:
        trainer.restore(run_dir / "last.pt")
        if world.is_main:
            _trim_metrics(run_dir / "metrics.jsonl", trainer.progress.step)
    summary = trainer.train()
    summary.update(
        parameters=trainer.model.num_parameters(), device=str(trainer.device),
        train_pairs=None if dc.streaming else int(trainer.train_indices.numel()),
        run_dir=str(run_dir), processes=world.world_size, rank=world.rank,
        backend=torch.distributed.get_backend() if world.launched else None)
    if tc.final_eval and _has_test_split(config) and world.is_main:
        summary["final_eval"] = _final_evaluation(trainer, progress_bars)
    return summary


def _has_test_split(config: Config) -> bool:
    return config.data.has_split("test")  # named in files/hub_splits, or held out


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
