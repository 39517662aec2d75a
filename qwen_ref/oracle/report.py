"""What compare finds: a Position per compared token, a RecordResult per generation, and the Report over them,
as text (the summary and the per-record table), as JSON lines (one per position) and as a plot."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.oracle.files import finite_or_none, open_output
from qwen_ref.oracle.thresholds import Thresholds


@dataclass
class Position:
    """The comparison at one position. `logprob` is the reference's in the distribution the backend's numbers are
    of (raw, or final with logprobs_of "final"); `rank` and `argmax` are in the raw distribution."""

    record: int
    phase: str  # "prompt" (teacher-forced prompt logprobs) or "output"
    step: int  # index in the output (in the prompt for phase "prompt")
    position: int  # index in the whole sequence
    token: int
    text: str
    via: str
    rank: int
    argmax: int
    backend_logprob: float | None = None
    logprob: float | None = None
    abs_diff: float | None = None
    top_n: int = 0
    kl: float | None = None
    top_max_abs_diff: float | None = None
    top_note: str = ""
    final_logprob: float | None = None
    backend_final_logprob: float | None = None
    final_abs_diff: float | None = None
    in_support: bool | None = None
    support: str = ""
    greedy_token: int | None = None
    greedy_margin: float | None = None
    flags: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)

    def flag(self, name: str, why: str) -> None:
        self.flags.append(name)
        self.why.append(why)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if value is None or value == "" or (value == [] and key not in ("flags",)):
                continue
            out[key] = finite_or_none(value) if isinstance(value, float) else value
        return out


@dataclass
class RecordResult:
    """The comparison of one backend generation: its positions in order (prompt, then output)."""

    index: int
    source: str
    prompt_tokens: int
    tokens: int  # output tokens the backend gave
    positions: list[Position]
    sampler: str  # what was checked of the sampler
    notes: list[str] = field(default_factory=list)
    unmapped: tuple[int, str] | None = None  # (step, why): teacher forcing stops there

    @property
    def compared(self) -> int:
        return sum(p.phase == "output" for p in self.positions)

    @property
    def flagged(self) -> list[Position]:
        return [p for p in self.positions if p.flags]

    @property
    def first_flag(self) -> Position | None:
        return next(iter(self.flagged), None)

    @property
    def greedy_divergence(self) -> Position | None:
        """The first position where greedy decoding would have chosen another token than the backend's."""
        return next((p for p in self.positions if p.greedy_token is not None and p.greedy_token != p.token), None)

    def errors(self) -> list[float]:
        return [p.abs_diff for p in self.positions if p.abs_diff is not None and math.isfinite(p.abs_diff)]


