"""Checkpoint loading: formats, sources, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_ref
from qwen_ref.checkpoint.weights import INDEX_FILE
from qwen_ref.errors import CheckpointError, ConfigError, SourceNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, edit) -> None:
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


def ids(n=10):
    return torch.arange(1, n + 1)[None] * 97


def test_load_returns_model_tokenizer_config(tiny):
    q = qwen_ref.load(tiny("qwen2.5"))
    assert q.config.num_key_value_heads == 2 and q.config.tie_word_embeddings
    assert q.model.lm_head.weight is q.model.model.embed_tokens.weight
    assert q.tokenizer is not None and q.tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert q.eos_token_ids[:2] == (151645, 151643)
    assert q.device == torch.device("cpu") and q.dtype == torch.float32
    assert not any(p.requires_grad for p in q.model.parameters())


def test_state_dict_names_equal_the_checkpoint(tiny):
    """Strict name match, and the KV cache / rotary tables are never in state_dict."""
    path = tiny("qwen2.5-coder-32b-shape")
    q = qwen_ref.load(path)
    on_disk = set(load_file(path / "model.safetensors"))
    assert set(q.model.state_dict()) == on_disk
    assert "lm_head.weight" in on_disk  # untied
    with torch.no_grad():
        assert torch.equal(q.model.lm_head.weight, load_file(path / "model.safetensors")["lm_head.weight"])


def test_embedded_default_model():
    q = qwen_ref.load("tiny")
    assert q.path.is_relative_to(Path(os.environ["QWEN_REF_CACHE"]))
    assert q.tokenizer is not None and q.tokenizer.chat_template
    with torch.no_grad():
        assert q.model(ids()).shape == (1, 10, 151936)
    assert qwen_ref.load("tiny").path == q.path  # built once, then reused


def test_directory_without_tokenizer_loads(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen1.5"), tmp_path / "ck")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (d / f).unlink(missing_ok=True)
    q = qwen_ref.load(d)
    assert q.tokenizer is None
    with torch.no_grad():
        assert q.model(ids()).shape == (1, 10, 151936)


def test_sharded_checkpoint_equals_single_file(tiny, tmp_path):
    src = tiny("qwen2.5")
    d = copy_checkpoint(src, tmp_path / "sharded")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    with torch.no_grad():
        a = qwen_ref.load(src).model(ids())
        b = qwen_ref.load(d).model(ids())
    assert torch.equal(a, b)
    # an index naming a shard that is not there
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        qwen_ref.load(d)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64", torch.float64])
def test_dtype_override(tiny, dtype):
    q = qwen_ref.load(tiny("qwen1.5"), dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert {p.dtype for p in q.model.parameters()} == {expected}
    with torch.no_grad():
        out = q.model(ids())
    assert torch.isfinite(out).all()


def test_missing_tensor(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    rewrite_weights(d, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"):
        qwen_ref.load(d)


def test_unexpected_tensor(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    rewrite_weights(d, lambda sd: sd.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(112)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.o_proj\.bias"):
        qwen_ref.load(d)


def test_wrong_shape(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    rewrite_weights(d, lambda sd: sd.update({"model.norm.weight": torch.ones(111)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: \(111,\) on disk, \(112,\) expected"):
        qwen_ref.load(d)


def test_all_problems_listed_at_once(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")

    def edit(sd):
        sd.pop("model.norm.weight")
        sd["extra.weight"] = torch.zeros(1)
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)

    rewrite_weights(d, edit)
    with pytest.raises(CheckpointError) as e:
        qwen_ref.load(d)
    msg = str(e.value)
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: extra.weight" in msg
    assert "model.layers.0.mlp.up_proj.weight: (3, 3) on disk" in msg


def test_truncated_safetensors(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        qwen_ref.load(d)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        qwen_ref.load(d)
    f.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match="corrupt"):
        qwen_ref.load(d)


def test_integer_tensor_refused(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    rewrite_weights(d, lambda sd: sd.update({"model.norm.weight": torch.ones(112, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight' has dtype I32"):
        qwen_ref.load(d)


def test_pickle_is_refused(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle is never loaded"):
        qwen_ref.load(d)


def test_unknown_rope_type_in_config(tiny, tmp_path):
    d = copy_checkpoint(tiny("qwen2.5"), tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "longrope", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rope_scaling\.type: 'longrope' is not supported"):
        qwen_ref.load(d)


def test_bad_dtype_and_device(tiny):
    with pytest.raises(CheckpointError, match="dtype: 'int8' is not supported"):
        qwen_ref.load(tiny("qwen2.5"), dtype="int8")
    with pytest.raises(CheckpointError, match="device: 'gpu0'"):
        qwen_ref.load(tiny("qwen2.5"), device="gpu0")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("@cf/qwen/qwen9-coder", "not a known Workers AI model; allowed: @cf/qwen/qwen2.5-coder-32b-instruct"),
        ("tiny:nope", "unknown tiny preset"),
        ("./no/such/dir/", "neither a directory"),
    ],
)
def test_unresolvable_sources(source, message):
    with pytest.raises(SourceNotFoundError, match=message):
        qwen_ref.load(source)


def test_source_that_is_a_file(tiny):
    with pytest.raises(SourceNotFoundError, match="is a file"):
        qwen_ref.load(tiny("qwen2.5") / "config.json")


def _run_py(code: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_hub_repo_and_workers_ai_id_from_the_local_hf_cache(tiny, tmp_path):
    """The real hub path (snapshot_download) served offline from an HF cache laid out as the hub leaves it."""
    cache = tmp_path / "hf" / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--Qwen--Qwen1.5-0.5B-Chat"
    shutil.copytree(tiny("qwen1.5"), repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    code = (
        "import qwen_ref, torch\n"
        "for s in ['Qwen/Qwen1.5-0.5B-Chat', '@cf/qwen/qwen1.5-0.5b-chat']:\n"
        "    q = qwen_ref.load(s)\n"
        "    print(s, q.path.name, q.known.workers_ai_id if q.known else None, q.config.num_key_value_heads)\n"
        "qwen_ref.load('Qwen/Qwen2.5-Coder-32B-Instruct')\n"
    )
    r = _run_py(code, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    lines = r.stdout.splitlines()
    assert lines[0] == f"Qwen/Qwen1.5-0.5B-Chat {sha} None 4", r.stderr
    assert lines[1] == f"@cf/qwen/qwen1.5-0.5b-chat {sha} @cf/qwen/qwen1.5-0.5b-chat 4"
    assert "SourceNotFoundError" in r.stderr and "not in the local Hugging Face cache" in r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stderr


def test_peak_memory_while_loading_stays_near_the_weights(tiny, tmp_path):
    """Peak RSS growth while loading weights <= 1.3x their bytes (no second full copy).

    Measured with the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs) after a
    warm-up load, so one-off costs (torch's meta-device registrations, imports) are not counted.
    """
    warm = copy_checkpoint(tiny("qwen1.5"), tmp_path / "warm")
    path = copy_checkpoint(tiny("qwen2.5-coder-32b-shape"), tmp_path / "ck")
    for d in (warm, path):
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (d / f).unlink(missing_ok=True)
    weight_bytes = (path / "model.safetensors").stat().st_size
    code = (
        "import torch, qwen_ref\n"
        "def mem(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1]) * 1024\n"
        f"qwen_ref.load({str(warm)!r})\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = mem('VmRSS')\n"
        f"q = qwen_ref.load({str(path)!r})\n"
        "print(mem('VmHWM') - before)\n"
    )
    r = _run_py(code, {})
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.strip())
    assert 0.9 * weight_bytes <= growth <= 1.3 * weight_bytes, (growth, weight_bytes)
