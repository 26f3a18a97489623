r"""A learning rule as a value: a frozen record of pure functions over a trace pytree.

An online learner runs, at every step :math:`t`, the model's step and the
rule's trace update, and answers the step's backward pass with the rule's
estimate of the gradient. Everything specific to a rule lives in one
:class:`LearningRule` record (in the spirit of optax's
``GradientTransformation``); :func:`etp_algorithms.extend.build_step` turns a
compiled graph and a rule into the ``custom_vjp`` step, once, and
:class:`etp_algorithms.ETraceAlgorithm` is the thin brainstate module that
holds the states.

The contract
------------
``traces`` is any JAX pytree the rule chooses (a frozen dataclass registered
with :func:`jax.tree_util.register_dataclass`, with the relation and group
indices as static fields, is the convention). ``values`` is the
:class:`~etp_algorithms.StepValues` of the step: ``values.x_values[r]``,
``values.hidden_dims[(r, g)]`` (:math:`D^t_f`, shape ``(*varshape, S)``),
``values.jacobians[g]`` (:math:`D^t`, shape ``(*varshape, S, S)``) and
``values.env`` (every variable of the step). ``dL_dh`` maps each hidden
state's path to :math:`g^t = \partial L / \partial h^t`.

``init_traces(ctx) -> traces``
    Zero traces for the compiled graph ``ctx.graph``.
``update_traces(ctx, traces, values) -> (new_traces, residual)``
    :math:`\epsilon^{t-1} \mapsto \epsilon^t`. ``residual`` is what the
    backward pass needs (a pytree of arrays; often the new traces).
``trace_gradients(ctx, residual, values, dL_dh) -> RelationGradients``
    For each relation index ``r`` and trainable key ``k``, the gradient of the
    loss with respect to the relation's trainable input through the hidden
    states *beyond* what the step's VJP already holds. The VJP holds the
    instantaneous term :math:`\mathrm{xy\_to\_dw}(x^t, \sum_s g^t_s D^t_{f,s})`
    except for the keys in ``ctx.hidden_only``, for which the rule's result
    must include it (:func:`etp_algorithms.extend.instantaneous_gradient`
    computes it).
``window_start_gradients(ctx, traces, values, dL_dh) -> RelationGradients``
    Optional (``None``: the rule does not support multi-step windows). The
    traces held at a window's start contracted with :math:`\partial L/\partial h`
    of that start state (the dependence on earlier windows).
``trace_of(ctx, traces, r) -> Any``
    The rule's traces of relation ``r``, for :meth:`ETraceAlgorithm.get_etrace_of`.

Which hidden cotangent
----------------------
``hidden_cotangents='new'`` (the default, what D-RTRL and ES-D-RTRL use):
``dL_dh`` holds :math:`g^t = \partial L/\partial h^t`, the cotangent of the
step's *new* hidden states, and the VJP leaves out the keys of
``ctx.hidden_only``. ``hidden_cotangents='previous'`` (for rules that carry a
total influence :math:`M^{t-1} = \mathrm{d}h^{t-1}/\mathrm{d}W`, such as exact
RTRL): ``dL_dh`` holds :math:`\partial L^t/\partial h^{t-1}`, the cotangent of
the step's hidden-state *inputs* with the weights and inputs held fixed;
``ctx.hidden_only`` is empty, so the VJP holds every direct term and the rule
returns only the history term :math:`\partial L^t/\partial h^{t-1}\, M^{t-1}`,
which is exact for any step.

``gradient_targets='relations'`` (the default): the gradient functions return
:data:`RelationGradients`, with respect to each relation's trainable inputs,
pulled back through the weight transforms by the learner.
``gradient_targets='weights'``: they return :data:`WeightGradients`, keyed by
ParamState leaf ``(state path, leaf key path)``, added to those leaves as they
are. Every weight leaf of the step can then learn through its history, also
one that reaches the hidden states only through another weight (a GRU's reset
gate) or through no ETP op at all. :func:`etp_algorithms.extend.hidden_transition`
gives such rules the step as a function of the old hidden states and the
relations' trainable inputs, for ``jax.jvp`` / ``jax.vjp``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from etp_compiler import ETraceGraph, StatePath, WeightLeaf

from ._executor import StepValues

__all__ = ["HiddenCotangents", "LearningRule", "RelationGradients", "RuleContext", "WeightGradients"]

#: ``relation index -> {trainable key: gradient w.r.t. the relation's trainable input}``.
RelationGradients = dict[int, dict[str, jax.Array]]
#: ``(state path, leaf key path) -> gradient`` of ParamState leaves (``gradient_targets='weights'``).
WeightGradients = dict[WeightLeaf, jax.Array]
#: ``hidden state path -> dL/dh`` of that state.
HiddenCotangents = Mapping[StatePath, jax.Array]


@dataclass(frozen=True)
class RuleContext:
    """What a rule's functions know statically (not traced): the graph and the VJP's shortcuts.

    Attributes
    ----------
    graph : etp_compiler.ETraceGraph
        The compiled step.
    hidden_only : frozenset of (int, str)
        ``(relation index, trainable key)`` pairs the step's VJP does not differentiate, because their
        only route to the loss is their relation's hidden states: the rule's ``trace_gradients`` must
        include the instantaneous term for them (see :mod:`etp_algorithms._hidden_only`).
    """

    graph: ETraceGraph
    hidden_only: frozenset[tuple[int, str]] = frozenset()

    def keeps_instantaneous(self, index: int, key: str) -> bool:
        """Whether the rule's gradient for ``key`` of relation ``index`` must include step ``t``'s own term."""
        return (index, key) in self.hidden_only


InitTraces = Callable[[RuleContext], Any]
UpdateTraces = Callable[[RuleContext, Any, StepValues], tuple[Any, Any]]
TraceGradients = Callable[[RuleContext, Any, StepValues, HiddenCotangents], RelationGradients | WeightGradients]
TraceOf = Callable[[RuleContext, Any, int], Any]
#: The values of :attr:`LearningRule.hidden_cotangents`.
HIDDEN_COTANGENTS = ("new", "previous")
#: The values of :attr:`LearningRule.gradient_targets`.
GRADIENT_TARGETS = ("relations", "weights")


def _whole_trace(ctx: RuleContext, traces: Any, index: int) -> Any:
    return traces


@dataclass(frozen=True)
class LearningRule:
    r"""An online learning rule: pure functions over a trace pytree (see the module docstring).

    Parameters
    ----------
    name : str
        Shown in reprs and error messages.
    init_traces, update_traces, trace_gradients : callable
        The rule (contract in :mod:`etp_algorithms._rule`).
    window_start_gradients : callable, optional
        Multi-step windows; ``None`` if the rule has no window-start contraction.
    trace_of : callable, optional
        ``(ctx, traces, relation index) -> traces of that relation``.
    hidden_cotangents : {'new', 'previous'}
        What ``dL_dh`` holds (see the module docstring): :math:`\partial L/\partial h^t` of the new
        hidden states (default), or :math:`\partial L^t/\partial h^{t-1}` of the step's hidden inputs.
    gradient_targets : {'relations', 'weights'}
        What the gradient functions return: :data:`RelationGradients` (default) or
        :data:`WeightGradients` (see the module docstring).

    Examples
    --------
    >>> from etp_algorithms.extend import LearningRule, d_rtrl
    >>> rule = d_rtrl()
    >>> isinstance(rule, LearningRule), rule.name, rule.supports_windows
    (True, 'D_RTRL', True)
    """

    name: str
    init_traces: InitTraces
    update_traces: UpdateTraces
    trace_gradients: TraceGradients
    window_start_gradients: TraceGradients | None = None
    trace_of: TraceOf = _whole_trace
    hidden_cotangents: str = "new"
    gradient_targets: str = "relations"

    @property
    def supports_windows(self) -> bool:
        """Whether the rule can run multi-step windows (it has a window-start contraction)."""
        return self.window_start_gradients is not None

    def __post_init__(self) -> None:
        for field in ("init_traces", "update_traces", "trace_gradients", "trace_of"):
            if not callable(getattr(self, field)):
                raise TypeError(f"LearningRule {self.name!r}: {field} must be callable, got {getattr(self, field)!r}.")
        if self.hidden_cotangents not in HIDDEN_COTANGENTS:
            raise ValueError(
                f"LearningRule {self.name!r}: hidden_cotangents must be one of {HIDDEN_COTANGENTS}, "
                f"got {self.hidden_cotangents!r}."
            )
        if self.gradient_targets not in GRADIENT_TARGETS:
            raise ValueError(
                f"LearningRule {self.name!r}: gradient_targets must be one of {GRADIENT_TARGETS}, "
                f"got {self.gradient_targets!r}."
            )
        if self.window_start_gradients is not None and not callable(self.window_start_gradients):
            raise TypeError(
                f"LearningRule {self.name!r}: window_start_gradients must be callable or None, "
                f"got {self.window_start_gradients!r}."
            )
