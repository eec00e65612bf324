"""Every user-fixable problem is one `error:` line with exit code 2 and loses nothing: failed
writes (full disk, no permission, read-only, a file in the way), damaged files, bad data files
and distributed environments. Numbers and YAML: tests/test_config.py; the command line:
tests/test_cli_tools.py; with a trained model: the end of tests/test_reliability.py."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import stat
from pathlib import Path

import pytest
import torch

from tinyt import distributed
from tinyt.checkpoint import load_checkpoint, save_checkpoint
from tinyt.config import DataConfig, TokenizerConfig
from tinyt.data import load_split, open_corpus
from tinyt.errors import TinytError
from tinyt.tokenizer import Tokenizers, train_or_load
from tinyt.rundir import trim_metrics
from tinyt.writing import (atomic_torch_save, atomic_write, atomic_write_text,
                           check_writable_dir, find_os_error, write_error, writing)

class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write that does not fit fails as a full
    disk does (errno ENOSPC)."""

    room = 0

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return super().write(data)


@pytest.fixture
def full_disk(monkeypatch):
    """Files opened by tinyt.writing have `room` bytes of space (set it on the fixture)."""

    class Disk:
        room = 100

    def fdopen(fd, mode="r", *args, **kwargs):
        f = FullDisk(fd, mode.replace("b", ""))
        f.room = Disk.room
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return Disk


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- the file-writing layer -----------------------------------------------------------------


@pytest.mark.parametrize("code,words", [
    (errno.ENOSPC, "no space left on the device holding"),
    (errno.EDQUOT, "quota"),
    (errno.EACCES, "no permission to write"),
    (errno.EPERM, "no permission to write"),
    (errno.EROFS, "read-only file system"),
    (errno.EISDIR, "is a folder"),
    (errno.ENOTDIR, "is a file, not a folder"),
])
def test_each_write_failure_names_the_path_and_its_own_fix(code, words):
    message = str(write_error(OSError(code, os.strerror(code)), "runs/x/last.pt"))
    assert words in message and "runs/x/last.pt" in message
    assert "\n" not in message
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        assert "free space" not in message  # not the fix for a permission problem


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path, full_disk):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    full_disk.room = 3
    with pytest.raises(TinytError, match="no space left on the device holding .*config.yaml"):
        atomic_write_text(path, "new contents, longer than the room left\n")
    assert path.read_text() == "old\n"
    assert no_temporaries(tmp_path)


def test_torch_save_on_a_full_disk_is_mapped_although_torch_hides_the_oserror(
        tmp_path, full_disk):
    """torch's zip writer turns the OSError into RuntimeError('... inline_container ...')."""
    path = tmp_path / "last.pt"
    full_disk.room = 10**9
    save_checkpoint({"model": {"w": torch.ones(3)}, "progress": {"step": 1}}, path)
    full_disk.room = 200
    with pytest.raises(TinytError) as info:
        save_checkpoint({"model": {"w": torch.zeros(10_000)}, "progress": {"step": 2}}, path)
    message = str(info.value)
    assert "no space left on the device holding" in message and "intact" in message
    assert "inline_container" not in message and "unexpected pos" not in message
    assert no_temporaries(tmp_path)
    full_disk.room = 10**9
    assert load_checkpoint(path)["progress"]["step"] == 1


def test_atomic_save_refuses_a_target_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "pipe", tmp_path / "folder"):
        with pytest.raises(TinytError, match="not a regular file|is a folder"):
            atomic_torch_save({"w": torch.ones(1)}, target)
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)  # still the pipe, not replaced
    if Path("/dev/full").exists():
        with pytest.raises(TinytError, match="not a regular file"):
            atomic_write_text("/dev/full", "x")


def test_atomic_write_through_a_link_replaces_the_file_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    real.write_text("old")
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    with pytest.raises(TinytError, match="not a regular file"):
        atomic_write_text(stdout_link, "x")
    assert stdout_link.is_symlink()


