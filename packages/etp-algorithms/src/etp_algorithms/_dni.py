r"""DNI: decoupled neural interfaces with synthetic gradients over windows of steps (Jaderberg et al. 2017).

A recurrent model driven over windows of :math:`K` steps (inputs wrapped in
:class:`MultiStepData`) learns, in window :math:`w` from the start state
:math:`h_{s}` to the end state :math:`h_{e}` (:math:`e = s + K`), by exact reverse mode
inside the window and a *synthetic gradient* for what the future would send back:

.. math::

    \widehat{\frac{\partial L}{\partial \theta}}
      = \frac{\partial}{\partial \theta}\Big[ L_w(\theta)
        + \big\langle \mathrm{sg}\,\hat g(h_e),\, h_e(\theta) \big\rangle \Big],
    \qquad \hat g(h_e) \approx \frac{\partial L_{>e}}{\partial h_e},

with :math:`L_w` the loss of the window's outputs, :math:`\mathrm{sg}` a stop-gradient and
:math:`\hat g` a :class:`SyntheticGradient` of the final hidden state (per hidden group). Nothing
flows back past the window's start (truncated BPTT), so memory is the window's, independent of the
sequence length, and the learner keeps no eligibility traces.

The synthesizer learns online by bootstrapping (:func:`train_synthetic_gradient`): its prediction at a
window's start is regressed on the window's true in-window gradient at the start plus the synthetic
gradient of the window's end carried back,

.. math::

    \delta_s = \frac{\partial}{\partial h_s}\Big[ L_w + \big\langle \mathrm{sg}\,\hat g(h_e),\, h_e \big\rangle \Big],
    \qquad \ell_{\mathrm{SG}} = \tfrac12 \big\lVert \hat g(h_s) - \mathrm{sg}\,\delta_s \big\rVert^2 .

:math:`\delta_s` is :math:`\partial L_{\ge s}/\partial h_s` with the future beyond :math:`e` replaced by the
prediction: the fixed point of the regression is the true expected future gradient (a TD(:math:`K`)
target).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import ControlFlowPolicy, ETraceGraph, ModuleInfo, NotSupportedError, StatePath, run_step

from ._compat import inside_staging
from ._executor import KeyedValues, StepValues
from ._learner import ETraceAlgorithm
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._synthetic_gradient import SyntheticGradient

__all__ = ["DNI", "train_synthetic_gradient", "truncated"]

#: The compiler's warnings about eligibility traces (irrelevant to DNI, which keeps none).
_TRACE_NOTE = re.compile(r"ETP primitive|eligibility trace")

#: ``synthesize(param values, hidden path -> value) -> hidden path -> synthetic dL/dh``.
Synthesize = Callable[[Any, Mapping[StatePath, Any]], dict[StatePath, jax.Array]]


def _no_traces(ctx: RuleContext) -> dict[str, Any]:
    return {}


def _keep(ctx: RuleContext, traces: Any, values: StepValues) -> tuple[Any, Any]:
    return traces, None


def _no_history(ctx: RuleContext, traces: Any, values: StepValues, dL_dh: HiddenCotangents) -> RelationGradients:
    return {}


def truncated() -> LearningRule:
    """The rule of truncated BPTT: no traces, no history (``hidden_cotangents='previous'``: the VJP holds every
    direct term), and nothing contracted at a window's start. :class:`DNI` adds the synthetic gradient."""
    return LearningRule(
        name="DNI",
        init_traces=_no_traces,
        update_traces=_keep,
        trace_gradients=_no_history,
        window_start_gradients=_no_history,
        hidden_cotangents="previous",
    )


def _window_forward(minfo: ModuleInfo, steps: int) -> Callable[..., tuple[list[Any], list[Any]]]:
    """``(weights, others, arg leaves per step) -> (outputs per step, others after the window)``: the plain steps."""
    other_paths = minfo.other_state_paths

    def forward(weight_vals: Any, other_vals: Any, arg_leaves: Any) -> tuple[list[Any], list[Any]]:
        outputs = []
        others = list(other_vals)
        for t in range(steps):
            outs, states = minfo.read_outputs(run_step(minfo, minfo.flatten_inputs(weight_vals, others, arg_leaves[t])))
            others = [states[p] if p in states else v for p, v in zip(other_paths, others, strict=True)]
            outputs.append(outs)
        return outputs, others

    return forward


