"""Rotary position embedding frequencies for the rope types Qwen2 checkpoints use.

Numerics follow HF transformers: inverse frequencies are computed in float32 (they define the model's
positions), angles and cos/sin in float32 and then cast to the activation dtype, and the attention factor
multiplies both cos and sin. Float64 mode computes the angles and cos/sin in float64 from the same float32
frequencies, so that it is a ground truth with no float32 step left in it.
"""

from __future__ import annotations

import math

import torch

from qwen_ref.config import QwenConfig, RopeConfig


def _base_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    # float32 exponent, as HF: base ** (arange(0, dim, 2) / dim)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def static_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [dim/2], attention_factor) for a forward whose positions stay below max_pos."""
    if rope.rope_type == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        # At or below max_pos the NTK base is unchanged: HF evaluates its formula with seq_len = max_pos.
        base = rope.theta * ((rope.factor * max_pos / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    raise AssertionError(rope.rope_type)


def dynamic_inv_freq(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK frequencies for a sequence of seq_len > max_pos positions.

    HF passes seq_len as an int64 tensor here, so the NTK base is computed in float32; we do the same.
    """
    n = torch.tensor(seq_len, dtype=torch.int64)
    base = rope.theta * ((rope.factor * n / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    orig = rope.original_max_position_embeddings
    assert orig is not None

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite, as HF does

    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Maps positions [B, T] to (cos, sin) [B, T, head_dim] in the activation dtype."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.rope = config.rope
        self.dim = config.head_dim
        self.max_pos = config.max_position_embeddings
        # A plain attribute, not a buffer: it stays float32 whatever .to(dtype) the model gets, it is built on
        # the CPU even when the model is created on the meta device, and it never enters state_dict.
        with torch.device("cpu"):
            self.inv_freq, self.attention_factor = static_inv_freq(self.rope, self.dim, self.max_pos)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _static(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device)
        return self._on_device[device]

    def _inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[B, dim/2] float32: one row of frequencies per sequence; seq_lens [B] counts its real positions."""
        batch, device = seq_lens.shape[0], seq_lens.device
        if self.rope.rope_type == "dynamic":
            # Dynamic NTK depends on the sequence length. HF takes max(position)+1 over the whole batch and
            # keeps grown frequencies on the module between calls; we take each row's length per forward, which
            # equals HF for one sequence decoded left to right and keeps rows independent of their batch.
            lengths = seq_lens.tolist()
            rows = [
                dynamic_inv_freq(self.rope, self.dim, self.max_pos, n).to(device)
                if n > self.max_pos
                else self._static(device)
                for n in lengths
            ]
            return torch.stack(rows)
        return self._static(device).expand(batch, -1)

    def forward(
        self, positions: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq(seq_lens)
        # numerics: angles, cos and sin in float32 (float64 in float64 mode), then cast to the activation dtype
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = positions[..., None].to(angle_dtype) * inv_freq[:, None, :].to(angle_dtype)  # [B, T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, dim]
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)
