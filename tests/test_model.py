"""The Transformer's masks, attention and incremental decoding do what they claim."""

import math

import pytest
import torch

from tinyt.config import ModelConfig
from tinyt.model import MultiHeadAttention, Transformer, sinusoidal_positions
from tinyt.tokenizer import BOS_ID, EOS_ID, PAD_ID

VOCAB = 50


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, d_ff=64,
                         dropout=0.0, **overrides)
    return Transformer(config, VOCAB, VOCAB).eval()


def random_tokens(batch: int, length: int, generator=None) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_causal_mask_hides_the_future(pre_norm):
    model = make_model(pre_norm=pre_norm)
    src = random_tokens(3, 7)
    tgt = random_tokens(3, 9)
    tgt[:, 0] = BOS_ID
    before = model(src, tgt)
    for t in (0, 3, 7):
        changed = tgt.clone()
        changed[:, t + 1:] = random_tokens(3, 9 - t - 1)
        after = model(src, changed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])


def test_source_padding_is_ignored():
    model = make_model()
    src = random_tokens(2, 6)
    tgt = random_tokens(2, 5)
    padded_src = torch.cat([src, torch.full((2, 4), PAD_ID)], dim=1)
    memory, _ = model.encode(src)
    padded_memory, mask = model.encode(padded_src)
    torch.testing.assert_close(padded_memory[:, :6], memory, rtol=0, atol=1e-5)
    assert mask[:, 0, 0].tolist() == [[True] * 6 + [False] * 4] * 2
    torch.testing.assert_close(model(padded_src, tgt), model(src, tgt), rtol=0, atol=1e-5)


def test_target_padding_is_ignored():
    model = make_model()
    src = random_tokens(2, 6)
    tgt = random_tokens(2, 5)
    padded_tgt = torch.cat([tgt, torch.full((2, 3), PAD_ID)], dim=1)
    torch.testing.assert_close(model(src, padded_tgt)[:, :5], model(src, tgt), rtol=0, atol=1e-5)


def test_sentences_in_a_batch_do_not_interact():
    model = make_model()
    src = torch.tensor([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, PAD_ID]])
    tgt = torch.tensor([[BOS_ID, 10, 11], [BOS_ID, 12, PAD_ID]])
    both = model(src, tgt)
    alone = model(src[1:, :3], tgt[1:, :2])
    torch.testing.assert_close(both[1:, :2], alone, rtol=0, atol=1e-5)


