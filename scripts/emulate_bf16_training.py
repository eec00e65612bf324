#!/usr/bin/env python
"""Train with bf16 autocast's rounding, at float32 speed, on a CPU without bf16 instructions.

    python scripts/emulate_bf16_training.py train --config configs/multi30k_de_en_cpu.yaml \\
        --data-dir ../shared/data/multi30k --run-dir runs/bf16_emulated --set train.amp=none

Runs any `tinyt` command (the arguments are tinyt's own) with every operation that CPU autocast
would run in bf16 (linear layers, matrix multiplies, attention) rounding its floating-point
inputs and output to bf16, and its gradients on the way back too, while the matrix multiply
itself runs in float32. Everything autocast keeps in float32 (softmax, LayerNorm, the loss, the
optimizer's master weights) stays float32. This is bf16 training's arithmetic without bf16's
speed: a way to ask whether a recipe loses quality in bf16 on a machine whose bf16 matrix
multiplies are emulated and dozens of times slower than float32 (tinyt's development CPU: 2.8
against 170 GFLOP/s). It is a measurement tool, not a way to train: products are accumulated
in float32 in another order than a bf16 kernel's, so the runs match bf16 in kind, not bit for
bit. Pass --set train.amp=none so that the real autocast stays off.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyt.cli import main  # noqa: E402

# The operations CPU autocast runs in bf16 that tinyt's model calls.
# (`a @ b` arrives as Tensor.matmul.)
ROUNDED = {F.linear, torch.matmul, torch.Tensor.matmul, torch.bmm,
           F.scaled_dot_product_attention}


class _RoundToBf16(torch.autograd.Function):
    """Identity up to bf16 rounding, forward and backward (the gradient is rounded too, as a
    bf16 tensor's gradient is bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(torch.bfloat16).to(grad.dtype)


def round_bf16(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return _RoundToBf16.apply(value)
    return value


class Bf16Rounding(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ROUNDED:
            return func(*args, **kwargs)
        args = [round_bf16(a) for a in args]
        kwargs = {k: round_bf16(v) for k, v in kwargs.items()}
        return round_bf16(func(*args, **kwargs))


if __name__ == "__main__":
    with Bf16Rounding():
        main(sys.argv[1:])