def _written(minfo: ModuleInfo, others: Sequence[Any]) -> KeyedValues:
    """The written states' leaves (``state_outvars`` paths) among ``others`` (``other_state_paths`` order)."""
    return KeyedValues.of(
        {p: v for p, v in zip(minfo.other_state_paths, others, strict=True) if p in minfo.state_outvars}
    )


def synthesizer_function(graph: ETraceGraph, synthesizer: SyntheticGradient) -> Synthesize:
    """``synthesize(params, hidden path -> value)``: the synthesizer on the groups' stacked signals, split per state."""
    groups = list(graph.hidden_groups)

    def synthesize(params: Any, hidden: Mapping[StatePath, Any]) -> dict[StatePath, jax.Array]:
        signals = {g.index: jnp.stack([hidden[p] for p in g.hidden_paths], axis=-1) for g in groups}
        predicted = synthesizer.apply(params, signals)
        return {
            p: predicted[g.index][..., s].astype(jnp.result_type(hidden[p]))
            for g in groups
            for s, p in enumerate(g.hidden_paths)
        }

    return synthesize


def build_dni_window(graph: ETraceGraph, steps: int, synthesize: Synthesize) -> Any:
    """A ``custom_vjp`` window ``(weights, others, arg leaves per step, synthesizer params) -> (outputs, new states)``.

    Backward: exact reverse mode over the window with the synthetic gradient of the final hidden states added
    to their cotangents; zero for the start states (truncation) and the synthesizer's parameters.
    """
    minfo = graph.module_info
    forward = _window_forward(minfo, steps)
    hidden_paths = list(minfo.hidden_path_to_outvar)

    def primal(weight_vals: Any, other_vals: Any, arg_leaves: Any) -> Any:
        outputs, others = forward(weight_vals, other_vals, arg_leaves)
        return outputs, _written(minfo, others)

    @jax.custom_vjp
    def window(weight_vals: Any, other_vals: Any, arg_leaves: Any, params: Any) -> Any:
        return primal(weight_vals, other_vals, arg_leaves)

    def window_fwd(weight_vals: Any, other_vals: Any, arg_leaves: Any, params: Any) -> Any:
        return primal(weight_vals, other_vals, arg_leaves), (weight_vals, other_vals, arg_leaves, params)

    def window_bwd(res: Any, cotangents: Any) -> Any:
        weight_vals, other_vals, arg_leaves, params = res
        ct_outputs, ct_states = cotangents
        (_, final), pullback = jax.vjp(primal, weight_vals, other_vals, arg_leaves)
        synthetic = synthesize(params, {p: final[p][0] for p in hidden_paths})
        ct_states = KeyedValues.of({p: [ct[0] + synthetic[p]] if p in synthetic else ct for p, ct in ct_states.items()})
        g_weights, _, g_args = pullback((ct_outputs, ct_states))
        zeros = jax.tree.map(jnp.zeros_like, (other_vals, params))
        return g_weights, zeros[0], g_args, zeros[1]

    window.defvjp(window_fwd, window_bwd)
    return window


class _Synth:
    """The attached synthesizer (a plain holder: not part of the module's state graph)."""

    def __init__(self, synthesizer: SyntheticGradient | None, default: bool) -> None:
        self.synthesizer = synthesizer
        self.default = default


def check_synthesizer(
    synthesizer: SyntheticGradient, shapes: Mapping[int, tuple[int, ...]], label: str = "DNI"
) -> None:
    """A ValueError unless ``synthesizer`` has exactly the learner's groups, each shape a suffix of the group's signal."""
    if set(synthesizer.group_shapes) != set(shapes):
        raise ValueError(
            f"{label}: the synthesizer's groups {sorted(synthesizer.group_shapes)} are not the model's hidden groups "
            f"{sorted(shapes)} (group index -> signal shape: {dict(shapes)}); build it as "
            "SyntheticGradient(learner.group_signal_shapes()) or with those shapes' trailing axes."
        )
    for group, want in shapes.items():
        shape = synthesizer.group_shapes[group]
        if len(shape) > len(want) or tuple(want[len(want) - len(shape) :]) != shape:
            raise ValueError(
                f"{label}: the synthesizer's shape {shape} of group {group} does not match the group's signal shape "
                f"{want} (it must be the signal shape or its trailing axes, e.g. {want[1:] or want} without a "
                "batch axis)."
            )


