"""The encoder-decoder Transformer, readable top to bottom.

Shapes: B batch, S source length, T target length, D d_model, H heads, Dh = D / H, V vocab.
Token id 0 is padding (see tinyt.tokenizer); source sequences end with <eos>, target inputs
start with <bos>. Padding is always on the right.

Incremental decoding (tinyt.search) goes through `start_decoding` and `decode_step`: the
decoder's self-attention keys/values are cached per layer and grow one position a step, and the
cross-attention keys/values are computed once per source sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyt.config import ModelConfig
from tinyt.tokenizer import PAD_ID


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention: encoder self-attention, masked decoder
    self-attention and encoder-decoder cross-attention are all this one module.

    The query/key/value projections are one (3D, D) matrix: self-attention applies it in one
    matmul, cross-attention applies its first third to the queries and the rest to the memory.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.d_model = d_model
        self.attn_dropout = attn_dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(attn_dropout)
        # Set to a list to record attention probabilities (see `forward`); None, the default,
        # keeps the fused SDPA kernel, which never materialises them (except in CPU training
        # with attention dropout, where `forward` writes attention out for speed).
        self.capture: list[torch.Tensor] | None = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, D) -> (B, H, L, Dh)
        b, length, _ = x.shape
        return x.view(b, length, self.n_heads, -1).transpose(1, 2)

    @staticmethod
    def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool) -> torch.Tensor:
        """softmax(QK^T / sqrt(Dh)) with SDPA's masking: q (B, H, L, Dh), k (B, H, S, Dh) ->
        float32 (B, H, L, S). Every row keeps at least one key (<eos> in the source, the
        query's own position under the causal mask), so no row is all -inf."""
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
        if is_causal:
            # SDPA's is_causal is the top-left aligned lower triangle: query i sees keys <= i.
            length, keys = scores.shape[-2:]
            future = torch.ones(length, keys, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the memory for cross-attention: (B, S, D) -> 2 x (B, H, S, Dh)."""
        w = self.in_proj.weight[self.d_model:]
        bias = self.in_proj.bias[self.d_model:]
        k, v = F.linear(memory, w, bias).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, L, D) queries -> (B, L, D).

        Self-attention when `memory_kv` is None, else cross-attention to those keys/values.
        mask: bool, broadcastable to (B, H, L, S), True where attention is allowed.
        cache: for incremental self-attention, a list holding [keys, values] (B, H, t, Dh) of
            the earlier positions (empty at the first step); this call's keys/values are
            appended, and queries attend to all cached positions.
        When `self.capture` is a list, the attention probabilities (B, H, L, S) are computed
        explicitly, appended to it and used for the output, which then equals the SDPA path's
        within float rounding; masked positions get exactly 0.
        """
        # On a CPU, SDPA with dropout runs its unfused math path and draws the mask with
        # bernoulli_, one generator call per element; the same computation written out here
        # with tinyt's Dropout is 10-30 % faster forward + backward at Multi30k's shapes.
        explicit = self.capture is not None or (
            self.training and self.attn_dropout > 0 and x.device.type == "cpu")
        if memory_kv is None:
            q, k, v = self.in_proj(x).chunk(3, dim=-1)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            if cache is not None:
                if cache:
                    k = torch.cat([cache[0], k], dim=2)
                    v = torch.cat([cache[1], v], dim=2)
                cache[:] = [k, v]
        else:
            w = self.in_proj.weight[: self.d_model]
            bias = self.in_proj.bias[: self.d_model]
            q = self._split_heads(F.linear(x, w, bias))
            k, v = memory_kv
        if not explicit:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.attn_dropout if self.training else 0.0,
            )
        else:
            probs = self._probabilities(q, k, mask, is_causal)
            if self.capture is not None:
                self.capture.append(probs.detach())
            out = self.dropout(probs).to(v.dtype) @ v
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.d_model))


