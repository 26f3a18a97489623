r"""D-RTRL (``ParamDimVjpAlgorithm``): parameter-dimension eligibility traces.

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

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

import etp_primitives as etp
from etp_compiler import HiddenGroup, HiddenParamOpRelation, StatePath

from ._base import ETraceAlgorithm, host_zeros, rule_shapes
from ._compat import jaxpr_as_fun
from ._executor import StepValues
from ._hidden_only import reach

__all__ = ["ParamDimVjpAlgorithm", "D_RTRL"]

_VJP_METHODS = ("single-step", "multi-step")


def _extra_axes(relation: HiddenParamOpRelation, group: HiddenGroup) -> int:
    """Leading hidden axes that ``y`` broadcasts over (an unbatched op feeding batched states)."""
    y_aval: Any = relation.y_var.aval
    return len(group.varshape) - len(y_aval.shape)


def _map_extra(fn: Callable[..., Any], extra: int, in_axes: tuple[Any, ...]) -> Callable[..., Any]:
    for _ in range(extra):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn


class ParamDimVjpAlgorithm(ETraceAlgorithm):
    r"""Online learning with D-RTRL traces (alias :data:`D_RTRL`).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: each call takes a window of steps (inputs with a leading time axis,
        see :class:`MultiStepData`); exact reverse mode inside the window, traces across windows.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import D_RTRL
    >>> cell = etp_nn.GRUCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = D_RTRL(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))  # doctest: +SKIP
    """

    def __init__(self, model: Any, name: str | None = None, vjp_method: str = "single-step") -> None:
        if vjp_method not in _VJP_METHODS:
            raise ValueError(f"D_RTRL: unknown vjp_method {vjp_method!r}; expected one of {list(_VJP_METHODS)}.")
        super().__init__(model, name=name)
        self.vjp_method = vjp_method

    def _initial_traces(self) -> dict[int, Any]:
        traces: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            init = etp.require_rules(relation.primitive, "init_drtrl")["init_drtrl"]
            per_group = {}
            for group in relation.hidden_groups:
                extra = _extra_axes(relation, group)
                base = rule_shapes(init, relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
                # Stored as a tuple of one array per state (no S axis): stacking the states, or a size-1
                # minor S axis, makes XLA write each step's trace to a new buffer and copy it into the
                # loop carry, a full extra pass over the trace per step (see _relation_traces).
                per_group[group.index] = {
                    key: tuple(
                        host_zeros((*group.varshape[:extra], *leaf.shape[:-1]), leaf.dtype)
                        for _ in range(group.num_state)
                    )
                    for key, leaf in base.items()
                }
            traces[index] = per_group
        return traces

    def _relation_traces(self, value: Any) -> Any:
        """The traces with the states stacked on a trailing S axis (they are stored one array per state)."""
        out: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            out[index] = {
                group.index: {k: jnp.stack(v, axis=-1) for k, v in value[index][group.index].items()}
                for group in relation.hidden_groups
            }
        return out

    def _coupling(self, group: HiddenGroup) -> tuple[tuple[bool, ...], ...]:
        """``[s][s']``: whether ``h_s^t`` depends on ``h_{s'}^{t-1}`` with the relations' outputs held fixed."""
        minfo = self.graph.module_info
        eqns = list(minfo.jaxpr.eqns)
        cut = {id(relation.eqn) for relation in self.graph.hidden_param_op_relations}
        rows = []
        for path in group.hidden_paths:
            out = minfo.hidden_path_to_outvar[path]
            rows.append(
                tuple(
                    out in reach(eqns, {minfo.hidden_path_to_invar[source]}, stop=set(), cut=cut)
                    for source in group.hidden_paths
                )
            )
        return tuple(rows)

    def _update_traces(self, traces: Any, values: StepValues, weights: dict[Any, Any]) -> tuple[Any, Any]:
        new_traces: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            w = {key: values.env[var] for key, var in relation.trainable_vars.items()}
            new_traces[index] = {}
            for group in relation.hidden_groups:
                one = partial(
                    _propagate_and_seed,
                    coupling=self._coupling(group),
                    primitive=relation.primitive,
                    params=relation.eqn_params,
                    weights=w,
                    num_state=group.num_state,
                )
                fn = _map_extra(one, _extra_axes(relation, group), (0, 0, 0, None))
                new_traces[index][group.index] = fn(
                    traces[index][group.index],
                    values.jacobians[group.index],
                    values.hidden_dims[(index, group.index)],
                    values.x_values[index],
                )
        # The residual is the new traces: the backward pass recovers D eps^{t-1} = eps^t - seed^t inside
        # its contraction, so the old traces are dead after the update (XLA updates them in place) and
        # the trace is read once by the update and once by the contraction.
        return new_traces, new_traces

    def _window_start_gradients(
        self, traces: Any, first: StepValues, lam: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        # the full trace at the window start is dh/dW of the start state
        return self._contract_traces(traces, first, lam, subtract_seed=False)

    def _trace_gradients(
        self, residual: Any, values: StepValues, g_hidden: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        # Without the barrier XLA re-fuses the update into the contraction and reads eps^{t-1} again,
        # which keeps the old traces alive and costs a full copy of them per step inside a scan.
        new_traces = jax.lax.optimization_barrier(residual)
        return self._contract_traces(new_traces, values, g_hidden, subtract_seed=True)

    def _contract_traces(
        self, traces: Any, values: StepValues, g_hidden: dict[StatePath, Any], subtract_seed: bool
    ) -> dict[int, dict[str, jax.Array]]:
        """``sum_s drtrl_grad(x, g_s, eps_s)`` per relation; ``eps_s - seed_s`` when ``subtract_seed``."""
        grads: dict[int, dict[str, jax.Array]] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            w = {key: values.env[var] for key, var in relation.trainable_vars.items()}
            x = values.x_values[index]
            total: dict[str, jax.Array] = {}
            for group in relation.hidden_groups:
                g = jnp.stack([g_hidden[p] for p in group.hidden_paths], axis=-1)
                Df = values.hidden_dims[(index, group.index)] if subtract_seed else None
                eps = traces[index][group.index]
                one = partial(
                    _contract_group,
                    primitive=relation.primitive,
                    params=relation.eqn_params,
                    weights=w,
                    num_state=group.num_state,
                    # keys left out of the VJP keep their seed: it is their instantaneous term
                    keep_seed=frozenset(k for i, k in self._hidden_only if i == index),
                )
                extra = _extra_axes(relation, group)
                if extra == 0 and _weight_shaped_batched(relation.primitive, eps, w, g, x):
                    part = _sum_over_samples(one, eps, g, Df, x)
                else:
                    part = _map_extra(one, extra, (0, 0, 0, None))(eps, g, Df, x)
                for key, value in part.items():
                    value = jnp.sum(value, axis=tuple(range(extra))) if extra else value
                    total[key] = total[key] + value if key in total else value
            grads[index] = total
        return grads


#: Batches up to this size are contracted sample by sample (see :func:`_sum_over_samples`).
_PER_SAMPLE_LIMIT = 128


def _weight_shaped_batched(primitive: Any, eps: dict[str, Any], weights: dict[str, Any], g: Any, x: Any) -> bool:
    """Whether every trace leaf is ``(batch, *weight.shape[, S])``: its contraction is element-wise per sample."""
    if not etp.is_batched_primitive(primitive) or x is None or g.ndim < 2:
        return False
    batch = g.shape[0]
    if not 1 < batch <= _PER_SAMPLE_LIMIT or jnp.shape(x)[0] != batch:
        return False

    def weight_shaped(key: str, shape: tuple[int, ...]) -> bool:
        if key not in weights:
            return False
        return shape == (batch, *jnp.shape(weights[key]))

    return all(weight_shaped(key, tuple(leaf.shape)) for key, value in eps.items() for leaf in value)


def _sum_over_samples(one: Callable[..., dict[str, Any]], eps: dict[str, Any], g: Any, Df: Any, x: Any) -> Any:
    """``one`` on each sample's slices, summed pairwise.

    Slicing the operands before the element-wise contraction lets XLA fuse the whole
    contraction into one pass over the trace; a batched product followed by a reduction over
    the batch axis materialises the product, or on XLA's CPU backend becomes a YNNPACK
    reduction many times slower. To keep the B-fold unroll cheap to trace, each operand is
    split once and ``one`` is traced once, on the first sample, its jaxpr replayed on the others.
    """
    batch = g.shape[0]
    leaves, structure = jax.tree.flatten((eps, g, Df, x))
    per_sample = list(zip(*(jax.lax.split(leaf, [1] * batch, axis=0) for leaf in leaves), strict=True))
    closed, shapes = jax.make_jaxpr(lambda *sample: one(*jax.tree.unflatten(structure, sample)), return_shape=True)(
        *per_sample[0]
    )
    replay = jaxpr_as_fun(closed)
    out_tree = jax.tree.structure(shapes)
    return etp.pairwise_sum([jax.tree.unflatten(out_tree, replay(*sample)) for sample in per_sample])


def _propagate(
    eps: dict[str, Any],
    D: Any,
    *,
    primitive: Any,
    params: dict[str, Any],
    num_state: int,
    coupling: tuple[tuple[bool, ...], ...] | None = None,
) -> dict[str, Any]:
    r"""``\bar\epsilon_s = \sum_{s'} yw\_to\_w(D_{ss'}, \epsilon_{s'})`` per state.

    ``coupling[s][s']`` false means :math:`D_{ss'}` is structurally zero (``h_s`` does not
    depend on ``h_{s'}`` once the ETP outputs are held fixed): that term is skipped, which
    also lets XLA update a state's trace in place when no other state reads it.
    """
    yw_to_w = etp.require_rules(primitive, "yw_to_w")["yw_to_w"]
    propagated = []
    for s in range(num_state):
        acc: dict[str, Any] = {}
        for s2 in range(num_state):
            if coupling is not None and not coupling[s][s2]:
                continue
            part = yw_to_w(D[..., s, s2], {k: v[s2] for k, v in eps.items()}, **params)
            acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
        if not acc:
            acc = {k: jnp.zeros_like(v[s]) for k, v in eps.items()}
        propagated.append(acc)
    return {k: tuple(p[k] for p in propagated) for k in eps}


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
    coupling: tuple[tuple[bool, ...], ...] | None = None,
) -> dict[str, Any]:
    """``eps^t = D eps^{t-1} + seed`` for one group: the S x S propagation, then the seed."""
    prop = _propagate(eps, D, primitive=primitive, params=params, num_state=num_state, coupling=coupling)
    seeds = [etp.drtrl_seed(primitive, x, Df[..., s], weights, params) for s in range(num_state)]
    seed = {k: tuple(sd[k] for sd in seeds) for k in eps}
    return {k: tuple(p + sd.astype(p.dtype) for p, sd in zip(prop[k], seed[k], strict=True)) for k in eps}


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


#: D-RTRL, the documented name of :class:`ParamDimVjpAlgorithm`.
D_RTRL = ParamDimVjpAlgorithm
