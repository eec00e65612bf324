"""Checkpoints: atomic saves, safe loads, what training saves and restores, rebuilding a
trained model, and averaging validation checkpoints.

A run directory (tinyt.rundir) holds these checkpoints:
    last.pt        everything a resume needs (`training_payload`): weights, optimizer, schedule,
                   gradient scaler, progress, random states
    best.pt        weights and metadata of the best validation (`weights_payload`)
    ckpt-STEP.pt   the same for each of the last `train.keep_checkpoints` validations, and
                   averaged.pt, their average (`average_checkpoints`)
A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: nothing in it can execute code.
"""

from __future__ import annotations

import errno
import random
import re
from pathlib import Path
from typing import Any

import torch

from tinyt.config import Config, ConfigError, load_config
from tinyt.distributed import World
from tinyt.errors import TinytError
from tinyt.model import Transformer
from tinyt.schedule import LearningRateSchedule
from tinyt.tokenizer import Tokenizers
from tinyt.writing import atomic_torch_save

FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path,
                    then: str | None = None) -> None:
    """Write `payload`, stamped with the checkpoint format version, atomically to `path`.

    Weights that are not finite are never written: a checkpoint of NaN weights would replace
    the last good one (a learning rate so high that the weights overflow gives finite losses
    until the step after). A failed write names the path and the fix, then `then` (default:
    resume the run in `path`'s folder); the previous file at `path` is intact either way.
    """
    path = Path(path)
    _refuse_nonfinite_weights(payload, path)
    if then is None:
        then = (f"resume with: tinyt train --resume {path.parent}"
                if (path.parent / "last.pt").is_file() else "run the command again")
    atomic_torch_save({"format_version": FORMAT_VERSION, **payload}, path, then=then,
                      note="the previous checkpoint is intact" if path.is_file() else "")


def _refuse_nonfinite_weights(payload: dict[str, Any], path: Path) -> None:
    weights = payload.get("model")
    if not isinstance(weights, dict):
        return
    floats = [t for t in weights.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return
    # One host sync for all tensors, not one each.
    if bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        return
    step = (payload.get("progress") or {}).get("step", "?")
    raise TinytError(f"the model's weights became NaN or infinite by step {step}, so {path} "
                     f"was not written and the last good checkpoints in {path.parent} are "
                     "kept; the learning rate is too high for this model: lower train.lr (or "
                     "raise train.warmup_steps), e.g. tinyt train --resume "
                     f"{path.parent} --set train.lr=..., or start over")


def load_tensors_safely(path: Path, damaged: str) -> Any:
    """torch.load with weights_only=True (tensors, numbers, strings, containers: no code runs).
    A file that cannot be loaded raises TinytError(damaged); torch's own words stay in the
    exception chain (shown by --verbose), not in the one-line message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # torch seeking to where a file cut short says data is
            raise TinytError(damaged) from exc
        raise TinytError(f"cannot read {path}: {exc.strerror or exc}; check the file's "
                         "permissions") from exc
    except Exception as exc:
        raise TinytError(damaged) from exc


def _other_checkpoints(path: Path) -> list[str]:
    """Names of the other checkpoints beside `path` (at most four), for advice."""
    try:
        names = sorted(p.name for p in path.parent.glob("*.pt")
                       if p.is_file() and p.name != path.name)
    except OSError:
        return []
    return names[:4]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a missing, damaged or foreign file raises TinytError."""
    path = Path(path)
    if not path.is_file():
        raise TinytError(f"checkpoint {path} not found; train the run first or pick another run")
    others = _other_checkpoints(path)
    usable = f"use another checkpoint of the run ({', '.join(others)})" if others else \
        "retrain the run"
    if path.name == "last.pt":  # what resume reads: no other file can stand in for it
        fix = ("the run cannot resume from it; start it over with --overwrite"
               + (f" (to evaluate or translate, {usable})" if others else ""))
    else:
        fix = usable + (" or retrain" if others else "")
    payload = load_tensors_safely(path, f"checkpoint {path} is damaged or not a tinyt "
                                        f"checkpoint (cut short or overwritten); {fix}")
    if not isinstance(payload, dict) or "model" not in payload:
        raise TinytError(f"{path} is not a tinyt checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise TinytError(f"checkpoint {path} has format version {version}, this tinyt reads "
                         f"version {FORMAT_VERSION}; use the tinyt release that wrote it")
    return payload


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinytError(f"run directory {run_dir} does not exist; pass --run with a trained run")
    try:
        return load_config(run_dir / "config.yaml", check_paths=False)
    except ConfigError as exc:
        raise TinytError(f"run {run_dir} has no usable config.yaml ({exc})") from None


def build_model(config: Config, tokenizers: Tokenizers) -> Transformer:
    return Transformer(config.model, tokenizers.src_vocab_size, tokenizers.tgt_vocab_size)


def load_trained(run_dir: str | Path, checkpoint: str = "best.pt"
                 ) -> tuple[Config, Tokenizers, Transformer, dict[str, Any]]:
    """Config, tokenizers and model (weights from `checkpoint`, in eval mode, on the CPU) of a
    trained run, checked against each other."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    payload = load_checkpoint(run_dir / checkpoint)
    if payload.get("tokenizer_fingerprint") != tokenizers.fingerprint:
        raise TinytError(f"{run_dir / checkpoint} was trained with a different vocabulary than "
                         f"{run_dir / 'tokenizer'}; restore the run's own tokenizer folder")
    model = build_model(config, tokenizers)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise TinytError(f"{run_dir / checkpoint} does not fit the model in its config.yaml "
                         f"({first}); was config.yaml edited after training?") from None
    model.eval()
    return config, tokenizers, model, payload


# -- what training saves and restores -------------------------------------------------------

# The keys of best.pt and ckpt-STEP.pt: what inference needs, a third of last.pt's size.
_WEIGHTS_KEYS = ("model", "progress", "tokenizer_fingerprint", "config")


def rng_state() -> dict[str, Any]:
    """This process's random state: torch's CPU (and CUDA) generators and Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_payload(*, model: Transformer, optimizer: torch.optim.Optimizer,
                     schedule: LearningRateSchedule, scaler: torch.amp.GradScaler,
                     progress: dict[str, Any], rng_ranks: list[dict[str, Any]],
                     tokenizers_fingerprint: str, config: Config) -> dict[str, Any]:
    """What last.pt holds: everything a resume needs to continue bit for bit.

    progress: the trainer's Progress as a dict. rng_ranks: every rank's `rng_state()`, in rank
    order; "rng" is rank 0's (all a single process uses), and "rng_ranks" is kept only when
    there are several, so that a resume with as many processes redraws the same dropout masks
    everywhere. The schedule's state is saved under "scheduler", as it always was.
    """
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": progress,
        "rng": rng_ranks[0],
        "tokenizer_fingerprint": tokenizers_fingerprint,
        "config": config.to_dict(),
    }
    if len(rng_ranks) > 1:
        payload["rng_ranks"] = rng_ranks
    return payload


