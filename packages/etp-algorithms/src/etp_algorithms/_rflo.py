r"""RFLO: random-feedback local online learning (Murray 2019, eLife 8:e43299).

For a leaky RNN :math:`h^t = (1-a)\,h^{t-1} + a\,\phi(u^t)`, :math:`u^t = W_{rec} h^{t-1} + W_{in} x^t`,
read out as :math:`y^t = W_{out} h^t`, RFLO keeps for every weight :math:`W_{ij}` of the recurrence
the eligibility trace propagated with the leak only,

.. math::

    e^t_{ij} = (1-a)\, e^{t-1}_{ij} + a\, \phi'(u^t_i)\, r^t_j,

(:math:`r^t` the weight's input: :math:`x^t` for :math:`W_{in}`, :math:`h^{t-1}` for :math:`W_{rec}`) and
sends the error :math:`\varepsilon^t = \partial L^t/\partial y^t` to the hidden units through a fixed
random matrix :math:`B` (hidden :math:`\times` output) in place of :math:`W_{out}^\top`:

.. math::

    \Delta W_{ij} \propto \sum_t (B\,\varepsilon^t)_i\, e^t_{ij}.

The readout learns by its own instantaneous (delta-rule) gradient :math:`\varepsilon^t (h^t)^\top`.

In ETP's terms, the trace is D-RTRL's (:mod:`etp_algorithms._d_rtrl`): propagated with :math:`D^t`,
the position-wise Jacobian with the ETP ops' outputs held fixed, and seeded with
:math:`\mathrm{drtrl\_seed}(x^t, D^t_f)`; on the leaky RNN above :math:`D^t = 1-a` and
:math:`D^t_f = a\,\phi'(u^t)`, which is Murray's trace. RFLO is D-RTRL's trace contracted with the
feedback signal :math:`\tilde g^t_p = B_p \varepsilon^t` for each hidden state :math:`p` in place of
the true :math:`g^t_p = \partial L^t/\partial h^t_p`; ``feedback='symmetric'`` keeps the true
:math:`g^t` and is D-RTRL. On other models (a GRU, a LIF network) RFLO is D-RTRL's trace with the
feedback route.

Feedback layout
---------------
:math:`\varepsilon^t` is the concatenation of the model's floating-point outputs (flattened, in
the outputs' order); non-floating outputs carry no error. Each hidden state :math:`p` driven by an
ETP op gets its own matrix :math:`B_p` of shape ``(units of p, O)``, entries drawn once from
``feedback_key`` (folded in with the state's index) as :math:`\mathcal N(0, s^2)`, with
:math:`s = 1/\sqrt{O}` by default. A *batched* model (every such hidden state with at least two axes
and one leading batch size :math:`B`, every floating output with that leading axis) gets per-sample
feedback: ``(B, O) -> (B, units)``, units and :math:`O` per sample. Otherwise (some hidden state has
one axis or none, or their leading sizes differ) the model is unbatched and the whole flattened
outputs feed the whole flattened states. Hidden states that look batched beside an output without
their batch axis are refused at compile (:class:`etp_compiler.CompilationError` with the shapes).

The step's own term
-------------------
The gradient of a weight with respect to its relation's hidden states at step :math:`t` (the seed
term) also takes the feedback signal. For the keys the step's VJP leaves out (``ctx.hidden_only``:
their only route to the loss is their relation's hidden states) the rule's contraction is the whole
gradient. For the others the VJP already holds the true hidden-route term (and the routes that
bypass the hidden states, which stay exact); the rule subtracts the true hidden-route term,
:math:`\mathrm{xy\_to\_dw}(x^t, \sum_s g^t_s D^t_{f,s})`, which is exact when the op's output
reaches the hidden states position-wise (otherwise the learner warns at compile, naming the weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import CompilationError, ControlFlowPolicy, ETraceGraph, NotSupportedError, StatePath

from . import _d_rtrl
from ._compat import is_tracer
from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import as_scalar, instantaneous_gradient

__all__ = ["RFLO", "FeedbackLayout", "feedback_layout", "feedback_signal", "rflo"]

#: The values of ``feedback``.
FEEDBACK = ("random", "symmetric")


@dataclass(frozen=True)
class FeedbackLayout:
    """How the outputs' error reaches the hidden states (static, from the compiled graph).

    Attributes
    ----------
    batch : int or None
        The per-sample batch size of a batched model; ``None`` for an unbatched one.
    outputs : tuple of int
        The indices of the floating-point outputs (in the model's flattened outputs).
    size : int
        :math:`O`: the error's size per sample (the whole flattened outputs when unbatched).
    hidden : tuple of (path, shape, dtype name)
        The hidden states that get a feedback signal, with their full shapes.
    """

    batch: int | None
    outputs: tuple[int, ...]
    size: int
    hidden: tuple[tuple[StatePath, tuple[int, ...], str], ...]

    def units(self, shape: tuple[int, ...]) -> int:
        """The feedback matrix's rows for a hidden state of ``shape`` (per sample when batched)."""
        return int(np.prod(shape[1:] if self.batch is not None else shape, dtype=np.int64))


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in var.aval.shape)


