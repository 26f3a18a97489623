r"""Three-factor learning: the D-RTRL eligibility trace gated by a caller's modulator.

Three-factor (neuromodulated, reward-modulated) plasticity changes a weight by
the product of a local eligibility trace (pre- and postsynaptic factors,
remembered over time) and a third, global or per-unit signal :math:`M^t`
(dopamine, a reward prediction error, an attention signal; Frémaux & Gerstner
2016, Gerstner et al. 2018). With the D-RTRL trace of each relation
:math:`y = \mathrm{op}(x, W)` and hidden state :math:`s`,

.. math::

    e^t_s = \sum_{s'} D^t_{ss'}\, e^{t-1}_{s'} + \mathrm{drtrl\_seed}(x^t, D^t_{f,s}, W), \qquad
    \Delta W^t \propto \frac{\partial L^t}{\partial W}\Big|_{\text{direct}}
        + \sum_s \mathrm{drtrl\_grad}(x^t, M^t_s, e^t_s, W),

the modulator :math:`M^t_s` (one array of the hidden state's shape) taking the
place of :math:`g^t_s = \partial L^t/\partial h^t_s`, the learning signal of
D-RTRL. What reaches the loss without passing through a hidden state (a
weight's direct path to the output, a readout, every weight without a trace)
keeps its ordinary gradient. With :math:`M^t = \partial L^t/\partial h^t` the
rule is D-RTRL exactly; with any other :math:`M^t` it is what the caller
defines (no approximation claim). Memory and compute are D-RTRL's:
:math:`O(B\cdot\theta)` per relation, one propagation and one contraction per
step.

The modulator enters the step's ``custom_vjp`` as an input, so it may be a
traced value (under ``jit``, ``scan``, :meth:`~ETraceAlgorithm.etrace_grad`);
the backward pass contracts the traces with it instead of
:math:`\partial L/\partial h`. Multi-step windows run exact reverse mode and
take no modulator.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import ControlFlowPolicy, ETraceGraph, StatePath

from ._d_rtrl import _contract, init_traces, trace_of, update_traces, window_start_gradients
from ._d_rtrl import trace_gradients as d_rtrl_trace_gradients
from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._peer_keywords import DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS, PeerKeywords
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import instantaneous_gradient

__all__ = ["ThreeFactor", "modulator_values", "three_factor"]

#: ``modulator(output, hidden) -> modulator``: the model's output of the step and ``hidden path -> new value``.
ModulatorFn = Callable[[Any, dict[StatePath, jax.Array]], Any]


def _text(path: tuple[Hashable, ...]) -> str:
    return ".".join(map(str, path))


def modulator_values(graph: ETraceGraph, modulator: Any, label: str = "ThreeFactor") -> dict[StatePath, jax.Array]:
    """The modulator as ``hidden path -> array of the hidden state's shape`` (missing states: zeros).

    ``modulator`` is an array (the model has one hidden state) or a mapping ``hidden path (tuple) -> array``;
    each array must broadcast to its hidden state's shape (a scalar reward broadcasts to every unit).
    """
    avals: dict[StatePath, Any] = {p: v.aval for p, v in graph.module_info.hidden_path_to_outvar.items()}
    known = ", ".join(_text(p) for p in avals)
    if isinstance(modulator, Mapping):
        given = {tuple(p) if isinstance(p, (tuple, list)) else (p,): v for p, v in modulator.items()}
        unknown = [p for p in given if p not in avals]
        if unknown:
            raise ValueError(
                f"{label}: the modulator names {', '.join(_text(p) for p in unknown)}, which "
                f"{'is not a hidden state' if len(unknown) == 1 else 'are not hidden states'} of the model; "
                f"its hidden states: {known}."
            )
    elif len(avals) == 1:
        given = {next(iter(avals)): modulator}
    else:
        raise ValueError(
            f"{label}: the model has {len(avals)} hidden states ({known}); pass the modulator as a dict "
            "hidden path -> array (states left out get no modulator, i.e. zero)."
        )
    out: dict[StatePath, jax.Array] = {}
    for path, aval in avals.items():
        if path not in given:
            out[path] = jnp.zeros(aval.shape, aval.dtype)
            continue
        value = given[path]
        value = getattr(value, "mantissa", value)  # a saiunit Quantity: its number, as dL/dh is
        shape = tuple(jnp.shape(value))
        try:
            fits = np.broadcast_shapes(shape, aval.shape) == tuple(aval.shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{label}: the modulator of hidden state {_text(path)} must have the state's shape "
                f"{tuple(aval.shape)} (or broadcast to it); got shape {shape}."
            )
        out[path] = jnp.broadcast_to(jnp.asarray(value, dtype=aval.dtype), aval.shape)
    return out


def three_factor(modulator: ModulatorFn | None = None) -> LearningRule:
    r"""The three-factor rule: D-RTRL's traces contracted with a modulator instead of :math:`\partial L/\partial h`.

    The modulator comes from the step's input (``dL_dh.modulator``, see
    :class:`etp_algorithms.extend.ModulatedCotangents`), else from ``modulator(output, hidden)`` called in the
    backward pass, else the rule is D-RTRL (:math:`M = \partial L/\partial h`).
    """

    def signal(ctx: RuleContext, values: StepValues, dL_dh: HiddenCotangents) -> dict[StatePath, jax.Array] | None:
        given = getattr(dL_dh, "modulator", None)
        if given is not None:
            return dict(given)
        if modulator is None:
            return None
        minfo = ctx.graph.module_info
        hidden = {p: values.state_values[p][0] for p in minfo.hidden_path_to_outvar}
        return modulator_values(ctx.graph, modulator(minfo.unflatten_outputs(values.outputs), hidden))

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        M = signal(ctx, values, dL_dh)
        if M is None:
            return d_rtrl_trace_gradients(ctx, residual, values, dL_dh)
        # M (e^t - seed^t) for the keys the VJP differentiated, M e^t for the others ...
        grads: RelationGradients = _contract(ctx, jax.lax.optimization_barrier(residual), values, M, True)
        # ... and the VJP's own hidden-path term g^t seed^t swapped for M^t seed^t: the hidden path is M e^t
        swap = {p: M[p] - dL_dh[p] for p in M}
        for index, per_key in grads.items():
            replaced = [k for k in per_key if not ctx.keeps_instantaneous(index, k)]
            if replaced:
                step = instantaneous_gradient(ctx, index, values, swap)
                grads[index] = {k: v + step[k] if k in replaced else v for k, v in per_key.items()}
        return grads

    return LearningRule(
        name="ThreeFactor",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=window_start_gradients,
        trace_of=trace_of,
    )


class ThreeFactor(ETraceAlgorithm):
    r"""Three-factor learning: D-RTRL's eligibility traces gated by a modulator, :math:`\Delta W = M^t \cdot e^t`.

    .. math::

        \Delta W^t \propto \frac{\partial L^t}{\partial W}\Big|_{\text{direct}}
            + \sum_s \mathrm{drtrl\_grad}(x^t, M^t_s, e^t_s, W)

    with :math:`e^t` the D-RTRL trace (see :class:`~etp_algorithms.D_RTRL`) and
    :math:`M^t` the modulator in place of :math:`\partial L^t/\partial h^t`. The
    gradient a ``brainstate.transform.grad`` of the step's loss returns is this
    :math:`\Delta W^t`: weights and readouts without a trace keep their ordinary
    gradient. :math:`M^t = \partial L^t/\partial h^t` gives D-RTRL exactly.
    Memory :math:`O(B\cdot\theta)` per relation (D-RTRL's).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: windows (:class:`MultiStepData`) run exact reverse mode and take no modulator;
        one-step calls take one as usual.
    modulator : array, dict, callable or None
        The default of a call that passes none. An array (one hidden state) or a dict
        ``hidden path -> array``, each broadcasting to its state's shape (states left out: zero);
        or a callable ``modulator(output, hidden)`` of the step's model output and
        ``hidden path -> new value``, called in the backward pass (e.g. a reward times the output error);
        ``None``: without a call's modulator the rule is D-RTRL.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements
        braintrace 0.2.8's engine keywords (:mod:`etp_algorithms._peer_keywords`): ``trace_dtype`` is the
        traces' storage dtype, ``config`` must describe this learner, the others are checked and kept.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms._three_factor import ThreeFactor
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = ThreeFactor(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> params = cell.states(brainstate.ParamState)
    >>> reward = 0.5  # a scalar third factor broadcasts to every unit
    >>> grads = brainstate.transform.grad(lambda x: jnp.sum(learner(x, modulator=reward)), params)(jnp.ones(3))
    >>> grads[("W", "weight")]["weight"].shape
    (7, 4)
    """

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        modulator: Any = None,
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS,
        *,
        config: Any = None,
        random_feedback_key: Any = None,
    ) -> None:
        function = modulator if callable(modulator) and not hasattr(modulator, "shape") else None
        keywords = (fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements)
        peer = PeerKeywords(type(self).__name__, *keywords)
        super().__init__(
            model,
            three_factor(function),
            name=name,
            vjp_method=vjp_method,
            control_flow=control_flow,
            peer_keywords=peer,
        )
        self.default_modulator = None if function is not None else modulator

    def _step_modulator(self, modulator: Any) -> list[Any] | None:
        chosen = self.default_modulator if modulator is None else modulator
        if chosen is None:
            return None
        values = modulator_values(self.graph, chosen, type(self).__name__)
        return [values[p] for p in self.graph.module_info.hidden_path_to_outvar]