def weights_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """What best.pt and ckpt-STEP.pt hold of a `training_payload`: weights and metadata, no
    optimizer state."""
    return {key: payload[key] for key in _WEIGHTS_KEYS}


def restore_training(payload: dict[str, Any], path: Path, *, model: Transformer,
                     optimizer: torch.optim.Optimizer, schedule: LearningRateSchedule,
                     scaler: torch.amp.GradScaler, tokenizers_fingerprint: str
                     ) -> dict[str, Any]:
    """Load a `training_payload` (read from `path`) back into the trainer's pieces; returns
    its progress dict. The random state is `saved_rng_state`'s business."""
    if payload.get("tokenizer_fingerprint") != tokenizers_fingerprint:
        raise TinytError(f"{path} was trained with another vocabulary than this run's "
                         "tokenizer; resume needs the run's original data and config")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise TinytError(f"{path} does not fit this run's model/optimizer ({first}); was "
                         "the config changed since the checkpoint was written?") from None
    schedule.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    return payload["progress"]


def saved_rng_state(payload: dict[str, Any], world: World) -> dict[str, Any] | None:
    """The random state this rank continues from: its own when the checkpoint was written by
    as many processes; otherwise rank 0 continues the saved stream ("rng") and the others get
    None: they start fresh dropout streams of their own."""
    rank_states = payload.get("rng_ranks")
    if rank_states is not None and len(rank_states) == world.world_size:
        return rank_states[world.rank]
    return payload["rng"] if world.is_main else None


# -- validation checkpoints and averaging ---------------------------------------------------

# Training writes the weights of each validation as ckpt-STEP.pt; the step in the name orders
# them (a lexical sort would put ckpt-1000 before ckpt-200).
_VALIDATION_CHECKPOINT = re.compile(r"ckpt-(\d+)\.pt")


def validation_checkpoint_name(step: int) -> str:
    return f"ckpt-{step}.pt"