def _dtype(var: Any) -> Any:
    aval: Any = var.aval
    return aval.dtype


def feedback_layout(graph: ETraceGraph) -> FeedbackLayout:
    """The :class:`FeedbackLayout` of ``graph`` (see the module docstring); ``CompilationError`` if none fits."""
    minfo = graph.module_info
    paths: list[StatePath] = []
    for relation in graph.hidden_param_op_relations:
        for group in relation.hidden_groups:
            paths.extend(p for p in group.hidden_paths if p not in paths)
    order = list(minfo.hidden_path_to_outvar)
    paths.sort(key=order.index)
    hidden = tuple(
        (p, _shape(minfo.hidden_path_to_outvar[p]), str(_dtype(minfo.hidden_path_to_outvar[p]))) for p in paths
    )
    outputs = tuple(i for i, v in enumerate(minfo.out_vars) if jnp.issubdtype(_dtype(v), jnp.inexact))
    shapes = {".".join(map(str, p)): s for p, s, _ in hidden}
    out_shapes = [_shape(minfo.out_vars[i]) for i in outputs]
    if not outputs or sum(int(np.prod(s, dtype=np.int64)) for s in out_shapes) == 0:
        raise CompilationError(
            f"RFLO with feedback='random': the model has no floating-point output to send back as the error "
            f"(outputs: {[_shape(v) for v in minfo.out_vars]}); return the readout from the model's update."
        )
    leading = {s[0] for s in shapes.values() if len(s) >= 2}
    batch: int | None = None
    if hidden and all(len(s) >= 2 for s in shapes.values()) and len(leading) == 1:
        batch = leading.pop()
        if any(len(s) < 1 or s[0] != batch for s in out_shapes):
            raise CompilationError(
                f"RFLO with feedback='random': the hidden states {shapes} share a leading batch axis of size "
                f"{batch}, but the floating-point outputs have shapes {out_shapes}: a feedback matrix maps each "
                f"sample's error to its hidden units, so every output needs that batch axis first (shape "
                f"({batch}, ...)). Return per-sample outputs, or use feedback='symmetric'."
            )
    size = sum(int(np.prod(s[1:] if batch is not None else s, dtype=np.int64)) for s in out_shapes)
    return FeedbackLayout(batch, outputs, size, hidden)


def feedback_signal(
    layout: FeedbackLayout, matrices: dict[StatePath, Any], output_cotangents: Sequence[Any] | None
) -> dict[StatePath, jax.Array]:
    r"""``hidden path -> B_p \varepsilon^t`` shaped like the state, from the outputs' cotangents.

    ``output_cotangents`` is :attr:`StepValues.output_cotangents` (all flattened outputs); ``matrices``
    maps each path of ``layout.hidden`` to its ``(units, O)`` matrix.
    """
    if output_cotangents is None:
        raise ValueError("RFLO: the feedback signal needs the outputs' cotangents (only in the backward pass).")
    lead = (layout.batch, -1) if layout.batch is not None else (-1,)
    eps = jnp.concatenate([jnp.reshape(output_cotangents[i], lead) for i in layout.outputs], axis=-1)
    return {p: jnp.reshape(eps @ matrices[p].T, shape).astype(dtype) for p, shape, dtype in layout.hidden}


