"""One sampling step for the rows that have logits: JSON masks, the sampler, and each row's bookkeeping.

Failures stay in their row: a row whose logits hold NaN or +inf, whose JSON mask cannot be computed, whose
sampler input is rejected or whose constraint refuses the token fails alone with its typed error. The sampler
is batched, and each row's draw is a pure function of its own distribution, seed and step, so a row's token does
not depend on the rows beside it; when the batched call raises, the rows are sampled one by one.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from qwen_ref.engine.runner import as_error
from qwen_ref.engine.sequence import Sequence
from qwen_ref.errors import NonFiniteLogits, QwenRefError
from qwen_ref.sampling import TokenLogprobs, sample
from qwen_ref.sampling.json_mask import batch_allowed

Drawn = tuple[int, TokenLogprobs | None]


def sample_rows(seqs: Seq[Sequence], logits: torch.Tensor) -> list[Drawn | QwenRefError]:
    """Per row of logits [B, V] (row b is seqs[b]): its token and logprobs, accepted into its state, or its error."""
    out: list[Drawn | QwenRefError | None] = [None] * len(seqs)
    top = logits.amax(dim=-1)  # NaN anywhere in a row makes its max NaN; +inf anywhere makes it +inf
    bad = (torch.isnan(top) | torch.isposinf(top)).tolist()
    for row, seq in enumerate(seqs):
        if bad[row]:
            out[row] = NonFiniteLogits(f"the model produced NaN or infinite logits for this request at output "
                                       f"token {seq.produced} (the model's weights or inputs are broken)")
    mask, failures = batch_allowed([s.request.constraint for s in seqs], logits.shape[-1])
    for row, error in failures.items():
        out[row] = error
    live = [row for row, o in enumerate(out) if o is None]
    if live:
        every = len(live) == len(seqs)  # no copy of the logits when no row failed
        rows_logits = logits if every else logits[live]
        rows_mask = None if mask is None else (mask if every else mask[live]).to(logits.device)
        for row, drawn in zip(live, _draw([seqs[r] for r in live], rows_logits, rows_mask)):
            out[row] = drawn if isinstance(drawn, QwenRefError) else _accept(seqs[row], drawn)
    return out  # type: ignore[return-value]


def _draw(seqs: Seq[Sequence], logits: torch.Tensor, allowed: torch.Tensor | None) -> list[Drawn | QwenRefError]:
    wanted = [s.request.logprobs for s in seqs]
    n = max((w for w in wanted if w is not None), default=None)
    try:
        tokens, infos = sample(logits, [s.request.state for s in seqs], allowed=allowed, logprobs=n)
    except Exception as e:
        if len(seqs) == 1:
            return [as_error(e)]
        return [_draw([s], logits[i : i + 1], None if allowed is None else allowed[i : i + 1])[0]
                for i, s in enumerate(seqs)]
    # the batch computes the largest N asked for; each request keeps its own N
    return [(token, _trim(infos[i], w) if infos is not None and w is not None else None)
            for i, (token, w) in enumerate(zip(tokens.tolist(), wanted))]


def _trim(info: TokenLogprobs, n: int) -> TokenLogprobs:
    return replace(info, raw_top=info.raw_top[:n], final_top=info.final_top[:n])


def _accept(seq: Sequence, drawn: Drawn) -> Drawn | QwenRefError:
    token = drawn[0]
    try:
        if seq.request.constraint is not None:
            seq.request.constraint.advance(token)
    except Exception as e:
        return as_error(e)
    seq.request.state.accept(token)
    return drawn
