r"""UORO: unbiased online recurrent optimization (Tallec & Ollivier, 2017).

Write the model's step as :math:`h^t = F(h^{t-1}, \theta)`, with :math:`h` every
(floating) hidden state of the model and :math:`\theta` every ParamState leaf the
step reads. Exact RTRL carries :math:`M^t = \mathrm{d}h^t/\mathrm{d}\theta`; UORO
carries a rank-one estimate :math:`\tilde h^t \tilde\theta^{t\top}` of it:

.. math::

    \tilde h^t = \rho_0\, \frac{\partial F}{\partial h}\tilde h^{t-1} + \rho_1\, \nu^t, \qquad
    \tilde\theta^t = \frac{\tilde\theta^{t-1}}{\rho_0} + \frac{\nu^{t\top} \partial F/\partial\theta}{\rho_1},

with :math:`\nu^t` random signs (:math:`\pm 1`) of :math:`h`'s shape, drawn fresh
at every step, and the variance-minimising scales

.. math::

    \rho_0 = \sqrt{\frac{\lVert\tilde\theta^{t-1}\rVert}{\lVert \partial F/\partial h\,\tilde h^{t-1}\rVert
        + \epsilon}} + \epsilon, \qquad
    \rho_1 = \sqrt{\frac{\lVert\nu^{t\top}\partial F/\partial\theta\rVert}{\lVert\nu^t\rVert + \epsilon}}
        + \epsilon,

the norms taken over the whole of :math:`\theta` (all leaves) and the whole of
:math:`h` (all paths, all samples). Since :math:`\mathbb{E}[\nu\nu^\top] = I` and
the cross terms vanish, :math:`\mathbb{E}[\tilde h^t\tilde\theta^{t\top}] = M^t`
when :math:`\mathbb{E}[\tilde h^{t-1}\tilde\theta^{t-1\top}] = M^{t-1}` (the
Jacobians taken along the actual trajectory, which does not depend on the draws).
The gradient of step :math:`t`'s loss is the step's own VJP plus
:math:`(\partial L^t/\partial h^{t-1}\cdot\tilde h^{t-1})\,\tilde\theta^{t-1}`
(the ``hidden_cotangents='previous'`` contract), an unbiased estimate of the RTRL
gradient.

The random draws come from a key carried in the traces: each step splits it
into the next key and the step's draws (state in, state out), so the learner is
a pure function and a reset (:meth:`~etp_algorithms.ETraceAlgorithm.init_etrace_state`)
replays the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import ControlFlowPolicy, StatePath

from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._peer_keywords import DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS, PeerKeywords
from ._rtrl import _floating_paths, _theta_avals
from ._rule import HiddenCotangents, LearningRule, RuleContext
from ._rule_helpers import as_scalar, host_zeros
from ._transition import hidden_transition, trainable_inputs

__all__ = ["UORO", "RandomProjectionLearner", "UOROTrace", "as_key_data", "checked_epsilon", "uoro"]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class UOROTrace:
    r"""The rank-one influence estimate :math:`\tilde h\,\tilde\theta^\top` and the random key.

    Attributes
    ----------
    keys : tuple
        The ParamState leaves ``(state path, leaf key path)`` of :math:`\theta` (static).
    paths : tuple
        The floating hidden paths (static, ``module_info.hidden_path_to_outvar`` order).
    impl : str
        The PRNG implementation of the key (static, e.g. ``'threefry2x32'``).
    h_tilde : tuple of jax.Array
        One array per path, of the hidden state's (batched) shape.
    theta_tilde : tuple of jax.Array
        One array per leaf, of the leaf's shape.
    key : jax.Array
        The raw key data (``jax.random.key_data``) of the next step's draws.
    """

    keys: tuple[Any, ...] = field(metadata={"static": True})
    paths: tuple[StatePath, ...] = field(metadata={"static": True})
    impl: str = field(metadata={"static": True})
    h_tilde: tuple[jax.Array, ...]
    theta_tilde: tuple[jax.Array, ...]
    key: jax.Array


def as_key_data(projection_key: Any, label: str) -> tuple[np.ndarray, str]:
    """``(raw key data, implementation name)`` of a JAX PRNG key or an ``int`` seed.

    Accepts a typed key (:func:`jax.random.key`), a raw ``uint32`` key (:func:`jax.random.PRNGKey`)
    or a Python / NumPy integer seed; a ``TypeError`` naming ``label`` and the value otherwise.
    """
    if isinstance(projection_key, (int, np.integer)) and not isinstance(projection_key, (bool, np.bool_)):
        key = jax.random.key(int(projection_key))
        return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
    if isinstance(projection_key, jax.Array):
        if jnp.issubdtype(projection_key.dtype, jax.dtypes.prng_key) and projection_key.shape == ():
            return np.asarray(jax.random.key_data(projection_key)), str(jax.random.key_impl(projection_key))
        if projection_key.dtype == jnp.uint32 and projection_key.shape == (2,):
            return np.asarray(projection_key), "threefry2x32"
    raise TypeError(
        f"{label}: projection_key must be a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)) "
        f"or an int seed, got {projection_key!r} of type {type(projection_key).__name__}."
    )


def checked_epsilon(epsilon: Any, label: str) -> float:
    """The guard of a projection rule's scales as a float, ``>= 0`` (a ValueError naming ``label`` otherwise)."""
    eps = as_scalar(epsilon, f"{label}: epsilon")
    if not eps >= 0:
        raise ValueError(f"{label}: epsilon must be >= 0, got {epsilon!r}.")
    return float(eps)


