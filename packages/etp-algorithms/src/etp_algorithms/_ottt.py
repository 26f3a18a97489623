r"""OTTT: online training through time (Xiao et al. 2022, NeurIPS).

For a spiking layer :math:`u^t = \lambda u^{t-1} + c\,W s^t + \dots` (leak :math:`\lambda`, the reset
detached from the graph), OTTT keeps, for every weight, the leaky trace of its presynaptic input

.. math::

    \hat a^t = \lambda\, \hat a^{t-1} + s^t, \qquad \hat a^0 = 0,

and takes as gradient of the step's loss :math:`L^t`

.. math::

    g_W^t = \frac{\partial L^t}{\partial u^t} \otimes \hat a^t ,

where :math:`\partial L^t/\partial u^t` is back-propagated through the layers of step :math:`t` only
(the instantaneous surrogate derivative, no backpropagation through the membrane's past).

In ETP's terms, for a relation :math:`y = \mathrm{op}(x, W)` with cotangent
:math:`\delta^t = \partial L^t/\partial y^t` (all routes of step :math:`t`: through the spike computed
from the new potential, and through the stored hidden states with :math:`\partial L/\partial h^t`),

.. math::

    g_W^t = \mathrm{xy\_to\_dw}(\hat a^t, \delta^t)
          = \underbrace{\mathrm{xy\_to\_dw}(x^t, \delta^t)}_{\text{the step's VJP}}
          + \mathrm{xy\_to\_dw}(\lambda \hat a^{t-1}, \delta^t),

since ETP ops are linear in their input :math:`x`. A trainable key that does not depend on :math:`x`
(a bias) is a weight on a constant input 1: its trace is :math:`c^t = \lambda c^{t-1} + 1` and its
gradient :math:`c^t\,\delta^t` summed like the bias's own VJP (spikingjelly's OTTT layers see the
trace in place of the input, so their bias gets :math:`\delta^t` alone).

What it approximates
--------------------
Summed over steps, OTTT is the forward-mode (RTRL) form of BPTT for a layer whose potential depends on
its past only through the linear leak :math:`\lambda`: with :math:`\partial u^t/\partial u^{t-1} =
\lambda` and :math:`u^t` linear in :math:`W` through :math:`c\,W x^t`,
:math:`\mathrm{d}u^t/\mathrm{d}W = c\sum_{\tau\le t}\lambda^{t-\tau} x^\tau = c\,\hat a^t`, so
:math:`\sum_t g^t_W = \mathrm{d}(\sum_t L^t)/\mathrm{d}W` **exactly** (equal to BPTT) when

* the decay equals the postsynaptic leak (``etp_nn.LIF``: :math:`\lambda = 1 - \Delta t/\tau`;
  ``etp_nn.LeakyRateReadout``: :math:`e^{-\Delta t/\tau}`; a plain leaky integrator);
* the reset is soft and detached (``etp_nn.LIF``'s default: :math:`\partial V^t/\partial V'^t = 1`);
  a hard reset multiplies the temporal Jacobian by :math:`1 - s^t`, which OTTT ignores;
* the weight's input :math:`x^t` does not depend on :math:`W`'s earlier effects (no recurrence), and
  the loss :math:`L^t` reads the layer at step :math:`t` only through step-:math:`t` computations
  (e.g. spikes then an instantaneous readout). A weight *below* another leaky layer loses the
  paths through that layer's memory (OTTT's spatial-only credit assignment).

Otherwise it is the paper's approximation. Memory per relation: :math:`O(B\cdot I)` (a trace shaped
like the op's input, plus one scalar); compute per step: one VJP of the step for the relations'
cotangents and one ``xy_to_dw`` per relation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import etp_primitives as etp
from etp_compiler import ControlFlowPolicy, ETraceGraph, HiddenParamOpRelation, bind_eqn, eval_eqns, read_atom

from ._executor import StepValues
from ._hidden_only import reach
from ._learner import ETraceAlgorithm
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import as_scalar, host_zeros, relation_weights
from ._substeps import shifted_bind

__all__ = ["OTTT", "OTTTTrace", "leak_of", "ottt", "relation_cotangents"]

#: ``graph -> one decay per relation`` (how a learner without ``decay=`` finds it at compile).
DecayOf = Callable[[ETraceGraph], Sequence[float]]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class OTTTTrace:
    r"""The OTTT traces of one relation.

    Attributes
    ----------
    relation : int
        The relation's index in the graph (static).
    decay : float
        :math:`\lambda` of this relation (static).
    x : jax.Array or None
        :math:`\hat a`, shaped like the op's input (``None`` for input-free primitives).
    count : jax.Array
        :math:`c = \sum_k \lambda^k` over the steps so far: the trace of a constant input 1 (for biases).
    """

    relation: int = field(metadata={"static": True})
    decay: float = field(metadata={"static": True})
    x: jax.Array | None
    count: jax.Array

    def __getitem__(self, name: str) -> Any:  # the field names as keys, like the other learners' traces
        return getattr(self, name)


def check_decay(decay: Any, label: str = "OTTT") -> float:
    r"""``decay`` as a float :math:`\lambda \in [0, 1)`; a ``TypeError`` / ``ValueError`` naming ``label``."""
    try:
        value = float(as_scalar(decay, f"{label}: decay"))
    except TypeError as error:
        raise TypeError(f"{error} Expected one float leak lambda in [0, 1) (e.g. 1 - dt/tau).") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{label}: decay (the presynaptic trace's leak lambda) must lie in [0, 1), got {value}.")
    return value


# ------------------------------------------------------------------------------------------ the leak


def _owner(model: Any, path: Sequence[Any]) -> Any:
    """The module holding the state at ``path`` (its last key the attribute), or ``None``."""
    obj = model
    try:
        for key in path[:-1]:
            obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return obj


def _scalar(value: Any) -> float | None:
    """A one-element dimensionless number as a float, else ``None``."""
    if isinstance(value, u.Quantity):
        if not value.is_unitless:
            return None
        value = value.to_decimal()
    array = np.asarray(value)
    return float(array.reshape(())) if array.size == 1 else None


def _module_leak(module: Any, attribute: Any) -> float | None:
    """The leak of the etp_nn neuron/readout ``module``'s state ``attribute``, or ``None`` if not one of them."""
    names = {cls.__name__ for cls in type(module).__mro__ if cls.__module__.startswith("etp_nn")}
    if names & {"LIF", "ALIF"} and attribute == "V":
        ratio = _scalar(_dt(module, attribute) / module.tau)
        return None if ratio is None else 1.0 - ratio  # forward Euler of tau dV/dt = V_rest - V + x
    if "LeakyRateReadout" in names and attribute == "r":
        ratio = _scalar(_dt(module, attribute) / module.tau)
        return None if ratio is None else float(np.exp(-ratio))
    return None