class Dropout(nn.Module):
    """nn.Dropout, with the mask drawn four times faster on a CPU.

    torch's CPU dropout draws one number from its generator per element: 12 ms for the
    (B, T, D) activations of a 4,096-token batch at D = 256, and with the FFN's and the
    embeddings' dropouts about a sixth of a training step. Here each 64-bit draw gives four
    16-bit uniform numbers, so the generator runs a quarter as often (3 ms for the same mask).
    The drop rate is p rounded to a multiple of 1/65536 and kept values are scaled by
    1 / (1 - that rate), so the expectation is exactly the input's. The draws come from torch's
    default generator, seeded and checkpointed like every other random number in training.
    Elsewhere (CUDA) F.dropout's fused kernel is used.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        dropped = round(self.p * 65536)  # of the 65536 values an int16 draw takes
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
        return x * (keep * (65536 / (65536 - dropped))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(D, F) -> activation -> dropout -> Linear(F, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.dropout = Dropout(config.act_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class Residual(nn.Module):
    """Residual connection with LayerNorm around a sublayer.

    Pre-norm: x + dropout(f(LN(x))), stable without warmup tricks; post-norm (original paper):
    LN(x + dropout(f(x))).
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.ffn = FeedForward(config)
        self.res_attn = Residual(config.d_model, config.dropout, config.pre_norm)
        self.res_ffn = Residual(config.d_model, config.dropout, config.pre_norm)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, D); src_mask: (B, 1, 1, S), True at real tokens."""
        x = self.res_attn(x, lambda h: self.self_attn(h, mask=src_mask))
        return self.res_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.ffn = FeedForward(config)
        self.res_self = Residual(config.d_model, config.dropout, config.pre_norm)
        self.res_cross = Residual(config.d_model, config.dropout, config.pre_norm)
        self.res_ffn = Residual(config.d_model, config.dropout, config.pre_norm)

    def forward(
        self,
        y: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        src_mask: torch.Tensor,
        cache: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """y: (B, T, D) -> (B, T, D).

        Without a cache, self-attention is causal over all T positions. Target padding needs no
        mask of its own: it sits to the right of every real token, so the causal mask already
        keeps real positions from seeing it (padded positions' outputs are never used).
        With a cache, y holds only the newest position(s) and attends to everything cached.
        """
        y = self.res_self(y, lambda h: self.self_attn(h, is_causal=cache is None, cache=cache))
        y = self.res_cross(y, lambda h: self.cross_attn(h, mask=src_mask, memory_kv=memory_kv))
        return self.res_ffn(y, self.ffn)


def sinusoidal_positions(max_positions: int, d_model: int) -> torch.Tensor:
    """(max_positions, D): sin on even, cos on odd dimensions, wavelengths 2π … 10000·2π."""
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


@dataclass
class DecoderState:
    """What incremental decoding carries between steps, one row per hypothesis.

    memory_kv: per decoder layer, cross-attention (keys, values), each (N, H, S, Dh).
    src_mask: (N, 1, 1, S). self_cache: per layer [keys, values] (N, H, t, Dh), or None when
    decoding without a cache (each step then re-runs the decoder over the whole prefix).
    """

    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask: torch.Tensor
    self_cache: list[list[torch.Tensor]] | None

    def select(self, rows: torch.Tensor, cross: bool = True) -> DecoderState:
        """Keep/reorder hypotheses: row i of the result is row rows[i] of this state.

        cross=False leaves the cross-attention tensors alone; valid only when every new row
        comes from a row of the same source sentence in the same place (beam reordering).
        """
        memory_kv, src_mask = self.memory_kv, self.src_mask
        if cross:
            memory_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in memory_kv]
            src_mask = src_mask.index_select(0, rows)
        cache = None
        if self.self_cache is not None:
            cache = [[t.index_select(0, rows) for t in layer] for layer in self.self_cache]
        return DecoderState(memory_kv, src_mask, cache)


class Transformer(nn.Module):
    """Encoder-decoder Transformer for translation.

    forward(src, tgt_in) -> decoder hidden states; `logits` maps them to the vocabulary (kept
    apart so training can project only the non-padding positions).
    """

    def __init__(self, config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        if config.tie_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError("tied embeddings need one shared vocabulary")
        self.config = config
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        d = config.d_model
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d, padding_idx=PAD_ID)
        self.src_embed = (self.tgt_embed if config.tie_embeddings
                          else nn.Embedding(src_vocab_size, d, padding_idx=PAD_ID))
        self.register_buffer("positions", sinusoidal_positions(config.max_positions, d),
                             persistent=False)
        self.embed_dropout = Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.dec_layers))
        # Pre-norm leaves the residual stream un-normalised: normalise once at the end.
        self.enc_norm = nn.LayerNorm(d) if config.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if config.pre_norm else nn.Identity()
        self.output = None if config.tie_embeddings else nn.Linear(d, tgt_vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                if "embed" in name:
                    # std D^-0.5: scaled by √D at the input they have unit variance, and tied to
                    # the output they give logits of unit scale.
                    nn.init.normal_(p, std=self.config.d_model ** -0.5)
                else:
                    nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.tgt_embed.weight[PAD_ID].zero_()
            self.src_embed.weight[PAD_ID].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # tokens: (B, L) -> (B, L, D)
        length = tokens.size(1)
        if offset + length > self.config.max_positions:
            raise ValueError(f"sequence of {offset + length} tokens exceeds model.max_positions="
                             f"{self.config.max_positions}")
        x = table(tokens) * math.sqrt(self.config.d_model)
        return self.embed_dropout(x + self.positions[offset: offset + length])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (B, S) ids -> memory (B, S, D), src_mask (B, 1, 1, S) True at real tokens."""
        src_mask = (src != PAD_ID)[:, None, None, :]
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. src: (B, S), tgt_in: (B, T) starting with <bos> -> (B, T, D)."""
        memory, src_mask = self.encode(src)
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y = layer(y, layer.cross_attn.project_kv(memory), src_mask)
        return self.dec_norm(y)

    @torch.no_grad()
    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor
                       ) -> dict[str, list[torch.Tensor]]:
        """Attention probabilities of a teacher-forced pass (in eval mode, so no dropout).

        src: (B, S) ids ending with <eos>; tgt_in: (B, T) starting with <bos>. Returns float32
        tensors, one per layer, first layer first:
            "encoder_self": enc_layers x (B, H, S, S)
            "decoder_self": dec_layers x (B, H, T, T), exactly 0 above the diagonal
            "cross":        dec_layers x (B, H, T, S), exactly 0 at source padding
        Each row sums to 1 over the keys (the last dimension).
        """
        maps: dict[str, list[torch.Tensor]] = {"encoder_self": [], "decoder_self": [],
                                               "cross": []}
        # Modules of one kind share a list: layers run in order, so index i is layer i.
        modules = ([(layer.self_attn, maps["encoder_self"]) for layer in self.encoder]
                   + [(layer.self_attn, maps["decoder_self"]) for layer in self.decoder]
                   + [(layer.cross_attn, maps["cross"]) for layer in self.decoder])
        was_training = self.training
        self.eval()
        try:
            for module, sink in modules:
                module.capture = sink
            self(src, tgt_in)
        finally:
            for module, _ in modules:
                module.capture = None
            self.train(was_training)
        return maps

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) unnormalised scores over the target vocabulary."""
        if self.output is None:
            return F.linear(hidden, self.tgt_embed.weight)
        return self.output(hidden)

    def log_probs(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> (B, T, V) float32 log-probabilities
        of each next target token."""
        return torch.log_softmax(self.logits(self(src, tgt_in)).float(), dim=-1)

    def start_decoding(self, src: torch.Tensor, use_cache: bool = True) -> DecoderState:
        """Encode src (B, S) and precompute each layer's cross-attention keys/values."""
        memory, src_mask = self.encode(src)
        memory_kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        cache = [[] for _ in self.decoder] if use_cache else None
        return DecoderState(memory_kv, src_mask, cache)

    def decode_step(self, prefix: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """prefix: (N, t) tokens so far (<bos> first) -> log-probabilities (N, V) of token t+1.

        With a cache only the newest token is run through the decoder (its position is t-1);
        without one, the whole prefix is, under the causal mask. Both give the same result.
        """
        if state.self_cache is not None:
            y = self._embed(self.tgt_embed, prefix[:, -1:], offset=prefix.size(1) - 1)
            for layer, kv, cache in zip(self.decoder, state.memory_kv, state.self_cache):
                y = layer(y, kv, state.src_mask, cache=cache)
        else:
            y = self._embed(self.tgt_embed, prefix)
            for layer, kv in zip(self.decoder, state.memory_kv):
                y = layer(y, kv, state.src_mask)
        hidden = self.dec_norm(y[:, -1])
        return torch.log_softmax(self.logits(hidden).float(), dim=-1)