def test_two_writers_of_one_path_use_separate_temporary_files(tmp_path):
    path = tmp_path / "best.pt"

    def outer(f):
        f.write(b"outer")
        atomic_write(path, lambda g: g.write(b"inner"))  # a second writer meanwhile

    atomic_write(path, outer)
    assert path.read_bytes() == b"outer"  # the last rename wins; neither file was shared
    assert no_temporaries(tmp_path)


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "config.yaml", "x\n")
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o666 & ~umask


def test_write_failures_wrapped_by_a_library_are_found():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/data/cache")
        except OSError as inner:
            raise RuntimeError("the library failed") from inner
    except RuntimeError as outer:
        assert find_os_error(outer).errno == errno.EROFS
        with pytest.raises(TinytError, match="read-only file system"):
            with writing("cache.arrow"):
                raise outer


def test_check_writable_dir(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TinytError, match="is a file, not a folder"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(TinytError, match="is a file"):
        check_writable_dir(tmp_path / "file" / "run")
    with pytest.raises(TinytError, match="does not exist"):
        check_writable_dir(tmp_path / "missing", create=False)
    assert check_writable_dir(tmp_path / "new" / "run").is_dir()
    assert no_temporaries(tmp_path)

    import tempfile

    def refused(*args, **kwargs):  # as for a folder of another user (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(TinytError, match="no permission to write .*run"):
        check_writable_dir(tmp_path / "new" / "run")


# -- checkpoints, tokenizers, caches --------------------------------------------------------


def test_nonfinite_weights_are_never_saved(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "progress": {"step": 1}}, path)
    with pytest.raises(TinytError, match="NaN or infinite by step 7.*train.lr"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])},
                         "progress": {"step": 7}}, path)
    assert load_checkpoint(path)["progress"]["step"] == 1


def test_a_damaged_last_pt_is_not_advised_as_the_fix(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(3)}, "progress": {"step": 1}}, tmp_path / "best.pt")
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(TinytError) as info:
        load_checkpoint(tmp_path / "last.pt")
    message = str(info.value)
    assert "damaged" in message and "--overwrite" in message and "best.pt" in message
    assert "e.g. last.pt" not in message
    assert "PytorchStreamReader" not in message and "central directory" not in message


def test_tokenizer_on_a_full_disk_leaves_no_truncated_model(tmp_path, full_disk):
    lines = [f"ein hund läuft {i} mal über die wiese" for i in range(300)]
    config = TokenizerConfig(vocab_size=40)
    full_disk.room = 1000  # the model (tens of kB) does not fit
    with pytest.raises(TinytError, match="no space left on the device holding .*joint.model"):
        train_or_load(config, lines, lines, tmp_path / "tokenizer")
    folder = tmp_path / "tokenizer"
    assert not (folder / "joint.model").exists() and not (folder / "meta.json").exists()
    assert no_temporaries(tmp_path)
    full_disk.room = 10**9
    assert train_or_load(config, lines, lines, folder).src_vocab_size <= 40


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe not utf-8"])
def test_a_damaged_tokenizer_meta_json_is_retrained_or_one_line(tmp_path, content):
    lines = [f"zwei katzen schlafen {i}" for i in range(200)]
    config = TokenizerConfig(vocab_size=30)
    folder = tmp_path / "tokenizer"
    train_or_load(config, lines, lines, folder)
    (folder / "meta.json").write_bytes(content)
    with pytest.raises(TinytError, match="meta.json is damaged"):
        Tokenizers.load(folder)
    train_or_load(config, lines, lines, folder)  # retrained over it, no crash
    assert json.loads((folder / "meta.json").read_text())["joint"] is True