def _dt(module: Any, attribute: Any) -> Any:
    """``brainstate.environ.get_dt()``, or a clear error saying that the leak of ``module.attribute`` needs it."""
    try:
        return brainstate.environ.get_dt()
    except KeyError:
        raise ValueError(
            f"OTTT: the leak of {type(module).__name__}.{attribute} is derived from dt/tau, and no dt is set; "
            "compile inside brainstate.environ.context(dt=...) (or brainstate.environ.set(dt=...)), or pass decay=."
        ) from None


def leak_of(model: brainstate.nn.Module, graph: ETraceGraph) -> tuple[float, ...]:
    r"""One :math:`\lambda` per relation of ``graph``: the leak of the hidden state it drives.

    Derivable for the potential ``V`` of ``etp_nn.LIF`` / ``ALIF`` (and subclasses such as
    ``LeakySpikeReadout``), :math:`1 - \Delta t/\tau`, and the state ``r`` of ``etp_nn.LeakyRateReadout``,
    :math:`e^{-\Delta t/\tau}`, with a scalar :math:`\tau` and ``brainstate.environ.get_dt()`` now. Any
    other model raises a ``ValueError`` that asks for ``decay=``.
    """
    minfo = graph.module_info
    decays = []
    for relation in graph.hidden_param_op_relations:
        found = set()
        paths = [p for group in relation.hidden_groups for p in group.hidden_paths]
        for path in paths:
            owner = _owner(model, path)
            if owner is None or getattr(owner, str(path[-1]), None) is not minfo.hidden_states[path]:
                continue
            leak = _module_leak(owner, path[-1])
            if leak is not None:
                found.add(leak)
        weight = ".".join(map(str, relation.weight_path))
        if len(found) != 1:
            why = (
                "different leaks " + str(sorted(found))
                if found
                else "no etp_nn LIF/ALIF potential V or LeakyRateReadout state r with a scalar tau"
            )
            raise ValueError(
                f"OTTT: cannot derive the leak lambda of the weight {weight} (it drives the hidden states "
                f"{['.'.join(map(str, p)) for p in paths]}: {why}); pass decay= (a float in [0, 1), the "
                "postsynaptic membrane leak, e.g. 1 - dt/tau)."
            )
        decays.append(check_decay(found.pop(), f"OTTT (the leak derived for {weight})"))
    return tuple(decays)


