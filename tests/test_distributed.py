"""Data-parallel training under torchrun (gloo on the CPU): two processes follow the same loss
curve as one process with the same effective batch, and a killed two-process run resumes
exactly where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyt.config import config_from_dict
from tinyt.data import collate, load_split, make_batches, tokenize, trainable_indices
from tinyt.distributed import World, world_from_environment
from tinyt.tokenizer import PAD_ID, train_or_load
from tinyt.training import Trainer, train

REPO_ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str, **popen) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node N -m tinyt ARGS` (python -m torch.distributed.run,
    the module behind the torchrun script), on a free port."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               TQDM_DISABLE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "tinyt", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ddp_config(data_dir: Path, run_dir: Path, tiny_config_for, **train) -> dict:
    config = tiny_config_for(data_dir, run_dir)
    config["train"].update({"max_epochs": 100, "valid_every": 4, "valid_bleu": False,
                            "final_eval": False, "log_every": 2, "batch_tokens": 300, **train})
    return config


def test_world_comes_from_torchruns_environment():
    assert world_from_environment({}) == World()
    world = world_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.local_rank, world.launched) == (3, 4, 1, True)
    assert not world.is_main
    with pytest.raises(Exception, match="outside WORLD_SIZE"):
        world_from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_gets_its_share_and_padding_adds_nothing(small_corpus, tiny_config_for,
                                                          tmp_path):
    """An update of 3 batches over 2 ranks: rank 0 trains on batches 0 and 2, rank 1 on
    batch 1 plus a batch whose targets are all padding, which has no loss and no gradient."""
    config = config_from_dict(tiny_config_for(small_corpus, tmp_path / "run"))
    text = load_split(config.data, "train")
    tokenizers = train_or_load(config.tokenizer, text.src, text.tgt, tmp_path / "tok")
    data = tokenize(text, tokenizers)
    group = make_batches(data, trainable_indices(data, 64), 300)[:3]
    shares = []
    for rank in (0, 1):
        trainer = Trainer(config, tokenizers, data, data, text.tgt, progress_bars=False,
                          world=World(rank=rank, world_size=2))
        shares.append(trainer._my_share(group))
    assert [b.n_tokens for b in shares[0]] == [collate(data, group[i]).n_tokens for i in (0, 2)]
    assert shares[1][0].n_tokens == collate(data, group[1]).n_tokens
    pad = shares[1][1]
    assert pad.n_tokens == 0 and bool((pad.tgt_out == PAD_ID).all())
    trainer.model.zero_grad()
    loss = trainer.loss(pad.src, pad.tgt_in, pad.tgt_out)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())


def test_two_processes_follow_one_process_with_the_same_effective_batch(
        module_small_corpus, tiny_config_for, write_config, tmp_path):
    """2 processes x 1 batch per update against 1 process accumulating 2 batches per update:
    same batches, same updates, so the same losses at every validation (dropout off, since
    the processes draw different masks)."""
    no_dropout = {"dropout": 0.0, "attn_dropout": 0.0, "act_dropout": 0.0}
    single = ddp_config(module_small_corpus, tmp_path / "one", tiny_config_for,
                        max_steps=12, accumulate_steps=2)
    single["model"].update(no_dropout)
    train(config_from_dict(single), progress_bars=False)

    double = ddp_config(module_small_corpus, tmp_path / "two", tiny_config_for, max_steps=12)
    double["model"].update(no_dropout)
    code, out, err = finish(torchrun(2, "train", "--config",
                                     str(write_config(double, tmp_path / "two.yaml"))))
    assert code == 0, err[-2000:]
    assert "x 2 processes" in out and out.count("done:") == 1  # rank 0 alone reports

    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [4, 8, 12]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-4)
    # The checkpoint format does not depend on the number of processes.
    ckpt_one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    ckpt_two = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    assert set(ckpt_two) - set(ckpt_one) == {"rng_ranks"}
    for name, weight in ckpt_one["model"].items():
        torch.testing.assert_close(ckpt_two["model"][name], weight, rtol=1e-4, atol=1e-5)


def test_killed_two_process_run_resumes_exactly(module_small_corpus, tiny_config_for,
                                                write_config, tmp_path):
    """SIGTERM to torchrun mid-run: both ranks stop at the same step and rank 0 saves last.pt;
    `--resume` with 2 processes then follows the uninterrupted run's curve exactly, dropout
    included (every rank's random state is in the checkpoint)."""
    settings = dict(max_steps=24)
    reference = ddp_config(module_small_corpus, tmp_path / "ref", tiny_config_for, **settings)
    code, _, err = finish(torchrun(2, "train", "--config",
                                   str(write_config(reference, tmp_path / "ref.yaml"))))
    assert code == 0, err[-2000:]

    killed = ddp_config(module_small_corpus, tmp_path / "run", tiny_config_for, **settings)
    # At a lower priority than this test: when the poll below wakes, it runs at once instead
    # of waiting for the ranks' time slices, so on a busy machine the run cannot get far past
    # the point it is stopped at while the test waits for the CPU.
    process = torchrun(2, "train", "--config", str(write_config(killed, tmp_path / "run.yaml")),
                       start_new_session=True, preexec_fn=lambda: os.nice(10))
    metrics_file = tmp_path / "run" / "metrics.jsonl"

    def validations() -> int:
        return len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0

    # Stopped by the run's own progress, not the clock: once the first validation (step 4 of
    # 24) is logged, the whole process group (torchrun and both ranks) is frozen, so the
    # SIGTERM lands a few steps after it at most, however fast or slow the machine.
    while validations() < 1:
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGSTOP)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    os.killpg(process.pid, signal.SIGCONT)
    code, _, err = finish(process)
    assert code != 0
    assert "interrupted by SIGTERM" in err
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    stopped_at = stopped["progress"]["step"]
    assert 4 <= stopped_at < 24
    assert len(stopped["rng_ranks"]) == 2

    code, out, err = finish(torchrun(2, "train", "--resume", str(tmp_path / "run")))
    assert code == 0, err[-2000:]
    assert "24 steps" in out
    resumed, uninterrupted = metrics(tmp_path / "run"), metrics(tmp_path / "ref")
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted]
    for a, b in zip(uninterrupted, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process(module_small_corpus, tiny_config_for,
                                                         write_config, tmp_path):
    """Moving a run from 2 processes to 1: the single process continues at the saved step
    and batch position (with accumulate_steps=2 it keeps the same effective batch)."""
    config = ddp_config(module_small_corpus, tmp_path / "run", tiny_config_for, max_steps=8)
    code, _, err = finish(torchrun(2, "train", "--config",
                                   str(write_config(config, tmp_path / "run.yaml"))))
    assert code == 0, err[-2000:]
    resumed = config_from_dict({**config, "train": {**config["train"], "max_steps": 12,
                                                    "accumulate_steps": 2}})
    summary = train(resumed, resume=True, progress_bars=False)
    assert summary["steps"] == 12 and summary["processes"] == 1
    assert [m["step"] for m in metrics(tmp_path / "run")] == [4, 8, 12]