def _norm(arrays: Any) -> jax.Array:
    """The Euclidean norm of all the arrays together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in arrays))


def uoro(projection_key: Any = 42, epsilon: float = 1e-7) -> LearningRule:
    """The UORO rule over the ParamState leaves (see the module docstring)."""
    key_data, impl = as_key_data(projection_key, "uoro")
    eps = checked_epsilon(epsilon, "uoro")

    def init_traces(ctx: RuleContext) -> UOROTrace:
        thetas = _theta_avals(ctx, "weights")
        paths = _floating_paths(ctx)
        outvars = ctx.graph.module_info.hidden_path_to_outvar
        h_tilde = tuple(host_zeros(outvars[p].aval.shape, outvars[p].aval.dtype) for p in paths)  # type: ignore[attr-defined]
        theta_tilde = tuple(host_zeros(a.shape, a.dtype) for a in thetas.values())
        return UOROTrace(tuple(thetas), paths, impl, h_tilde, theta_tilde, jax.device_put(key_data))

    def update_traces(ctx: RuleContext, traces: UOROTrace, values: StepValues) -> tuple[UOROTrace, UOROTrace]:
        minfo = ctx.graph.module_info
        F = hidden_transition(ctx, values, wrt="weights")
        paths = traces.paths
        hidden = {p: values.env[minfo.hidden_path_to_invar[p]] for p in minfo.hidden_path_to_outvar}
        fixed = {p: v for p, v in hidden.items() if p not in paths}
        theta = trainable_inputs(ctx, values, wrt="weights")

        def floating(h: dict[StatePath, jax.Array], w: dict[Any, jax.Array]) -> dict[StatePath, jax.Array]:
            new = F({**fixed, **h}, w)
            return {p: new[p] for p in paths}

        h0 = {p: hidden[p] for p in paths}
        key, draw = jax.random.split(jax.random.wrap_key_data(traces.key, impl=traces.impl))
        draws = jax.random.split(draw, len(paths))
        nu = {p: jax.random.rademacher(draws[i], jnp.shape(h0[p]), h0[p].dtype) for i, p in enumerate(paths)}
        # dF/dh . h~ (forward mode) and nu^T dF/dtheta (reverse mode), both at this step's values
        tangent = {p: t.astype(h0[p].dtype) for p, t in zip(paths, traces.h_tilde, strict=True)}
        _, h_prop = jax.jvp(lambda h: floating(h, theta), (h0,), (tangent,))
        _, pull = jax.vjp(lambda w: floating(h0, w), theta)
        (nu_theta,) = pull(nu)
        rho0 = jnp.sqrt(_norm(traces.theta_tilde) / (_norm(h_prop.values()) + eps)) + eps
        rho1 = jnp.sqrt(_norm(nu_theta.values()) / (_norm(nu.values()) + eps)) + eps
        h_new = tuple(
            (rho0 * h_prop[p] + rho1 * nu[p]).astype(old.dtype) for p, old in zip(paths, traces.h_tilde, strict=True)
        )
        theta_new = tuple(
            (old / rho0 + nu_theta[k] / rho1).astype(old.dtype)
            for k, old in zip(traces.keys, traces.theta_tilde, strict=True)
        )
        new = UOROTrace(traces.keys, paths, traces.impl, h_new, theta_new, jax.random.key_data(key))
        # the backward pass contracts the old estimate of M^{t-1} with dL^t/dh^{t-1}
        return new, traces

    def gradients(ctx: RuleContext, traces: UOROTrace, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        dot = sum(jnp.sum(dL_dh[p].astype(h.dtype) * h) for p, h in zip(traces.paths, traces.h_tilde, strict=True))
        return {k: dot * t for k, t in zip(traces.keys, traces.theta_tilde, strict=True)}

    def trace_of(ctx: RuleContext, traces: UOROTrace, index: int) -> dict[str, Any]:
        """``{'h_tilde': {path: h~}, 'theta_tilde': {leaf: theta~}}`` (the estimate is global, not per relation)."""
        return {
            "h_tilde": dict(zip(traces.paths, traces.h_tilde, strict=True)),
            "theta_tilde": dict(zip(traces.keys, traces.theta_tilde, strict=True)),
        }

    return LearningRule(
        name="UORO",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=gradients,
        # at a window's start the traces held estimate M^{start}: the same contraction with dL/dh^{start}
        window_start_gradients=gradients,
        trace_of=trace_of,
        hidden_cotangents="previous",
        gradient_targets="weights",
    )


class RandomProjectionLearner(ETraceAlgorithm):
    """The constructor UORO and KF_RTRL share: a rule factory ``(projection_key, epsilon) -> LearningRule``."""

    _rule_factory: Callable[[Any, float], LearningRule]

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        projection_key: Any = 42,
        epsilon: float = 1e-7,
        *,
        projection_eps: float | None = None,
        control_flow: ControlFlowPolicy | None = None,
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        config: Any = None,
        random_feedback_key: Any = None,
        snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS,
    ) -> None:
        if projection_eps is not None:  # braintrace 0.2.8's name for the guard
            epsilon = projection_eps
        keywords = (fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements)
        peer = PeerKeywords(type(self).__name__, *keywords)
        super().__init__(
            model,
            self._rule_factory(projection_key, epsilon),
            name=name,
            vjp_method=vjp_method,
            control_flow=control_flow,
            peer_keywords=peer,
        )
        self.epsilon = epsilon


class UORO(RandomProjectionLearner):
    r"""Unbiased online recurrent optimization: a rank-one estimate of the RTRL influence.

    Carries :math:`\tilde h` (the hidden states' shape) and :math:`\tilde\theta` (the
    weights' shape) with :math:`\mathbb{E}[\tilde h\tilde\theta^\top] = \mathrm{d}h/\mathrm{d}\theta`:

    .. math::

        \tilde h^t = \rho_0\,\frac{\partial F}{\partial h}\tilde h^{t-1} + \rho_1\nu^t, \qquad
        \tilde\theta^t = \tilde\theta^{t-1}/\rho_0 + \nu^{t\top}\frac{\partial F}{\partial\theta}\Big/\rho_1,

    with :math:`\nu^t \in \{\pm1\}` drawn fresh each step from a key held in the traces, and
    :math:`\rho_0, \rho_1` the variance-minimising scales of Tallec & Ollivier (2017) (see
    :mod:`etp_algorithms._uoro`). The gradient adds
    :math:`(\partial L^t/\partial h^{t-1}\cdot\tilde h^{t-1})\,\tilde\theta^{t-1}` to the step's
    own VJP.

    :math:`\theta` is every ParamState leaf of the step (``gradient_targets='weights'``), so a
    weight that reaches the hidden states only through another weight (a GRU's reset gate) or
    through no ETP op learns through its history too. :math:`h` is every floating hidden state of
    the model, *with the batch*: a batch of :math:`B` samples is one vector :math:`h` of
    :math:`B\cdot N` entries, :math:`\tilde h` has the batched shape and :math:`\tilde\theta` the
    weights' shape. It stays unbiased for the summed gradient: the influence of sample :math:`b`
    on sample :math:`b'` is zero, and :math:`\mathbb{E}[\nu_b\nu_{b'}] = 0` for
    :math:`b \ne b'` makes the estimate's cross-sample terms vanish in expectation (their
    variance grows with :math:`B`; :class:`~etp_algorithms.ETraceVmap` gives each sample its own
    rank-one estimate instead, with the same key sequence in every sample).

    Exact: nothing but the expectation. Unbiased: the gradient, for any model the compiler
    accepts (the Jacobians are the step's full ones). Approximate: each draw's gradient, with a
    variance that grows with the number of steps and the size of :math:`h`.

    Memory: :math:`O(B\cdot N + P)` (batch, hidden units, parameters), twice during a step.
    Compute: one JVP and one VJP of the step per step, beside the step itself.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    projection_key : jax.Array or int
        A JAX PRNG key (:func:`jax.random.key` or :func:`jax.random.PRNGKey`) or an ``int`` seed
        (default 42, as braintrace): the start of the key sequence of the random signs :math:`\nu` (a reset starts it again).
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: windows of steps (:class:`MultiStepData`), exact inside a window, the
        estimate at the window's start contracted with :math:`\partial L/\partial h^{start}`.
    epsilon : float
        The guard :math:`\epsilon` of :math:`\rho_0, \rho_1`.
    projection_eps : float, optional
        braintrace 0.2.8's name for ``epsilon``; when given, it is the guard used.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements
        braintrace 0.2.8's engine keywords (:mod:`etp_algorithms._peer_keywords`): ``trace_dtype`` is the
        traces' storage dtype, ``config`` must describe this learner, the others are checked and kept.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import UORO
    >>> cell = etp_nn.VanillaRNNCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=4)
    >>> learner = UORO(cell, projection_key=jax.random.key(0))
    >>> _ = learner.compile_graph(jnp.zeros((4, 2)))
    >>> _ = learner(jnp.ones((4, 2)))
    >>> trace = learner.etrace.value
    >>> trace.h_tilde[0].shape, {k[1]: t.shape for k, t in zip(trace.keys, trace.theta_tilde)}
    ((4, 3), {('bias',): (3,), ('weight',): (5, 3)})
    >>> grads = brainstate.transform.grad(lambda: jnp.sum(learner(jnp.ones((4, 2)))), cell.states(brainstate.ParamState))()
    """

    _rule_factory = staticmethod(uoro)
