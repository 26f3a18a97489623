r"""ES-D-RTRL (pp-prop): input- and output-dimension traces.

For a relation :math:`y = \mathrm{op}(x, W)` driving a group with :math:`S`
states, with decay :math:`a \in [0, 1)`:

.. math::

    \epsilon_x^t = a\,\epsilon_x^{t-1} + x^t, \qquad
    \epsilon_{f,s}^t = a \sum_{s'} D^t_{ss'} \epsilon_{f,s'}^{t-1} + (1-a)\, D^t_{f,s},

    \frac{\partial L^t}{\partial W} \approx
    \frac{1}{1 - a^{k+1}} \sum_s \mathrm{xy\_to\_dw}\big(\epsilon_x^t,\; g^t_s \odot \epsilon^t_{f,s}\big),

with :math:`k` the number of steps since the last reset (bias correction) and
:math:`g^t = \partial L^t/\partial h^t`. The approximation replaces the
hidden-state part of the instantaneous gradient of step :math:`t`; other paths
(e.g. from :math:`y` straight to the output) keep their instantaneous
gradient. Exact at :math:`T = 1`. Memory :math:`O(B\cdot(I + O))` per
relation instead of :math:`O(B\cdot I\cdot O)`. A rank :math:`r` stands for
the decay :math:`a = (r-1)/(r+1)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import etp_primitives as etp
from etp_compiler import ControlFlowPolicy

from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._peer_keywords import PeerKeywords
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import (
    as_scalar,
    contract_states,
    extra_axes,
    host_zeros,
    instantaneous_gradient,
    relation_weights,
    rule_shapes,
)

__all__ = ["ES_D_RTRL", "ES_D_RTRLTrace", "ES_D_RTRLTraces", "IODimVjpAlgorithm", "es_d_rtrl", "pp_prop"]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ES_D_RTRLTrace:
    """The ES-D-RTRL traces of one relation.

    Attributes
    ----------
    relation : int
        The relation's index in the graph (static).
    x : jax.Array or None
        :math:`\\epsilon_x`, shaped like the op's input (``None`` for input-free primitives).
    f : tuple of jax.Array
        :math:`\\epsilon_f` per connected group (the relation's ``hidden_groups`` order), each
        shaped like the primitive's ``init_pp`` trace with the group's broadcast axes in front.
    """

    relation: int = field(metadata={"static": True})
    x: jax.Array | None
    f: tuple[jax.Array, ...]

    def __getitem__(self, name: str) -> Any:  # the field names as keys, like the earlier dict traces
        return getattr(self, name)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ES_D_RTRLTraces:
    """All ES-D-RTRL traces: the step counter (for the bias correction) and one record per relation."""

    steps: jax.Array
    relations: tuple[ES_D_RTRLTrace, ...]

    def __getitem__(self, name: str) -> Any:  # the field names as keys, like the earlier dict traces
        return getattr(self, name)


def _decay_from(decay_or_rank: Any) -> float:
    try:
        value = as_scalar(decay_or_rank, "ES_D_RTRL: decay_or_rank")
    except TypeError as error:
        raise TypeError(f"{error} Expected a float decay in (0, 1) or an int rank > 0.") from None
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"ES_D_RTRL: a rank must be a positive int, got {value}.")
        return (value - 1) / (value + 1)
    if not 0.0 < value < 1.0:
        raise ValueError(f"ES_D_RTRL: a decay must lie in (0, 1), got {value}.")
    return value


def _init_traces(ctx: RuleContext) -> ES_D_RTRLTraces:
    relations = []
    for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
        init_pp = etp.require_rules(relation.primitive, "init_pp")["init_pp"]
        x_aval: Any = None if relation.x_var is None else relation.x_var.aval
        f = []
        for group in relation.hidden_groups:
            base = rule_shapes(init_pp, relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
            f.append(host_zeros((*group.varshape[: extra_axes(relation, group)], *base.shape), base.dtype))
        x = None if x_aval is None else host_zeros(x_aval.shape, x_aval.dtype)
        relations.append(ES_D_RTRLTrace(index, x, tuple(f)))
    return ES_D_RTRLTraces(host_zeros((), np.int32), tuple(relations))


def _correction(a: float, steps: jax.Array) -> jax.Array:
    """:math:`1 - a^{k}` after ``k`` steps (1 for zero traces, ``k = 0``)."""
    return jnp.where(steps > 0, 1.0 - jnp.power(a, steps), 1.0)


def es_d_rtrl(decay_or_rank: Any) -> LearningRule:
    r"""The ES-D-RTRL rule with decay :math:`a` (or rank :math:`r`, :math:`a = (r-1)/(r+1)`)."""
    a = _decay_from(decay_or_rank)

    def update_traces(ctx: RuleContext, traces: ES_D_RTRLTraces, values: StepValues) -> tuple[Any, Any]:
        relations = []
        for old, relation in zip(traces.relations, ctx.graph.hidden_param_op_relations, strict=True):
            x = values.x_values[old.relation]
            f = []
            for eps_f, group in zip(old.f, relation.hidden_groups, strict=True):
                D = values.jacobians[group.index]
                Df = values.hidden_dims[(old.relation, group.index)]
                propagated = jnp.stack(
                    [
                        etp.pairwise_sum([D[..., s, s2] * eps_f[..., s2] for s2 in range(group.num_state)])
                        for s in range(group.num_state)
                    ],
                    axis=-1,
                )
                f.append(a * propagated + (1 - a) * Df.astype(eps_f.dtype))
            eps_x = None if x is None or old.x is None else a * old.x + x
            relations.append(ES_D_RTRLTrace(old.relation, eps_x, tuple(f)))
        new = ES_D_RTRLTraces(traces.steps + 1, tuple(relations))
        return new, new

    def contract(ctx: RuleContext, traces: ES_D_RTRLTraces, dL_dh: HiddenCotangents, values: StepValues) -> Any:
        """``xy_to_dw(eps_x, sum_s g_s eps_f,s) / (1 - a^k)`` per relation."""
        correction = _correction(a, traces.steps)
        grads: RelationGradients = {}
        for trace, relation in zip(traces.relations, ctx.graph.hidden_param_op_relations, strict=True):
            xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
            cot: Any = 0.0
            for eps_f, group in zip(trace.f, relation.hidden_groups, strict=True):
                cot = cot + contract_states(group, dL_dh, eps_f, extra_axes(relation, group))
            approx = xy_to_dw(trace.x, cot, relation_weights(relation, values), **relation.eqn_params)
            grads[trace.relation] = {k: v / correction.astype(v.dtype) for k, v in approx.items()}
        return grads

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        grads = contract(ctx, residual, dL_dh, values)
        for index in grads:
            replaced = [k for k in grads[index] if not ctx.keeps_instantaneous(index, k)]
            if replaced:
                # the step's VJP already holds this step's hidden-path term: the trace replaces it
                current = instantaneous_gradient(ctx, index, values, dL_dh)
                grads[index] = {k: v - current[k] if k in replaced else v for k, v in grads[index].items()}
        return grads

    def window_start_gradients(ctx: RuleContext, traces: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        return contract(ctx, traces, dL_dh, values)

    def trace_of(ctx: RuleContext, traces: ES_D_RTRLTraces, index: int) -> ES_D_RTRLTrace:
        return traces.relations[index]

    return LearningRule(
        name="ES_D_RTRL",
        init_traces=_init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=window_start_gradients,
        trace_of=trace_of,
    )


class ES_D_RTRL(ETraceAlgorithm):
    r"""Online learning with ES-D-RTRL (pp-prop) traces (aliases ``IODimVjpAlgorithm``, ``pp_prop``).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    decay_or_rank : float or int
        Decay :math:`a \in (0, 1)`, or a rank :math:`r > 0` meaning :math:`a = (r-1)/(r+1)`.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: the learner also takes windows of steps (:class:`MultiStepData`).
    control_flow : etp_compiler.ControlFlowPolicy, optional
        Control flow in the model's step (see :class:`etp_compiler.ControlFlowPolicy`).
    fast_solve : bool
        braintrace 0.2.8's engine switch; checked and kept (this library always uses its closed forms).
    config : ETraceConfig, optional
        Must describe this learner with this decay (another learner's, or another decay, raises ``ValueError``).
    random_feedback_key
        braintrace 0.2.8's keyword, checked and kept; it changes nothing for this learner.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import ES_D_RTRL
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = ES_D_RTRL(cell, decay_or_rank=3)
    >>> learner.decay
    0.5
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner.get_etrace_of(cell.W.weight).x.shape  # the op's input: inputs + hidden
    (7,)
    """

    #: Runs on a step with a lax.scan kept as a loop (one relation per sub-step: reads only x, D_f, D).

    def __init__(
        self,
        model: Any,
        decay_or_rank: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        config: Any = None,
        random_feedback_key: Any = None,
    ) -> None:
        decay = _decay_from(decay_or_rank)
        peer = PeerKeywords(
            type(self).__name__,
            fast_solve,
            config=config,
            random_feedback_key=random_feedback_key,
            own_options={"decay_or_rank": decay},
        )
        super().__init__(
            model, es_d_rtrl(decay), name=name, vjp_method=vjp_method, control_flow=control_flow, peer_keywords=peer
        )
        self.decay = decay


#: ES-D-RTRL's historical names.
IODimVjpAlgorithm = ES_D_RTRL
pp_prop = ES_D_RTRL
