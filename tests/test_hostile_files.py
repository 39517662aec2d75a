"""Hostile operator-supplied files (issue #15): each malformed file is refused with a typed QwenRefError whose message
names the file and the field or problem, in bounded time and memory.

Only file problems not already covered in test_loading.py, test_config.py and test_tokenizer_loading.py are here.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import qwen_ref
from qwen_ref.errors import QwenRefError

LIMIT_S = 20
DEEP = b"[" * 100_000 + b"]" * 100_000
NOT_UTF8 = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00"
A, B = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"  # same dtype, shape

CONFIG = r"(?<![\w.])config\.json"  # not generation_config.json or tokenizer_config.json
WEIGHTS = r"model\.safetensors(?!\.index)"
INDEX = r"model\.safetensors\.index\.json"
GENERATION = r"generation_config\.json"
TOO_DEEP = r"(?i:nest|deep|depth)"
UTF8 = r"(?i:utf-?8)"
NOT_OBJECT = r"(?i:object)"

Corrupt = Callable[[Path], None]


def field(name: str) -> str:
    """The field named in words, not only inside a JSON dump of the entry ("dtype": ...)."""
    return rf'(?<!["\w]){name}(?!["\w])'


def names(*patterns: str) -> str:
    """A regex that matches a message containing every pattern, in any order."""
    return "(?s)^" + "".join(f"(?=.*(?:{p}))" for p in patterns)


def read_header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_header(path: Path, header: dict | bytes) -> None:
    """Replace a safetensors file's header (and its 8-byte little-endian length), keeping the tensor data."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def shard(d: Path) -> dict[str, str]:
    """Split model.safetensors into two shards; return the weight map (the index is the caller's to write)."""
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    order = sorted(sd)
    weight_map = {}
    for i, part in enumerate((order[: len(order) // 2], order[len(order) // 2 :]), 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
    return weight_map


# ------------------------------------------------------------------------------------------ ways to corrupt


def raw(file: str, data: bytes) -> Corrupt:
    return lambda d: (d / file).write_bytes(data)


def fields(file: str, **changes) -> Corrupt:
    def corrupt(d: Path) -> None:
        value = json.loads((d / file).read_text())
        value.update(changes)
        (d / file).write_text(json.dumps(value))

    return corrupt


def as_list(file: str) -> Corrupt:
    return lambda d: (d / file).write_text(json.dumps([json.loads((d / file).read_text())]))


def header(edit: Callable[[dict], None]) -> Corrupt:
    def corrupt(d: Path) -> None:
        h = read_header(d / "model.safetensors")
        edit(h)
        write_header(d / "model.safetensors", h)

    return corrupt


def raw_header(data: bytes) -> Corrupt:
    return lambda d: write_header(d / "model.safetensors", data)


def set_entry(name: str, key: str, value: Callable[[dict], object]) -> Corrupt:
    def edit(h: dict) -> None:
        h[name][key] = value(h[name])

    return header(edit)


def leading_gap(d: Path) -> None:
    """64 unclaimed bytes at the start of the data section: every offset shifted past them."""
    path = d / "model.safetensors"
    h = read_header(path)
    for name, info in h.items():
        if name != "__metadata__":
            info["data_offsets"] = [o + 64 for o in info["data_offsets"]]
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw_h = json.dumps(h).encode()
    path.write_bytes(struct.pack("<Q", len(raw_h)) + raw_h + b"\0" * 64 + blob[8 + n :])


def index(make: Callable[[dict[str, str]], bytes]) -> Corrupt:
    def corrupt(d: Path) -> None:
        (d / "model.safetensors.index.json").write_bytes(make(shard(d)))

    return corrupt


def index_json(value: Callable[[dict[str, str]], object]) -> Corrupt:
    return index(lambda weight_map: json.dumps(value(weight_map)).encode())


def index_not_utf8(weight_map: dict[str, str]) -> bytes:
    text = json.dumps({"metadata": {"note": "caf\u00e9"}, "weight_map": weight_map}, ensure_ascii=False)
    return text.encode("latin-1")


def shard_numbers(weight_map: dict[str, str]) -> dict:
    return {"metadata": {}, "weight_map": {n: int(s[6:11]) for n, s in weight_map.items()}}


CASES = [
    # config.json
    pytest.param(raw("config.json", DEEP), names(CONFIG, TOO_DEEP), id="config-100k-deep"),
    pytest.param(raw("config.json", b'{"a": ' + DEEP + b"}"), names(CONFIG, TOO_DEEP), id="config-100k-deep-field"),
    pytest.param(as_list("config.json"), names(CONFIG, NOT_OBJECT), id="config-list"),
    pytest.param(raw("config.json", NOT_UTF8), names(CONFIG, UTF8), id="config-not-utf8"),
    pytest.param(fields("config.json", head_dim=10**9), names(CONFIG, "head_dim"), id="config-head-dim-1e9"),
    pytest.param(fields("config.json", num_hidden_layers=100_000), names(CONFIG, "num_hidden_layers"),
                 id="config-100k-layers"),
    pytest.param(fields("config.json", hidden_size=-1), names(CONFIG, "hidden_size"), id="config-hidden-size-negative"),
    pytest.param(fields("config.json", num_attention_heads=0), names(CONFIG, "num_attention_heads"),
                 id="config-zero-heads"),
    pytest.param(fields("config.json", vocab_size="151936"), names(CONFIG, "vocab_size"), id="config-vocab-size-str"),
    pytest.param(fields("config.json", rope_theta=[1e6]), names(CONFIG, "rope_theta"), id="config-rope-theta-list"),
    pytest.param(fields("config.json", max_position_embeddings=1e30), names(CONFIG, "max_position_embeddings"),
                 id="config-max-positions-1e30"),
    pytest.param(fields("config.json", num_key_value_heads=3), names(CONFIG, "num_key_value_heads"),
                 id="config-kv-heads-not-dividing"),
    pytest.param(fields("config.json", intermediate_size=2 * 224),
                 names(f"{CONFIG}|{WEIGHTS}", r"mlp\.(gate|up|down)_proj"), id="config-sizes-do-not-match-tensors"),
    # model.safetensors header
    pytest.param(raw_header(DEEP), names(WEIGHTS, TOO_DEEP), id="header-100k-deep"),
    pytest.param(raw_header(b'{"x": "\xff\xfe"}'), names(WEIGHTS, UTF8), id="header-not-utf8"),
    pytest.param(set_entry(A, "dtype", lambda e: [e["dtype"]]), names(WEIGHTS, field("dtype")), id="header-dtype-list"),
    pytest.param(set_entry(A, "data_offsets", lambda e: [float(o) for o in e["data_offsets"]]),
                 names(WEIGHTS, field("data_offsets")), id="header-offsets-floats"),
    pytest.param(set_entry(A, "data_offsets", lambda e: [str(o) for o in e["data_offsets"]]),
                 names(WEIGHTS, field("data_offsets")), id="header-offsets-strings"),
    pytest.param(set_entry(A, "shape", lambda e: [-1, *e["shape"]]), names(WEIGHTS, field("shape")),
                 id="header-negative-dim"),
    pytest.param(header(lambda h: h[B].update(data_offsets=h[A]["data_offsets"])), names(WEIGHTS, "(?i:overlap)"),
                 id="header-overlapping-tensors"),
    pytest.param(leading_gap, names(WEIGHTS, r"(?i:gap|cover|unused|unclaimed|contiguous)"), id="header-gap"),
    # model.safetensors.index.json
    pytest.param(index(lambda weight_map: DEEP), names(INDEX, TOO_DEEP), id="index-100k-deep"),
    pytest.param(index(index_not_utf8), names(INDEX, UTF8), id="index-not-utf8"),
    pytest.param(index_json(shard_numbers), names(INDEX, "weight_map|shard"), id="index-shard-names-int"),
    pytest.param(index_json(lambda weight_map: {"metadata": {}, "weight_map": sorted(weight_map)}),
                 names(INDEX, "weight_map"), id="index-weight-map-list"),
    # generation_config.json
    pytest.param(raw("generation_config.json", NOT_UTF8), names(GENERATION, UTF8), id="generation-garbage"),
    pytest.param(raw("generation_config.json", b"[151645, 151643]"), names(GENERATION, NOT_OBJECT),
                 id="generation-list"),
    pytest.param(fields("generation_config.json", eos_token_id="151645"), names(GENERATION, "eos_token_id"),
                 id="generation-eos-str"),
    pytest.param(fields("generation_config.json", eos_token_id=10**9), names(GENERATION, "eos_token_id"),
                 id="generation-eos-out-of-vocab"),
    pytest.param(raw("generation_config.json", DEEP), names(GENERATION, TOO_DEEP), id="generation-100k-deep"),
]


@pytest.mark.parametrize(("corrupt", "message"), CASES)
def test_hostile_file_is_refused(tiny, tmp_path, corrupt: Corrupt, message: str):
    d = shutil.copytree(tiny("qwen2.5"), tmp_path / "ck")
    corrupt(d)
    start = time.monotonic()
    with pytest.raises(QwenRefError, match=message):
        qwen_ref.load(d)
    assert time.monotonic() - start < LIMIT_S


# A hostile chat template loads (it is only compiled) and fails when a request is rendered. It runs in a child
# process: a template the library does not bound would otherwise hang or exhaust memory in the test run itself.
# The child's address space is capped a few GiB above its size after loading, and a watchdog ends it after
# LIMIT_S, so an unbounded template fails this test instead of the machine.
_RENDER = f"""
import json, os, resource, sys, threading, time
import qwen_ref
q = qwen_ref.load(sys.argv[1])
size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
watchdog = threading.Timer({LIMIT_S}, os._exit, (124,))
watchdog.daemon = True
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
watchdog.start()
try:
    qwen_ref.generate(q, {{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 1}})
    error = None
except BaseException as e:
    error = e
seconds = time.monotonic() - start
print(json.dumps({{
    "type": None if error is None else type(error).__qualname__,
    "typed": isinstance(error, qwen_ref.QwenRefError),
    "message": str(error)[:1000],
    "seconds": seconds,
    "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
}}), flush=True)
os._exit(0)
"""

TEMPLATES = [
    pytest.param("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                 id="template-1e10-iterations"),
    pytest.param("{{ 'x' * 2000000000 }}", id="template-2gb-string"),
    pytest.param("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", id="template-10gb-output"),
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_hostile_chat_template_is_refused_when_rendered(tiny, tmp_path, template: str):
    d = shutil.copytree(tiny("qwen2.5"), tmp_path / "ck")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").unlink(missing_ok=True)  # it would win over the config's entry
    run = subprocess.run([sys.executable, "-c", _RENDER, str(d)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the render did not end by itself within {LIMIT_S} s (rc {run.returncode}): " \
                                f"{run.stderr[-2000:]}"
    outcome = json.loads(run.stdout.splitlines()[-1])
    assert outcome["typed"], outcome
    assert outcome["seconds"] < LIMIT_S, outcome
    assert outcome["rss_growth_kib"] < 2**20, outcome
    assert any(s in outcome["message"].lower() for s in ("chat template", "chat_template")), outcome
