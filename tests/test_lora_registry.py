"""The adapter registry: switching merged adapters, plain names only, broken adapter files refused cleanly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lora_helpers import CASES, AdapterFactory, assert_unchanged, fresh_model, our_model, snapshot

from qwen_ref.lora import (
    AdapterNotFoundError,
    AdapterRegistry,
    LoraAdapter,
    LoraError,
    merge,
    resolve_adapter,
)

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    return AdapterFactory(tiny, tmp_path_factory.mktemp("adapters"), CASES)


def make_registry(root: Path, adapters) -> AdapterRegistry:
    root.mkdir()
    for case in ("plain", "dora", "rslora_layers"):
        shutil.copytree(adapters(case), root / case)
    return AdapterRegistry(root)


def test_registry_switches_adapters(tiny, adapters, tmp_path):
    registry = make_registry(tmp_path / "loras", adapters)
    assert registry.names() == ["dora", "plain", "rslora_layers"]
    assert registry.get("plain") is registry.get("plain")  # cached
    model, base = fresh_model(tiny, "qwen2.5")
    direct = {}
    for name in ("plain", "dora"):
        m = our_model(tiny("qwen2.5"))
        merge(m, LoraAdapter.from_dir(adapters(name)))
        direct[name] = snapshot(m)

    registry.activate(model, "plain")
    assert_unchanged(model, {**direct["plain"], "adapter": registry.get("plain")})
    data_ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    registry.activate(model, "plain")  # same adapter: nothing happens
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == data_ptr
    registry.activate(model, "dora")
    assert_unchanged(model, {**direct["dora"], "adapter": registry.get("dora")})
    registry.activate(model, None)
    assert_unchanged(model, base)

    outside = LoraAdapter.from_dir(adapters("plain"))  # an adapter not from the registry (load(lora=PATH))
    assert registry.activate(model, outside) is outside
    assert_unchanged(model, {**direct["plain"], "adapter": outside})
    registry.activate(model, None)
    assert resolve_adapter("dora", registry) is registry.get("dora")
    assert resolve_adapter(str(adapters("dora"))).path == adapters("dora")
    with pytest.raises(AdapterNotFoundError):
        resolve_adapter("missing", registry)


BAD_NAMES = ["", ".", "..", "../plain", "plain/..", "a/b", "a\\b", "/etc", "C:\\x", "pl..ain", "a\x00b", "a\nb",
             " plain", "-x", "x" * 129, "é"]


@pytest.fixture(scope="module")
def serving(tiny, adapters, tmp_path_factory):
    """One registry and one model with "dora" merged, shared by the tests that must leave both unchanged."""
    registry = make_registry(tmp_path_factory.mktemp("serving") / "loras", adapters)
    model = our_model(tiny("qwen2.5"))
    registry.activate(model, "dora")
    return registry, model, snapshot(model)



@pytest.mark.parametrize("name", BAD_NAMES)
def test_registry_rejects_path_like_names(name, serving):
    registry, model, snap = serving
    with pytest.raises(LoraError, match="plain adapter name"):
        registry.activate(model, name)
    assert_unchanged(model, snap)


def test_registry_unknown_name(serving):
    registry, model, snap = serving
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        registry.activate(model, "nope")
    assert_unchanged(model, snap)


def test_registry_rejects_symlink_escape(tiny, adapters, tmp_path):
    registry = make_registry(tmp_path / "loras", adapters)
    outside = shutil.copytree(adapters("plain"), tmp_path / "outside")
    (registry.directory / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoraError, match="links outside"):
        registry.get("sneaky")


def corrupt(adapter_dir: Path, dest: Path, how: str) -> Path:
    shutil.copytree(adapter_dir, dest)
    weights = dest / "adapter_model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) - 100])
    elif how == "garbage_header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "huge_header":
        weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "pickle_only":
        weights.unlink()
        (dest / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    elif how == "bad_json":
        (dest / "adapter_config.json").write_text("{")
    return dest


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated"), ("garbage_header", "corrupt"), ("huge_header", "corrupt or truncated"),
    ("empty", "not a safetensors file"), ("pickle_only", "pickle"), ("nan", "NaN"), ("bad_json", "not valid JSON"),
])
def test_broken_adapter_files(how, message, adapters, serving):
    registry, model, snap = serving
    corrupt(adapters("plain"), registry.directory / f"broken-{how}", how)
    with pytest.raises(LoraError, match=message):
        registry.activate(model, f"broken-{how}")
    assert_unchanged(model, snap)

