"""qwen-ref inspect: the next-token distribution after every sampler stage, for one or more steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwen_ref.errors import QwenRefError
from qwen_ref.qwen import Qwen
from qwen_ref.sampling import Trace, format_trace, trace
from qwen_ref.sampling.json_mask import batch_allowed
from qwen_ref.workers_ai.request import prepare


@torch.inference_mode()
def traces(qwen: Qwen, request: dict[str, Any], steps: int, top: int = 10) -> Iterator[Trace]:
    """A Trace per step; each step continues with the token the request's own draw picks (seed, step)."""
    p = prepare(qwen, request)
    state = p.state
    model = qwen.model
    cache = model.new_cache(1, len(p.prompt_ids) + steps)
    logits = model(torch.tensor([p.prompt_ids], device=qwen.device), cache=cache, last_only=True)[0, 0]
    output: list[int] = []
    for step in range(steps):
        allowed = None
        if p.constraint is not None:
            mask, failures = batch_allowed([p.constraint], logits.shape[-1])
            if failures:
                raise failures[0]
            allowed = mask[0]
        tr = trace(logits, state.params, p.prompt_ids, output, top, allowed=allowed, seed=state.seed,
                   step=state.step)
        yield tr
        assert tr.token is not None  # a seed is always given, so the step always picks a token
        state.accept(tr.token)
        output.append(tr.token)
        if p.constraint is not None:
            p.constraint.advance(tr.token)
        if tr.token in qwen.eos_token_ids or step + 1 == steps:
            return
        logits = model(torch.tensor([[tr.token]], device=qwen.device), cache=cache)[0, 0]


def plot_trace(tr: Trace, path: str | Path, decode) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QwenRefError("--plot needs matplotlib: pip install 'qwen-ref[plot]'") from None
    ids = [c.id for c in tr.stages[0].top]
    for c in tr.final.top:
        if c.id not in ids:
            ids.append(c.id)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(ids)), 4.0))
    width = 0.8 / len(tr.stages)
    for i, stage in enumerate(tr.stages):
        probs = [float(stage.probs[t]) for t in ids]
        ax.bar([x + i * width for x in range(len(ids))], probs, width, label=f"{stage.name} (kept {stage.kept})")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ids))])
    ax.set_xticklabels([f"{t}\n{decode(t)!r}"[:24] for t in ids], fontsize=7)
    ax.set_ylabel("probability")
    ax.set_title(f"next token across sampler stages; drawn: {tr.token}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inspect_steps(qwen: Qwen, request: dict[str, Any], *, steps: int = 1, top: int = 10,
                  plot: str | None = None) -> Iterator[str]:
    tok = qwen.tokenizer

    def decode(i: int) -> str:
        return tok.decode([i]) if tok is not None else ""

    for i, tr in enumerate(traces(qwen, request, steps, top)):
        if plot is not None and i == 0:
            plot_trace(tr, plot, decode)
        yield f"step {i}\n" + format_trace(tr, decode)
