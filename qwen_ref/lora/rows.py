"""Per-request LoRA in a shared batch: each row's adapter applied unmerged, to that row only.

The model calls `lora.apply(layer, x, y)` after every nn.Linear of a forward (models/qwen2.py, Forward.linear),
with x [B, T, in] the layer's input and y [B, T, out] the base layer's output; row b is request b. For the rows
whose adapter targets the layer, y becomes what PEFT's unmerged LoRA Linear forward computes:

    plain LoRA   y + B(A x) * scaling                       (lora_bias: B has its bias)
    DoRA         y + (f - 1) * (y - bias) + f * B(A x) * scaling
                 f = m / ||W + scaling * B @ A||, one per output row: a constant of the weights (PEFT detaches it)

Rows without an adapter, and layers their adapter does not target, are left as they are. Scaling, target
matching and validation are the merge path's (config.py, targets.py, plan.py); what only a merge can do
(embeddings, whole-parameter replacements, tied weights) is refused by check_unmerged, naming the fix.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen_ref.lora.adapter import LoraAdapter
from qwen_ref.lora.config import LoraError
from qwen_ref.lora.merge import active_adapter, add_delta, dora_factor, work_dtype
from qwen_ref.lora.plan import Plan, build_plan, some_names, tied_names
from qwen_ref.lora.targets import saved_modules

_FIX = "merge it at load instead: qwen_ref.load(source, lora=...)"


def check_unmerged(model: nn.Module, adapter: LoraAdapter) -> None:
    """Raise LoraError if the adapter does not fit the model, or only a merge can apply it. The model is not
    touched. An adapter that passes is prepared for RowAdapters then (once per adapter and model), so checking
    it again costs a lookup."""
    _branches(model, adapter)


def _unmerged_plan(model: nn.Module, adapter: LoraAdapter) -> Plan:
    plan = build_plan(model, adapter)  # every check of the merge path first
    cfg, tied = adapter.config, tied_names(model)
    deltas = [d for ds in plan.deltas.values() for d in ds]
    problems = []
    embeddings = [d.module for d in deltas if d.kind == "embedding"]
    if embeddings:
        problems.append(f"LoRA on the embedding {some_names(embeddings)} (lora_embedding_A/B)")
    shared = [d.module for d in deltas if d.kind == "linear" and f"{d.module}.weight" in tied]
    if shared:
        problems.append(f"LoRA on {some_names(shared)}, whose weight is tied to the embedding (a merge changes "
                        "both, as PEFT's merge_and_unload does; per row only this layer's output would change)")
    # PEFT saves the embedding layers whenever it adapts one of them, trained or not: a replacement equal to the
    # parameter it replaces changes nothing
    params = dict(model.named_parameters(remove_duplicate=False))
    replaced = [p for p, value in adapter.replacements.items()
                if not torch.equal(value.to(device=params[p].device, dtype=params[p].dtype), params[p])]
    saved = saved_modules(cfg, model, adapter.replacements)
    whole = [p for p in replaced if any(p.startswith(m + ".") for m in saved)]
    biases = [p for p in replaced if p not in whole and p.endswith(".bias")]
    others = [p for p in replaced if p not in whole and p not in biases]
    if whole:
        problems.append(f"modules_to_save {list(cfg.modules_to_save)}, whose saved copies replace "
                        f"{some_names(whole)}")
    if biases:
        problems.append(f"bias={cfg.bias!r}: trained biases that replace the base ones ({some_names(biases)})")
    if others:
        problems.append(f"saved base parameters that replace the model's ({some_names(others)}), such as a "
                        "trained embedding")
    if problems:
        raise LoraError(f"adapter {adapter.name!r} cannot be applied unmerged per row: {'; '.join(problems)}. "
                        f"{_FIX.capitalize()}")
    return plan


@dataclass(frozen=True)
class _Branch:
    """One Linear of one adapter, its tensors cast once to the arithmetic's dtype, on the layer's device."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    B_bias: torch.Tensor | None  # [out] (lora_bias)
    scaling: float
    dora: tuple[torch.Tensor, torch.Tensor] | None  # DoRA: (f, f - 1), f = m / ||W + scaling * B @ A|| [out]

    def __call__(self, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # numerics: as PEFT's unmerged forward, whose adapter weights are float32 (autocast_adapter_dtype):
        # x is cast to the branch's dtype (float32; float64 for float64 models), B(A x) * scaling is computed
        # there and added to y upcast, and the sum is cast once to y's dtype. DoRA's (y - bias) is taken in y's
        # dtype, as PEFT subtracts the base bias from the base result.
        lora = F.linear(F.linear(x.to(self.A.dtype), self.A), self.B, self.B_bias)
        if self.dora is None:
            out = y.to(self.A.dtype) + lora * self.scaling
        else:
            f, f_minus_1 = self.dora
            base = y if layer.bias is None else y - layer.bias
            out = y.to(self.A.dtype) + (f_minus_1 * base + f * lora * self.scaling)
        return out.to(y.dtype)


@dataclass
class _Prepared:
    """An adapter's branches for one model, and what they were computed from (to notice a moved model)."""

    adapter: weakref.ref
    branches: dict[nn.Module, _Branch]
    probe: tuple[nn.Parameter, torch.device, torch.dtype] | None  # one targeted weight, where it was
    dora_weights: list[tuple[nn.Parameter, int, int]]  # DoRA factors depend on W: (weight, data_ptr, version)

    def current(self) -> bool:
        if self.probe is not None and (self.probe[0].device, self.probe[0].dtype) != self.probe[1:]:
            return False
        return all(w.data_ptr() == ptr and w._version == version for w, ptr, version in self.dora_weights)


_LOCK = threading.RLock()  # re-entrant: a finalizer (_forget) may run during a collection inside the lock
# model -> id(adapter) -> its branches. An entry goes when its model or its adapter is garbage collected.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[int, _Prepared]] = weakref.WeakKeyDictionary()


def _branches(model: nn.Module, adapter: LoraAdapter) -> dict[nn.Module, _Branch]:
    """The adapter's branches for this model: computed on first use, then kept (recomputed if the model was moved
    or cast, or, for DoRA, if its weights changed)."""
    with _LOCK:
        per_model = _PREPARED.setdefault(model, {})
        entry = per_model.get(id(adapter))
        if entry is None or entry.adapter() is not adapter or not entry.current():
            new = entry is None or entry.adapter() is not adapter
            entry = per_model[id(adapter)] = _prepare(model, adapter)
            if new:
                weakref.finalize(adapter, _forget, weakref.ref(model), id(adapter))
        return entry.branches


def _forget(model_ref: weakref.ref, key: int) -> None:
    model = model_ref()
    if model is not None:
        with _LOCK:
            _PREPARED.get(model, {}).pop(key, None)


def _prepare(model: nn.Module, adapter: LoraAdapter) -> _Prepared:
    plan = _unmerged_plan(model, adapter)
    modules = dict(model.named_modules())
    branches, probe, dora_weights = {}, None, []
    # normal tensors even when the first use is under inference_mode, so later forwards with autograd work
    with torch.inference_mode(False), torch.no_grad():
        for ds in plan.deltas.values():
            (d,) = ds  # only a tied weight has two deltas, and check_unmerged refuses those
            layer = modules[d.module]
            w = layer.weight
            work = work_dtype(w.dtype)
            dora = None
            if d.magnitude is not None:
                v = w.detach().to(dtype=work, copy=True)
                add_delta(v, d, work)  # W + scaling * B @ A, as the merge computes it
                f = dora_factor(v, d)
                dora = (f, f - 1)
                dora_weights.append((w, w.data_ptr(), w._version))
            b = adapter.lora[d.module].get("B_bias")
            branches[layer] = _Branch(
                A=d.A.to(device=w.device, dtype=work), B=d.B.to(device=w.device, dtype=work),
                B_bias=None if b is None else b.to(device=w.device, dtype=work), scaling=d.scaling, dora=dora)
            probe = probe or (w, w.device, w.dtype)
    return _Prepared(weakref.ref(adapter), branches, probe, dora_weights)


class RowAdapters:
    """Each row's LoRA adapter (None: the base model) for one forward, applied unmerged to its own rows.

    The model must have no adapter merged (LoraError otherwise: it would stack under every row's adapter).
    Rows sharing an adapter are computed together (one pair of matmuls per adapter and layer). per_row=True
    computes every row alone instead (its own matmuls, M = its T), so each row's result is bit-identical to
    the same row in a batch of one; with batch-invariant base layers that makes the whole forward so.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter | None], *, per_row: bool = False):
        self.adapters = tuple(adapters)
        self.per_row = per_row
        rows_of: dict[int, list[int]] = {}
        for b, adapter in enumerate(self.adapters):
            if adapter is None:
                continue
            if not isinstance(adapter, LoraAdapter):
                raise LoraError(f"RowAdapters: row {b} has a {type(adapter).__name__}; each row takes a LoraAdapter "
                                "or None")
            rows_of.setdefault(id(adapter), []).append(b)
        merged = active_adapter(model)
        if rows_of and merged is not None:
            raise LoraError(f"RowAdapters: adapter {merged.name!r} is merged into the model's weights, so every row "
                            "would get it under its own adapter; unmerge() it first (per-row adapters apply to the "
                            "base weights)")
        B = len(self.adapters)
        # (branches, rows, whole batch?) per group of rows computed together
        self._groups: list[tuple[dict[nn.Module, _Branch], slice | torch.Tensor, bool]] = []
        for rows in rows_of.values():
            branches = _branches(model, self.adapters[rows[0]])
            if not branches:
                continue  # an adapter that targets nothing
            if per_row:
                self._groups += [(branches, slice(b, b + 1), B == 1) for b in rows]
            elif rows == list(range(rows[0], rows[-1] + 1)):
                self._groups.append((branches, slice(rows[0], rows[-1] + 1), len(rows) == B))
            else:
                device = next(iter(branches.values())).A.device
                self._groups.append((branches, torch.tensor(rows, device=device), False))

    @property
    def batch_size(self) -> int:
        return len(self.adapters)

    def apply(self, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [B, T, out] with each row's adapter branch for `layer` added (x [B, T, in] is the layer's input)."""
        hits = [(branch, rows, whole) for branches, rows, whole in self._groups
                if (branch := branches.get(layer)) is not None]
        if not hits:
            return y
        if x.shape[0] != len(self.adapters):
            raise LoraError(f"RowAdapters: a forward of {x.shape[0]} rows, but adapters were given for "
                            f"{len(self.adapters)}")
        if len(hits) == 1 and hits[0][2]:
            return hits[0][0](layer, x, y)
        out = y.clone()
        for branch, rows, _ in hits:
            xs = x[rows]
            if self.per_row:
                xs = xs.clone()  # its own allocation, as the row's input is when it runs alone
            out[rows] = branch(layer, xs, y[rows])
        return out
