"""scripts/emulate_bf16_training.py rounds what bf16 autocast rounds, and nothing else."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "emulate_bf16_training.py"


def load_script():
    spec = importlib.util.spec_from_file_location("emulate_bf16_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_bf16(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).float())


def test_matrix_products_and_their_gradients_are_rounded_to_bf16():
    rounding = load_script().Bf16Rounding
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    with rounding():
        linear = F.linear(x, w)
        product = x @ w.T
        batched = torch.bmm(x[None], w.T[None])
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        linear.sum().backward()
        attention.sum().backward()
    # Each gradient comes from one rounded operation (gradients from several are summed in
    # float32, as autocast sums them into a float32 leaf).
    for t in (linear, product, batched, attention, x.grad, w.grad, q.grad, k.grad, v.grad):
        assert in_bf16(t)
    # The product of the rounded inputs, computed in float32, then rounded: bf16 autocast's
    # arithmetic, not float32's.
    rounded = F.linear(x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float())
    assert torch.equal(linear, rounded.to(torch.bfloat16).float())
    assert not torch.equal(linear, F.linear(x, w))


def test_what_autocast_keeps_in_float32_is_not_rounded():
    rounding = load_script().Bf16Rounding
    torch.manual_seed(1)
    x = torch.randn(4, 32)
    norm = torch.nn.LayerNorm(32)
    with rounding():
        normed = norm(x)
        soft = torch.softmax(x, dim=-1)
        loss = F.cross_entropy(x, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(normed, norm(x)) and not in_bf16(normed)
    assert torch.equal(soft, torch.softmax(x, dim=-1)) and not in_bf16(soft)
    assert torch.equal(loss, F.cross_entropy(x, torch.tensor([1, 2, 3, 4])))