def _as_key(value: Any) -> jax.Array:
    """A concrete JAX PRNG key from an int or a key (a typed key, or a raw ``uint32[2]`` key)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return jax.random.key(int(value))
    if isinstance(value, (jax.Array, np.ndarray)) and not is_tracer(value):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape == ():
            return jnp.asarray(value)
        if value.dtype == np.uint32 and value.shape == (2,):
            key: jax.Array = jax.random.wrap_key_data(jnp.asarray(value))
            return key
    raise TypeError(
        f"RFLO: feedback_key must be an int or a concrete JAX PRNG key (jax.random.key(...) or a raw uint32[2] "
        f"key), got {value!r} of type {type(value).__name__}."
    )


def _as_scale(value: Any) -> float | None:
    if value is None:
        return None
    scale = float(as_scalar(value, "RFLO: feedback_scale"))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"RFLO: feedback_scale must be a positive finite number or None, got {value!r}.")
    return scale


def _check_feedback(feedback: Any) -> str:
    if not isinstance(feedback, str) or feedback not in FEEDBACK:
        raise ValueError(f"RFLO: unknown feedback {feedback!r}; expected one of {list(FEEDBACK)}.")
    return feedback


class _FeedbackMatrices:
    """The feedback matrices of a graph, drawn once per layout (a memo: a deterministic function of the key)."""

    def __init__(self, key: jax.Array, scale: float | None) -> None:
        self.key, self.scale = key, scale
        self._drawn: dict[FeedbackLayout, dict[StatePath, np.ndarray]] = {}

    def __call__(self, graph: ETraceGraph) -> tuple[FeedbackLayout, dict[StatePath, np.ndarray]]:
        layout = feedback_layout(graph)
        if layout not in self._drawn:
            scale = self.scale if self.scale is not None else 1.0 / np.sqrt(layout.size)
            drawn = {}
            # concrete even when first asked inside a trace: the matrices are constants of the step
            with jax.ensure_compile_time_eval():
                for i, (path, shape, dtype) in enumerate(layout.hidden):
                    sample = jax.random.normal(
                        jax.random.fold_in(self.key, i), (layout.units(shape), layout.size), jnp.float32
                    )
                    drawn[path] = (np.asarray(sample, dtype=np.float64) * scale).astype(dtype)
            self._drawn[layout] = drawn
        return layout, self._drawn[layout]


def rflo(feedback: str = "random", feedback_key: Any = 0, feedback_scale: Any = None) -> LearningRule:
    """The RFLO learning rule (see the module docstring): D-RTRL's traces with the feedback route.

    ``feedback='symmetric'`` is D-RTRL's rule (named ``'RFLO'``), with multi-step windows; with
    ``'random'`` the rule has no window-start contraction (a window's exact reverse mode would send
    the true signal).

    Examples
    --------
    >>> from etp_algorithms._rflo import rflo
    >>> rflo().name, rflo().supports_windows, rflo("symmetric").supports_windows
    ('RFLO', False, True)
    """
    return _build(feedback, feedback_key, feedback_scale)[0]


def _build(feedback: Any, feedback_key: Any, feedback_scale: Any) -> tuple[LearningRule, _FeedbackMatrices | None]:
    """The rule and, with random feedback, its feedback matrices."""
    mode = _check_feedback(feedback)
    key, scale = _as_key(feedback_key), _as_scale(feedback_scale)
    if mode == "symmetric":
        rule = LearningRule(
            name="RFLO",
            init_traces=_d_rtrl.init_traces,
            update_traces=_d_rtrl.update_traces,
            trace_gradients=_d_rtrl.trace_gradients,
            window_start_gradients=_d_rtrl.window_start_gradients,
            trace_of=_d_rtrl.trace_of,
        )
        return rule, None
    matrices = _FeedbackMatrices(key, scale)

    def init_traces(ctx: RuleContext) -> Any:
        matrices(ctx.graph)  # the layout check and the draw, at compile
        return _d_rtrl.init_traces(ctx)

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        layout, drawn = matrices(ctx.graph)
        signal = feedback_signal(layout, drawn, values.output_cotangents)
        # the full trace eps^t (the seed included) with the feedback signal: history and step t's term
        grads = _d_rtrl._contract(ctx, jax.lax.optimization_barrier(residual), values, signal, subtract_seed=False)
        return _without_true_instantaneous(ctx, grads, values, dL_dh)

    rule = LearningRule(
        name="RFLO",
        init_traces=init_traces,
        update_traces=_d_rtrl.update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=None,
        trace_of=_d_rtrl.trace_of,
    )
    return rule, matrices


def _without_true_instantaneous(
    ctx: RuleContext, grads: RelationGradients, values: StepValues, dL_dh: HiddenCotangents
) -> RelationGradients:
    """Subtract the true hidden-route term the VJP holds for the keys it differentiated (not ``hidden_only``)."""
    for index, part in grads.items():
        keys = [k for k in part if not ctx.keeps_instantaneous(index, k)]
        if keys:
            true = instantaneous_gradient(ctx, index, values, dL_dh)
            for k in keys:
                part[k] = part[k] - true[k].astype(part[k].dtype)
    return grads


def _approximate_instantaneous(ctx: RuleContext) -> list[str]:
    """The weights (``path.key``) whose true hidden-route term is subtracted with a non-position-wise ``D_f``."""
    names = []
    for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
        if all(relation.y_to_hidden_positionwise.values()):
            continue
        for key in relation.trainable_vars:
            if not ctx.keeps_instantaneous(index, key):
                names.append(".".join(map(str, (*relation.weight_path, key))))
    return names


class RFLO(ETraceAlgorithm):
    r"""Random-feedback local online learning (Murray 2019): leak-only traces, a fixed random feedback.

    For every weight :math:`W` driving a hidden state through an ETP op, the trace is D-RTRL's

    .. math::

        \epsilon^t = D^t \odot \epsilon^{t-1} + \mathrm{drtrl\_seed}(x^t, D^t_f),

    which on a leaky RNN :math:`h^t = (1-a) h^{t-1} + a\,\phi(W_{rec} h^{t-1} + W_{in} x^t)` is Murray's
    :math:`e^t_{ij} = (1-a) e^{t-1}_{ij} + a\,\phi'(u^t_i)\, r^t_j` (:math:`D^t = 1-a` with the op's
    output held fixed). The gradient estimate of step :math:`t` is

    .. math::

        \widehat{\frac{\partial L^t}{\partial W_{ij}}} = (B\,\varepsilon^t)_i\, e^t_{ij},
        \qquad \varepsilon^t = \frac{\partial L^t}{\partial y^t},

    with :math:`B` a fixed random matrix (hidden :math:`\times` output, entries
    :math:`\mathcal N(0, s^2)`, :math:`s = 1/\sqrt{O}` unless ``feedback_scale``) in place of the
    readout's transpose; the readout and every parameter without a trace learn by their
    instantaneous gradient (the delta rule for a linear readout). With ``feedback='symmetric'``
    :math:`B\varepsilon^t` is the true :math:`\partial L^t/\partial h^t` and RFLO equals
    :class:`D_RTRL` (whose diagonal :math:`D^t` on such a model is the leak too). Layout of the
    feedback (several outputs, several hidden states, batched or not): :mod:`etp_algorithms._rflo`.

    With random feedback this is not the gradient, not even D-RTRL's approximation of it: it is an
    approximation that learns when the readout comes to align with :math:`B` (feedback alignment).
    Memory: D-RTRL's :math:`O(B\cdot\theta)` traces per relation, plus the constant matrices
    (:math:`N \cdot O` per hidden state). Compute per step: D-RTRL's trace update and contraction
    plus one ``(B, O) x (O, N)`` product per hidden state.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised; it returns the readout (the error's route starts at its outputs).
    feedback : {'random', 'symmetric'}
        ``'random'``: a fixed random feedback matrix; ``'symmetric'``: the true :math:`\partial L/\partial h`.
    feedback_key : int or jax.random key
        The key the feedback matrices are drawn from (once).
    feedback_scale : float, optional
        The standard deviation of their entries (default :math:`1/\sqrt{O}`, :math:`O` the error's size per sample).
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'`` only with ``feedback='symmetric'`` (a window's exact reverse mode sends the true signal).
    random_feedback_key : int or jax.random key, optional
        braintrace's name for ``feedback_key``; when given, it is the key used.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).

    Raises
    ------
    ValueError
        An unknown ``feedback``, a non-positive ``feedback_scale``.
    TypeError
        A ``feedback_key`` that is neither an int nor a concrete JAX key.
    etp_compiler.NotSupportedError
        ``vjp_method='multi-step'`` with ``feedback='random'``.
    etp_compiler.CompilationError
        At compile, when the outputs and hidden states do not fit a feedback matrix (the shapes named).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import RFLO
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn, self.out = etp_nn.VanillaRNNCell(3, 5), etp_nn.Linear(5, 2)
    ...     def update(self, x):
    ...         return self.out(self.rnn(x))
    >>> net = Net()
    >>> _ = brainstate.nn.init_all_states(net, batch_size=4)
    >>> learner = RFLO(net, feedback_key=1)
    >>> _ = learner.compile_graph(jnp.zeros((4, 3)))
    >>> {p: b.shape for p, b in learner.feedback_matrices.items()}  # (hidden, output) per sample
    {('rnn', 'h'): (5, 2)}
    >>> loss = lambda x: jnp.sum(learner(x) ** 2)
    >>> grads = brainstate.transform.grad(loss, net.states(brainstate.ParamState))(jnp.ones((4, 3)))
    """

    def __init__(
        self,
        model: Any,
        feedback: str = "random",
        feedback_key: Any = 0,
        feedback_scale: Any = None,
        name: str | None = None,
        vjp_method: str = "single-step",
        random_feedback_key: Any = None,
        *,
        control_flow: ControlFlowPolicy | None = None,
    ) -> None:
        if random_feedback_key is not None:  # braintrace's keyword for the feedback matrices' key
            feedback_key = random_feedback_key
        mode = _check_feedback(feedback)
        if mode == "random" and vjp_method == "multi-step":
            raise NotSupportedError(
                "RFLO: vjp_method='multi-step' needs feedback='symmetric'; with random feedback a window's exact "
                "reverse mode would send the true signal. Use vjp_method='single-step'."
            )
        rule, matrices = _build(mode, feedback_key, feedback_scale)
        super().__init__(model, rule, name=name, vjp_method=vjp_method, control_flow=control_flow)
        self.feedback = mode
        self._matrices = matrices

    def compile_graph(self, *args: Any) -> ETraceGraph:
        """Compile (see :meth:`ETraceAlgorithm.compile_graph`); checks the feedback layout and warns about
        weights whose true instantaneous term can only be removed approximately."""
        graph = super().compile_graph(*args)
        if self.feedback == "random":
            names = _approximate_instantaneous(self.context)
            if names:
                warnings.warn(
                    f"RFLO: the step's VJP differentiates the weights {names}, whose op's output reaches the hidden "
                    "states not position-wise, so it holds their true step-t term; RFLO removes it with D-RTRL's "
                    "diagonal D_f, which is exact only position-wise: their step-t term keeps part of the true signal.",
                    UserWarning,
                    stacklevel=2,
                )
        return graph

    @property
    def feedback_matrices(self) -> dict[StatePath, jax.Array]:
        """``hidden path -> B`` of shape ``(units, O)`` (per sample when batched); ``{}`` with ``'symmetric'``."""
        if self._matrices is None:
            return {}
        _, drawn = self._matrices(self.graph)
        return {p: jnp.asarray(b) for p, b in drawn.items()}
