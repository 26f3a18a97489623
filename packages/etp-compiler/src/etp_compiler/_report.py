"""``CompilationReport``: a read-only summary of an :class:`ETraceGraph`, as data and as text."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import IO

from ._diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel
from ._graph import ETraceGraph
from ._module_info import StatePath

__all__ = ["CompilationReport"]

#: The diagnostics that say why a weight op got no eligibility trace.
_EXCLUSION_KINDS = (
    DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL,
    DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT,
    DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE,
    DiagnosticKind.RELATION_EXCLUDED_SHAPE_MISMATCH,
)

_RULE = "=" * 72


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(map(str, path))


class CompilationReport:
    """What the compiler found in one model step: hidden groups, weights with and without traces.

    A view over the graph: every property is derived from it on access.

    Parameters
    ----------
    graph : ETraceGraph
        A compiled graph (:func:`compile_etrace_graph`, or a learner's ``graph``).

    Attributes
    ----------
    graph : ETraceGraph

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_compiler import CompilationReport, compile_etrace_graph
    >>> cell = etp_nn.ValinaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> report = CompilationReport(compile_etrace_graph(cell, jnp.ones(3)))
    >>> report.hidden_groups
    [(0, [('h',)])]
    >>> report.counts["etrace_weights"], report.counts["hidden_groups"]
    (1, 1)
    """

    def __init__(self, graph: ETraceGraph) -> None:
        if not isinstance(graph, ETraceGraph):
            raise TypeError(f"CompilationReport expects an ETraceGraph, got {type(graph).__name__}.")
        self.graph = graph

    # ---------------------------------------------------------------- data
    @property
    def hidden_groups(self) -> list[tuple[int, list[StatePath]]]:
        """``(group index, hidden state paths)`` of each hidden group."""
        return [(g.index, list(g.hidden_paths)) for g in self.graph.hidden_groups]

    @property
    def etrace_weights(self) -> list[tuple[StatePath, list[int]]]:
        """``(ParamState path, indices of the groups its traces feed)`` of each weight with an eligibility trace.

        One entry per ParamState (in the order the step uses them), over all the
        relations (ETP equations) that read it.
        """
        groups: dict[StatePath, list[int]] = {}
        for relation in self.graph.hidden_param_op_relations:
            for leaves in relation.trainable_paths.values():
                for state_path, _ in leaves:
                    found = groups.setdefault(state_path, [])
                    found.extend(g.index for g in relation.hidden_groups if g.index not in found)
        return [(path, sorted(indices)) for path, indices in groups.items()]

    @property
    def excluded_weights(self) -> list[tuple[StatePath, str | None]]:
        """``(ParamState path, reason)`` of each parameter the step reads that has no eligibility trace.

        The reason is the value of the compiler's exclusion diagnostic (e.g.
        ``'relation_excluded_non_temporal'`` for a readout), or ``None`` for a
        parameter read by plain JAX ops only. These parameters get their
        instantaneous gradient.
        """
        traced = {path for path, _ in self.etrace_weights}
        reasons: dict[StatePath, str] = {}
        for record in self.graph.diagnostics:
            if record.kind in _EXCLUSION_KINDS and record.weight_path is not None:
                reasons.setdefault(tuple(record.weight_path), record.kind.value)
        return [(path, reasons.get(path)) for path in self.graph.module_info.weight_states if path not in traced]

    @property
    def dynamic_states(self) -> list[StatePath]:
        """Paths of the step's states that are neither parameters nor in a hidden group (e.g. counters)."""
        grouped = {p for g in self.graph.hidden_groups for p in g.hidden_paths}
        minfo = self.graph.module_info
        return [p for p in minfo.compiled_state_paths if p not in minfo.weight_states and p not in grouped]

    @property
    def diagnostics(self) -> tuple[CompilationRecord, ...]:
        """The compiler's records, in the order it made them."""
        return tuple(self.graph.diagnostics)

    @property
    def counts(self) -> dict[str, int]:
        """Numbers of hidden groups, weights with and without traces, warnings and errors."""
        levels = [record.level for record in self.graph.diagnostics]
        return {
            "hidden_groups": len(self.graph.hidden_groups),
            "etrace_weights": len(self.etrace_weights),
            "excluded_weights": len(self.excluded_weights),
            "warnings": levels.count(DiagnosticLevel.WARNING),
            "errors": levels.count(DiagnosticLevel.ERROR),
        }

    # ---------------------------------------------------------------- text
    def to_str(self, level: int = 1) -> str:
        """The report as text.

        Parameters
        ----------
        level : int
            ``1``: the hidden groups (their states and shape), the other
            dynamic states, the weights with traces (their ETP primitives and
            groups) and the weights without (with the reason). ``2``: also the
            compiler's warnings and errors. ``3``: every diagnostic.

        Raises
        ------
        ValueError
            If ``level`` is not 1, 2 or 3.
        """
        if isinstance(level, bool) or level not in (1, 2, 3):
            raise ValueError(f"CompilationReport.to_str: level must be 1, 2 or 3, got {level!r}.")
        graph = self.graph
        c = self.counts
        lines = [
            _RULE,
            f"ETP compilation of {type(graph.module_info.model).__name__}: {c['hidden_groups']} hidden group(s), "
            f"{c['etrace_weights']} weight(s) with eligibility traces, {c['excluded_weights']} without; "
            f"{c['warnings']} warning(s), {c['errors']} error(s).",
            "",
            "Hidden groups:",
        ]
        for group in graph.hidden_groups:
            lines.append(
                f"  Group {group.index}: {', '.join(_text(p) for p in group.hidden_paths)}  "
                f"(shape {group.varshape}, {group.num_state} state(s))"
            )
        if not graph.hidden_groups:
            lines.append("  (none)")
        dynamic = self.dynamic_states
        if dynamic:
            lines += ["", "Other dynamic states (no hidden group):"]
            lines += [f"  {_text(p)}" for p in dynamic]
        lines += ["", "Weights with eligibility traces:"]
        primitives: dict[StatePath, list[str]] = {}
        for relation in graph.hidden_param_op_relations:
            for leaves in relation.trainable_paths.values():
                for state_path, _ in leaves:
                    names = primitives.setdefault(state_path, [])
                    name = str(getattr(relation.primitive, "name", relation.primitive))
                    if name not in names:
                        names.append(name)
        for path, indices in self.etrace_weights:
            lines.append(f"  {_text(path)}  via {', '.join(primitives[path])} -> hidden group(s) {indices}")
        if not primitives:
            lines.append(
                "  (none: no ETP primitive drives a hidden state; every parameter gets its instantaneous gradient)"
            )
        excluded = self.excluded_weights
        if excluded:
            lines += ["", "Weights without traces (instantaneous gradient):"]
            for path, reason in excluded:
                lines.append(f"  {_text(path)}  ({reason if reason is not None else 'read by plain JAX ops only'})")
        if level >= 2:
            wanted = (DiagnosticLevel.WARNING, DiagnosticLevel.ERROR) if level == 2 else tuple(DiagnosticLevel)
            records = [r for r in graph.diagnostics if r.level in wanted]
            if records:
                lines += ["", "Compiler diagnostics:" if level == 3 else "Compiler warnings and errors:"]
                lines += [f"  [{r.level.value}] {r.kind.value}: {r.message}" for r in records]
        lines.append(_RULE)
        return "\n".join(lines)

    def show(self, level: int = 1, *, file: IO[str] | None = None) -> None:
        """Print :meth:`to_str` (``level``) to ``file`` (standard output by default)."""
        print(self.to_str(level), file=file)

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value}" for key, value in self.counts.items())
        return f"CompilationReport({fields})"