# ------------------------------------------------------------------------------------------ dL/dy


def relation_cotangents(ctx: RuleContext, values: StepValues, dL_dh: HiddenCotangents) -> dict[int, jax.Array]:
    r"""``relation index -> dL^t/dy^t``: the cotangent of each relation's output in step :math:`t`.

    The outputs' cotangents (:attr:`StepValues.output_cotangents`) are pulled back along every route of
    the step that does not pass through a stored new hidden state, and :math:`\partial L/\partial h^t`
    along the routes that end in one. Needs the backward pass (``values.output_cotangents``).
    """
    if values.output_cotangents is None:
        raise ValueError("OTTT: dL/dy needs the outputs' cotangents (only in the backward pass).")
    graph = ctx.graph
    minfo = graph.module_info
    jaxpr = minfo.jaxpr
    relations = graph.hidden_param_op_relations
    # an op inside a scan kept as a loop has one body equation for every sub-step: its y_k enters through the delta
    y_index = {relation.y_var: index for index, relation in enumerate(relations) if relation.substep is None}
    substeps = [index for index, relation in enumerate(relations) if relation.substep is not None]
    hidden_vars = {var: path for path, var in minfo.hidden_path_to_outvar.items()}
    inputs = {v: values.env[v] for v in (*jaxpr.constvars, *jaxpr.invars)}
    floats = [
        i for i, v in enumerate(minfo.out_vars) if jnp.issubdtype(jnp.result_type(values.outputs[i]), jnp.inexact)
    ]

    def run(ys: dict[int, jax.Array]) -> tuple[list[Any], dict[Any, Any]]:
        produced: dict[Any, Any] = {}

        def override(var: Any, value: Any) -> Any:
            if var in y_index:
                value = ys[y_index[var]]
            if var in hidden_vars:
                produced[hidden_vars[var]] = value  # its route to the loss is dL/dh^t
                return jax.lax.stop_gradient(value)
            return value

        bind = shifted_bind(graph, {i: ys[i] - values.y_values[i] for i in substeps}) if substeps else bind_eqn
        # held loops: a sub-step's y_k reaches the loss through the states, not through the later sub-steps' ops
        env = eval_eqns(minfo.held_eqns, dict(inputs), override, bind=bind)
        return [read_atom(env, minfo.out_vars[i]) for i in floats], produced

    ys = {index: values.y_values[index] for index in range(len(relations))}
    (_, produced), pullback = jax.vjp(run, ys)
    ct_out = [jnp.asarray(values.output_cotangents[i], jnp.result_type(values.outputs[i])) for i in floats]
    ct_hidden = {p: jnp.asarray(dL_dh[p], jnp.result_type(v)) for p, v in produced.items()}
    (cotangents,) = pullback((ct_out, ct_hidden))
    return dict(cotangents)