@dataclass
class Report:
    """Every record's result, with the thresholds they were judged by."""

    records: list[RecordResult]
    thresholds: Thresholds
    reference: str  # the reference checkpoint and dtype
    backend_dtype: str

    @property
    def positions(self) -> list[Position]:
        return [p for r in self.records for p in r.positions]

    @property
    def flagged(self) -> list[Position]:
        return [p for p in self.positions if p.flags]

    @property
    def first_flag(self) -> Position | None:
        return next(iter(self.flagged), None)

    @property
    def unmapped(self) -> list[RecordResult]:
        return [r for r in self.records if r.unmapped is not None]

    @property
    def ok(self) -> bool:
        return not self.flagged and not self.unmapped

    def summary(self) -> dict[str, Any]:
        errors = [e for r in self.records for e in r.errors()]
        kls = [p.kl for p in self.positions if p.kl is not None]
        counts: dict[str, int] = {}
        for p in self.flagged:
            for f in p.flags:
                counts[f] = counts.get(f, 0) + 1
        first = self.first_flag
        return {
            "reference": self.reference, "backend_dtype": self.backend_dtype,
            "thresholds": self.thresholds.__dict__, "records": len(self.records),
            "positions": len(self.positions), "output_positions": sum(r.compared for r in self.records),
            "flagged": len(self.flagged), "flags": counts, "unmapped_records": len(self.unmapped),
            "max_abs_diff": max(errors, default=None), "mean_abs_diff": float(np.mean(errors)) if errors else None,
            "max_kl": max(kls, default=None),
            "first_flag": None if first is None else {
                "record": first.record, "source": self.records[first.record].source, "phase": first.phase,
                "step": first.step, "position": first.position, "token": first.token, "why": first.why},
        }

    def format(self) -> str:
        s = self.summary()
        lines = [f"reference: {self.reference}   backend dtype: {self.backend_dtype} ({self.thresholds.describe()})",
                 f"records: {s['records']}   positions compared: {s['positions']} (output {s['output_positions']})"
                 f"   flagged: {s['flagged']}   unmapped records: {s['unmapped_records']}",
                 f"|dlogprob|: max {_g(s['max_abs_diff'])}, mean {_g(s['mean_abs_diff'])}   "
                 f"KL top-N: max {_g(s['max_kl'])}   flags: "
                 + (", ".join(f"{k} {v}" for k, v in s["flags"].items()) or "none")]
        first = self.first_flag
        if first is not None:
            lines.append(f"first flagged: record {first.record} ({self.records[first.record].source}) "
                         f"{first.phase} step {first.step} (position {first.position}) token {first.token} "
                         f"{first.text!r}: " + "; ".join(first.why))
        for r in self.unmapped:
            lines.append(f"record {r.index} ({r.source}): compared up to step {r.unmapped[0]}, where "
                         f"a token cannot be mapped to our ids: {r.unmapped[1]}")
        lines += ["", f"{'rec':>3}  {'source':<28}{'tokens':>7}{'cmp':>5}{'flag':>5}{'max|d|':>10}{'mean|d|':>10}"
                      f"{'greedy-div':>11}  {'sampler':<30}first flag"]
        for r in self.records:
            errors = r.errors()
            div = r.greedy_divergence
            ff = r.first_flag
            lines.append(f"{r.index:>3}  {r.source[-28:]:<28}{r.tokens:>7}{r.compared:>5}{len(r.flagged):>5}"
                         f"{_g(max(errors, default=None)):>10}{_g(float(np.mean(errors)) if errors else None):>10}"
                         f"{('step ' + str(div.step)) if div else '-':>11}  {r.sampler[:29]:<30}"
                         + (f"{ff.phase} step {ff.step}: {', '.join(ff.flags)}" if ff else "-"))
        notes = [(r.index, n) for r in self.records for n in r.notes]
        if notes:
            lines.append("")
            lines += [f"record {i}: {n}" for i, n in notes]
        return "\n".join(lines)

    def details(self) -> Iterator[dict[str, Any]]:
        for r in self.records:
            for p in r.positions:
                yield {"source": r.source, **p.to_dict()}

    def write_jsonl(self, path: str | Path) -> None:
        with open_output(path) as f:
            for row in self.details():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def plot(self, path: str | Path) -> None:
        """|logprob difference| per position, one line per record, with the tolerance and the flags."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise QwenRefError("--plot needs matplotlib: pip install 'qwen-ref[plot]'") from None
        fig, ax = plt.subplots(figsize=(9.0, 4.0))
        floor = self.thresholds.logprob * 1e-4
        for r in self.records:
            pts = [p for p in r.positions if p.phase == "output" and p.abs_diff is not None]
            ax.plot([p.step for p in pts], [max(min(p.abs_diff, 1e3), floor) for p in pts], marker=".",
                    linewidth=0.8, label=f"{r.index}: {r.source[-24:]}")
            bad = [p for p in r.positions if p.phase == "output" and p.flags]
            ax.scatter([p.step for p in bad], [max(min(p.abs_diff or 1e3, 1e3), floor) for p in bad],
                       color="red", zorder=3, s=30)
        ax.axhline(self.thresholds.logprob, color="gray", linestyle="--", label="tolerance")
        ax.set_yscale("log")
        ax.set_xlabel("output step")
        ax.set_ylabel("|logprob difference| (nats)")
        ax.set_title(f"backend vs {self.reference}: red = flagged")
        if len(self.records) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"

