"""``CompilationReport`` against the graph it summarises.

The model has one weight of each kind: ETP weights driving two hidden groups
(one of them read by two ETP ops into both groups), an ETP readout (excluded,
non-temporal), a parameter read by a plain JAX op (excluded, no ETP op), and a
counter that is neither a parameter nor in a hidden group.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_primitives as etp
from etp_compiler import CompilationReport, DiagnosticKind, DiagnosticLevel, ETraceGraph, compile_etrace_graph

Array = jax.Array
I, N, M, K = 3, 4, 2, 2


class Mixed(brainstate.nn.Module):
    """``h = a h + x W_in + x S``, ``g = b g + x W_g + x S[:, :M] + c``, readout ``h R``; ``c`` via a plain op."""

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.w_in = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, N))))
        self.w_shared = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, N))))
        self.w_g = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, M))))
        self.readout = brainstate.ParamState(jnp.asarray(rng.normal(size=(N, K))))
        self.plain = brainstate.ParamState(jnp.asarray(rng.normal(size=(M,))))
        self.h = brainstate.HiddenState(jnp.zeros(N))
        self.g = brainstate.HiddenState(jnp.zeros(M))
        self.count = brainstate.ShortTermState(jnp.zeros((), jnp.int32))

    def update(self, x: Array) -> Array:
        shared_h = etp.matmul(x, self.w_shared.value)
        shared_g = etp.matmul(x, self.w_shared.value[:, :M])  # a second ETP op on the same ParamState
        self.h.value = 0.9 * self.h.value + etp.matmul(x, self.w_in.value) + shared_h
        self.g.value = 0.8 * self.g.value + etp.matmul(x, self.w_g.value) + shared_g + self.plain.value
        self.count.value = self.count.value + 1
        return etp.matmul(self.h.value, self.readout.value)


def _graph(rng: np.random.Generator) -> ETraceGraph:
    model = Mixed(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_etrace_graph(model, jnp.ones(I))


def _group_of(graph: ETraceGraph, path: tuple[str, ...]) -> int:
    return graph.hid_path_to_group[path].index


def test_data_views_match_the_graph(rng: np.random.Generator) -> None:
    graph = _graph(rng)
    report = CompilationReport(graph)
    gh, gg = _group_of(graph, ("h",)), _group_of(graph, ("g",))
    assert gh != gg
    assert sorted(report.hidden_groups) == sorted([(gh, [("h",)]), (gg, [("g",)])])
    assert report.hidden_groups == [(g.index, list(g.hidden_paths)) for g in graph.hidden_groups]

    # weights with traces: by hand, and from the relations
    expected = {("w_in",): [gh], ("w_shared",): sorted([gh, gg]), ("w_g",): [gg]}
    assert dict(report.etrace_weights) == expected
    assert len(report.etrace_weights) == 3  # one entry per ParamState: w_shared's two relations are merged
    assert sum(r.weight_path == ("w_shared",) for r in graph.hidden_param_op_relations) == 2
    from_relations: dict[Any, set[int]] = {}
    for relation in graph.hidden_param_op_relations:
        from_relations.setdefault(relation.weight_path, set()).update(g.index for g in relation.hidden_groups)
    assert {p: sorted(s) for p, s in from_relations.items()} == expected

    excluded = dict(report.excluded_weights)
    assert excluded == {
        ("readout",): DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL.value,
        ("plain",): None,
    }
    # every parameter the step reads is either traced or excluded, never both
    assert set(excluded) | set(expected) == set(graph.module_info.weight_states)
    assert not set(excluded) & set(expected)

    assert report.dynamic_states == [("count",)]
    assert report.diagnostics == graph.diagnostics
    levels = [r.level for r in graph.diagnostics]
    assert report.counts == {
        "hidden_groups": 2,
        "etrace_weights": 3,
        "excluded_weights": 2,
        "warnings": levels.count(DiagnosticLevel.WARNING),
        "errors": levels.count(DiagnosticLevel.ERROR),
    }
    assert report.counts["warnings"] >= 1  # the readout's exclusion is a warning
    assert repr(report).startswith("CompilationReport(hidden_groups=2, etrace_weights=3, excluded_weights=2")


def test_text_names_groups_weights_and_reasons(rng: np.random.Generator) -> None:
    graph = _graph(rng)
    report = CompilationReport(graph)
    gh, gg = _group_of(graph, ("h",)), _group_of(graph, ("g",))
    text = report.to_str()
    assert "Mixed" in text
    assert f"Group {gh}: h  (shape ({N},), 1 state(s))" in text
    assert f"Group {gg}: g  (shape ({M},), 1 state(s))" in text
    assert f"w_in  via etp_mv -> hidden group(s) [{gh}]" in text
    assert f"w_shared  via etp_mv -> hidden group(s) {sorted([gh, gg])}" in text
    assert "readout  (relation_excluded_non_temporal)" in text
    assert "plain  (read by plain JAX ops only)" in text
    assert "Other dynamic states (no hidden group):\n  count" in text
    warning = next(r for r in graph.diagnostics if r.level is DiagnosticLevel.WARNING)
    info = next(r for r in graph.diagnostics if r.level is DiagnosticLevel.INFO)
    assert warning.message not in text
    level2 = report.to_str(2)
    assert warning.message in level2 and info.message not in level2
    level3 = report.to_str(3)
    assert warning.message in level3 and info.message in level3
    for bad in (0, 4, True, "1"):
        with pytest.raises(ValueError, match="level must be 1, 2 or 3"):
            report.to_str(bad)  # type: ignore[arg-type]

    out = io.StringIO()
    report.show(2, file=out)
    assert out.getvalue() == level2 + "\n"


def test_model_without_traces(rng: np.random.Generator) -> None:
    class Plain(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, N))))
            self.h = brainstate.HiddenState(jnp.zeros(N))

        def update(self, x: Array) -> Array:
            self.h.value = 0.5 * self.h.value + x @ self.w.value
            return self.h.value

    model = Plain()
    report = CompilationReport(compile_etrace_graph(model, jnp.ones(I)))
    assert report.etrace_weights == []
    assert report.excluded_weights == [(("w",), None)]
    assert "(none: no ETP primitive drives a hidden state" in report.to_str()


def test_rejects_what_is_not_a_graph() -> None:
    with pytest.raises(TypeError, match="CompilationReport expects an ETraceGraph, got dict"):
        CompilationReport({})  # type: ignore[arg-type]
