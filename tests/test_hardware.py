"""Mixed precision by phase: train.amp: auto uses bf16 on a CPU only where it has native bf16
matrix instructions, and there for training and scoring but not for decoding."""

import pytest
import torch

from tinyt import hardware
from tinyt.hardware import amp_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else None
    assert amp_dtype("auto", CPU, "train") == expected
    assert amp_dtype("auto", CPU, "score") == expected
    assert amp_dtype("auto", CPU, "decode") is None  # slower in bf16, measured
    # Explicit settings apply everywhere, whatever the CPU.
    for phase in ("train", "score", "decode"):
        assert amp_dtype("bf16", CPU, phase) == torch.bfloat16
        assert amp_dtype("none", CPU, phase) is None
        assert amp_dtype("auto", CUDA, phase) == torch.bfloat16


def test_the_capability_check_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert hardware.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not hardware.cpu_has_native_bf16()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not hardware.cpu_has_native_bf16()


def test_a_translator_scores_in_bf16_and_searches_in_fp32(monkeypatch):
    """On a (mocked) bf16 CPU: teacher-forced scoring runs under bf16 autocast, search not."""
    from tinyt.config import ModelConfig
    from tinyt.model import Transformer
    from tinyt.translation import Translator

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    model = Transformer(ModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1,
                                    d_ff=64), 40, 40)
    translator = Translator(model, tokenizers=None, decoding=None, device="cpu", amp="auto")
    assert translator.amp_dtype is None and translator.score_amp_dtype == torch.bfloat16
    seen = []
    original = model.log_probs

    def spy(src, tgt_in):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                    else None)
        return original(src, tgt_in)

    monkeypatch.setattr(model, "log_probs", spy)
    translator.token_log_probs([[5, 6, 7]], [[8, 9]], batch_size=1)
    assert seen == [torch.bfloat16]