class DNI(ETraceAlgorithm):
    r"""Decoupled neural interfaces: exact reverse mode inside a window, a synthetic gradient at its end.

    For a window of steps (inputs in :class:`MultiStepData`) from :math:`h_s` to :math:`h_e`, the gradient a
    ``brainstate.transform.grad`` of the window's loss :math:`L_w` returns is

    .. math::

        \frac{\partial}{\partial \theta}\Big[ L_w(\theta) + \big\langle \mathrm{sg}\,\hat g(h_e),\, h_e(\theta)\big\rangle \Big]

    (BPTT over the window plus the synthetic bootstrap :math:`\hat g(h_e) \approx \partial L_{>e}/\partial h_e`);
    nothing flows back past :math:`h_s`. A plain call is a window of one step. No eligibility traces:
    memory is the window's activations, independent of the sequence length.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    synthesizer : SyntheticGradient, optional
        ``None``: at compile time a linear one, zero-initialised (so DNI starts as truncated BPTT), over
        each group's last state axis and state stack (``shape[-2:]`` of :meth:`group_signal_shapes`: leading
        axes, such as a batch, share the map).
    name : str, optional
    vjp_method : {'multi-step'}
        DNI learns over windows; ``'single-step'`` raises ``NotSupportedError``.
    fast_solve, trace_dtype, chunked_trace, snap_max_jacobian_elements
        Accepted for braintrace 0.2.8's signature; DNI keeps no traces, so they change nothing.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import MultiStepData
    >>> from etp_algorithms import DNI
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = DNI(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner.group_signal_shapes()
    {0: (4, 1)}
    >>> params = cell.states(brainstate.ParamState)
    >>> grads = brainstate.transform.grad(lambda xs: jnp.sum(learner(MultiStepData(xs)) ** 2), params)(jnp.ones((5, 3)))
    >>> grads[("W", "weight")]["weight"].shape
    (7, 4)
    """

    def __init__(
        self,
        model: brainstate.nn.Module,
        synthesizer: SyntheticGradient | None = None,
        name: str | None = None,
        vjp_method: str = "multi-step",
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        snap_max_jacobian_elements: int = 16777216,
    ) -> None:
        if vjp_method == "single-step":
            raise NotSupportedError(
                "DNI learns over windows of steps (exact reverse mode inside, a synthetic gradient at the end): "
                "vjp_method='single-step' is not supported; use vjp_method='multi-step' and MultiStepData inputs."
            )
        if vjp_method != "multi-step":
            raise ValueError(f"DNI: unknown vjp_method {vjp_method!r}; expected 'multi-step'.")
        if synthesizer is not None and not isinstance(synthesizer, SyntheticGradient):
            raise TypeError(f"DNI: synthesizer must be a SyntheticGradient or None, got {type(synthesizer).__name__}.")
        for flag, value in (("fast_solve", fast_solve), ("chunked_trace", chunked_trace)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"DNI: {flag} must be a bool, got {value!r}.")
        super().__init__(model, truncated(), name=name, vjp_method="multi-step", control_flow=control_flow)
        self.fast_solve, self.trace_dtype, self.chunked_trace = bool(fast_solve), trace_dtype, bool(chunked_trace)
        self.snap_max_jacobian_elements = snap_max_jacobian_elements
        self._synth = _Synth(synthesizer, default=synthesizer is None)

    # ---------------------------------------------------------------- the synthesizer
    @property
    def synthesizer(self) -> SyntheticGradient:
        """The attached synthesizer (the default one exists once the graph is compiled)."""
        if self._synth.synthesizer is None:
            raise RuntimeError(
                "DNI: no synthesizer yet: the default one is made by compile_graph(*example_args); "
                "or attach one with attach_synthesizer(SyntheticGradient(...))."
            )
        return self._synth.synthesizer

    def group_signal_shapes(self) -> dict[int, tuple[int, ...]]:
        """``group index -> (*varshape, S)``: each hidden group's states stacked on a trailing axis (the signal the
        synthesizer reads and predicts the gradient of)."""
        return {g.index: (*g.varshape, g.num_state) for g in self.graph.hidden_groups}

    def attach_synthesizer(self, synthesizer: SyntheticGradient) -> None:
        """Use ``synthesizer`` from the next call on; its groups and shapes are checked against the compiled graph
        (now, or at :meth:`compile_graph`)."""
        if not isinstance(synthesizer, SyntheticGradient):
            raise TypeError(f"DNI.attach_synthesizer expects a SyntheticGradient, got {type(synthesizer).__name__}.")
        if self.is_compiled:
            check_synthesizer(synthesizer, self.group_signal_shapes())
        self._synth = _Synth(synthesizer, default=False)

    def compile_graph(self, *args: Any) -> ETraceGraph:
        """Compile the model's step (see :meth:`ETraceAlgorithm.compile_graph`) and check or make the synthesizer.

        The compiler's notes on which weights get eligibility traces are dropped: DNI uses none (every weight
        learns by reverse mode over the window).
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = super().compile_graph(*args)
        for note in caught:
            if not (issubclass(note.category, UserWarning) and _TRACE_NOTE.search(str(note.message))):
                warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
        shapes = self.group_signal_shapes()
        current = self._synth.synthesizer
        if current is not None:
            try:
                check_synthesizer(current, shapes)
            except ValueError:
                if not self._synth.default:
                    raise
                current = None  # the model changed under a default synthesizer: make a new one
        if current is None:
            self._synth = _Synth(SyntheticGradient({g: s[-2:] for g, s in shapes.items()}), default=True)
        return graph

    def learns_nothing_online(self, graph: ETraceGraph) -> bool:
        """Never: every weight learns by reverse mode over the window (no eligibility trace is needed)."""
        return False

    # ---------------------------------------------------------------- the step
    def _built_fn(self, steps: int | None) -> Any:
        """A window of ``steps`` (``None``: one step) with the learner's call contract ``(w, others, args, traces)``;
        the synthesizer's parameters are read at call time and enter the window as an input."""
        synthesizer = self.synthesizer
        key = ("dni", id(self.graph), id(synthesizer), steps)
        built = self._built.functions
        if key not in built:
            window = build_dni_window(
                self.graph, 1 if steps is None else steps, synthesizer_function(self.graph, synthesizer)
            )

            def call(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
                leaves = [arg_leaves] if steps is None else arg_leaves
                outputs, new_states = window(weight_vals, other_vals, leaves, synthesizer.param_values())
                return (outputs[0] if steps is None else outputs), new_states, traces

            built[key] = call
        return built[key]


# ---------------------------------------------------------------- training the synthesizer
def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"train_synthetic_gradient: {what} must be a positive int, got {value!r}.")
    return int(value)


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], Any]:
    """``(model arguments, targets or None)`` from ``xs`` or ``(xs, targets)`` (``xs`` a tuple: several arguments)."""
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 2:
            raise ValueError(
                "train_synthetic_gradient: inputs must be the time-major model input xs, or a pair (xs, targets) "
                f"(xs a tuple for a model of several inputs); got a sequence of {len(inputs)} items."
            )
        xs, targets = inputs
    else:
        xs, targets = inputs, None
    return (tuple(xs) if isinstance(xs, (tuple, list)) else (xs,)), targets


