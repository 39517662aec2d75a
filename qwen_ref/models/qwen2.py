"""The Qwen2-architecture decoder (Qwen1.5, Qwen2, Qwen2.5, Qwen2.5-Coder), following HF Qwen2 semantics.

Module and parameter names equal the HF checkpoint names (model.layers.N.self_attn.q_proj.weight, ...), so
loading is a strict name match. The model computes logits; it never samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_ref.config import QwenConfig
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.models.rope import RotaryEmbedding


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) that can route decode steps through the batch-invariant CPU kernel."""

    invariant = False  # set by use_invariant_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self)[0]


def project(x: torch.Tensor, *layers: Linear) -> list[torch.Tensor]:
    """x through several Linear layers that read it (q/k/v, gate/up). On the invariant path a decode step (one
    token per row) is one kernel call for all of them; prefill keeps BLAS, whose speed on long inputs the kernel
    lacks. Each output is the same as its layer's alone."""
    if layers[0].invariant and x.dim() == 3 and x.shape[1] == 1:
        from qwen_ref_kernels.invariant_linear import linears_unchecked

        B = x.shape[0]
        ys = linears_unchecked(x.view(B, -1), [m.weight for m in layers], [m.bias for m in layers])  # [B, N_i]
        return [y.view(B, 1, -1) for y in ys]  # [B, 1, N_i]
    return [F.linear(x, m.weight, m.bias) for m in layers]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.triton = False  # set by use_kernels(): the Triton kernel instead of the PyTorch lines below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton and x.dtype != torch.float64:
            from qwen_ref_kernels import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # numerics: normalise in float32, cast back to the input dtype, then multiply by the weight (HF order)
        h = x.float() if x.dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(q_pos: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S]: query at position p sees key j iff j <= p (and j > p - window when sliding).

    Each row has its own positions, so the causal mask is aligned to where each row is, never top-left.
    """
    k_pos = torch.arange(num_keys, device=q_pos.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return allowed[:, None]


def key_runs(num_keys: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first row, end row, keys) for each run of consecutive rows that hold the same number of keys."""
    runs: list[tuple[int, int, int]] = []
    for row, n in enumerate(num_keys.tolist()):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], row + 1, n)
        else:
            runs.append((row, row + 1, n))
    return runs


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
        self.q_proj = Linear(config.hidden_size, q_out, bias=True)
        self.k_proj = Linear(config.hidden_size, kv_out, bias=True)
        self.v_proj = Linear(config.hidden_size, kv_out, bias=True)
        self.o_proj = Linear(q_out, config.hidden_size, bias=False)
        self.triton = False  # set by use_kernels(): Triton flash attention / flash decoding
        self.invariant = False  # set by use_invariant_linear(): batched decode with each row's arithmetic alone

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        masks: dict,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]: one rotation per row and position
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if cache is not None:
            num_keys = cache.write(self.layer_idx, positions, k, v)
            k = cache.k[self.layer_idx][:, :, :num_keys]  # [B, KV, S, D]
            v = cache.v[self.layer_idx][:, :, :num_keys]
        if self.triton and self.sliding_window is None and q.dtype != torch.float64:
            out = self._triton(q, k, v, positions, cache is not None)  # [B, H, T, D]
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*D]
        S = k.shape[2]
        if self.sliding_window not in masks:  # one mask per window size, shared by the layers of a forward
            masks[self.sliding_window] = attention_mask(positions, S, self.sliding_window)
        mask = masks[self.sliding_window]
        if self.invariant and T == 1 and B > 1:
            # exact batched decode: each run of rows that hold the same number of keys attends as one batch over
            # exactly those keys, which is the arithmetic each row gets alone (a batched matmul computes its
            # batch entries independently; padded key columns would change the sums' lengths)
            if "runs" not in masks:
                masks["runs"] = key_runs(positions[:, 0] + 1)
            out = torch.cat([self._attend(q[a:b], k[a:b, :, :n], v[a:b, :, :n], mask[a:b, :, :, :n])
                             for a, b, n in masks["runs"]])
        else:
            out = self._attend(q, k, v, mask)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*D]

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        B, _, T, _ = q.shape
        S = k.shape[2]
        # GQA: query head i reads KV head i // G. The G query heads of a KV head are stacked along the
        # query axis, so one plain batched matmul per KV head serves them, with no repeated keys.
        G = self.num_heads // self.num_kv_heads
        q = q.reshape(B, self.num_kv_heads, G * T, self.head_dim)  # [B, KV, G*T, D] (a view: H = KV*G)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling  # [B, KV, G*T, S]
        scores = scores.view(B, self.num_kv_heads, G, T, S)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, T, S] -> [B, 1, 1, T, S]
        # numerics: softmax in float32 (float64 in float64 mode), probabilities cast back before P @ V (HF eager)
        softmax_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        probs = F.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
        out = torch.matmul(probs.view(B, self.num_kv_heads, G * T, S), v)  # [B, KV, G*T, D]
        return out.view(B, self.num_heads, T, self.head_dim)  # [B, H, T, D]

    def _triton(self, q, k, v, positions, cached: bool) -> torch.Tensor:
        from qwen_ref_kernels import attention, decode_attention

        if not cached:
            return attention(q, k, v, causal=True)
        if q.shape[2] == 1:  # decode: each row reads its own number of cached keys
            return decode_attention(q, k, v, positions[:, 0] + 1)
        # prefill after a cached prefix: row b's queries are the last T of its positions[:, -1] + 1 keys
        return attention(q, k, v, causal=True, kv_lens=positions[:, -1] + 1)


