"""Merge an adapter into the weights exactly as PEFT's merge_and_unload does; unmerge restores them bit for bit.

Every new tensor is computed from the plan (plan.py) before any parameter changes, so a failing merge leaves the
model as it was. merge() keeps the original tensor of every parameter it changes, and unmerge() puts those very
tensors back. Formulas and numerics: docs/lora.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwen_ref.lora.adapter import LoraAdapter
from qwen_ref.lora.config import LoraError
from qwen_ref.lora.plan import Delta, Plan, build_plan

_STATE_ATTR = "_qwen_ref_lora"


@dataclass
class _MergeState:
    adapter: LoraAdapter
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]]  # id -> (Parameter, its original tensor)
    slots: dict[tuple[str, str], nn.Parameter]  # (module, param) -> the Parameter it held before


def active_adapter(model: nn.Module) -> LoraAdapter | None:
    state = getattr(model, _STATE_ATTR, None)
    return state.adapter if state is not None else None


@torch.no_grad()
def merge(model: nn.Module, adapter: LoraAdapter) -> None:
    """Merge the adapter into the model's weights. Refuses (LoraError) while another merge is active."""
    current = active_adapter(model)
    if current is not None:
        raise LoraError(f"adapter {current.name!r} is already merged; unmerge() it first (or switch with "
                        "AdapterRegistry.activate)")
    plan = build_plan(model, adapter)
    # Every new tensor is computed before any parameter changes, so a failure here leaves the model untouched.
    new_values = {pid: _merged_value(plan, pid, p) for pid, p in plan.params.items()}
    new_slots = {}
    for (mod, leaf), value in plan.slots.items():
        old = getattr(model.get_submodule(mod), leaf)
        new_slots[(mod, leaf)] = value.to(device=old.device, dtype=old.dtype, copy=True)  # numerics: one cast
    originals = {}
    for pid, value in new_values.items():
        p = plan.params[pid]
        originals[pid] = (p, p.data)
        p.data = value
    slots = {}
    for (mod, leaf), value in new_slots.items():
        module = model.get_submodule(mod)
        slots[(mod, leaf)] = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    setattr(model, _STATE_ATTR, _MergeState(adapter, originals, slots))


@torch.no_grad()
def unmerge(model: nn.Module) -> LoraAdapter | None:
    """Put back the original parameters (the very tensors merge() replaced: bit-identical). Returns the adapter."""
    state: _MergeState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    for p, original in state.originals.values():
        p.data = original
    for (mod, leaf), original in state.slots.items():
        model.get_submodule(mod)._parameters[leaf] = original
    delattr(model, _STATE_ATTR)
    return state.adapter


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA arithmetic runs in: float32, or float64 for float64 weights (the ground-truth mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_delta(w: torch.Tensor, d: Delta, work: torch.dtype) -> None:
    """w += scaling * (B @ A) (Linear) or scaling * (B @ A).T (Embedding), in place, in one fused addmm_.

    PEFT computes transpose(B @ A, fan_in_fan_out) * scaling and adds it; fan_in_fan_out is forced off for
    nn.Linear and the embedding delta is always transposed. On CPU, addmm_ gives the same bits as that
    product-then-add (checked by the tests against PEFT).
    """
    A, B = d.A.to(device=w.device, dtype=work), d.B.to(device=w.device, dtype=work)
    if d.kind == "embedding":
        A, B = B.T, A.T  # (B @ A).T == A.T @ B.T: [vocab, r] @ [r, dim]
    w.addmm_(B, A, alpha=d.scaling)


def dora_factor(v: torch.Tensor, d: Delta) -> torch.Tensor:
    """DoRA's m / ||V|| for V = W + ΔW: one factor per output row of a Linear ([out, in] rows, norm over `in`),
    one per embedding dimension of an Embedding (norm over the vocabulary of its [vocab, dim] weight)."""
    m = d.magnitude.to(device=v.device, dtype=v.dtype)
    return m / torch.linalg.norm(v, dim=1 if d.kind == "linear" else 0)


def _merged_value(plan: Plan, pid: int, p: nn.Parameter) -> torch.Tensor:
    base = plan.inplace.get(pid)
    deltas = plan.deltas.get(pid, [])
    bias = plan.bias_deltas.get(pid)
    if not deltas and bias is None:
        # numerics: a replacement is stored in the adapter's dtype and cast once to the parameter's dtype
        return base.to(device=p.device, dtype=p.dtype, copy=True)
    # numerics: everything below runs in float32 (float64 for float64 weights) and is cast once at the end
    work = work_dtype(p.dtype)
    w = (base if base is not None else p.data).to(device=p.device, dtype=work, copy=True)
    for d in deltas:
        w = _apply_delta(w, d, work)
    if bias is not None:
        b, scaling = bias
        w += b.to(device=w.device, dtype=work) * scaling
    return w.to(p.dtype)


def _apply_delta(w: torch.Tensor, d: Delta, work: torch.dtype) -> torch.Tensor:
    add_delta(w, d, work)
    if d.magnitude is None:
        return w
    # DoRA: W' = m / ||W + dW|| * (W + dW)
    factor = dora_factor(w, d)
    return w.mul_(factor.view(-1, 1) if d.kind == "linear" else factor.view(1, -1))
