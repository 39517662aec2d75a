from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and importing peft or transformers imports it. Without a
# GPU the kernel tests run in the interpreter, so it is set before any test module is collected, whatever the order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen_ref.checkpoint.tiny import make_tiny_checkpoint

TEST_PRESETS = ["qwen1.5", "qwen2.5", "qwen2.5-coder-32b-shape", "yarn", "linear", "dynamic", "sliding"]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Tokenizers and the embedded default model are built into a fresh cache, as on a new machine."""
    old = os.environ.get("QWEN_REF_CACHE")
    os.environ["QWEN_REF_CACHE"] = str(tmp_path_factory.mktemp("qwen_ref_cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    if old is None:
        os.environ.pop("QWEN_REF_CACHE", None)
    else:
        os.environ["QWEN_REF_CACHE"] = old


class TinyCheckpoints:
    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple[str, str], Path] = {}

    def __call__(self, preset: str, dtype: str = "float32") -> Path:
        key = (preset, dtype)
        if key not in self._built:
            self._built[key] = make_tiny_checkpoint(preset, self.root / f"{preset}-{dtype}", dtype=dtype)
        return self._built[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, _hermetic_cache) -> TinyCheckpoints:
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny"))


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.eval()
