r"""D-RTRL: parameter-dimension eligibility traces.

For a relation :math:`y = \mathrm{op}(x, W)` driving a group with :math:`S`
states per position, the trace of each trainable key evolves as

.. math::

    \epsilon^t_s = \underbrace{\sum_{s'} \mathrm{yw\_to\_w}(D^t_{ss'}, \epsilon^{t-1}_{s'})}_{\bar\epsilon^t_s}
                   + \mathrm{drtrl\_seed}(x^t, D^t_{f,s}, W),

and the gradient of a loss :math:`L^t` of step :math:`t` is

.. math::

    \frac{\partial L^t}{\partial W} = \frac{\partial L^t}{\partial W}\Big|_{h^{t-1}}
        + \sum_s \mathrm{drtrl\_grad}(x^t, g^t_s, \bar\epsilon^t_s, W),
    \qquad g^t = \partial L^t / \partial h^t,

where the first term (the instantaneous VJP of the step) already contains
the seed term contracted with :math:`g^t`. Exact when the hidden dynamics and
the op are position-wise and the outputs read the stored hidden states (e.g.
leaky integrators); an approximation otherwise: paths through other ETP ops
are dropped, and ``etp_nn.LIF`` emits the spike of its potential before the
reset, not of the stored state, so it is approximate even with feed-forward
input. Memory: :math:`O(B\cdot\theta)` per relation, independent of
the sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

import etp_primitives as etp
from etp_compiler import ControlFlowPolicy, HiddenGroup, HiddenParamOpRelation

from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._peer_keywords import DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS, PeerKeywords
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import (
    coupling,
    extra_axes,
    host_zeros,
    map_extra,
    relation_weights,
    rule_shapes,
    stack_states,
    sum_over_samples,
    weight_shaped_batched,
)

__all__ = ["D_RTRL", "D_RTRLTrace", "ParamDimVjpAlgorithm", "d_rtrl"]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class D_RTRLTrace:
    """The D-RTRL trace of one relation toward one of its hidden groups.

    Attributes
    ----------
    relation, group : int
        The relation's index in the graph and the group's index (static).
    eps : dict
        ``trainable key -> (eps_1, ..., eps_S)``, one array per state (no S axis), each of the shape
        of the primitive's ``init_drtrl`` trace, with the group's broadcast axes in front.
    """

    relation: int = field(metadata={"static": True})
    group: int = field(metadata={"static": True})
    eps: dict[str, tuple[jax.Array, ...]]


def _pairs(ctx: RuleContext) -> Iterator[tuple[int, HiddenParamOpRelation, HiddenGroup]]:
    for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
        for group in relation.hidden_groups:
            yield index, relation, group


def _checked(ctx: RuleContext, traces: tuple[D_RTRLTrace, ...]) -> Iterator[Any]:
    pairs = list(_pairs(ctx))
    if len(pairs) != len(traces) or any((t.relation, t.group) != (i, g.index) for t, (i, _, g) in zip(traces, pairs)):
        raise ValueError("D_RTRL: the traces do not belong to this graph; call init_etrace_state() after compiling.")
    for trace, (index, relation, group) in zip(traces, pairs, strict=True):
        yield trace, index, relation, group


def init_traces(ctx: RuleContext) -> tuple[D_RTRLTrace, ...]:
    traces = []
    for index, relation, group in _pairs(ctx):
        init = etp.require_rules(relation.primitive, "init_drtrl")["init_drtrl"]
        extra = extra_axes(relation, group)
        base = rule_shapes(init, relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
        # One array per state (no S axis): stacking the states, or a size-1 minor S axis, makes XLA
        # write each step's trace to a new buffer and copy it into the loop carry, a full extra pass
        # over the trace per step.
        eps = {
            key: tuple(
                host_zeros((*group.varshape[:extra], *leaf.shape[:-1]), leaf.dtype) for _ in range(group.num_state)
            )
            for key, leaf in base.items()
        }
        traces.append(D_RTRLTrace(index, group.index, eps))
    return tuple(traces)


def update_traces(ctx: RuleContext, traces: Any, values: StepValues) -> tuple[Any, Any]:
    new = []
    for trace, index, relation, group in _checked(ctx, traces):
        one = partial(
            _propagate_and_seed,
            coupling=coupling(ctx.graph, group),
            primitive=relation.primitive,
            params=relation.eqn_params,
            weights=relation_weights(relation, values),
            num_state=group.num_state,
        )
        fn = map_extra(one, extra_axes(relation, group), (0, 0, 0, None))
        eps = fn(
            trace.eps, values.jacobians[group.index], values.hidden_dims[(index, group.index)], values.x_values[index]
        )
        new.append(D_RTRLTrace(index, group.index, eps))
    # The residual is the new traces: the backward pass recovers D eps^{t-1} = eps^t - seed^t inside
    # its contraction, so the old traces are dead after the update (XLA updates them in place) and
    # the trace is read once by the update and once by the contraction.
    return tuple(new), tuple(new)


def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> RelationGradients:
    # Without the barrier XLA re-fuses the update into the contraction and reads eps^{t-1} again,
    # which keeps the old traces alive and costs a full copy of them per step inside a scan.
    return _contract(ctx, jax.lax.optimization_barrier(residual), values, dL_dh, subtract_seed=True)


def window_start_gradients(
    ctx: RuleContext, traces: Any, values: StepValues, dL_dh: HiddenCotangents
) -> RelationGradients:
    # the full trace at the window start is dh/dW of the start state
    return _contract(ctx, traces, values, dL_dh, subtract_seed=False)


def trace_of(ctx: RuleContext, traces: Any, index: int) -> dict[int, dict[str, jax.Array]]:
    """``group index -> {trainable key: trace with the states on a trailing S axis}``."""
    return {t.group: {k: jnp.stack(v, axis=-1) for k, v in t.eps.items()} for t in traces if t.relation == index}


def _contract(
    ctx: RuleContext, traces: Any, values: StepValues, dL_dh: HiddenCotangents, subtract_seed: bool
) -> RelationGradients:
    """``sum_s drtrl_grad(x, g_s, eps_s)`` per relation; ``eps_s - seed_s`` when ``subtract_seed``."""
    grads: RelationGradients = {}
    for trace, index, relation, group in _checked(ctx, traces):
        w = relation_weights(relation, values)
        x = values.x_values[index]
        g = stack_states(group, dL_dh)
        Df = values.hidden_dims[(index, group.index)] if subtract_seed else None
        one = partial(
            _contract_group,
            primitive=relation.primitive,
            params=relation.eqn_params,
            weights=w,
            num_state=group.num_state,
            # keys left out of the VJP keep their seed: it is their instantaneous term
            keep_seed=frozenset(k for k in trace.eps if ctx.keeps_instantaneous(index, k)),
        )
        extra = extra_axes(relation, group)
        if extra == 0 and weight_shaped_batched(relation.primitive, trace.eps, w, g, x):
            part = sum_over_samples(one, trace.eps, g, Df, x)
        else:
            part = map_extra(one, extra, (0, 0, 0, None))(trace.eps, g, Df, x)
        total = grads.setdefault(index, {})
        for key, value in part.items():
            value = jnp.sum(value, axis=tuple(range(extra))) if extra else value
            total[key] = total[key] + value if key in total else value
    return grads


def _propagate_and_seed(
    eps: dict[str, Any],
    D: Any,
    Df: Any,
    x: Any,
    *,
    primitive: Any,
    params: dict[str, Any],
    weights: Any,
    num_state: int,
    coupling: tuple[tuple[bool, ...], ...],
) -> dict[str, Any]:
    r"""``eps^t_s = sum_{s'} yw_to_w(D_{ss'}, eps^{t-1}_{s'}) + seed_s`` for one group.

    ``coupling[s][s']`` false means :math:`D_{ss'}` is structurally zero: that term is skipped,
    which also lets XLA update a state's trace in place when no other state reads it.
    """
    yw_to_w = etp.require_rules(primitive, "yw_to_w")["yw_to_w"]
    out: dict[str, list[Any]] = {k: [] for k in eps}
    for s in range(num_state):
        acc: dict[str, Any] = {}
        for s2 in range(num_state):
            if coupling[s][s2]:
                part = yw_to_w(D[..., s, s2], {k: v[s2] for k, v in eps.items()}, **params)
                acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
        seed = etp.drtrl_seed(primitive, x, Df[..., s], weights, params)
        for k, v in eps.items():
            prop = acc[k] if acc else jnp.zeros_like(v[s])
            out[k].append(prop + seed[k].astype(prop.dtype))
    return {k: tuple(v) for k, v in out.items()}


def _contract_group(
    eps: dict[str, Any],
    g: Any,
    Df: Any,
    x: Any,
    *,
    primitive: Any,
    params: dict[str, Any],
    weights: Any,
    num_state: int,
    keep_seed: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """``sum_s drtrl_grad(x, g_s, eps_s)`` for one group; with ``Df``, ``eps_s`` minus the seed of ``(x, Df_s)``
    for the keys not in ``keep_seed``."""
    acc: dict[str, Any] = {}
    for s in range(num_state):
        trace = {k: v[s] for k, v in eps.items()}
        if Df is not None and set(trace) - keep_seed:
            seed = etp.drtrl_seed(primitive, x, Df[..., s], weights, params)
            trace = {k: trace[k] if k in keep_seed else trace[k] - seed[k].astype(trace[k].dtype) for k in trace}
        part = etp.drtrl_grad(primitive, x, g[..., s], trace, weights, params)
        acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
    return acc


def d_rtrl() -> LearningRule:
    """The D-RTRL learning rule (see the module docstring)."""
    return LearningRule(
        name="D_RTRL",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=window_start_gradients,
        trace_of=trace_of,
    )


class D_RTRL(ETraceAlgorithm):
    r"""Online learning with D-RTRL traces (alias ``ParamDimVjpAlgorithm``).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: the learner also takes windows of steps (inputs wrapped in
        :class:`MultiStepData`); exact reverse mode inside the window, traces across windows.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        Control flow in the model's step (see :class:`etp_compiler.ControlFlowPolicy`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements
        braintrace 0.2.8's engine keywords (:mod:`etp_algorithms._peer_keywords`): ``trace_dtype`` is the
        traces' storage dtype, ``config`` must describe this learner, the others are checked and kept.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import D_RTRL
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = D_RTRL(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner.get_etrace_of(cell.W.weight)[0]["weight"].shape  # (inputs + hidden, hidden, states)
    (7, 4, 1)
    """

    #: Runs on a step with a lax.scan kept as a loop (one relation per sub-step: reads only x, D_f, D).

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        config: Any = None,
        random_feedback_key: Any = None,
        snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS,
    ) -> None:
        keywords = (fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements)
        peer = PeerKeywords(type(self).__name__, *keywords)
        super().__init__(
            model, d_rtrl(), name=name, vjp_method=vjp_method, control_flow=control_flow, peer_keywords=peer
        )


#: D-RTRL's historical name.
ParamDimVjpAlgorithm = D_RTRL
