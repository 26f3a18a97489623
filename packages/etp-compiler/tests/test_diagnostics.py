"""Diagnostics: CompilationRecord, explain() filtering and printing, warnings."""

from __future__ import annotations

import io
import warnings
from typing import Any

import brainstate
import jax.numpy as jnp
import pytest
from compiler_testing import compile_quiet

import etp_nn
from etp_compiler import CompilationRecord, DiagnosticKind, DiagnosticLevel, ETraceGraph


class GRUWithReadout(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = etp_nn.GRUCell(3, 4)
        self.readout = etp_nn.Linear(4, 2)

    def update(self, x: Any) -> Any:
        return self.readout(self.gru(x))


@pytest.fixture(scope="module")
def graph() -> ETraceGraph:
    with brainstate.environ.context(precision=64):
        model = GRUWithReadout()
        brainstate.nn.init_all_states(model)
        return compile_quiet(model, jnp.ones(3))


def test_records_cover_every_weight_op(graph: ETraceGraph) -> None:
    kinds = [(r.kind, r.weight_path) for r in graph.diagnostics]
    assert kinds == [
        (DiagnosticKind.RELATION_INCLUDED, ("gru", "Wz", "weight")),
        (DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT, ("gru", "Wr", "weight")),
        (DiagnosticKind.RELATION_INCLUDED, ("gru", "Wh", "weight")),
        (DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, ("readout", "weight")),
    ]
    levels = {r.kind: r.level for r in graph.diagnostics}
    assert levels[DiagnosticKind.RELATION_INCLUDED] is DiagnosticLevel.INFO
    assert levels[DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL] is DiagnosticLevel.WARNING
    assert all(isinstance(r, CompilationRecord) for r in graph.diagnostics)
    assert all(r.primitive is not None and r.primitive.name == "etp_mv" for r in graph.diagnostics)


def test_explain_without_filters_prints_every_record_grouped_by_kind(
    graph: ETraceGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    selected = graph.explain()
    assert selected == graph.diagnostics
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ETP compilation: 4 record(s)"
    headers = [line for line in lines if not line.startswith("  ")]
    # grouped in DiagnosticKind order, with counts
    assert headers[1:] == [
        "RELATION_INCLUDED (2):",
        "RELATION_EXCLUDED_NON_TEMPORAL (1):",
        "RELATION_EXCLUDED_WEIGHT_TO_WEIGHT (1):",
    ]
    included = lines[lines.index("RELATION_INCLUDED (2):") + 1 : lines.index("RELATION_INCLUDED (2):") + 3]
    assert all(line.startswith("  [INFO   ] etp_mv(") for line in included)
    assert "('gru', 'Wz', 'weight')" in included[0] and "('gru', 'Wh', 'weight')" in included[1]
    assert any(line.startswith("  [WARNING] ") and "('readout', 'weight')" in line for line in lines)


def test_explain_filters_by_weight_path(graph: ETraceGraph, capsys: pytest.CaptureFixture[str]) -> None:
    (record,) = graph.explain(weight_path=["gru", "Wr", "weight"])
    assert record.kind is DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT
    out = capsys.readouterr().out
    assert out.startswith("ETP compilation: 1 record(s)\nRELATION_EXCLUDED_WEIGHT_TO_WEIGHT (1):\n  [WARNING] ")
    assert "RELATION_INCLUDED" not in out
    assert graph.explain(weight_path=("nope",)) == ()
    assert capsys.readouterr().out == "ETP compilation: 0 record(s)\n"


def test_explain_filters_by_hidden_path(graph: ETraceGraph, capsys: pytest.CaptureFixture[str]) -> None:
    selected = graph.explain(hidden_path=("gru", "h"))
    # the two included gates and the weight-to-weight exclusion name the hidden state; the readout does not
    assert [r.weight_path for r in selected] == [
        ("gru", "Wz", "weight"),
        ("gru", "Wr", "weight"),
        ("gru", "Wh", "weight"),
    ]
    assert "readout" not in capsys.readouterr().out


def test_explain_filters_by_kind_and_combines_filters(graph: ETraceGraph, capsys: pytest.CaptureFixture[str]) -> None:
    selected = graph.explain(kind=DiagnosticKind.RELATION_INCLUDED)
    assert [r.weight_path for r in selected] == [("gru", "Wz", "weight"), ("gru", "Wh", "weight")]
    kinds = [DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT]
    selected = graph.explain(kind=kinds)
    assert {r.kind for r in selected} == set(kinds)
    selected = graph.explain(kind=DiagnosticKind.RELATION_INCLUDED, weight_path=("gru", "Wh", "weight"))
    assert len(selected) == 1
    assert graph.explain(kind=DiagnosticKind.HIDDEN_GROUP_MERGED) == ()
    capsys.readouterr()


def test_explain_writes_to_a_file(graph: ETraceGraph, capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.StringIO()
    graph.explain(kind=DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, file=buffer)
    assert capsys.readouterr().out == ""
    text = buffer.getvalue()
    assert text.startswith("ETP compilation: 1 record(s)\nRELATION_EXCLUDED_NON_TEMPORAL (1):")
    assert "non-temporal parameter" in text


def test_record_repr_and_context(graph: ETraceGraph) -> None:
    record = graph.explain(weight_path=("gru", "Wz", "weight"), file=io.StringIO())[0]
    text = repr(record)
    assert text.startswith("CompilationRecord(kind=relation_included, level=info, primitive='etp_mv'")
    assert "weight_path=('gru', 'Wz', 'weight')" in text and "hidden_paths=[('gru', 'h')]" in text
    assert record.context == {"hidden_group_indices": (0,), "path_classification": {("gru", "h"): "all_direct"}}
    plain = CompilationRecord(DiagnosticKind.STATE_MISMATCH, DiagnosticLevel.ERROR, "boom")
    assert repr(plain) == "CompilationRecord(kind=state_mismatch, level=error, message='boom')"
    with pytest.raises(AttributeError):
        plain.message = "changed"  # type: ignore[misc]


def test_warnings_are_emitted_once_per_message_and_only_for_warning_level() -> None:
    from etp_compiler._diagnostics import emit_warnings

    records = [
        CompilationRecord(DiagnosticKind.RELATION_INCLUDED, DiagnosticLevel.INFO, "included"),
        CompilationRecord(DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, DiagnosticLevel.WARNING, "readout"),
        CompilationRecord(DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL, DiagnosticLevel.WARNING, "readout"),
        CompilationRecord(DiagnosticKind.STATE_MISMATCH, DiagnosticLevel.WARNING, "shapes"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emit_warnings(records)
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "readout"), (UserWarning, "shapes")]
