"""tinyt.allocator: freed memory really is reused instead of being faulted in afresh."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from tinyt import allocator

# A child process runs training steps of a small model with a 8,000-word vocabulary and prints
# the minor page faults a step costs once warm: each is a 4 KiB page the kernel hands over anew.
CHILD = textwrap.dedent("""
    import resource, sys
    import torch
    import torch.nn.functional as F
    from tinyt.allocator import reuse_freed_memory
    from tinyt.config import ModelConfig
    from tinyt.model import Transformer
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_heads=2, enc_layers=1, dec_layers=1, d_ff=128)
    model = Transformer(config, 8000, 8000)
    src, tgt = torch.randint(4, 8000, (64, 20)), torch.randint(4, 8000, (64, 21))

    def step():
        logits = model.logits(model(src, tgt[:, :-1]))  # 64 x 20 x 8000 floats: 10,000 pages
        F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten()).backward()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
""")
LOGITS_PAGES = 64 * 20 * 8000 * 4 // 4096


def page_faults_per_step(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc is Linux's")
def test_freed_memory_is_reused_without_new_page_faults():
    """The logits, their log-softmax and their gradients are each over glibc's 32 MiB mmap
    threshold: by default every step maps them afresh; kept, a step reuses warm pages."""
    if not allocator.reuse_freed_memory():
        pytest.skip("not glibc")
    assert page_faults_per_step("default") > 2 * LOGITS_PAGES
    assert page_faults_per_step("reuse") < LOGITS_PAGES // 2


def test_elsewhere_or_when_asked_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setenv("TINYT_MALLOC", "system")
    assert allocator.reuse_freed_memory() is False
    monkeypatch.delenv("TINYT_MALLOC")

    def no_libc(name):
        raise OSError("no C library here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.reuse_freed_memory() is False

    class Musl:  # a C library without glibc's version query (and its mallopt codes)
        def mallopt(self, *args):
            raise AssertionError("mallopt must not be called outside glibc")

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Musl())
    assert allocator.reuse_freed_memory() is False


def test_the_tinyt_program_keeps_freed_memory_before_any_command(monkeypatch, capsys):
    from tinyt import cli

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and calls == [True]
    assert "tinyt" in capsys.readouterr().out
