"""A GPT-style transformer from PyTorch primitives, driven by one `ModelConfig`.

Every variant the presets need is a setting: LayerNorm or RMSNorm, learned or rotary positions,
GELU, SwiGLU or ReLU^2, multi-head / grouped-query / multi-query attention, full or sliding-window
causal attention, tied or separate output head, and the small-model options QK-norm, logit
soft-capping, zero-initialised output projections, value embeddings and mixing the embedded input
back into every block's input. A `KVCache` makes generation cost one token
per step. With targets, the loss is computed by `tinystories.loss.linear_cross_entropy`, which fuses
the head with the cross-entropy and never holds the (B, T, V) logits.

Shapes in comments: B batch, T new tokens, S key slots (cached + new), C d_model,
H query heads, K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinystories.config import ModelConfig
from tinystories.devices import start_mkl_on_this_thread
from tinystories.loss import linear_cross_entropy


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with `model` in eval mode (no dropout), then give it back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class KVCache:
    """Keys and values of every layer, preallocated: `batch_size` rows of `max_length` slots each.

    Two ways to fill it. A forward pass with the cache (a prefill, or step-by-step decoding of a
    whole batch) writes its T new tokens of every row at slots [length, length + T) and advances
    `length`. A static decode step (`tinystories.decoding`) instead passes a (B,) tensor of
    positions as `start`: row b's one new token goes to slot positions[b], and attention reads all
    `max_length` slots under a mask, so the step's shapes never change and it compiles once.
    Each layer's keys and values are tensors of their own, so such a write mutates a whole graph
    input in place (a slice of one big tensor would make the compiled step copy the whole cache).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, config.kv_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.rows = torch.arange(batch_size, device=device)  # (B,) for per-row writes
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def write(self, layer: int, start: int | torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Store (B, K, T, D) keys/values at slots [start, start+T) and return the filled slots (B, K, S, D);
        or, with a (B,) tensor `start` and T = 1, row b's token at slot start[b], returning every slot."""
        if isinstance(start, torch.Tensor):
            self.keys[layer][self.rows, :, start] = keys[:, :, 0]  # (B, K, D) at (row, :, start[row])
            self.values[layer][self.rows, :, start] = values[:, :, 0]
            return self.keys[layer], self.values[layer]
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def row(self, index: int) -> "KVCache":
        """A one-row cache (length 0) whose tensors are views of row `index`: a prefill through it fills that row."""
        view = KVCache.__new__(KVCache)
        view.keys = [layer[index:index + 1] for layer in self.keys]
        view.values = [layer[index:index + 1] for layer in self.values]
        view.rows = self.rows[:1]
        view.max_length, view.length = self.max_length, 0
        return view

    def prefix(self, slots: int) -> "KVCache":
        """A view of the first `slots` slots of every row: an eager decode step need not read the rest."""
        view = KVCache.__new__(KVCache)
        view.keys = [layer[:, :, :slots] for layer in self.keys]
        view.values = [layer[:, :, :slots] for layer in self.values]
        view.rows, view.max_length, view.length = self.rows, slots, 0
        return view

    def reset(self) -> None:
        self.length = 0


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), 'rotate halves' layout as in Hugging Face Llama.

    Feature i of the first half and feature i of the second half form a pair (x_i, x_{i+D/2}) rotated by
    angle position * theta^(-2i/D). Angles are computed in float64 once, for the first `max_positions`.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        start_mkl_on_this_thread()  # often the process's first MKL call, and a 2-thread one
        cos, sin = self._tables(torch.arange(max_positions, dtype=torch.float64))
        self.register_buffer("cos_table", cos, persistent=False)  # (max_positions, D/2)
        self.register_buffer("sin_table", sin, persistent=False)

    def _tables(self, positions: torch.Tensor):
        """float64 positions (...) -> float32 cos, sin (..., D/2)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim
        angles = positions[..., None] * (1.0 / self.theta ** exponents)  # (..., D/2)
        return angles.cos().float(), angles.sin().float()

    def forward(self, start: int, length: int, position_ids: torch.Tensor | None = None):
        """cos, sin (T, 1, D/2) for positions [start, start+T), or (B, T, 1, D/2) for position_ids (B, T).

        Shaped to broadcast against the (B, T, heads, D/2) halves of queries and keys.
        """
        if position_ids is None:
            if start + length <= self.cos_table.shape[0]:
                # The training path: a slice is a view, with no gather and no host-device sync.
                cos, sin = self.cos_table[start:start + length], self.sin_table[start:start + length]
            else:  # beyond the precomputed table: compute directly
                positions = torch.arange(start, start + length, dtype=torch.float64, device=self.cos_table.device)
                cos, sin = self._tables(positions)
        elif int(position_ids.max()) < self.cos_table.shape[0]:
            cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]  # (T|B,T, D/2)
        else:
            cos, sin = self._tables(position_ids.double())
        return cos.unsqueeze(-2), sin.unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) of x (..., D) by the angle whose cos/sin (..., D/2) are given."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (K divides H) and optional RoPE."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One matrix for queries, keys and values: one matmul instead of three.
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        # how much of the token's own value embedding this layer adds to its values
        self.value_weight = nn.Parameter(torch.ones(())) if config.value_embedding else None

    def forward(self, x, rotary, mask, cache: KVCache | None, start: int,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        # split (not slicing) so that backward concatenates the gradients instead of zero-filling buffers
        qk, v = self.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)  # (B, T, H+K, D), (B, T, K, D)
        if self.qk_norm:  # unit RMS per head: attention logits stay bounded whatever the weights grow to
            qk = F.rms_norm(qk, (D,))
        if rotary is not None:
            # Rotate queries and keys together in the (B, T, heads, D) layout the matmul produced:
            # one pass over rows of contiguous heads instead of two over transposed views.
            qk = apply_rotary(qk, *rotary)
        if value_embedding is not None:  # (B, T, K, D): the values also carry which token this is
            v = v + self.value_weight * value_embedding
        q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = v.transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.write(self.layer_index, start, k, v)  # (B, K, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and cache is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=K != H,  # shared key/value heads are broadcast inside the kernel, not copied
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (proj(gelu(fc))), SwiGLU (proj(silu(gate) * up)) or ReLU^2
    (proj(relu(fc)^2))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.ffn_dim
        # SwiGLU's gate and up projections share one matrix: rows [0, hidden) gate, [hidden, 2*hidden) up.
        self.fc = nn.Linear(config.d_model, hidden * (2 if self.kind == "swiglu" else 1), bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer_index)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, mask, cache, start, value_embedding=None):
        x = x + self.dropout(self.attn(self.norm1(x), rotary, mask, cache, start, value_embedding))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.position == "learned" else None
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.context_length)
                       if config.position == "rope" else None)
        # Value embeddings (modded-nanogpt): parameters at no matmul cost, in every layer's values.
        self.value_emb = (nn.Embedding(config.vocab_size, config.kv_heads * config.head_dim)
                          if config.value_embedding else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Input mixing (modded-nanogpt): block i reads stream_weight[i] * x + input_weight[i] * x0.
        self.stream_weight = nn.Parameter(torch.ones(config.n_layer)) if config.input_mix else None
        self.input_weight = nn.Parameter(torch.zeros(config.n_layer)) if config.input_mix else None
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)
        (or zero, with `zero_init_proj`: every block then starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        # Each block adds two outputs to the residual stream; keep its variance from growing with depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        if self.config.input_mix:  # every block starts by reading the stream alone
            nn.init.ones_(self.stream_weight)
            nn.init.zeros_(self.input_weight)
        for block in self.blocks:
            if block.attn.value_weight is not None:
                nn.init.ones_(block.attn.value_weight)
            for projection in (block.attn.proj, block.mlp.proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(projection.weight)
                else:
                    nn.init.normal_(projection.weight, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors counted once

    def value_embeddings(self, idx: torch.Tensor) -> torch.Tensor | None:
        """idx (B, T) -> the tokens' value embeddings (B, T, K, D), or None when the model has none."""
        if self.value_emb is None:
            return None
        return self.value_emb(idx).view(*idx.shape, self.config.kv_heads, self.config.head_dim)

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_length or self.config.context_length,
                       device=device or weight.device, dtype=dtype or weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (None, mean loss).

        targets (B, T): next-token ids, -1 where no loss is wanted (padding). The loss is computed
        without the logits (`tinystories.loss`), so none are returned with it.
        cache, position_ids, key_padding_mask: as in `hidden_states`.
        """
        x = self.hidden_states(idx, cache=cache, position_ids=position_ids, key_padding_mask=key_padding_mask)
        if targets is not None:
            B, T = idx.shape
            return None, linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                              self.config.logit_softcap)
        return self.logits(x), None

    def hidden_states(self, idx: torch.Tensor, *, cache: KVCache | None = None,
                      position_ids: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> the final hidden states (B, T, C), normed, that the head turns into logits.

        cache: attend to earlier tokens stored in it and append these T tokens.
        position_ids (T,) or (B, T): positions of the new tokens (default: slot indices start..start+T-1).
        key_padding_mask (B, S): True for real tokens, False for padding, over all slots up to S.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} tokens; cannot add {T} to {start}")

        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            if position_ids is None:
                if start + T > self.config.context_length:
                    raise ValueError(f"position {start + T - 1} is beyond the learned positions "
                                     f"(context_length {self.config.context_length})")
                x = x + self.pos_emb.weight[start:start + T]  # (T, C): a slice, not a gather
            else:
                if int(position_ids.max()) >= self.config.context_length:
                    raise ValueError(f"position {int(position_ids.max())} is beyond the learned positions "
                                     f"(context_length {self.config.context_length})")
                x = x + self.pos_emb(position_ids)
        x = self.dropout(x)
        rotary = self.rotary(start, T, position_ids) if self.rotary is not None else None
        mask = self._attention_mask(T, start, key_padding_mask, cache is not None, idx.device)

        x = self.run_blocks(x, idx, rotary, mask, cache, start)
        if cache is not None:
            cache.length = start + T
        return self.norm_f(x)  # (B, T, C)

    def run_blocks(self, x: torch.Tensor, idx: torch.Tensor, rotary, mask, cache: KVCache | None,
                   start: int | torch.Tensor) -> torch.Tensor:
        """The blocks over the embedded tokens x (B, T, C) of ids idx (B, T) -> the last block's output (B, T, C)."""
        value_embedding = self.value_embeddings(idx)  # (B, T, K, D) or None
        embedded = x
        for i, block in enumerate(self.blocks):
            if self.stream_weight is not None:
                x = self.stream_weight[i] * x + self.input_weight[i] * embedded
            x = block(x, rotary, mask, cache, start, value_embedding)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head: final hidden states (..., C) -> next-token logits (..., V), soft-capped if configured."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _attention_mask(self, T: int, start: int, key_padding_mask, cached: bool, device) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, S) mask, True = may attend; None when plain causal attention suffices."""
        S = start + T
        window = self.config.sliding_window
        window_matters = window is not None and window < S
        if key_padding_mask is None and not window_matters and (not cached or T == 1):
            return None  # plain causal (or a single new token that may see every slot)
        query_slots = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        key_slots = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = key_slots <= query_slots  # (T, S)
        if window_matters:
            allowed = allowed & (key_slots > query_slots - window)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :S].bool()
            # A padding query may see no key at all; let every query see itself so softmax stays finite.
            allowed = allowed | (key_slots == query_slots)[None, None]
        return allowed