def _x_dependent(relation: HiddenParamOpRelation, x: Any, cot: Any, weights: dict[str, Any]) -> dict[str, bool]:
    """``key -> whether xy_to_dw's gradient of that key reads x`` (False for a bias)."""
    xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
    closed, shapes = jax.make_jaxpr(lambda a, c, w: xy_to_dw(a, c, w, **relation.eqn_params), return_shape=True)(
        x, cot, weights
    )
    reached = reach(closed.jaxpr.eqns, {closed.jaxpr.invars[0]}, stop=set(), cut=set())
    flags = [v in reached for v in closed.jaxpr.outvars]
    result: dict[str, bool] = jax.tree.unflatten(jax.tree.structure(shapes), flags)
    return result


# ------------------------------------------------------------------------------------------ the rule


def ottt(decay: Any) -> LearningRule:
    r"""The OTTT rule with leak :math:`\lambda` (see the module docstring).

    ``decay``: one float in ``[0, 1)`` for every relation, or a callable ``graph -> one decay per
    relation`` called when the traces are created (at ``compile_graph``).

    Examples
    --------
    >>> from etp_algorithms.extend import ottt
    >>> rule = ottt(0.8)
    >>> rule.name, rule.supports_windows
    ('OTTT', False)
    """
    decay_of: DecayOf
    if callable(decay):
        decay_of = decay
    else:
        value = check_decay(decay)

        def decay_of(graph: ETraceGraph) -> tuple[float, ...]:
            return (value,) * len(graph.hidden_param_op_relations)

    def init_traces(ctx: RuleContext) -> tuple[OTTTTrace, ...]:
        relations = ctx.graph.hidden_param_op_relations
        decays = [check_decay(d) for d in decay_of(ctx.graph)]
        if len(decays) != len(relations):
            raise ValueError(f"OTTT: {len(decays)} decays for {len(relations)} relations.")
        traces = []
        for index, (relation, lam) in enumerate(zip(relations, decays, strict=True)):
            y_aval: Any = relation.y_var.aval
            x_aval: Any = None if relation.x_var is None else relation.x_var.aval
            x = None if x_aval is None else host_zeros(x_aval.shape, x_aval.dtype)
            traces.append(OTTTTrace(index, lam, x, host_zeros((), y_aval.dtype)))
        return tuple(traces)

    def update_traces(ctx: RuleContext, traces: tuple[OTTTTrace, ...], values: StepValues) -> tuple[Any, Any]:
        new = []
        for old in traces:
            x = values.x_values[old.relation]
            a_hat = None if old.x is None or x is None else old.decay * old.x + jnp.asarray(x, old.x.dtype)
            new.append(OTTTTrace(old.relation, old.decay, a_hat, old.decay * old.count + 1))
        return tuple(new), traces  # the backward pass contracts the previous traces

    def trace_gradients(
        ctx: RuleContext, residual: tuple[OTTTTrace, ...], values: StepValues, dL_dh: HiddenCotangents
    ) -> RelationGradients:
        cotangents = relation_cotangents(ctx, values, dL_dh)
        grads: RelationGradients = {}
        for old in residual:
            relation = ctx.graph.hidden_param_op_relations[old.relation]
            xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
            weights = relation_weights(relation, values)
            x, cot = values.x_values[old.relation], cotangents[old.relation]
            part: dict[str, jax.Array] = {}
            if old.x is not None and x is not None:
                history = xy_to_dw(old.decay * old.x, cot, weights, **relation.eqn_params)
                reads_x = _x_dependent(relation, old.x, cot, weights)
                for key, grad in history.items():
                    # a key that ignores x (a bias) sees a constant input: its trace is the count
                    part[key] = grad if reads_x[key] else old.decay * old.count.astype(grad.dtype) * grad
            keep = [k for k in relation.trainable_vars if ctx.keeps_instantaneous(old.relation, k)]
            if keep:  # the step's VJP left these out: add step t's own term
                own = xy_to_dw(x, cot, weights, **relation.eqn_params)
                for key in keep:
                    part[key] = part[key] + own[key] if key in part else own[key]
            if part:
                grads[old.relation] = part
        return grads

    def trace_of(ctx: RuleContext, traces: tuple[OTTTTrace, ...], index: int) -> OTTTTrace:
        return traces[index]

    return LearningRule(
        name="OTTT",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=None,
        trace_of=trace_of,
    )


class OTTT(ETraceAlgorithm):
    r"""Online training through time (Xiao et al. 2022): presynaptic leaky traces, spatial credit only.

    For every weight :math:`W` of a relation :math:`y = \mathrm{op}(x, W)`,

    .. math::

        \hat a^t = \lambda \hat a^{t-1} + x^t, \qquad
        \frac{\widehat{\partial L^t}}{\partial W} = \mathrm{xy\_to\_dw}\Big(\hat a^t,
            \frac{\partial L^t}{\partial y^t}\Big),

    with :math:`\partial L^t/\partial y^t` of step :math:`t` alone (the instantaneous surrogate
    gradient); a bias uses the trace :math:`c^t = \lambda c^{t-1} + 1` of a constant input. Equal to
    BPTT when :math:`\lambda` is the postsynaptic leak, the reset is soft and detached and the weight's
    layer is not recurrent nor followed by another leaky layer (see :mod:`etp_algorithms._ottt`).
    Memory :math:`O(B\cdot I)` per relation.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    decay : float, optional
        :math:`\lambda \in [0, 1)` for every weight. ``None``: each weight's postsynaptic leak, derived at
        :meth:`compile_graph` from ``etp_nn.LIF`` / ``ALIF`` (:math:`1 - \Delta t/\tau`) or
        ``etp_nn.LeakyRateReadout`` (:math:`e^{-\Delta t/\tau}`) with the environment's ``dt``; a
        ``ValueError`` asking for ``decay=`` for any other model.
    name : str, optional
    vjp_method : {'single-step'}
        OTTT has no multi-step windows (``'multi-step'`` raises ``NotSupportedError``).
    control_flow : etp_compiler.ControlFlowPolicy, optional

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, saiunit as u, etp_nn
    >>> from etp_algorithms import OTTT
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.lif = etp_nn.Linear(3, 4), etp_nn.LIF(4, tau=4.0 * u.ms)
    ...     def update(self, x):
    ...         return self.lif(self.inp(x) * u.mV)
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     net = Net()
    ...     _ = brainstate.nn.init_all_states(net)
    ...     learner = OTTT(net)
    ...     _ = learner.compile_graph(jnp.zeros(3))
    ...     spikes = learner(jnp.ones(3))
    >>> learner.decays, learner.get_etrace_of(net.inp.weight).x.tolist()
    ((0.75,), [1.0, 1.0, 1.0])
    """

    def __init__(
        self,
        model: brainstate.nn.Module,
        decay: Any = None,
        name: str | None = None,
        vjp_method: str = "single-step",
        *,
        control_flow: ControlFlowPolicy | None = None,
    ) -> None:
        self.decay = None if decay is None else check_decay(decay)
        source: Any = self.decay if self.decay is not None else (lambda graph: leak_of(model, graph))
        super().__init__(model, ottt(source), name=name, vjp_method=vjp_method, control_flow=control_flow)

    @property
    def decays(self) -> tuple[float, ...]:
        """The :math:`\\lambda` of each relation (graph order), as the traces use them."""
        _ = self.graph  # the clear error before compile_graph
        traces: tuple[OTTTTrace, ...] = self.etrace.value
        return tuple(trace.decay for trace in traces)