class MLP(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, masks, cache):
        # residual adds in the activation dtype, as HF (no float32 residual stream)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, masks, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenModel(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, positions, seq_lens, cache):
        x = self.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = self.rotary_emb(positions, seq_lens, x.dtype)
        masks: dict = {}  # per forward: attention mask per window size, and the rows' key runs
        for layer in self.layers:
            x = layer(x, cos, sin, positions, masks, cache)
        return self.norm(x)


class QwenForCausalLM(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = QwenModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_kernels(self, triton: bool) -> None:
        """Route RMSNorm and attention through the Triton kernels (qwen_ref_kernels) or the PyTorch code.
        float64 and sliding-window layers always take the PyTorch code."""
        for m in self.modules():
            if isinstance(m, RMSNorm | Attention):
                m.triton = triton

    def use_invariant_linear(self, on: bool) -> None:
        """Decode steps through the batch-invariant CPU linear (qwen_ref_kernels.invariant_linear), and batched
        decode attention per run of equal-length rows: a row's logits then do not depend on the batch it is in."""
        if on:
            from qwen_ref_kernels.invariant_linear import SUPPORTED_WEIGHT_DTYPES
        for name, m in self.named_modules():
            if on and isinstance(m, Linear):
                w = m.weight
                if w.device.type != "cpu" or w.dtype not in SUPPORTED_WEIGHT_DTYPES or not w.is_contiguous():
                    raise ValueError(f"use_invariant_linear: {name}.weight is {w.dtype} on {w.device}"
                                     f"{'' if w.is_contiguous() else ', not contiguous'}; the kernel takes "
                                     "contiguous float32 or bfloat16 CPU weights")
        for m in self.modules():
            if isinstance(m, Linear | Attention):
                m.invariant = on

    @property
    def invariant_decode(self) -> bool:
        return self.lm_head.invariant

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        num_new: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) in float32, float64 in float64 mode.

        Without a cache: a full causal forward over input_ids [B, T] at positions 0..T-1.
        With a cache: the T tokens continue each row at its own length. num_new [B] (default T for every row)
        says how many of them are real; the rest are right padding whose keys the row never reads, and the
        cache advances by num_new. last_only keeps the logits of each row's last real token.
        """
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
        hidden = self.model(input_ids, positions, seq_lens, cache)  # [B, T, hidden]
        if cache is not None:
            cache.advance(num_new)
        if last_only:
            last = (num_new - 1).clamp(min=0)
            hidden = hidden[torch.arange(B, device=device), last][:, None]  # [B, 1, hidden]
        logits = self.lm_head(hidden)
        # numerics: lm_head runs in the model dtype (as HF); logits are then upcast for the sampler
        return logits if logits.dtype == torch.float64 else logits.float()