def validation_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The `(step, path)` of every ckpt-STEP.pt in `run_dir`, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _VALIDATION_CHECKPOINT.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_validation_checkpoints(run_dir: str | Path, keep: int, current_step: int) -> None:
    """Delete validation checkpoints so that only the newest `keep` up to `current_step` remain.

    Files for steps after `current_step` are deleted too: training never saves those steps
    before reaching them, so such a file is left over from an earlier run in the same folder
    and would otherwise crowd out this run's own checkpoints.
    """
    existing = validation_checkpoints(run_dir)
    stale = [path for step, path in existing if step > current_step]
    ours = [path for step, path in existing if step <= current_step]
    for path in stale + ours[: max(len(ours) - keep, 0)]:
        path.unlink(missing_ok=True)


def average_checkpoints(run_dir: str | Path, n: int, out_name: str = "averaged.pt") -> Path:
    """Average the weights of the newest `n` ckpt-STEP.pt files of a run into `out_name`.

    Averaging the last few validation checkpoints usually scores a little better than any one
    of them. The result is a weights-only checkpoint like best.pt, written into the run
    directory, so `load_trained(run_dir, out_name)` (and `tinyt evaluate --checkpoint
    averaged.pt`) use it like any other. Its progress is that of the newest checkpoint, and
    `averaged_steps` lists the steps that went into it.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if n < 1:
        raise TinytError(f"cannot average {n} checkpoints; pass a number >= 1")
    if Path(out_name).name != out_name or _VALIDATION_CHECKPOINT.fullmatch(out_name) \
            or out_name in ("last.pt", "best.pt"):
        raise TinytError(f"{out_name!r} cannot hold the average: use a plain file name other "
                         "than last.pt, best.pt and ckpt-STEP.pt, e.g. averaged.pt")
    available = validation_checkpoints(run_dir)
    if len(available) < n:
        keep = config.train.keep_checkpoints
        have = (f"has only {len(available)} validation checkpoint(s) (ckpt-STEP.pt)" if available
                else "has no validation checkpoints (ckpt-STEP.pt)")
        more = f"train (or resume) with train.keep_checkpoints >= {n}"
        fix = f"Average fewer (-n {len(available)}) or {more}" if available else more.capitalize()
        raise TinytError(f"cannot average {n} checkpoints: {run_dir} {have}; training keeps the "
                         f"last train.keep_checkpoints={keep} of them. {fix}")
    chosen = available[-n:]

    # Sum in float64 one checkpoint at a time: memory stays at two copies of the weights, and
    # rounding does not depend on the order of the files.
    _, first_path = chosen[0]
    first = load_checkpoint(first_path)
    fingerprint, reference = first.get("tokenizer_fingerprint"), first["model"]
    aliases = shared_tensor_names(reference)
    total = {name: t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone()
             for name, t in reference.items() if name not in aliases}
    newest = first
    for step, path in chosen[1:]:
        payload = load_checkpoint(path)
        weights = payload["model"]
        if payload.get("tokenizer_fingerprint") != fingerprint:
            raise TinytError(f"{path.name} and {first_path.name} were trained with different "
                             "vocabularies and cannot be averaged; delete the checkpoints left "
                             "over from another run")
        if weights.keys() != reference.keys() or any(
                weights[name].shape != reference[name].shape for name in weights):
            raise TinytError(f"{path.name} and {first_path.name} hold models of different shapes "
                             "and cannot be averaged; delete the checkpoints left over from "
                             "another run")
        for name in total:
            t = weights[name]
            if t.is_floating_point():
                total[name] += t.to(torch.float64)
            else:  # integer buffers (none today) count things rather than weigh: keep the newest
                total[name] = t.clone()
        newest = payload

    averaged = {name: (t / n).to(reference[name].dtype) if t.is_floating_point() else t
                for name, t in total.items()}
    for name, original in aliases.items():
        averaged[name] = averaged[original]
    averaged = {name: averaged[name] for name in reference}  # the checkpoints' key order
    out_path = run_dir / out_name
    save_checkpoint({"model": averaged, "progress": newest["progress"],
                     "tokenizer_fingerprint": fingerprint, "config": newest.get("config"),
                     "averaged_steps": [step for step, _ in chosen]}, out_path,
                    then="run tinyt average again")
    return out_path


def shared_tensor_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """`{alias: original}` for entries of a state dict that are the same tensor as an earlier
    entry (tied embeddings appear under two names); averaging them once and sharing the result
    keeps the average the size of the checkpoints it came from."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases
