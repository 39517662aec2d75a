"""Scripted replies: a model that writes chosen text, so that a client's whole loop (a tool call, the tool's result
sent back, the next answer) can be tested against a real server on a random-weight checkpoint.

    qwen-ref serve tiny --script replies.json
    qwen = scripted(qwen_ref.load("tiny"), [Rule("<tool_response>", "It is sunny."),
                                            Rule("weather", '<tool_call>\\n{"name": ...}\\n</tool_call>')])

A rule is {"when": TEXT, "reply": TEXT}. At a request's first generation step the prompt as the model read it
(chat template applied, special tokens included) is checked against the rules in order; the first whose `when`
occurs in it gives the reply, and with no match the model's own logits decide. The model still runs every
forward (caches, batching, prefill and timing behave as usual); at each step of a scripted request its logits are
replaced by SCRIPTED_LOGIT on the reply's next token and 0 elsewhere, then on the first eos id once the reply is
written. Sampling parameters, penalties and seeds still apply to those logits; the margin makes every other
token's probability underflow to 0 at any temperature the request schema allows. Limits: n > 1 samples after the
first (their caches are copies the script does not know) and passes without a cache use the model's logits.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qwen_ref.errors import QwenRefError
from qwen_ref.json_files import read_json_file
from qwen_ref.models.kv_cache import KVCache, RowCaches
from qwen_ref.models.qwen2 import Pass, QwenForCausalLM
from qwen_ref.qwen import Qwen

SCRIPTED_LOGIT = 1e4
MAX_RULES = 1000


class ScriptError(QwenRefError, ValueError):
    """A script file or rule that cannot be used, naming the file and the rule."""


@dataclass(frozen=True)
class Rule:
    when: str
    reply: str


@dataclass
class _Row:
    history: list[int]  # every token the row's cache has been fed
    reply: list[int] | None = None  # the scripted ids (eos appended); None: not started, or no rule matched
    start: int = -1  # len(history) at the first generation step


def load_script(path: str | Path) -> list[Rule]:
    """Rules from a JSON file: a list of {"when": TEXT, "reply": TEXT} objects."""
    data = read_json_file(Path(path), ScriptError, kind=list)
    if len(data) > MAX_RULES:
        raise ScriptError(f"script {path}: expected a list of at most {MAX_RULES} {{when, reply}} objects")
    rules = []
    for i, item in enumerate(data):
        if (not isinstance(item, dict) or set(item) != {"when", "reply"}
                or not all(isinstance(item[k], str) for k in ("when", "reply"))):
            raise ScriptError(f"script {path}: rule {i}: expected {{\"when\": TEXT, \"reply\": TEXT}}, "
                              f"got {json.dumps(item, ensure_ascii=False)[:80]}")
        rules.append(Rule(item["when"], item["reply"]))
    return rules


def scripted(qwen: Qwen, rules: list[Rule]) -> Qwen:
    """A Qwen whose model writes the rules' replies (module docstring); the weights are shared, not copied."""
    if qwen.tokenizer is None:
        raise ScriptError("a scripted model needs the checkpoint's tokenizer")
    if not qwen.eos_token_ids:
        raise ScriptError("a scripted model needs an eos id to end its replies")
    model = copy.copy(qwen.model)  # a shallow copy: the same modules and parameters
    model.__class__ = _ScriptedForCausalLM
    model.script = _Script(rules, qwen.tokenizer, qwen.eos_token_ids[0])
    return replace(qwen, model=model)


class _Script:
    def __init__(self, rules: list[Rule], tokenizer: Any, eos: int):
        self.rules = rules
        self.tokenizer = tokenizer
        self.eos = eos
        self.rows: weakref.WeakKeyDictionary[KVCache, _Row] = weakref.WeakKeyDictionary()

    def next_token(self, row: _Row) -> int | None:
        if row.start < 0:
            row.start = len(row.history)
            prompt = self.tokenizer.decode(row.history)
            reply = next((r.reply for r in self.rules if r.when in prompt), None)
            row.reply = None if reply is None else [*self.tokenizer.encode(reply), self.eos]
        if row.reply is None:
            return None
        k = len(row.history) - row.start
        return row.reply[k] if k < len(row.reply) else self.eos


def _caches(cache: KVCache | RowCaches | None) -> list[KVCache]:
    if isinstance(cache, RowCaches):
        return cache.caches
    return [cache] if cache is not None and cache.batch_size == 1 else []


class _ScriptedForCausalLM(QwenForCausalLM):
    script: _Script

    def begin(self, input_ids: torch.Tensor, cache: KVCache | RowCaches | None = None,
              num_new: torch.Tensor | None = None, lora: Any = None) -> Pass:
        p = super().begin(input_ids, cache, num_new, lora)
        for i, c in enumerate(_caches(cache)):
            row = self.script.rows.setdefault(c, _Row([]))
            row.history.extend(input_ids[i, : int(p.num_new[i])].tolist())
        return p

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        logits = super().logits(p, hidden, last_only)
        if logits.shape[1] != 1:  # only generation steps: one set of logits per row
            return logits
        for i, c in enumerate(_caches(p.fwd.cache)):
            row = self.script.rows.get(c)
            token = None if row is None else self.script.next_token(row)
            if token is not None:
                logits[i, 0] = 0.0
                logits[i, 0, token] = SCRIPTED_LOGIT
        return logits