def naive_attention(x, kv_source, attn: MultiHeadAttention, key_mask=None, causal=False):
    """Reference multi-head attention with explicit loops over heads, in float64."""
    d, h = attn.d_model, attn.n_heads
    w, b = attn.in_proj.weight.double(), attn.in_proj.bias.double()
    q = x.double() @ w[:d].T + b[:d]
    k = kv_source.double() @ w[d:2 * d].T + b[d:2 * d]
    v = kv_source.double() @ w[2 * d:].T + b[2 * d:]
    dh = d // h
    heads = []
    for i in range(h):
        sl = slice(i * dh, (i + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        if causal:
            lq, lk = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(lq, lk).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    out = torch.cat(heads, dim=-1)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


def test_attention_matches_naive_reference():
    torch.manual_seed(1)
    attn = MultiHeadAttention(24, 3, attn_dropout=0.0).eval()
    torch.nn.init.normal_(attn.in_proj.bias)
    x = torch.randn(2, 5, 24)
    memory = torch.randn(2, 7, 24)
    key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    # encoder-style self-attention with a padding mask
    self_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    got = attn(x, mask=self_mask[:, None, None, :])
    torch.testing.assert_close(got.double(), naive_attention(x, x, attn, self_mask),
                               rtol=1e-5, atol=1e-5)
    # masked decoder self-attention
    got = attn(x, is_causal=True)
    torch.testing.assert_close(got.double(), naive_attention(x, x, attn, causal=True),
                               rtol=1e-5, atol=1e-5)
    # cross-attention
    got = attn(x, mask=key_mask[:, None, None, :], memory_kv=attn.project_kv(memory))
    torch.testing.assert_close(got.double(), naive_attention(x, memory, attn, key_mask),
                               rtol=1e-5, atol=1e-5)


def test_incremental_decoding_matches_full_forward():
    model = make_model()
    src = torch.cat([random_tokens(3, 6), torch.full((3, 1), EOS_ID)], dim=1)
    src[2, 4:] = PAD_ID
    tgt = random_tokens(3, 8)
    tgt[:, 0] = BOS_ID
    full = torch.log_softmax(model.logits(model(src, tgt)), dim=-1)
    cached = model.start_decoding(src, use_cache=True)
    uncached = model.start_decoding(src, use_cache=False)
    for t in range(1, 9):
        prefix = tgt[:, :t]
        step_cached = model.decode_step(prefix, cached)
        step_uncached = model.decode_step(prefix, uncached)
        torch.testing.assert_close(step_cached, full[:, t - 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(step_uncached, full[:, t - 1], rtol=0, atol=1e-4)


def test_tied_and_untied_embeddings():
    tied = make_model()
    assert tied.src_embed is tied.tgt_embed
    assert tied.output is None
    untied = make_model(tie_embeddings=False)
    assert untied.src_embed is not untied.tgt_embed
    assert tied.num_parameters() < untied.num_parameters()
    src, tgt = random_tokens(2, 5), random_tokens(2, 4)
    assert untied.logits(untied(src, tgt)).shape == (2, 4, VOCAB)
    with pytest.raises(ValueError):
        Transformer(ModelConfig(d_model=32, n_heads=4), 50, 60)


def test_embeddings_are_scaled_and_positions_sinusoidal():
    table = sinusoidal_positions(16, 8)
    assert torch.equal(table[0, 0::2], torch.zeros(4))
    assert torch.equal(table[0, 1::2], torch.ones(4))
    torch.testing.assert_close(table[3, 0], torch.tensor(math.sin(3.0)))
    model = make_model()
    x = model.tgt_embed.weight
    assert abs(x[4:].std().item() * math.sqrt(32) - 1.0) < 0.1


def test_too_long_input_is_a_clear_error():
    model = make_model(max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        model(random_tokens(1, 9), random_tokens(1, 3))


def test_dropout_drops_p_of_the_values_and_keeps_the_expectation():
    from tinyt.model import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.3).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.003
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / (65536 - round(0.3 * 65536))))
    assert abs(y.mean().item() - 1.0) < 0.005  # the expectation is the input's
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient: the same mask, the same scale
    assert not torch.equal(dropout(x), dropout(x))  # a fresh mask every call
    torch.manual_seed(5)
    first = dropout(x)
    torch.manual_seed(5)
    assert torch.equal(first, dropout(x))  # masks come from the seeded generator
    assert dropout.eval()(x) is x and Dropout(0.0).train()(x) is x


def test_attention_dropout_in_training_keeps_the_masks_and_the_expectation():
    """With attention dropout on (training, where the CPU writes attention out instead of using
    SDPA's math path): the causal and padding masks still hide what they hide, a dropped
    probability changes the output, and the average over many masks is the eval output."""
    torch.manual_seed(3)
    attn = MultiHeadAttention(16, 2, attn_dropout=0.5)
    x = torch.randn(2, 6, 16)
    expected_causal = attn.eval()(x, is_causal=True)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    expected_masked = attn(x, mask=key_mask)
    attn.train()

    def seeded(inputs, **kwargs):
        torch.manual_seed(11)
        return attn(inputs, **kwargs)

    later = x.clone()
    later[:, 4:] = torch.randn(2, 2, 16)
    # Causal: positions 0..3 never see positions 4 and 5, whatever the mask drew.
    torch.testing.assert_close(seeded(later, is_causal=True)[:, :4],
                               seeded(x, is_causal=True)[:, :4], rtol=0, atol=1e-6)
    padded = x.clone()
    padded[1, 4:] = torch.randn(2, 16)
    # Padding: the second sentence's keys 4 and 5 are masked, so changing them moves only
    # their own query rows (which are outputs nobody reads).
    torch.testing.assert_close(seeded(padded, mask=key_mask)[1, :4],
                               seeded(x, mask=key_mask)[1, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(seeded(x, is_causal=True), expected_causal)
    torch.manual_seed(0)
    for kwargs, expected in (({"is_causal": True}, expected_causal),
                             ({"mask": key_mask}, expected_masked)):
        with torch.no_grad():
            mean = torch.stack([attn(x, **kwargs) for _ in range(4000)]).mean(0)
        # 4,000 draws: the Monte Carlo error is about 0.01 here.
        torch.testing.assert_close(mean, expected, rtol=0, atol=0.06)
