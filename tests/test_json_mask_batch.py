"""JSON mode: the masks of a batch (batch_allowed), where a row whose matcher fails fails alone."""

from __future__ import annotations

import pytest
import torch
from json_mask_helpers import (
    CODER_V,
    ENUMS,
    EOS,
    V,
    constraint,
    feed,
    qwen_fixture,  # noqa: F401 (the fixture `qwen`)
    schema_format,
    tok_fixture,  # noqa: F401 (the fixture `tok`)
)

from qwen_ref.sampling.json_mask import JsonConstraint, JsonConstraintError, batch_allowed

pytest.importorskip("llguidance")


def test_batch_allowed(tok):
    a = constraint(tok, {"type": "json_object"})
    b = constraint(tok, schema_format({"type": "array"}))
    done = constraint(tok, schema_format({"type": "null"}))
    feed(done, tok, "null")
    assert batch_allowed([None, None], V) == (None, {})
    mask, failed = batch_allowed([a, None, b, done], V)
    assert failed == {}
    assert mask.shape == (4, V)
    assert torch.equal(mask[0], a.allowed_mask()) and torch.equal(mask[2], b.allowed_mask())
    assert mask[1].all()
    assert mask[3].nonzero().flatten().tolist() == sorted(EOS)


def three_rows(tok) -> list[JsonConstraint]:
    rows = [constraint(tok, {"type": "json_object"}), constraint(tok, schema_format(ENUMS)),
            constraint(tok, schema_format({"type": "array"}))]
    feed(rows[1], tok, '{"color": "')
    return rows


@pytest.mark.parametrize("broken", [0, 1, 2])
def test_a_matcher_in_an_error_state_fails_its_row_alone(tok, broken):
    alone = [c.allowed_mask() for c in three_rows(tok)]
    rows = three_rows(tok)
    with pytest.raises(JsonConstraintError, match="not allowed"):
        rows[broken].advance(tok.encode("Hello")[0])  # refused: llguidance's matcher is now in its error state
    mask, failed = batch_allowed(rows, V)
    assert list(failed) == [broken]
    assert isinstance(failed[broken], JsonConstraintError) and "error state" in str(failed[broken])
    assert mask[broken].all(), "a failed row allows every token, so the batch can still be sampled"
    for row in set(range(3)) - {broken}:
        assert torch.equal(mask[row], alone[row])
    with pytest.raises(JsonConstraintError, match="error state"):
        rows[broken].allowed_mask()


class _RaisingMatcher:
    """Stands in for an llguidance matcher that fails while computing its mask."""

    def is_error(self) -> bool:
        return False

    def is_stopped(self) -> bool:
        return False

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        raise RuntimeError("boom")


def test_any_exception_of_one_row_is_caught_for_that_row(tok, monkeypatch):
    alone = [c.allowed_mask() for c in three_rows(tok)]
    rows = three_rows(tok)
    rows[1]._matcher = _RaisingMatcher()  # fails the parallel call: each row is then computed alone
    mask, failed = batch_allowed(rows, V)
    assert list(failed) == [1] and isinstance(failed[1], JsonConstraintError)
    assert str(failed[1]) == "the JSON mask could not be computed: RuntimeError: boom"
    assert isinstance(failed[1].__cause__, RuntimeError)
    assert mask[1].all() and torch.equal(mask[0], alone[0]) and torch.equal(mask[2], alone[2])

    rows = three_rows(tok)
    monkeypatch.setattr(rows[2], "is_finished", lambda: 1 / 0)
    mask, failed = batch_allowed([rows[0], None, rows[2], rows[1]], V)
    assert list(failed) == [2] and "ZeroDivisionError" in str(failed[2])
    assert torch.equal(mask[0], alone[0]) and torch.equal(mask[3], alone[1]) and mask[1].all() and mask[2].all()

    wider = constraint(tok, {"type": "json_object"}, vocab_size=CODER_V)
    mask, failed = batch_allowed([wider, three_rows(tok)[0]], V)
    assert list(failed) == [0] and f"vocab_size {CODER_V}, not {V}" in str(failed[0])
    assert torch.equal(mask[1], alone[0])