def test_a_full_disk_while_caching_the_corpus_names_the_cache(small_corpus, tmp_path,
                                                               monkeypatch):
    import tinyt.data.corpus as data_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_module, "_write_pairs_arrow", disk_full)
    config = DataConfig(dir=str(small_corpus))
    with pytest.raises(TinytError, match=r"no space left on the device holding .*cache.*\.arrow"):
        open_corpus(config, "train", tmp_path / "cache")


def test_metrics_jsonl_that_is_not_utf8_is_one_line_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 5}\n{"step": 10, "x": "\xff"}\n')
    with pytest.raises(TinytError, match=r"metrics.jsonl line 2 is not UTF-8"):
        trim_metrics(path, 10)


# -- data files -----------------------------------------------------------------------------


def tsv_config(folder: Path, **kwargs) -> DataConfig:
    return DataConfig(dir=str(folder), files={"train": "train", "valid": "val"}, **kwargs)


def test_tsv_lines_without_a_tab_are_counted_and_located(tmp_path, capsys):
    rows = ["de\ten", "Ein Hund.\tA dog.", "kein Tab", "Zwei.\tTwo.", "auch keiner"]
    (tmp_path / "val.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    load_split(tsv_config(tmp_path, format="tsv"), "valid")
    err = capsys.readouterr().err
    assert "2 line(s)" in err and "lines 3, 5" in err and "val.tsv" in err
    (tmp_path / "val.tsv").write_text("de en\nEin Hund. A dog.\n", encoding="utf-8")
    with pytest.raises(TinytError, match="no line of .*val.tsv has a tab"):
        load_split(tsv_config(tmp_path, format="tsv"), "valid")


def test_a_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"de": "a", "en": "b"}\n{"de": "c", "en": \n',
                                        encoding="utf-8")
    with pytest.raises(TinytError, match=r"val.jsonl line 2 is not a JSON object"):
        load_split(tsv_config(tmp_path, format="jsonl"), "valid")


def test_an_unwritable_datasets_cache_is_blamed_not_the_data_file(tmp_path, monkeypatch):
    import datasets

    def home_read_only(*args, **kwargs):
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/home/me/.cache")
        except OSError as exc:
            raise RuntimeError("could not prepare the cache") from exc

    (tmp_path / "val.jsonl").write_text('{"de": "a", "en": "b"}\n', encoding="utf-8")
    monkeypatch.setattr(datasets, "load_dataset", home_read_only)
    with pytest.raises(TinytError) as info:
        load_split(tsv_config(tmp_path, format="jsonl"), "valid")
    message = str(info.value)
    assert "/home/me/.cache" in message and "HF_DATASETS_CACHE" in message
    assert "cannot parse" not in message


# -- distributed training environments ------------------------------------------------------


def test_rank_and_world_size_without_master_addr_say_what_torchrun_sets():
    world = distributed.World(rank=0, world_size=2, launched=True)
    with pytest.raises(TinytError, match="MASTER_ADDR and MASTER_PORT are not; torchrun"):
        distributed._join(world, "gloo", None, environ={"RANK": "0", "WORLD_SIZE": "2"})


def test_a_bad_rendezvous_timeout_is_one_line():
    with pytest.raises(TinytError, match="TINYT_DIST_TIMEOUT"):
        distributed.rendezvous_timeout({"TINYT_DIST_TIMEOUT": "soon"})
    assert distributed.rendezvous_timeout({}) == distributed.RENDEZVOUS_TIMEOUT_S


def test_rank_0_waits_for_the_others_only_as_long_as_told(capfd):
    with socket.socket() as probe:  # a port nobody else is told about
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TINYT_DIST_TIMEOUT": "1"}
    world = distributed.World(rank=0, world_size=2, launched=True)
    with pytest.raises(TinytError, match=rf"gave up after 1 s waiting for 2 processes at "
                                         rf"127.0.0.1:{port}"):
        distributed._join(world, "gloo", None, environ=env)
    assert f"waiting for 2 processes at 127.0.0.1:{port} (timeout 1 s" in capfd.readouterr().err
    assert not torch.distributed.is_initialized()
