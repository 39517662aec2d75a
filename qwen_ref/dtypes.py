"""The compute dtypes qwen-ref runs in, by the names configs, flags and reports use."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """"float32" for torch.float32 (and for None, the default)."""
    return str(dtype or "float32").removeprefix("torch.")
