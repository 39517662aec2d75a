"""The request field `lora` through generate(), and `qwen-ref merge-lora`: the serving side of adapters."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import QKVO_MLP, hf_base, make_peft_adapter, our_model, peft_merged, snapshot

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny("qwen2.5")
    make_peft_adapter(base, dict(r=4, lora_alpha=16, target_modules=QKVO_MLP), {}, root / "alpha", seed=1)
    make_peft_adapter(base, dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), {},
                      root / "beta", seed=2)
    return root


def test_request_lora_equals_loading_the_adapter_merged(tiny, lora_dir):
    import qwen_ref
    from qwen_ref.workers_ai.generate import generate

    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "temperature": 0}
    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    base_out = generate(qwen_ref.load(tiny("qwen2.5")), body)
    for name in ("alpha", "beta", "alpha"):  # back and forth: no adapter outlives its request
        merged = qwen_ref.load(tiny("qwen2.5"), lora=lora_dir / name)
        assert generate(served, {**body, "lora": name}) == generate(merged, body)
    assert generate(served, body) == base_out  # a request without lora runs the base model
    assert generate(served, [{**body, "lora": "beta"}, {**body, "lora": "beta", "seed": 3}])[0] == \
        generate(qwen_ref.load(tiny("qwen2.5"), lora=lora_dir / "beta"), body)


@pytest.mark.parametrize(("name", "message"), [("gamma", "no adapter named 'gamma'"), ("../alpha", "lora"),
                                                ("/etc", "lora"), ("a/b", "lora")])
def test_bad_lora_names_are_clear_errors_and_leave_the_model_unchanged(tiny, lora_dir, name, message):
    import qwen_ref
    from qwen_ref.errors import InvalidInput
    from qwen_ref.workers_ai.generate import generate

    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    generate(served, {"prompt": "x", "max_tokens": 1, "lora": "alpha"})
    before = snapshot(served.model)
    with pytest.raises(InvalidInput, match=message) as e:
        generate(served, {"prompt": "x", "max_tokens": 1, "lora": name})
    assert e.value.path == "/lora"
    after = snapshot(served.model)
    assert after["adapter"] is before["adapter"]
    assert all(torch.equal(before["params"][n], p) for n, p in after["params"].items())


def test_a_batch_mixing_adapters_gives_each_request_its_own(tiny, lora_dir):
    import qwen_ref
    from qwen_ref.workers_ai.generate import generate

    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 8, "temperature": 0}
    batch = [{**body, "lora": "alpha"}, body, {**body, "lora": "beta"}]
    assert generate(served, batch) == [generate(served, b) for b in batch]


def test_lora_on_a_model_without_adapters(tiny):
    import qwen_ref
    from qwen_ref.errors import LoraUnavailable
    from qwen_ref.workers_ai.generate import generate

    with pytest.raises(LoraUnavailable, match="no LoRA adapters are registered"):
        generate(qwen_ref.load(tiny("qwen2.5")), {"prompt": "x", "lora": "alpha"})


def test_merge_lora_cli_writes_a_checkpoint_transformers_loads(tiny, lora_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "qwen_ref.cli", "merge-lora", str(tiny("qwen2.5")),
                        str(lora_dir / "alpha"), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    merged = peft_merged(tiny("qwen2.5"), lora_dir / "alpha")
    ids = torch.arange(1, 11)[None] * 37
    with torch.no_grad():
        ours = our_model(out)(ids)
        theirs = merged(ids).logits
        reloaded = hf_base(out)(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (reloaded - theirs).abs().max().item() <= 1e-4
    bad = subprocess.run([sys.executable, "-m", "qwen_ref.cli", "merge-lora", str(tiny("qwen2.5")),
                          str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr

