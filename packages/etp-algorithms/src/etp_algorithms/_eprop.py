r"""e-prop (Bellec et al. 2020, Nat. Commun. 11:3625): eligibility traces times a learning signal.

For a unit :math:`j` with hidden state :math:`h_j` and observable (spike) :math:`z_j`, and a weight
:math:`W_{ji}` driving it, e-prop keeps the *eligibility vector* :math:`\epsilon^t_{ji}`, propagated
with the unit's own dynamics only, and the *eligibility trace* :math:`e^t_{ji}`:

.. math::

    \epsilon^t_{ji} = D^t_j\, \epsilon^{t-1}_{ji} + \frac{\partial h^t_j}{\partial W_{ji}}, \qquad
    e^t_{ji} = \psi^t_j\, \epsilon^t_{ji}, \quad \psi^t_j = \frac{\partial z^t_j}{\partial h^t_j},

(:math:`\psi` the surrogate "pseudo-derivative" of the spike) and estimates the gradient as

.. math::

    \frac{\mathrm{d}E}{\mathrm{d}W_{ji}} \approx \sum_t L^t_j\, \bar e^t_{ji}, \qquad
    \bar e^t_{ji} = \mathcal F_\kappa(e)^t_{ji} = \kappa\, \bar e^{t-1}_{ji} + e^t_{ji},

with the learning signal :math:`L^t_j = \partial E^t/\partial z^t_j` (``feedback='symmetric'``: the
true cotangent of the unit's observable within step :math:`t`) or :math:`L^t_j = \sum_k B_{jk}\,
\delta^t_k` (``feedback='random'``: the output error :math:`\delta^t = \partial E^t/\partial y^t` sent
through a fixed random matrix :math:`B`). :math:`\kappa` (``kappa_filter_decay``) is the readout's
leak of the paper: the filter lets the signal of step :math:`t` credit the spikes of earlier steps
that a leaky readout still remembers.

In ETP's terms (see :mod:`etp_algorithms._eprop_graph`): :math:`\epsilon^t` is D-RTRL's trace of
each hidden state (:math:`D^t` the position-wise Jacobian with the ETP ops' outputs held fixed), and
for each observable :math:`o` of a unit (its new hidden states, and each value its transition
computes that the rest of the step reads, such as ``etp_nn.LIF``'s spike)

.. math::

    e^t_o = \sum_{s'} \frac{\partial o^t}{\partial h^{t-1}_{s'}}\, \epsilon^{t-1}_{s'}
        + \mathrm{drtrl\_seed}\Big(x^t, \frac{\partial o^t}{\partial y^t}\Big),

which is :math:`\psi^t \epsilon^t` of the paper for a spike :math:`z^t = f(h^t)`, and
:math:`\epsilon^t` itself for a new hidden state. The estimate of step :math:`t` is
:math:`\sum_o \mathrm{drtrl\_grad}(x^t, L^t_o, \bar e^t_o)`; the step's VJP already holds the true
step-:math:`t` term of the unit's routes, :math:`\sum_o L^t_o\,\mathrm{seed}_o`, which the rule
subtracts (exact for position-wise units). Everything that does not pass through a unit (a readout,
weights without a trace) keeps its instantaneous gradient.

The filter follows the paper, :math:`\mathcal F_\kappa(\psi\,\epsilon)`; braintrace 0.2.8 filters
:math:`\epsilon` first and multiplies by :math:`\psi^t` afterwards, which differs whenever
:math:`\psi` changes over time (always, for a spiking unit).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import etp_primitives as etp
from etp_compiler import CompilationError, ETraceGraph, NotSupportedError

from . import _d_rtrl
from ._compat import is_tracer
from ._eprop_graph import GroupObservables, escaping_cotangents, local_jacobians, observables_of
from ._eprop_loops import loop_cotangents
from ._executor import StepValues
from ._feedback import FixedRandomFeedback, KappaFilter, check_kappa
from ._learner import ETraceAlgorithm
from ._rflo import FeedbackLayout, feedback_layout
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import extra_axes, map_extra, relation_weights

__all__ = ["EProp", "EPropTraces", "eprop"]

#: The values of ``feedback``.
FEEDBACK = ("symmetric", "random")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class EPropTraces:
    """e-prop's traces: D-RTRL's eligibility vectors and, per (relation, group), the filtered traces.

    Attributes
    ----------
    eps : tuple of D_RTRLTrace
        :math:`\\epsilon^t` per relation and hidden group (D-RTRL's traces).
    ebar : tuple of dict
        Per (relation, group) pair (``eps`` order): ``trainable key -> (ebar_o, ...)``, one array per
        observable of the group; empty dicts when ``kappa_filter_decay == 0`` (nothing to remember).
    """

    eps: tuple[Any, ...]
    ebar: tuple[dict[str, tuple[jax.Array, ...]], ...]


@dataclass(frozen=True)
class _Static:
    graph: ETraceGraph
    observables: tuple[GroupObservables, ...] = field(default=())

    def of(self, group: int) -> GroupObservables:
        return next(o for o in self.observables if o.group == group)


def _pairs(ctx: RuleContext) -> Iterator[tuple[int, Any, Any]]:
    for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
        for group in relation.hidden_groups:
            yield index, relation, group


def _local_traces(
    eps_old: dict[str, tuple[Any, ...]],
    J: list[list[Any]],
    Df: list[Any],
    x: Any,
    *,
    primitive: Any,
    params: dict[str, Any],
    weights: Any,
) -> dict[str, tuple[Any, ...]]:
    r""":math:`e_o = \sum_{s'} \mathrm{yw\_to\_w}(J_{o,s'}, \epsilon^{t-1}_{s'}) + \mathrm{seed}(x, D_{f,o})` per observable."""
    yw_to_w = etp.require_rules(primitive, "yw_to_w")["yw_to_w"]
    out: dict[str, list[Any]] = {k: [] for k in eps_old}
    for row, df in zip(J, Df, strict=True):
        seed = etp.drtrl_seed(primitive, x, df, weights, params)
        for k, per_state in eps_old.items():
            total = seed[k].astype(per_state[0].dtype)
            for s, j in enumerate(row):
                total = total + yw_to_w(j, {k: per_state[s]}, **params)[k]
            out[k].append(total)
    return {k: tuple(v) for k, v in out.items()}


def _contract(
    ebar: dict[str, tuple[Any, ...]], L: list[Any], x: Any, *, primitive: Any, params: dict[str, Any], weights: Any
) -> dict[str, Any]:
    acc: dict[str, Any] = {}
    for o, signal in enumerate(L):
        part = etp.drtrl_grad(primitive, x, signal, {k: v[o] for k, v in ebar.items()}, weights, params)
        acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
    return acc


def _as_key(value: Any) -> jax.Array:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return jax.random.key(int(value))
    if isinstance(value, (jax.Array, np.ndarray)) and not is_tracer(value):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape == ():
            return jnp.asarray(value)
        if value.dtype == np.uint32 and value.shape == (2,):
            key: jax.Array = jax.random.wrap_key_data(jnp.asarray(value))
            return key
    raise TypeError(
        "EProp: random_feedback_key must be an int or a concrete JAX PRNG key (jax.random.key(...) or a raw "
        f"uint32[2] key), got {value!r} of type {type(value).__name__}."
    )


class _Feedback:
    """The random feedback matrices of a graph, one per hidden group (drawn once per layout)."""

    def __init__(self, key: jax.Array) -> None:
        self.key = key
        self._drawn: dict[Any, tuple[FeedbackLayout, dict[int, FixedRandomFeedback]]] = {}

    def __call__(self, graph: ETraceGraph, static: _Static) -> tuple[FeedbackLayout, dict[int, FixedRandomFeedback]]:
        try:
            layout = feedback_layout(graph)
        except CompilationError as error:
            raise CompilationError(str(error).replace("RFLO", "EProp")) from None
        if layout not in self._drawn:
            drawn = {}
            with jax.ensure_compile_time_eval():
                for obs in static.observables:
                    group = next(
                        g for r in graph.hidden_param_op_relations for g in r.hidden_groups if g.index == obs.group
                    )
                    units = layout.units(tuple(group.varshape))
                    drawn[obs.group] = FixedRandomFeedback(
                        layout.size, units, jax.random.fold_in(self.key, obs.group), init_scale=1 / np.sqrt(layout.size)
                    )
            self._drawn[layout] = (layout, drawn)
        return self._drawn[layout]


def eprop(feedback: str = "symmetric", kappa_filter_decay: Any = 0.0, random_feedback_key: Any = None) -> LearningRule:
    """The e-prop learning rule (see the module docstring); single-step only (no window-start contraction).

    Examples
    --------
    >>> from etp_algorithms._eprop import eprop
    >>> eprop().name, eprop().supports_windows
    ('EProp', False)
    """
    return _build(feedback, kappa_filter_decay, random_feedback_key)[0]


def _check_feedback(feedback: Any) -> str:
    if not isinstance(feedback, str) or feedback not in FEEDBACK:
        raise ValueError(f"EProp: unknown feedback {feedback!r}; expected one of {list(FEEDBACK)}.")
    return feedback


def _build(feedback: Any, kappa_filter_decay: Any, random_feedback_key: Any) -> tuple[LearningRule, _Feedback | None]:
    mode = _check_feedback(feedback)
    kappa = check_kappa(kappa_filter_decay, "EProp: kappa_filter_decay")
    matrices: _Feedback | None = None
    if mode == "random":
        if random_feedback_key is None:
            raise ValueError(
                "EProp: feedback='random' needs random_feedback_key (an int or a JAX PRNG key) to draw the fixed "
                "feedback matrices from; got None."
            )
        matrices = _Feedback(_as_key(random_feedback_key))
    elif random_feedback_key is not None:
        _as_key(random_feedback_key)  # validated, unused with symmetric feedback
    memo: list[_Static] = []

    def static(ctx: RuleContext) -> _Static:
        if not memo or memo[0].graph is not ctx.graph:
            memo[:] = [_Static(ctx.graph, observables_of(ctx.graph))]
        return memo[0]

    def init_traces(ctx: RuleContext) -> EPropTraces:
        st = static(ctx)
        if matrices is not None:
            matrices(ctx.graph, st)  # the layout check and the draw, at compile
        eps = _d_rtrl.init_traces(ctx)
        ebar = []
        for trace in eps:
            n_obs = len(st.of(trace.group).vars)
            if kappa > 0:
                ebar.append({k: tuple(jnp.zeros_like(v[0]) for _ in range(n_obs)) for k, v in trace.eps.items()})
            else:
                ebar.append({})
        return EPropTraces(tuple(eps), tuple(ebar))

    def update_traces(ctx: RuleContext, traces: EPropTraces, values: StepValues) -> tuple[Any, Any]:
        st = static(ctx)
        new_eps, _ = _d_rtrl.update_traces(ctx, traces.eps, values)
        jac = {obs.group: local_jacobians(ctx.graph, obs, values.env) for obs in st.observables}
        new_ebar, residual = [], []
        for (index, relation, group), old, filtered in zip(_pairs(ctx), traces.eps, traces.ebar, strict=True):
            J, Df_all = jac[group.index]
            Df = [d[index] for d in Df_all]
            one = _fn_local(relation, values)
            extra = extra_axes(relation, group)
            e = map_extra(one, extra, (0, 0, 0, None))(old.eps, J, Df, values.x_values[index])
            ebar = KappaFilter.step(filtered, e, kappa) if kappa > 0 else e
            new_ebar.append(ebar if kappa > 0 else {})
            residual.append((ebar, Df))
        return EPropTraces(tuple(new_eps), tuple(new_ebar)), tuple(residual)

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        st = static(ctx)
        if values.output_cotangents is None:
            raise ValueError("EProp: the learning signal needs the outputs' cotangents (only in the backward pass).")
        escaping = escaping_cotangents(ctx.graph, st.observables, values.env, values.output_cotangents)
        looped = [key for obs in st.observables for key in obs.loop_keys]
        escaping.update(loop_cotangents(ctx.graph, looped, values.env, values.output_cotangents))
        true_signal: dict[int, list[Any]] = {}
        for obs in st.observables:
            true_signal[obs.group] = [
                dL_dh[p] if p is not None else escaping[key] for key, p in zip(obs.keys, obs.paths, strict=True)
            ]
        signal = true_signal
        if matrices is not None:
            layout, drawn = matrices(ctx.graph, st)
            lead = (layout.batch, -1) if layout.batch is not None else (-1,)
            error = jnp.concatenate([jnp.reshape(values.output_cotangents[i], lead) for i in layout.outputs], axis=-1)
            signal = {}
            for obs in st.observables:
                group_shape = jnp.shape(true_signal[obs.group][0])
                sent = jnp.reshape(drawn[obs.group].project(error), group_shape)
                signal[obs.group] = [
                    sent.astype(t.dtype) if em else jnp.zeros_like(t)
                    for t, em in zip(true_signal[obs.group], obs.emitted, strict=True)
                ]
        grads: RelationGradients = {}
        for (index, relation, group), (ebar, Df) in zip(
            _pairs(ctx), jax.lax.optimization_barrier(residual), strict=True
        ):
            w = relation_weights(relation, values)
            x = values.x_values[index]
            extra = extra_axes(relation, group)
            one = _fn_contract(relation, w)
            part = map_extra(one, extra, (0, 0, None))(ebar, signal[group.index], x)
            held = [k for k in part if not ctx.keeps_instantaneous(index, k)]
            if held:  # the VJP holds the true step-t term of the unit's routes: the traces replace it
                xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
                cot = etp.pairwise_sum([L * d for L, d in zip(true_signal[group.index], Df, strict=True)])
                cot = etp.sum_leading_axes(cot, cot.ndim - extra)
                true = xy_to_dw(x, cot, w, **relation.eqn_params)
            total = grads.setdefault(index, {})
            for key, value in part.items():
                value = jnp.sum(value, axis=tuple(range(extra))) if extra else value
                if key in held:
                    value = value - true[key].astype(value.dtype)
                total[key] = total[key] + value if key in total else value
        return grads

    def trace_of(ctx: RuleContext, traces: EPropTraces, index: int) -> Any:
        return _d_rtrl.trace_of(ctx, traces.eps, index)

    rule = LearningRule(
        name="EProp",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=None,
        trace_of=trace_of,
    )
    return rule, matrices


def _fn_local(relation: Any, values: StepValues) -> Any:
    def one(eps: Any, J: Any, Df: Any, x: Any) -> Any:
        return _local_traces(
            eps,
            J,
            Df,
            x,
            primitive=relation.primitive,
            params=relation.eqn_params,
            weights=relation_weights(relation, values),
        )

    return one


def _fn_contract(relation: Any, weights: Any) -> Any:
    def one(ebar: Any, L: Any, x: Any) -> Any:
        return _contract(ebar, L, x, primitive=relation.primitive, params=relation.eqn_params, weights=weights)

    return one


#: braintrace 0.2.8's D_RTRL keywords that e-prop does not take (its traces are D-RTRL's, full precision).
_UNSUPPORTED = ("trace_dtype", "chunked_trace", "config", "snap_max_jacobian_elements")


class EProp(ETraceAlgorithm):
    r"""e-prop (Bellec et al. 2020): eligibility traces :math:`\psi\,\epsilon`, filtered, times a learning signal.

    .. math::

        \widehat{\frac{\mathrm{d}E}{\mathrm{d}W_{ji}}} = \sum_t L^t_j\, \bar e^t_{ji}, \qquad
        \bar e^t = \kappa\, \bar e^{t-1} + \psi^t \epsilon^t, \qquad
        \epsilon^t = D^t \epsilon^{t-1} + \frac{\partial h^t}{\partial W},

    with :math:`L^t_j = \partial E^t/\partial z^t_j` (``'symmetric'``) or :math:`(B\,\delta^t)_j`
    (``'random'``); the general form on any unit, and what the observables :math:`z` are, are in
    :mod:`etp_algorithms._eprop`. The filter is the paper's :math:`\mathcal F_\kappa(\psi\epsilon)`
    (braintrace 0.2.8 filters :math:`\epsilon` and multiplies by :math:`\psi^t` afterwards).

    Relation to D-RTRL: with ``kappa_filter_decay=0`` and symmetric feedback the estimate is
    :class:`D_RTRL`'s whenever the units reach the loss only through their stored hidden states
    (a spike kept as a hidden state, leaky integrators: then equal to the last bit). On
    ``etp_nn.LIF``, whose spike :math:`z^t = f(V'^t)` is computed from the potential before the reset
    and not stored, D-RTRL's :math:`\partial L/\partial V^t` is zero and it keeps only the
    instantaneous term; e-prop adds the history :math:`L^t \psi^t \alpha\,\epsilon^{t-1}` through
    the spike's :math:`\psi^t` of step :math:`t`.

    Memory: D-RTRL's :math:`O(B\cdot\theta)` traces per relation, plus with :math:`\kappa > 0` one
    filtered trace per observable of each unit (kept across steps), and within a step the local
    traces :math:`e^t_o` (one trace-sized array per observable) from the forward to the backward pass. Compute per step: D-RTRL's, plus one linearisation
    of each unit (its local Jacobians) and, in the backward pass, a VJP of the equations downstream
    of the escaping observables (a spike's uses) for their learning signal.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised; for ``'random'`` it returns the readout (the error starts there).
    feedback : {'symmetric', 'random'}
    kappa_filter_decay : float
        :math:`\kappa \in [0, 1)`.
    random_feedback_key : int or jax.random key, optional
        Required with ``feedback='random'``: :math:`B` per unit group, ``(units, O)`` per sample,
        entries :math:`\mathcal N(0, 1/O)` (:class:`FixedRandomFeedback`).
    name : str, optional
    vjp_method : {'single-step'}
        ``'multi-step'`` is refused (the learning signal is per step).
    fast_solve : bool
        braintrace's solver switch; accepted and ignored (one solver here).
    control_flow : etp_compiler.ControlFlowPolicy, optional
        Control flow in the model's step.

    Raises
    ------
    ValueError
        An unknown ``feedback``, ``kappa_filter_decay`` outside ``[0, 1)``, ``'random'`` without a key.
    TypeError
        A non-bool ``fast_solve``, a bad key, or an unknown keyword.
    etp_compiler.NotSupportedError
        ``vjp_method='multi-step'``; at compile, a unit whose transition mixes positions and emits a spike.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, saiunit as u, etp_nn
    >>> from etp_algorithms import EProp
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.lif = etp_nn.Linear(3, 4), etp_nn.LIF(4)
    ...     def update(self, x):
    ...         return self.lif(self.inp(x) * u.mV)
    >>> net = Net()
    >>> _ = brainstate.nn.init_all_states(net, batch_size=2)
    >>> learner = EProp(net, kappa_filter_decay=0.5)
    >>> with brainstate.environ.context(dt=1.0 * u.ms):
    ...     _ = learner.compile_graph(jnp.zeros((2, 3)))
    ...     grads = brainstate.transform.grad(lambda x: jnp.sum(learner(x)), net.states(brainstate.ParamState))(
    ...         jnp.ones((2, 3)))
    >>> sorted(grads)
    [('inp', 'weight')]
    """

    def __init__(
        self,
        model: Any,
        feedback: str = "symmetric",
        kappa_filter_decay: float = 0.0,
        random_feedback_key: Any = None,
        name: str | None = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        **kwargs: Any,
    ) -> None:
        control_flow = kwargs.pop("control_flow", None)
        if kwargs:
            known = [k for k in kwargs if k in _UNSUPPORTED]
            raise TypeError(
                f"EProp: unsupported keyword argument(s) {sorted(kwargs)}"
                + (f" ({known} are braintrace 0.2.8 D_RTRL knobs this learner does not have)" if known else "")
                + "; EProp takes feedback, kappa_filter_decay, random_feedback_key, name, vjp_method, fast_solve "
                "and control_flow."
            )
        if not isinstance(fast_solve, bool):
            raise TypeError(f"EProp: fast_solve must be a bool (accepted and ignored), got {fast_solve!r}.")
        if vjp_method == "multi-step":
            raise NotSupportedError(
                "EProp: vjp_method='multi-step' is not supported (e-prop's learning signal is per step; a window's "
                "exact reverse mode would replace it). Use vjp_method='single-step'."
            )
        rule, matrices = _build(feedback, kappa_filter_decay, random_feedback_key)
        super().__init__(model, rule, name=name, vjp_method=vjp_method, control_flow=control_flow)
        self.feedback = feedback
        self.kappa_filter_decay = check_kappa(kappa_filter_decay, "EProp: kappa_filter_decay")
        self._matrices = matrices

    @property
    def feedback_matrices(self) -> dict[tuple[Any, ...], jax.Array]:
        """``group's hidden paths -> B`` of shape ``(units, O)`` (per sample when batched); ``{}`` if symmetric."""
        if self._matrices is None:
            return {}
        static = _Static(self.graph, observables_of(self.graph))
        _, drawn = self._matrices(self.graph, static)
        groups = {g.index: g for r in self.graph.hidden_param_op_relations for g in r.hidden_groups}
        return {tuple(groups[i].hidden_paths): fb.matrix for i, fb in drawn.items()}
