"""The Qwen2-architecture decoder (Qwen1.5, Qwen2, Qwen2.5, Qwen2.5-Coder), following HF Qwen2 semantics.

Module and parameter names equal the HF checkpoint names (model.layers.N.self_attn.q_proj.weight, ...), so
loading is a strict name match. The model computes logits; it never samples. Every op goes through the
model's Backends (models/backends.py), chosen once at load time; the torch ops are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_ref.config import QwenConfig
from qwen_ref.models.backends import TORCH, Backends
from qwen_ref.models.kv_cache import KVCache, RowCaches
from qwen_ref.models.rope import RotaryEmbedding
from qwen_ref.models.torch_ops import rope_sin


@dataclass
class Forward:
    """What every layer of one forward reads: positions, rotations, the cache, the ops, per-row adapters."""

    positions: torch.Tensor  # [B, T]
    cos: torch.Tensor  # [B, 1, T, D]: one rotation per row and position, shared by the heads
    sin: torch.Tensor  # [B, 1, T, D], its first half negated (torch_ops.rope)
    cache: KVCache | RowCaches | None
    ops: Backends
    lora: Any = None  # qwen_ref.lora.RowAdapters: each row's LoRA adapter, applied unmerged

    def linear(self, x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
        ys = self.ops.linear(x, layers)
        if self.lora is not None:
            ys = [self.lora.apply(layer, x, y) for layer, y in zip(layers, ys)]
        return ys


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        return fwd.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = fwd.linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        q, k = fwd.ops.rope_qk(q, k, fwd.cos, fwd.sin)

        if fwd.cache is None:
            out = fwd.ops.attention(q, k, v, fwd.positions, self.sliding_window, self.scaling)
        else:
            groups = fwd.cache.update(self.layer_idx, fwd.positions, k, v)
            out = fwd.ops.attend_cached(q, groups, fwd.positions, self.sliding_window, self.scaling)  # [B, H, T, D]
        return fwd.linear(out.transpose(1, 2).reshape(B, T, -1), self.o_proj)[0]  # [B, T, H*D] -> [B, T, hidden]


class MLP(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        gate, up = fwd.linear(x, self.gate_proj, self.up_proj)
        return fwd.linear(fwd.ops.silu_mul(gate, up), self.down_proj)[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        if fwd.ops.decode_layer is not None:  # the backend's one call for the whole layer, where it has one
            out = fwd.ops.decode_layer(self, x, fwd)
            if out is not None:
                return out
        # residual adds in the activation dtype, as HF (no float32 residual stream)
        h = x + self.self_attn(self.input_layernorm(x, fwd), fwd)
        return h + self.mlp(self.post_attention_layernorm(h, fwd), fwd)


class QwenModel(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, x: torch.Tensor, fwd: Forward, layers: slice = slice(None)) -> torch.Tensor:
        for layer in self.layers[layers]:
            x = layer(x, fwd)
        return x


@dataclass
class Pass:
    """One forward in progress: the hidden states after the first `done` layers. The engine runs a long prompt's
    chunk a few layers at a time between other requests' decode steps; the numbers are those of forward()."""

    fwd: Forward
    x: torch.Tensor  # [B, T, hidden]
    num_new: torch.Tensor  # [B]
    done: int = 0


class QwenForCausalLM(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = QwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.backends = TORCH  # qwen_ref.load sets the ones models/backends.py resolves

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache for this model's layers and heads, in its dtype and on its device."""
        weight = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity, dtype=weight.dtype, device=weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | RowCaches | None = None,
        num_new: torch.Tensor | None = None,
        last_only: bool = False,
        lora: Any = None,
        compute_logits: bool = True,
    ) -> torch.Tensor | None:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) in float32, float64 in float64 mode.

        Without a cache: a full causal forward over input_ids [B, T] at positions 0..T-1.
        With a cache: the T tokens continue each row at its own length. num_new [B] (default T for every row)
        says how many of them are real; the rest are right padding whose keys the row never reads, and the
        cache advances by num_new. last_only keeps the logits of each row's last real token.
        lora: a qwen_ref.lora.RowAdapters giving each row its own adapter (or none), applied unmerged.
        compute_logits=False only fills the cache (a prefill chunk before the prompt's last) and returns None.
        """
        p = self.begin(input_ids, cache, num_new, lora)
        self.run_layers(p)
        return self.end(p, last_only, compute_logits)

    def begin(self, input_ids: torch.Tensor, cache: KVCache | RowCaches | None = None,
              num_new: torch.Tensor | None = None, lora: Any = None) -> Pass:
        """A forward up to its first layer: embeddings, positions, rotations."""
        B, T = input_ids.shape
        device = input_ids.device
        if num_new is None:
            num_new = torch.full((B,), T, dtype=torch.long, device=device)
        if cache is None:
            positions = torch.arange(T, device=device).expand(B, T)
            seq_lens = num_new
        else:
            positions = cache.positions(T)
            seq_lens = cache.lengths + num_new
        cos, sin = self.model.rotary_emb(positions, seq_lens, self.lm_head.weight.dtype)
        fwd = Forward(positions, cos[:, None], rope_sin(sin)[:, None], cache, self.backends, lora)
        return Pass(fwd, self.model.embed_tokens(input_ids), num_new)  # x: [B, T, hidden]

    def run_layers(self, p: Pass, count: int | None = None) -> bool:
        """Run the pass's next `count` decoder layers (all that are left by default); True once all have run."""
        stop = len(self.model.layers) if count is None else min(len(self.model.layers), p.done + count)
        p.x = self.model(p.x, p.fwd, slice(p.done, stop))
        p.done = stop
        return stop == len(self.model.layers)

    def end(self, p: Pass, last_only: bool = False, compute_logits: bool = True) -> torch.Tensor | None:
        """The final norm and lm_head of a pass whose layers have all run; the cache advances here."""
        hidden = self.final_hidden(p)
        return self.logits(p, hidden, last_only) if compute_logits else None

    def final_hidden(self, p: Pass) -> torch.Tensor:
        """The final norm of a pass whose layers have all run, [B, T, hidden]; the cache advances here."""
        assert p.done == len(self.model.layers), "final_hidden() before every layer ran"
        hidden = self.model.norm(p.x, p.fwd)  # [B, T, hidden]
        if p.fwd.cache is not None:
            p.fwd.cache.advance(p.num_new)
        return hidden

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """lm_head over the final hidden states [B, T, hidden] (last_only: each row's last real token)."""
        if last_only:
            B = hidden.shape[0]
            last = (p.num_new - 1).clamp(min=0)
            hidden = hidden[torch.arange(B, device=hidden.device), last][:, None]  # [B, 1, hidden]
        logits = p.fwd.linear(hidden, self.lm_head)[0]
        # numerics: lm_head runs in the model dtype (as HF); logits are then upcast for the sampler
        return logits if logits.dtype == torch.float64 else logits.float()