def _sequence_length(tree: Any) -> int:
    lengths = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) else 0 for leaf in jax.tree.leaves(tree)}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            "train_synthetic_gradient: the inputs (and targets) must be arrays sharing a non-empty leading time "
            f"axis; got leading lengths {sorted(lengths)}."
        )
    return lengths.pop()


def _optimizer(optimizer: Any, lr: float) -> tuple[Callable[[Any], Any], Callable[[Any, Any, Any], tuple[Any, Any]]]:
    """``(init, step)``: plain gradient descent with ``lr``, or an optax-style ``GradientTransformation``."""
    if optimizer is None:
        rate = float(lr)

        def sgd(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
            return jax.tree.map(lambda p, g: p - rate * g, params, grads), state

        return (lambda params: None), sgd
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):

        def transform(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
            updates, state = optimizer.update(grads, state, params)
            return jax.tree.map(jnp.add, params, updates), state

        return optimizer.init, transform
    raise TypeError(
        "train_synthetic_gradient: optimizer must be None (gradient descent with lr) or an optax-style "
        f"GradientTransformation (init(params), update(grads, state, params)); got {type(optimizer).__name__}."
    )


def _squared_error(outputs: Any, targets: Any) -> Any:
    """The default loss of a window: half the summed squared error of the outputs against the targets."""
    pairs = zip(jax.tree.leaves(outputs), jax.tree.leaves(targets), strict=True)
    return 0.5 * sum(jnp.sum((o - y) ** 2) for o, y in pairs)


def _train_program(learner: DNI, steps: int, loss_fn: Callable[..., Any], has_targets: bool) -> Any:
    """The jitted window ``(synth params, weights, others, arg leaves, targets) -> (SG loss, SG grads, new states)``."""
    graph = learner.graph
    minfo = graph.module_info
    synthesize = synthesizer_function(graph, learner.synthesizer)
    forward = _window_forward(minfo, steps)
    hidden_paths = list(minfo.hidden_path_to_outvar)
    slots = [list(minfo.other_state_paths).index(p) for p in hidden_paths]

    def program(params: Any, weight_vals: Any, other_vals: Any, arg_leaves: Any, targets: Any) -> Any:
        def window(hidden: list[Any]) -> Any:
            others = list(other_vals)
            for slot, value in zip(slots, hidden, strict=True):
                others[slot] = [value]
            outputs, final = forward(weight_vals, others, arg_leaves)
            stacked = jax.tree.map(lambda *o: jnp.stack(o), *[minfo.unflatten_outputs(o) for o in outputs])
            loss = loss_fn(stacked, targets) if has_targets else loss_fn(stacked)
            if jnp.shape(loss) != ():
                raise ValueError(
                    f"train_synthetic_gradient: loss_fn must return a scalar, got shape {jnp.shape(loss)}."
                )
            return (loss, [final[slot][0] for slot in slots]), final

        start = [other_vals[slot][0] for slot in slots]
        (loss, end), pullback, final = jax.vjp(window, start, has_aux=True)
        synthetic = synthesize(params, dict(zip(hidden_paths, end, strict=True)))
        (delta,) = pullback((jnp.ones_like(loss), [synthetic[p] for p in hidden_paths]))
        target = jax.lax.stop_gradient(dict(zip(hidden_paths, delta, strict=True)))

        def sg_loss(p: Any) -> Any:
            predicted = synthesize(p, dict(zip(hidden_paths, start, strict=True)))
            return 0.5 * sum(jnp.sum((predicted[h] - target[h]) ** 2) for h in hidden_paths)

        value, grads = jax.value_and_grad(sg_loss)(params)
        return value, grads, _written(minfo, final)

    return jax.jit(program)


def _at(tree: Any, t: int) -> Any:
    return jax.tree.map(lambda a: a[t], tree)


def _between(tree: Any, start: int, stop: int) -> Any:
    return jax.tree.map(lambda a: a[start:stop], tree)


def _arg_leaves(learner: DNI, args: tuple[Any, ...]) -> list[Any]:
    """One step's argument leaves, checked against the compiled inputs (as a call of the learner checks them)."""
    checked: Any = cast(Any, learner._check_args)(args)  # the leaves (units converted) where the core returns them
    return list(jax.tree.leaves(args)) if checked is None else list(checked)


def _check_hidden_shapes(learner: DNI) -> None:
    minfo = learner.graph.module_info
    for path, var in minfo.hidden_path_to_invar.items():
        shape = tuple(jnp.shape(jax.tree.leaves(minfo.state_at(path).value)[0]))
        want = tuple(var.aval.shape)  # type: ignore[attr-defined]
        if shape != want:
            raise ValueError(
                f"train_synthetic_gradient: hidden state {'.'.join(map(str, path))} has shape {shape} after the reset, "
                f"but the learner was compiled for {want}; pass batch_size= (the batch size of the states), or "
                "reset=False."
            )


def train_synthetic_gradient(
    learner: DNI,
    inputs: Any,
    *,
    chunk_size: int = 1,
    loss_fn: Callable[..., Any] | None = None,
    optimizer: Any = None,
    lr: float = 0.01,
    epochs: int = 1,
    reset: bool = True,
    batch_size: int | None = None,
) -> list[float]:
    r"""Train a DNI learner's synthesizer online to the bootstrapped future gradient; the model is not changed.

    The sequence is cut into windows of ``chunk_size`` steps (the last one may be shorter). In each window, from
    :math:`h_s` to :math:`h_e`,

    .. math::

        \delta_s = \frac{\partial}{\partial h_s}\Big[ L_w + \big\langle \mathrm{sg}\,\hat g(h_e),\, h_e\big\rangle\Big],
        \qquad \ell_{\mathrm{SG}} = \tfrac12 \sum_g \big\lVert \hat g_g(h_s) - \mathrm{sg}\,\delta_{s,g} \big\rVert^2,

    (the true in-window gradient at the window's start plus the synthetic gradient of its end carried back) and
    the synthesizer's parameters take one optimizer step on :math:`\ell_{\mathrm{SG}}`. The model's states advance
    window by window; its parameters stay.

    Parameters
    ----------
    learner : DNI
    inputs : array or (xs, targets)
        Time-major (leading axis :math:`T`): the model's input ``xs`` (a tuple of arrays for a model of several
        inputs), or a pair ``(xs, targets)`` sliced in lockstep.
    chunk_size : int
        Steps per window.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)`` (``loss_fn(outputs)`` without targets) of a window's stacked outputs
        (leading axis: the window's steps) -> scalar :math:`L_w`. Default with targets:
        :math:`\tfrac12 \sum (\text{outputs} - \text{targets})^2`.
    optimizer : optax-style GradientTransformation, optional
        ``init(params)``, ``update(grads, state, params) -> (updates, state)``; ``None``: gradient descent with ``lr``.
    lr : float
        The learning rate of the default optimizer.
    epochs : int
        Passes over the sequence.
    reset : bool
        Reset the model's states (``brainstate.nn.reset_all_states(model, batch_size=batch_size)``) before each epoch.
    batch_size : int, optional
        The batch size of the states to reset to (``None``: unbatched states).

    Returns
    -------
    list of float
        :math:`\ell_{\mathrm{SG}}` of every window, in order (all epochs).

    Raises
    ------
    TypeError
        ``learner`` not a DNI; an optimizer of another kind.
    RuntimeError
        Called inside ``jit`` (it runs eagerly, window by window).
    ValueError
        Bad ``chunk_size``/``epochs``, inputs without a common time axis, no ``loss_fn`` and no targets, a
        non-scalar loss, states reset to another shape than compiled.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import DNI, train_synthetic_gradient
    >>> cell = etp_nn.VanillaRNNCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = DNI(cell)
    >>> _ = learner.compile_graph(jnp.zeros(2))
    >>> losses = train_synthetic_gradient(learner, (jnp.ones((6, 2)), jnp.zeros((6, 3))), chunk_size=2)
    >>> len(losses)
    3
    """
    if not isinstance(learner, DNI):
        raise TypeError(f"train_synthetic_gradient expects a DNI learner, got {type(learner).__name__}.")
    if inside_staging():
        raise RuntimeError(
            "train_synthetic_gradient runs eagerly (each window one compiled program, the losses returned as floats); "
            "call it outside jit."
        )
    chunk = _positive_int(chunk_size, "chunk_size")
    epochs = _positive_int(epochs, "epochs")
    xs, targets = _split_inputs(inputs)
    length = _sequence_length((xs, targets))
    has_targets = targets is not None
    if loss_fn is None and not has_targets:
        raise ValueError(
            "train_synthetic_gradient: without targets, pass loss_fn(outputs) -> scalar (the loss of a window's "
            "outputs); or pass inputs=(xs, targets) for the default squared error."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"train_synthetic_gradient: loss_fn must be callable, got {type(loss_fn).__name__}.")
    fn = _squared_error if loss_fn is None else loss_fn
    init, step = _optimizer(optimizer, lr)
    opt_state: Any = None
    losses: list[float] = []
    for _ in range(epochs):
        if reset:
            brainstate.nn.reset_all_states(learner.model, batch_size=batch_size)
            if learner.is_compiled:
                learner.reset_state()
                _check_hidden_shapes(learner)
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            per_step = [tuple(_at(x, t) for x in xs) for t in range(start, stop)]
            if not learner.is_compiled:
                learner.compile_graph(*per_step[0])
            arg_leaves = [_arg_leaves(learner, a) for a in per_step]
            synthesizer = learner.synthesizer
            params = synthesizer.param_values()
            if opt_state is None:
                opt_state = init(params)
            key = ("dni-train", id(learner.graph), id(synthesizer), stop - start, fn, has_targets)
            built = learner._built.functions
            if key not in built:
                built[key] = _train_program(learner, stop - start, fn, has_targets)
            weight_vals, other_vals = learner.graph.module_info.current_state_leaves()
            window_targets = None if targets is None else _between(targets, start, stop)
            value, grads, new_states = built[key](params, weight_vals, other_vals, arg_leaves, window_targets)
            new_params, opt_state = step(params, grads, opt_state)
            for (name,), state in synthesizer.states_dict().items():
                state.value = new_params[name]
            learner.graph.module_info.write_states(new_states)
            losses.append(float(value))
    return losses
