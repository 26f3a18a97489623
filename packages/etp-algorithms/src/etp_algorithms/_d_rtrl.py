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
the op are position-wise (e.g. leaky integrators, LIF neurons with
feed-forward input); an approximation otherwise (paths through other ETP ops
are dropped). Memory: :math:`O(B\cdot\theta)` per relation, independent of
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

from ._base import ETraceAlgorithm
from ._executor import StepValues

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
                base = init(relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
                per_group[group.index] = {
                    key: jnp.zeros((*group.varshape[:extra], *leaf.shape), leaf.dtype) for key, leaf in base.items()
                }
            traces[index] = per_group
        return traces

    def _update_traces(self, traces: Any, values: StepValues, weights: dict[Any, Any]) -> tuple[Any, Any]:
        new_traces: dict[int, Any] = {}
        propagated: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            w = {key: values.env[var] for key, var in relation.trainable_vars.items()}
            new_traces[index], propagated[index] = {}, {}
            for group in relation.hidden_groups:
                one = partial(
                    _propagate_and_seed,
                    primitive=relation.primitive,
                    params=relation.eqn_params,
                    weights=w,
                    num_state=group.num_state,
                )
                fn = _map_extra(one, _extra_axes(relation, group), (0, 0, 0, None))
                new, prop = fn(
                    traces[index][group.index],
                    values.jacobians[group.index],
                    values.hidden_dims[(index, group.index)],
                    values.x_values[index],
                )
                new_traces[index][group.index] = new
                propagated[index][group.index] = prop
        return new_traces, propagated

    def _window_start_gradients(
        self, traces: Any, first: StepValues, lam: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        # the full trace at the window start is dh/dW of the start state
        return self._trace_gradients(traces, first, lam, weights)

    def _trace_gradients(
        self, residual: Any, values: StepValues, g_hidden: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        grads: dict[int, dict[str, jax.Array]] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            w = {key: values.env[var] for key, var in relation.trainable_vars.items()}
            total: dict[str, jax.Array] = {}
            for group in relation.hidden_groups:
                g = jnp.stack([g_hidden[p] for p in group.hidden_paths], axis=-1)
                one = partial(
                    _contract,
                    primitive=relation.primitive,
                    params=relation.eqn_params,
                    weights=w,
                    num_state=group.num_state,
                )
                extra = _extra_axes(relation, group)
                part = _map_extra(one, extra, (0, 0, None))(residual[index][group.index], g, values.x_values[index])
                for key, value in part.items():
                    value = jnp.sum(value, axis=tuple(range(extra))) if extra else value
                    total[key] = total[key] + value if key in total else value
            grads[index] = total
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(eps^t, D eps^{t-1})`` for one group: the S x S propagation, then the seed."""
    yw_to_w = etp.require_rules(primitive, "yw_to_w")["yw_to_w"]
    propagated = []
    for s in range(num_state):
        acc: dict[str, Any] = {}
        for s2 in range(num_state):
            part = yw_to_w(D[..., s, s2], {k: v[..., s2] for k, v in eps.items()}, **params)
            acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
        propagated.append(acc)
    prop = {k: jnp.stack([p[k] for p in propagated], axis=-1) for k in eps}
    seeds = [etp.drtrl_seed(primitive, x, Df[..., s], weights, params) for s in range(num_state)]
    seed = {k: jnp.stack([sd[k] for sd in seeds], axis=-1) for k in eps}
    return {k: prop[k] + seed[k].astype(prop[k].dtype) for k in eps}, prop


def _contract(
    prop: dict[str, Any], g: Any, x: Any, *, primitive: Any, params: dict[str, Any], weights: Any, num_state: int
) -> dict[str, Any]:
    """``sum_s drtrl_grad(x, g_s, prop_s)`` for one group."""
    acc: dict[str, Any] = {}
    for s in range(num_state):
        part = etp.drtrl_grad(primitive, x, g[..., s], {k: v[..., s] for k, v in prop.items()}, weights, params)
        acc = {k: acc[k] + part[k] for k in part} if acc else dict(part)
    return acc


#: D-RTRL, the documented name of :class:`ParamDimVjpAlgorithm`.
D_RTRL = ParamDimVjpAlgorithm
