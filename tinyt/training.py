"""The training loop: teacher forcing, label-smoothed cross-entropy, Adam, gradient clipping,
periodic validation and checkpoints.

The loop (`Trainer.train`) delegates each concern to a piece of its own: the learning rate to
tinyt.schedule (warmup, then ReduceLROnPlateau), when to stop to tinyt.stopping (limits,
signals, agreement between ranks), what a checkpoint holds to tinyt.checkpoint, and what a run
directory holds and whether it may be trained or resumed to tinyt.rundir.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import shutil
import sys
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
                              restore_training, rng_state, save_checkpoint, saved_rng_state,
                              set_rng_state, training_payload, validation_checkpoint_name,
                              weights_payload)
from tinyt.config import Config, save_config
from tinyt.data import (Batch, Corpus, TokenizedText, collate, make_batches,
                        open_training_data, sample_corpus, tokenize, tokenize_corpus,
                        trainable_indices)
from tinyt.distributed import World
from tinyt import distributed
from tinyt.allocator import reuse_freed_memory
from tinyt.errors import TinytError
from tinyt.evaluation import evaluate_split, perplexity, score_translations, teacher_forced_nll
from tinyt.finetuning import InitSource, copy_tokenizer, open_init_source
from tinyt.hardware import (amp_dtype, autocast, configure_backends, resolve_device,
                            set_threads)
from tinyt.model import Transformer
from tinyt.rundir import (RunDirLock, check_can_train, clear_trained_state,
                          remove_stale_temporaries, trim_metrics)
from tinyt.schedule import LearningRateSchedule
from tinyt.sinks import LogSinks
from tinyt.stopping import StopConditions, TrainingInterrupted
from tinyt.tokenizer import PAD_ID, Tokenizers, saved_tokenizers, train_or_load
from tinyt.translation import Translator
from tinyt.writing import append_text


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


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's subword sampling, unrelated to its neighbours'."""
    digest = hashlib.sha256(f"{seed}/{epoch}/subword sampling".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of a rank > 0 (rank 0 keeps the run's seed, as a single process)."""
    return seed + 1_000_003 * rank

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


class _TrainingLog:
    """The training loss and speed of one call of the training loop.

    Each update's loss stays on the device until the next progress-bar update or save
    (`flush`), so that logging costs no host sync per step. Flushing adds it to
    Progress.window_loss/window_tokens: the training loss of the next metrics line, which
    checkpoints carry so that a resumed run logs the same numbers.
    """

    def __init__(self, device: torch.device):
        self.start = time.monotonic()
        self.trained_tokens = 0  # target tokens of every update, all ranks, skipped ones too
        self.validation_seconds = 0.0
        self._loss = torch.zeros((), device=device)  # summed over finite updates since flush
        self._tokens = 0  # target tokens behind _loss
        self._measured_from = self.start  # start of the progress bar's speed measurement

    def add(self, loss: torch.Tensor, tokens: int, finite: bool) -> None:
        self.trained_tokens += tokens
        if finite:
            self._loss += loss
            self._tokens += tokens

    def flush(self, progress: Progress) -> None:
        progress.window_loss += float(self._loss)
        progress.window_tokens += self._tokens
        self._loss.zero_()
        self._tokens = 0

    def show(self, bar: tqdm, progress: Progress, lr: float) -> tuple[float | None, float]:
        """Loss, learning rate and tokens/s since the last update, on the progress bar.
        Returns the loss (None when every update since was skipped) and the tokens/s."""
        now = time.monotonic()
        loss = float(self._loss) / self._tokens if self._tokens else None
        speed = self._tokens / max(now - self._measured_from, 1e-9)
        postfix = {"loss": f"{loss or 0.0:.3f}", "lr": f"{lr:.2e}", "tok_s": f"{speed:.0f}"}
        if progress.nonfinite_steps:
            postfix["skipped"] = progress.nonfinite_steps
        self.flush(progress)
        bar.set_postfix(postfix)
        self._measured_from = now
        return loss, speed

    def restart_speed(self) -> None:
        """Leave the time just spent (validating, saving) out of the next speed shown."""
        self._measured_from = time.monotonic()

    def tokens_per_s(self) -> float:
        """Target tokens per second of training steps (all ranks), validation excluded."""
        return self.trained_tokens / max(
            time.monotonic() - self.start - self.validation_seconds, 1e-9)


class Trainer:
    """Owns the model, optimizer, schedule and progress of one run directory.

    Under torchrun (`world.launched`) every rank holds a replica; each step's batches are
    shared out between the ranks and DistributedDataParallel averages the gradients. Rank 0
    validates, writes checkpoints and metrics and shows progress; the others receive its
    validation results so every rank takes the same schedule and stopping decisions.
    """

    def __init__(self, config: Config, tokenizers: Tokenizers, train_data: TokenizedText | None,
                 valid_data: TokenizedText, valid_refs: list[str], progress_bars: bool = True,
                 world: World = World(), stream=None, train_text: Corpus | None = None):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.tokenizers = tokenizers
        self.train_data = train_data
        self.stream = stream  # a data.StreamingCorpus when data.streaming is on, else None
        # The training pairs' text (rows as train_data's): with tokenizer.sampling every epoch
        # segments it afresh into epoch_data; without, epoch_data is train_data.
        self.train_text = train_text
        self.epoch_data = train_data
        if config.tokenizer.sampling is not None and stream is None and train_text is None:
            raise ValueError("tokenizer.sampling needs the training text (train_text)")
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
        # The fused kernel updates all parameters in one pass: on CUDA a few launches instead
        # of many, on a 2-core CPU 4 ms a step for the default model instead of 13.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tc.betas,
                                          eps=tc.eps, weight_decay=tc.weight_decay, fused=True)
        self.schedule = LearningRateSchedule(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.train_indices = (trainable_indices(train_data, config.data.max_len)
                              if train_data is not None else None)
        if self.train_indices is not None and self.train_indices.numel() == 0:
            raise TinytError(f"no training pair has 1..{config.data.max_len} tokens on both "
                             "sides; check the data or raise data.max_len")
        self.progress = Progress()
        self.sinks = LogSinks()  # train.log's extra sinks, open while `train` runs (rank 0)
        # Source ids of the validation split, for greedy decoding at every validation.
        self.valid_src_ids = [valid_data.src(i).tolist() for i in range(len(valid_data))]

    # -- checkpoints -------------------------------------------------------------------------

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
        # dropout masks everywhere.
        rank_states = distributed.gather(self.world, rng_state())
        if not self.world.is_main:
            return
        payload = training_payload(
            model=self.model, optimizer=self.optimizer, schedule=self.schedule,
            scaler=self.scaler, progress=vars(self.progress).copy(), rng_ranks=rank_states,
            tokenizers_fingerprint=self.tokenizers.fingerprint, config=self.config)
        weights = weights_payload(payload)
        keep = self.config.train.keep_checkpoints
        if validation and keep:
            step = self.progress.step
            save_checkpoint(weights, self.run_dir / validation_checkpoint_name(step))
            prune_validation_checkpoints(self.run_dir, keep, step)
        if best:
            save_checkpoint(weights, self.run_dir / "best.pt")
        save_checkpoint(payload, self.run_dir / "last.pt")

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint written by `save`: weights, optimizer, schedule, RNGs
        and the position in the epoch's batch order."""
        payload = load_checkpoint(path)
        progress = restore_training(
            payload, path, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
            scaler=self.scaler, tokenizers_fingerprint=self.tokenizers.fingerprint)
        self.progress = Progress(**progress)
        rng = saved_rng_state(payload, self.world)
        if rng is not None:
            set_rng_state(rng)
        else:  # saved by another number of processes: a fresh dropout stream of its own
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
        result: dict[str, Any] = {"valid_loss": round(nll, 4),
                                  "valid_ppl": round(perplexity(nll), 3)}
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

        After every update: validate and save when validation is due or training stops (the
        state training stops in is always validated and saved), else save when a checkpoint is
        due or a signal came. Raises TrainingInterrupted on SIGINT/SIGTERM (after finishing the
        step and saving last.pt) and TinytError after too many non-finite updates in a row.
        """
        p = self.progress
        # The extra sinks (TensorBoard) start where this call starts: a resumed run's events
        # after its checkpoint's step are replaced, not repeated. Opened first, so that their
        # start-up is not counted in the training time and speed.
        self.sinks = LogSinks.open(self.config, p.step + 1) if self.world.is_main else LogSinks()
        stops = StopConditions(self.config.train, self.world, self.device)
        log = _TrainingLog(self.device)
        reason = stops.before_training(p)  # a resumed run may have reached a limit already
        self.model.train()
        with stops.catching_signals(), self.sinks:
            while reason is None:
                updates, total = self._rest_of_epoch()
                with self._progress_bar(total) as bar:
                    for group, end_of_epoch in updates:
                        self._update(group, end_of_epoch, log, bar)
                        reason = stops.after_update(p)
                        if reason is not None or self._validation_due(end_of_epoch):
                            self._validate_and_save(log, bar)
                            reason = reason or stops.after_validation(p)
                        elif stops.interrupted_by is not None or self._checkpoint_due():
                            log.flush(p)
                            self.save(best=False)
                        if stops.interrupted_by is not None:
                            raise TrainingInterrupted(stops.interrupted_by, p.step, self.run_dir)
                        if reason is not None:
                            break
                reason = reason or stops.after_epoch(p)
        return {"stop_reason": reason, "steps": p.step, "epochs": p.epoch,
                "best_valid_loss": p.best_valid_loss, "best_step": p.best_step,
                "nonfinite_steps": p.nonfinite_steps,
                "minutes": (time.monotonic() - log.start) / 60,
                "tokens_per_s": log.tokens_per_s()}

    def _rest_of_epoch(self) -> tuple[Iterator[tuple[list[Any], bool]], int | None]:
        """The updates left in the current epoch and the epoch's number of batches (None when
        streaming). Each update is a list of batch items, every rank's (accumulate_steps x
        world_size of them; the epoch's last update may have fewer), with whether it is the
        epoch's last."""
        p = self.progress
        items, total = self._epoch_batches(p.epoch, p.batch_in_epoch)
        return self._group_updates(items, p.epoch), total

    def _group_updates(self, items: Iterator[Any], epoch: int
                       ) -> Iterator[tuple[list[Any], bool]]:
        per_update = self.config.train.accumulate_steps * self.world.world_size
        group = list(itertools.islice(items, per_update))
        if not group:
            raise TinytError(f"epoch {epoch + 1} has no training batch: no pair has "
                             f"1..{self.config.data.max_len} tokens on both sides; "
                             "check the data or raise data.max_len")
        while group:
            # Read one update ahead: a stream's end is known only when it runs dry.
            following = list(itertools.islice(items, per_update))
            yield group, not following
            group = following

    def _progress_bar(self, total: int | None) -> tqdm:
        p = self.progress
        return tqdm(total=total, initial=p.batch_in_epoch, desc=f"epoch {p.epoch + 1}",
                    unit="batch", disable=not self.progress_bars, dynamic_ncols=True)

    def _update(self, group: list[Any], end_of_epoch: bool, log: _TrainingLog,
                bar: tqdm) -> None:
        """One optimisation step on this rank's share of `group`, and its bookkeeping."""
        p = self.progress
        p.step += 1
        self.schedule.start_update(p.step)
        tokens = sum(self._n_tokens(item) for item in group)
        loss, finite = self.train_step(self._my_share(group), tokens)
        p.batch_in_epoch += len(group)
        log.add(loss, tokens, finite)
        bar.update(len(group))
        self._count_nonfinite(finite)
        if p.step % self.config.train.log_every == 0:
            loss, speed = log.show(bar, p, self.schedule.lr)
            self.sinks.progress(p.step, loss, self.schedule.lr, speed)
        if end_of_epoch:
            p.epoch += 1
            p.batch_in_epoch = 0

    def _count_nonfinite(self, finite: bool) -> None:
        """Count a skipped update; too many in a row mean the run diverged: stop it."""
        p = self.progress
        if finite:
            p.nonfinite_in_a_row = 0
            return
        p.nonfinite_steps += 1
        p.nonfinite_in_a_row += 1
        if p.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
            raise TinytError(f"{p.nonfinite_in_a_row} updates in a row had a non-finite loss "
                             f"or gradient (at step {p.step}); stopped. The last good "
                             f"checkpoints are in {self.run_dir}; lower train.lr or raise "
                             "train.warmup_steps, then --resume or start over")

    def _validation_due(self, end_of_epoch: bool) -> bool:
        # The update that completes the last epoch (train.max_epochs) is always validated and
        # saved, as the last step of a max_steps or max_minutes run is: with valid_every set,
        # the steps since the last validation would otherwise be trained and then lost.
        p, train = self.progress, self.config.train
        if end_of_epoch and p.epoch >= train.max_epochs:
            return True
        return p.step % train.valid_every == 0 if train.valid_every else end_of_epoch

    def _checkpoint_due(self) -> bool:
        every = self.config.train.checkpoint_every
        return bool(every) and self.progress.step % every == 0

    def _validate_and_save(self, log: _TrainingLog, bar: tqdm) -> None:
        """Validate, tell the schedule, log a metrics line, save (best.pt too if improved)."""
        p = self.progress
        log.flush(p)
        started = time.monotonic()
        train_loss = p.window_loss / max(p.window_tokens, 1)
        result = self.validate()
        log.validation_seconds += time.monotonic() - started
        improved = result["valid_loss"] < p.best_valid_loss
        if improved:
            p.best_valid_loss, p.best_step, p.validations_since_best = result["valid_loss"], p.step, 0
        else:
            p.validations_since_best += 1
        self.schedule.validated(p.step, result["valid_loss"])
        record = {"step": p.step, "epoch": p.epoch, "train_loss": round(train_loss, 4), **result,
                  "lr": self.schedule.lr, "elapsed_s": round(started - log.start, 1),
                  "best": improved}
        if p.nonfinite_steps:
            record["nonfinite_steps"] = p.nonfinite_steps
        if self.world.is_main:
            self._write_metrics(record, bar)
            self.sinks.validation(record)
        p.window_loss, p.window_tokens = 0.0, 0
        self.save(best=improved, validation=True)
        log.restart_speed()

    def _write_metrics(self, record: dict[str, Any], bar: tqdm) -> None:
        """Append a validation's record to metrics.jsonl and say it in one line."""
        append_text(self.run_dir / "metrics.jsonl", json.dumps(record) + "\n",
                    then=f"resume with: tinyt train --resume {self.run_dir}")
        bleu = f", bleu {record['valid_bleu']:.2f}" if "valid_bleu" in record else ""
        message = (f"step {record['step']} epoch {record['epoch']}: valid loss "
                   f"{record['valid_loss']:.3f}, ppl {record['valid_ppl']:.2f}{bleu}"
                   + (" (best)" if record["best"] else ""))
        (bar.write if self.progress_bars else print)(message)

    def _epoch_batches(self, epoch: int, start: int = 0) -> tuple[Iterator[Any], int | None]:
        """The epoch's batches in training order from its `start`-th on, the same on every
        rank, and the epoch's number of batches (None when streaming). Items are index tensors
        into epoch_data, or, when streaming, ready Batches. With tokenizer.sampling each epoch
        segments the training pairs afresh (`_sampled_epoch`) and batches them by those
        lengths."""
        tc, max_len = self.config.train, self.config.data.max_len
        sampling = self.config.tokenizer.sampling
        if self.stream is not None:
            if sampling is not None and start > 0 and self.world.is_main:
                print(f"warning: streamed windows are sampled as they are read, so the rest of "
                      f"epoch {epoch + 1} is cut into subwords otherwise than the interrupted "
                      "run did (not cached as a whole corpus is)", file=sys.stderr)
            stream = self.stream.batches(self.tokenizers, tc.batch_tokens, max_len, tc.seed,
                                         epoch, sampling)
            return itertools.islice(stream, start, None), None
        if sampling is not None:
            self.epoch_data = self._sampled_epoch(epoch)
            self.train_indices = trainable_indices(self.epoch_data, max_len)
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        order = make_batches(self.epoch_data, self.train_indices, tc.batch_tokens, generator)
        return iter(order[start:]), len(order)

    def _sampled_epoch(self, epoch: int) -> TokenizedText:
        """This epoch's random segmentation of the training pairs (tokenizer.sampling), kept
        in RUN/cache/sampled-epochN-KEY/ until the next epoch's replaces it, so that a resumed
        run trains on the very segmentations the interrupted one did."""
        cache = self.run_dir / "cache"
        name = f"sampled-epoch{epoch}"
        if (self.world.is_main and self.progress.batch_in_epoch > 0
                and not any(p.is_dir() for p in cache.glob(name + "-*"))):
            print(f"warning: the subword segmentation of epoch {epoch + 1} is gone from "
                  f"{cache}; the rest of the epoch trains on a new one (not the one the "
                  "interrupted run used)", file=sys.stderr)
        data = sample_corpus(self.train_text, self.tokenizers, cache,
                             self.config.tokenizer.sampling,
                             _epoch_seed(self.config.train.seed, epoch), self.config.data.max_len,
                             name, self.config.data.tokenize_processes,
                             desc=f"sampling subwords (epoch {epoch + 1})")
        if self.world.is_main:
            for old in cache.glob("sampled-epoch*"):
                if old.name.startswith(name + "-"):
                    continue
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:  # a map's Arrow file left by a killed run
                    old.unlink(missing_ok=True)
        return data

    def _n_tokens(self, item: Any) -> int:
        """Target tokens (+ <eos>) of a batch item, without building its tensors."""
        if isinstance(item, Batch):
            return item.n_tokens
        return int(self.epoch_data.tgt_lengths_at(item).sum()) + item.numel()

    def _as_batch(self, item: Any) -> Batch:
        return item if isinstance(item, Batch) else collate(self.epoch_data, item)

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



def train(config: Config, overwrite: bool = False, resume: bool = False,
          progress_bars: bool = True) -> dict[str, Any]:
    """Train a model as `config` says, writing everything into `config.run_dir`.

    The run directory has one writer at a time (tinyt.rundir): rank 0 holds its lock for the
    whole run. Nothing in it changes until the run directory, the data and (on resume) the
    checkpoint and config have all been checked: a refused or failed start leaves it as it was.
    With train.init_from (fine-tuning, tinyt.finetuning) the run starts from that run's weights
    and vocabulary, and `config`'s tokenizer section becomes that run's.

    Under torchrun every process calls this; see tinyt.distributed. Rank 0 alone prepares the
    run directory, trains the tokenizer, caches token ids, writes files and runs the final
    evaluation; the summary it returns is the one that counts.
    """
    tc = config.train
    world = distributed.world_from_environment()
    # Fine-tuning reads and checks the run it starts from first, so that a refusal does not
    # even create the run directory; a resumed run continues from its own last.pt instead.
    init = open_init_source(config) if tc.init_from is not None and not resume else None
    set_threads(tc.num_threads)
    reuse_freed_memory()
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    distributed.start(world, resolve_device(tc.device))
    lock = RunDirLock(config.run_dir, "tinyt train --resume" if resume else "tinyt train")
    try:
        distributed.main_first(world, lock.__enter__, then=lambda: lock)
        summary = _train(config, overwrite, resume, progress_bars, world, lock, init)
        distributed.wait_for_all(world)
        return summary
    finally:
        lock.__exit__(None, None, None)
        distributed.stop(world)


def _train(config: Config, overwrite: bool, resume: bool, progress_bars: bool,
           world: World, lock: RunDirLock, init: InitSource | None = None) -> dict[str, Any]:
    tc, dc = config.train, config.data
    run_dir = Path(config.run_dir)
    cache = run_dir / "cache"


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
        # Check everything before anything is written, so a refused start changes nothing.
        remove_stale_temporaries(run_dir)
        check_can_train(config, resume, overwrite)
        return open_data()

    try:
        train_corpus, valid_text = distributed.main_first(world, check_and_open, then=open_data)
    except TinytError:
        if world.is_main and not resume:
            lock.discard()  # a first start that failed leaves no empty run directory behind
        raise

    def prepare_tokens():
        if tc.init_from is not None:  # fine-tuning: the vocabulary is the start run's
            tokenizers = fine_tuning_tokenizers()
            save_config(config, run_dir / "config.yaml")
            return tokenizers, *tokenize_data(tokenizers)
        src, tgt = train_corpus.sample(config.tokenizer.max_sentences, tc.seed)
        if resume:  # never retrained: the checkpoint's weights belong to this vocabulary
            tokenizers = saved_tokenizers(config.tokenizer, src, tgt, run_dir / "tokenizer")
        else:
            if overwrite:
                clear_trained_state(run_dir)
            tokenizers = train_or_load(config.tokenizer, src, tgt, run_dir / "tokenizer", tc.seed)
        save_config(config, run_dir / "config.yaml")
        del src, tgt
        return tokenizers, *tokenize_data(tokenizers)

    def fine_tuning_tokenizers() -> Tokenizers:
        if resume:
            # The copy made at the start, never compared with the new data's fingerprint (it
            # was learned from other data); check_resumable matched it to last.pt.
            return Tokenizers.load(run_dir / "tokenizer")
        print(init.announcement)
        if overwrite:
            clear_trained_state(run_dir)
        return copy_tokenizer(init, run_dir / "tokenizer")

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
                      world, stream=train_corpus if dc.streaming else None,
                      train_text=None if dc.streaming else train_corpus)
    if resume:
        trainer.restore(run_dir / "last.pt")
        if world.is_main:
            trim_metrics(run_dir / "metrics.jsonl", trainer.progress.step)
    elif init is not None:
        # Fine-tuning: the start run's weights, with the fresh optimizer, schedule and
        # progress (step 0) the Trainer was built with.
        trainer.model.load_state_dict(init.weights)
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
