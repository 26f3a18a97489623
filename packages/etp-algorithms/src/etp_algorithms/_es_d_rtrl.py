r"""ES-D-RTRL / pp-prop (``IODimVjpAlgorithm``): input- and output-dimension traces.

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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import etp_primitives as etp
from etp_compiler import StatePath

from ._base import ETraceAlgorithm, host_zeros, rule_shapes
from ._d_rtrl import _extra_axes
from ._executor import StepValues

__all__ = ["IODimVjpAlgorithm", "ES_D_RTRL", "pp_prop"]


def _decay_from(decay_or_rank: float | int) -> float:
    if isinstance(decay_or_rank, bool) or not isinstance(decay_or_rank, (int, float)):
        raise TypeError(
            f"ES_D_RTRL: decay_or_rank must be a float decay in (0, 1) or an int rank > 0, got {decay_or_rank!r}."
        )
    if isinstance(decay_or_rank, int):
        if decay_or_rank <= 0:
            raise ValueError(f"ES_D_RTRL: a rank must be a positive int, got {decay_or_rank}.")
        return (decay_or_rank - 1) / (decay_or_rank + 1)
    if not 0.0 < decay_or_rank < 1.0:
        raise ValueError(f"ES_D_RTRL: a decay must lie in (0, 1), got {decay_or_rank}.")
    return float(decay_or_rank)


# Sums over a group's S states are written as element-wise adds (etp.pairwise_sum), never as a
# ``jnp.sum`` over a minor S axis: XLA's CPU backend (jax 0.10) hands that reduction to a YNNPACK
# fusion costing several times the whole step, while adds of slices fuse with the element-wise work.


def _contract_states(group: Any, g: dict[StatePath, Any], per_state: Any, extra: int) -> Any:
    r"""``sum_s g_s * per_state[..., s]``, also summed over the ``extra`` leading hidden axes."""
    total = etp.pairwise_sum([g[path] * per_state[..., s] for s, path in enumerate(group.hidden_paths)])
    return etp.sum_leading_axes(total, total.ndim - extra)


class IODimVjpAlgorithm(ETraceAlgorithm):
    r"""Online learning with ES-D-RTRL (pp-prop) traces (aliases :data:`ES_D_RTRL`, :data:`pp_prop`).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    decay_or_rank : float or int
        Decay :math:`a \in (0, 1)`, or a rank :math:`r > 0` meaning :math:`a = (r-1)/(r+1)`.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: each call takes a window of steps (:class:`MultiStepData`).
    """

    def __init__(
        self, model: Any, decay_or_rank: float | int, name: str | None = None, vjp_method: str = "single-step"
    ) -> None:
        self.decay = _decay_from(decay_or_rank)
        if vjp_method not in ("single-step", "multi-step"):
            raise ValueError(
                f"ES_D_RTRL: unknown vjp_method {vjp_method!r}; expected one of ['single-step', 'multi-step']."
            )
        super().__init__(model, name=name)
        self.vjp_method = vjp_method

    def _initial_traces(self) -> dict[Any, Any]:
        relations: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            init_pp = etp.require_rules(relation.primitive, "init_pp")["init_pp"]
            x_aval: Any = None if relation.x_var is None else relation.x_var.aval
            per_group: dict[int, Any] = {}
            for group in relation.hidden_groups:
                base = rule_shapes(init_pp, relation.x_var, relation.y_var, relation.trainable_vars, group.num_state)
                extra = _extra_axes(relation, group)
                per_group[group.index] = host_zeros((*group.varshape[:extra], *base.shape), base.dtype)
            relations[index] = {
                "x": None if x_aval is None else host_zeros(x_aval.shape, x_aval.dtype),
                "f": per_group,
            }
        return {"steps": host_zeros((), np.int32), "relations": relations}

    def _relation_traces(self, value: Any) -> Any:
        return value["relations"]

    def _update_traces(self, traces: Any, values: StepValues, weights: dict[Any, Any]) -> tuple[Any, Any]:
        a = self.decay
        relations: dict[int, Any] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            x = values.x_values[index]
            old_relation = traces["relations"][index]
            eps_x = None if x is None else a * old_relation["x"] + x
            eps_f: dict[int, Any] = {}
            for group in relation.hidden_groups:
                D = values.jacobians[group.index]
                Df = values.hidden_dims[(index, group.index)]
                old = old_relation["f"][group.index]
                propagated = jnp.stack(
                    [
                        etp.pairwise_sum([D[..., s, s2] * old[..., s2] for s2 in range(group.num_state)])
                        for s in range(group.num_state)
                    ],
                    axis=-1,
                )
                eps_f[group.index] = a * propagated + (1 - a) * Df.astype(old.dtype)
            relations[index] = {"x": eps_x, "f": eps_f}
        new = {"steps": traces["steps"] + 1, "relations": relations}
        return new, (traces["steps"], relations)

    def _window_start_gradients(
        self, traces: Any, first: StepValues, lam: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        steps = traces["steps"]
        # after k steps the traces carry the bias correction 1 - a^k (zero traces when k == 0)
        correction = jnp.where(steps > 0, 1.0 - jnp.power(self.decay, steps), 1.0)
        grads: dict[int, dict[str, jax.Array]] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
            w = {key: first.env[var] for key, var in relation.trainable_vars.items()}
            trace = traces["relations"][index]
            cot: Any = 0.0
            for group in relation.hidden_groups:
                extra = _extra_axes(relation, group)
                cot = cot + _contract_states(group, lam, trace["f"][group.index], extra)
            approx = xy_to_dw(trace["x"], cot, w, **relation.eqn_params)
            grads[index] = {k: v / correction.astype(v.dtype) for k, v in approx.items()}
        return grads

    def _trace_gradients(
        self, residual: Any, values: StepValues, g_hidden: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        steps, traces = residual
        correction = 1.0 - jnp.power(self.decay, steps + 1)
        grads: dict[int, dict[str, jax.Array]] = {}
        for index, relation in enumerate(self.graph.hidden_param_op_relations):
            xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
            w = {key: values.env[var] for key, var in relation.trainable_vars.items()}
            approx_cot: Any = 0.0
            exact_cot: Any = 0.0
            for group in relation.hidden_groups:
                extra = _extra_axes(relation, group)
                f = traces[index]["f"][group.index]
                Df = values.hidden_dims[(index, group.index)]
                approx_cot = approx_cot + _contract_states(group, g_hidden, f, extra)
                exact_cot = exact_cot + _contract_states(group, g_hidden, Df, extra)
            approx = xy_to_dw(traces[index]["x"], approx_cot, w, **relation.eqn_params)
            grads[index] = {k: v / correction.astype(v.dtype) for k, v in approx.items()}
            replaced = [k for k in approx if (index, k) not in self._hidden_only]
            if replaced:
                # the instantaneous VJP already holds the current step's hidden-path term: replace it by the trace
                current = xy_to_dw(values.x_values[index], exact_cot, w, **relation.eqn_params)
                grads[index] = {k: v - current[k] if k in replaced else v for k, v in grads[index].items()}
        return grads


#: ES-D-RTRL, the documented name of :class:`IODimVjpAlgorithm`.
ES_D_RTRL = IODimVjpAlgorithm
#: pp-prop, another name of :class:`IODimVjpAlgorithm`.
pp_prop = IODimVjpAlgorithm
