"""Compiler diagnostics: one record per decision, in words a modeller understands."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DiagnosticKind", "DiagnosticLevel", "CompilationRecord", "explain_records", "emit_warnings"]


class DiagnosticKind(enum.Enum):
    """What a compiler decision was about."""

    #: A weight op drives hidden states and gets an eligibility trace.
    RELATION_INCLUDED = "relation_included"
    #: A weight op reaches no hidden state (e.g. a readout): instantaneous gradient only.
    RELATION_EXCLUDED_NON_TEMPORAL = "relation_excluded_non_temporal"
    #: A weight op reaches hidden states only through another trainable ETP op.
    RELATION_EXCLUDED_WEIGHT_TO_WEIGHT = "relation_excluded_weight_to_weight"
    #: A trainable input of an ETP op does not come from a ParamState alone.
    RELATION_EXCLUDED_NO_PARAMSTATE = "relation_excluded_no_paramstate"
    #: A weight op's output is not broadcast-compatible with the hidden state it reaches.
    RELATION_EXCLUDED_SHAPE_MISMATCH = "relation_excluded_shape_mismatch"
    #: Some of a weight op's paths to a hidden state pass through another trainable ETP op and are cut there.
    TRANSITION_TAIL_BOUNDED = "transition_tail_bounded"
    #: Several hidden states form one group (S > 1 states per position).
    HIDDEN_GROUP_MERGED = "hidden_group_merged"
    #: Connected hidden states of different shapes, or other state inconsistencies.
    STATE_MISMATCH = "state_mismatch"
    #: An ETP primitive inside lax control flow (scan/while/cond), or a custom-derivative call that had to be inlined.
    PRIMITIVE_INSIDE_CONTROL_FLOW = "primitive_inside_control_flow"
    #: A control-flow construct of the step was if-converted, unrolled, or left opaque (see ControlFlowPolicy).
    CONTROL_FLOW_CONVERTED = "control_flow_converted"
    #: A transition (h -> h or y -> h) that mixes positions: D-RTRL keeps its diagonal (approximation).
    TRANSITION_NOT_POSITIONWISE = "transition_not_positionwise"


class DiagnosticLevel(enum.Enum):
    """How much a decision matters: ``INFO`` (as expected), ``WARNING`` (check it), ``ERROR``."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class CompilationRecord:
    """One compiler decision.

    Attributes
    ----------
    kind : DiagnosticKind
    level : DiagnosticLevel
    message : str
        Names the weight, the primitive and the reason.
    primitive : jax Primitive or None
    weight_path : tuple or None
        Path of the ParamState, e.g. ``('cell', 'Wr', 'weight')``.
    hidden_paths : tuple of paths or None
        Hidden states involved.
    context : dict
        Extra facts (group indices, path classification, shapes).
    """

    kind: DiagnosticKind
    level: DiagnosticLevel
    message: str
    primitive: Any = None
    weight_path: tuple[Hashable, ...] | None = None
    hidden_paths: tuple[tuple[Hashable, ...], ...] | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [f"kind={self.kind.value}", f"level={self.level.value}"]
        if self.primitive is not None:
            parts.append(f"primitive={getattr(self.primitive, 'name', self.primitive)!r}")
        if self.weight_path is not None:
            parts.append(f"weight_path={self.weight_path!r}")
        if self.hidden_paths:
            parts.append(f"hidden_paths={list(self.hidden_paths)!r}")
        parts.append(f"message={self.message!r}")
        if self.context:
            parts.append(f"context={self.context!r}")
        return f"CompilationRecord({', '.join(parts)})"


def _matches(record: CompilationRecord, weight_path: Any, hidden_path: Any, kind: Any) -> bool:
    if kind is not None:
        kinds = {kind} if isinstance(kind, DiagnosticKind) else set(kind)
        if record.kind not in kinds:
            return False
    if weight_path is not None and record.weight_path != tuple(weight_path):
        return False
    if hidden_path is not None and tuple(hidden_path) not in (record.hidden_paths or ()):
        return False
    return True


def explain_records(
    records: Sequence[CompilationRecord],
    *,
    weight_path: Sequence[Hashable] | None = None,
    hidden_path: Sequence[Hashable] | None = None,
    kind: DiagnosticKind | Iterable[DiagnosticKind] | None = None,
    file: Any = None,
) -> tuple[CompilationRecord, ...]:
    """Print ``records`` grouped by kind (optionally filtered) and return the selected ones."""
    selected = tuple(r for r in records if _matches(r, weight_path, hidden_path, kind))
    lines = [f"ETP compilation: {len(selected)} record(s)"]
    for k in DiagnosticKind:
        of_kind = [r for r in selected if r.kind is k]
        if not of_kind:
            continue
        lines.append(f"{k.name} ({len(of_kind)}):")
        lines.extend(f"  [{r.level.name:7s}] {r.message}" for r in of_kind)
    print("\n".join(lines), file=file)
    return selected


def emit_warnings(records: Iterable[CompilationRecord]) -> None:
    """Emit each warning-level record once as a ``UserWarning``."""
    seen: set[str] = set()
    for record in records:
        if record.level is DiagnosticLevel.WARNING and record.message not in seen:
            seen.add(record.message)
            warnings.warn(record.message, UserWarning, stacklevel=3)
