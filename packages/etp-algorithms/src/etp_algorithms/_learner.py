r"""``ETraceAlgorithm``: the brainstate module an online learner is.

A learner wraps a model and a :class:`~etp_algorithms.extend.LearningRule`.
:meth:`~ETraceAlgorithm.compile_graph` compiles the model's step
(:mod:`etp_compiler`) and creates the eligibility traces; each call
:meth:`~ETraceAlgorithm.update` runs one step of the model, updates the
traces and returns the model's output. The output comes from the
``custom_vjp`` step built by :func:`etp_algorithms.extend.build_step`, whose
backward pass returns, for a loss :math:`L^t` of that output,

* for every weight with a relation: the rule's trace gradient plus the
  instantaneous term of step :math:`t`;
* for every other parameter (plain JAX ops, readouts, weights excluded by the
  tail rule): the instantaneous gradient :math:`\partial L^t/\partial\theta`
  with :math:`h^{t-1}` held fixed (exact for a readout).

So an ordinary ``brainstate.transform.grad(loss, params)`` gives the online
gradient of the step, in memory independent of the sequence length. The
module itself only compiles, holds the states, commits a call's results and
resets; the rule is a value.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp

from etp_compiler import CompilationReport, ControlFlowPolicy, ETraceGraph, NotSupportedError, StatePath

from ._driver import SequenceDriverMixin
from ._executor import ETraceGraphExecutor
from ._hidden_only import hidden_only_keys
from ._inputs import MultiStepData, SingleStepData
from ._rule import LearningRule, RuleContext
from ._step import build_step, build_window

#: How a weight opts in to an eligibility trace (in the messages about models without one).
OPT_IN = (
    "etp_primitives.matmul, conv, element_wise, sparse_matmul or lora_matmul (braintrace.matmul, ...), "
    "or the etp_nn layers built on them (Linear, GRUCell, LIF + a Linear input, ...)"
)


class NoEligibilityTraceWarning(UserWarning):
    """A learner was built on a model none of whose weights gets an eligibility trace."""


__all__ = ["ETraceAlgorithm", "EligibilityTrace"]

_VJP_METHODS = ("single-step", "multi-step")


class EligibilityTrace(brainstate.ShortTermState):
    """The state holding a learner's eligibility traces (filter states by this type to find them)."""


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(map(str, path))


class _BuiltSteps:
    """The built step functions of a learner (a plain holder: not part of the module's state graph)."""

    def __init__(self) -> None:
        self.functions: dict[Any, Any] = {}


class ETraceAlgorithm(SequenceDriverMixin, brainstate.nn.Module):
    """An online learner: a model, a learning rule, and the eligibility traces as a state.

    Parameters
    ----------
    model : brainstate.nn.Module
        The model, with states initialised.
    rule : LearningRule
        The learning rule (e.g. :func:`etp_algorithms.extend.d_rtrl`); :class:`D_RTRL` and
        :class:`ES_D_RTRL` are this class with their rule.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: the learner also takes windows of steps, inputs wrapped in
        :class:`MultiStepData` (a leading time axis); exact reverse mode inside the window,
        traces across windows. A plain call is one step on either kind of learner (as in
        braintrace 0.2.8); :class:`SingleStepData` says so explicitly.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` inside the model's step
        (default ``ControlFlowPolicy()``: if-convert, unroll up to 16 sub-steps, refuse data-dependent loops).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import ETraceAlgorithm
    >>> from etp_algorithms.extend import d_rtrl
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = ETraceAlgorithm(cell, d_rtrl())
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner(jnp.ones(3)).shape
    (4,)
    """

    def __init__(
        self,
        model: brainstate.nn.Module,
        rule: LearningRule,
        name: str | None = None,
        vjp_method: str = "single-step",
        *,
        control_flow: ControlFlowPolicy | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        label = type(self).__name__
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(f"{label} expects a brainstate.nn.Module, got {type(model).__name__}.")
        if not isinstance(rule, LearningRule):
            raise TypeError(f"{label} expects a LearningRule as its rule, got {type(rule).__name__}.")
        if vjp_method not in _VJP_METHODS:
            raise ValueError(f"{label}: unknown vjp_method {vjp_method!r}; expected one of {list(_VJP_METHODS)}.")
        if vjp_method == "multi-step" and not rule.supports_windows:
            raise NotSupportedError(
                f"{label}: the rule {rule.name!r} has no window_start_gradients, so vjp_method='multi-step' "
                "is not supported; use vjp_method='single-step'."
            )
        self.model = model
        self.rule = rule
        self.vjp_method = vjp_method
        self._executor = ETraceGraphExecutor(model, control_flow=control_flow)
        self._arg_shapes: list[tuple[tuple[int, ...], Any]] | None = None
        self._recompile_on_next_call = False
        self._hidden_only: frozenset[tuple[int, str]] = frozenset()
        self._built = _BuiltSteps()
        self.etrace = EligibilityTrace({})

    # ---------------------------------------------------------------- compiled structure
    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile_graph` has run (and no batch-size reset is pending)."""
        return self._executor.is_compiled

    @property
    def graph(self) -> ETraceGraph:
        """The compiled :class:`etp_compiler.ETraceGraph` (``RuntimeError`` before :meth:`compile_graph`)."""
        if not self._executor.is_compiled:
            raise RuntimeError(
                f"{type(self).__name__}: call compile_graph(*example_args) before using the learner "
                "(it compiles the model's step and creates the eligibility traces)."
            )
        return self._executor.graph

    @property
    def executor(self) -> ETraceGraphExecutor:
        """The graph executor (one step with the trace quantities)."""
        return self._executor

    @property
    def context(self) -> RuleContext:
        """What the rule's functions see statically: the graph and the VJP's shortcuts."""
        return RuleContext(self.graph, self._hidden_only)

    @property
    def param_states(self) -> dict[StatePath, brainstate.State[Any]]:
        """``path -> ParamState`` of every parameter the model's step reads."""
        return dict(self.graph.module_info.weight_states)

    @property
    def hidden_states(self) -> dict[StatePath, brainstate.State[Any]]:
        """``path -> HiddenState`` of the model's hidden states."""
        return dict(self.graph.module_info.hidden_states)

    @property
    def other_states(self) -> dict[StatePath, brainstate.State[Any]]:
        """``path -> State`` of the remaining states (neither parameters nor hidden)."""
        return dict(self.graph.module_info.other_states)

    @property
    def path_to_states(self) -> dict[StatePath, brainstate.State[Any]]:
        """``path -> State`` of every state the model's step reads or writes (parameters included)."""
        minfo = self.graph.module_info
        return {minfo.state_paths[id(s)]: s for s in minfo.compiled_model_states}

    @property
    def state_id_to_path(self) -> dict[int, StatePath]:
        """``id(state) -> path`` of the states of :attr:`path_to_states`."""
        return dict(self.graph.module_info.state_paths)

    @property
    def report(self) -> CompilationReport:
        """The :class:`etp_compiler.CompilationReport` of the compiled graph."""
        return CompilationReport(self.graph)

    def show_graph(self, verbose: bool = True, return_msg: bool = False) -> str | None:
        """The compiled graph in words: hidden groups, weights with and without traces, trace memory.

        ``verbose``: print it (with the compiler's warnings); ``return_msg``: return the text.
        """
        text = f"{self.report.to_str(2 if verbose else 1)}\nEligibility-trace memory: {self.trace_bytes()} bytes"
        if verbose:
            print(text)
        return text if return_msg else None

    def compile_graph(self, *args: Any) -> ETraceGraph:
        """Compile the model's step for inputs shaped like ``args`` and initialise the traces."""
        graph = self._executor.compile_graph(*args)
        if self.learns_nothing_online(graph):
            warnings.warn(
                f"{type(self).__name__}: no weight of {type(self.model).__name__} gets an eligibility trace (no ETP "
                f"primitive drives one of its hidden states), so every weight learns from its instantaneous gradient "
                f"alone. A weight opts in through {OPT_IN}.",
                NoEligibilityTraceWarning,
                stacklevel=2,
            )
        # a rule given dL/dh^{t-1} returns only history terms: the VJP must hold every direct term
        self._hidden_only = hidden_only_keys(graph) if self.rule.hidden_cotangents == "new" else frozenset()
        self._built = _BuiltSteps()
        self._recompile_on_next_call = False
        self._arg_shapes = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in jax.tree.leaves(args)]
        self.init_etrace_state()
        return graph

    def learns_nothing_online(self, graph: ETraceGraph) -> bool:
        """Whether this learner's rule carries no history on ``graph``: a relation rule on a graph without relations."""
        return self.rule.gradient_targets == "relations" and not graph.hidden_param_op_relations

    def init_etrace_state(self) -> None:
        """(Re)create zero traces for the compiled graph."""
        self.etrace.value = self.rule.init_traces(self.context)

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Reset the traces; with ``batch_size``, also re-initialise the model's states for that batch size
        (the step is recompiled at the next call)."""
        if batch_size is not None:
            brainstate.nn.init_all_states(self.model, batch_size=batch_size)
            self._executor._graph = None
            self._arg_shapes = None
            self._built = _BuiltSteps()
            self.etrace.value = {}
            self._recompile_on_next_call = True
            return
        if self.is_compiled:
            self.init_etrace_state()

    def trace_bytes(self) -> int:
        """Bytes held by the eligibility traces (independent of the sequence length)."""
        return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self.etrace.value)))

    def get_etrace_of(self, weight: brainstate.State[Any] | Sequence[Hashable]) -> Any:
        """The traces of the relation(s) whose weight is ``weight`` (a ParamState or its path).

        One relation: its traces (the rule's ``trace_of``); several: ``relation index -> traces``.
        """
        path = self._path_of(weight)
        ctx = self.context
        found = {
            index: self.rule.trace_of(ctx, self.etrace.value, index)
            for index, relation in enumerate(self.graph.hidden_param_op_relations)
            if relation.weight_path == path
        }
        if not found:
            raise ValueError(
                f"{type(self).__name__}: weight {_text(path)} has no eligibility trace; weights with traces: "
                + ", ".join(sorted({_text(r.weight_path) for r in self.graph.hidden_param_op_relations}))
                + "."
            )
        return found[next(iter(found))] if len(found) == 1 else found

    def _path_of(self, weight: brainstate.State[Any] | Sequence[Hashable]) -> StatePath:
        if isinstance(weight, brainstate.State):
            for path, state in self.graph.module_info.weight_states.items():
                if state is weight:
                    return path
            raise ValueError(f"{type(self).__name__}: the given state is not a ParamState used by the model's step.")
        return tuple(weight)

    # ---------------------------------------------------------------- the step
    def _built_fn(self, steps: int | None) -> Any:
        """The step (``steps=None``) or a window of ``steps``, built once per graph and VJP shortcuts."""
        key = (id(self.graph), self._hidden_only, steps)
        built = self._built.functions
        if key not in built:
            ctx = self.context
            built[key] = build_step(ctx, self.rule) if steps is None else build_window(ctx, self.rule, steps)
        return built[key]

    def _check_args(self, args: tuple[Any, ...]) -> None:
        assert self._arg_shapes is not None
        given = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in jax.tree.leaves(args)]
        if [s for s, _ in given] != [s for s, _ in self._arg_shapes]:
            window = all(
                len(g) == len(c) + 1 and g[1:] == c for (g, _), (c, _) in zip(given, self._arg_shapes, strict=False)
            )
            hint = (
                " A window of steps (a leading time axis) is passed as MultiStepData(x): a plain call is one step."
                if window and len(given) == len(self._arg_shapes)
                else ""
            )
            raise ValueError(
                f"{type(self).__name__}: input shapes {[s for s, _ in given]} differ from the compiled "
                f"{[s for s, _ in self._arg_shapes]}; to change the batch size call reset_state(batch_size=...) "
                f"first, or compile_graph(...) with the new inputs.{hint}"
            )
        for index, ((_, got), (_, want)) in enumerate(zip(given, self._arg_shapes, strict=True)):
            # a float of another precision runs the step in mixed precision, or fails deep in a rule
            if got != want and jnp.issubdtype(got, jnp.floating) and jnp.issubdtype(want, jnp.floating):
                raise TypeError(
                    f"{type(self).__name__}: input {index} is {jnp.dtype(got).name}, but the learner was compiled "
                    f"for {jnp.dtype(want).name} inputs; cast it (x.astype(jnp.{jnp.dtype(want).name})) or "
                    "compile_graph(...) with inputs of the new dtype."
                )

    def _step_modulator(self, modulator: Any) -> list[Any] | None:
        """The modulator input of this call's step (one array per hidden state), or ``None`` for a plain step.

        Only a learner whose rule reads a modulator (:class:`etp_algorithms.ThreeFactor`) takes one.
        """
        if modulator is not None:
            raise TypeError(
                f"{type(self).__name__} takes no modulator= (the third factor of a three-factor rule); "
                "only a learner whose rule reads one does (ThreeFactor)."
            )
        return None

    def update(self, *args: Any, modulator: Any = None) -> Any:
        """Run one step (or a window, with :class:`MultiStepData` inputs); return the model's output.

        The model's states and the traces are updated only after the whole
        call succeeded. ``modulator``: only for learners that take one (:class:`ThreeFactor`).
        """
        if self._is_window(args):
            if modulator is not None:
                raise NotSupportedError(
                    f"{type(self).__name__}: a modulator applies to one step; a window (MultiStepData) runs exact "
                    "reverse mode inside and takes none."
                )
            return self._update_window(args)
        if not self._executor.is_compiled:
            if self._recompile_on_next_call:
                self.compile_graph(*args)
            else:
                _ = self.graph  # raises the clear error
        self._check_args(args)
        step_modulator = self._step_modulator(modulator)
        weight_vals, other_vals = self._current_values()
        extra = () if step_modulator is None else (step_modulator,)
        outputs, new_states, new_traces = self._built_fn(None)(
            weight_vals, other_vals, list(jax.tree.leaves(args)), self.etrace.value, *extra
        )
        self._commit(new_states, new_traces)
        return self.graph.module_info.unflatten_outputs(outputs)

    def _current_values(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Leaves of the ParamStates (``weight_states`` order) and of every other state (``other_state_paths``)."""
        return self.graph.module_info.current_state_leaves()

    def _commit(self, new_states: Mapping[StatePath, list[Any]], new_traces: Any) -> None:
        """Write a successful call's results back (nothing is written before everything succeeded)."""
        self.graph.module_info.write_states(new_states)
        self.etrace.value = new_traces

    def _is_window(self, args: tuple[Any, ...]) -> bool:
        # as braintrace 0.2.8: a window only when asked for with MultiStepData; a plain call is one step,
        # also on a multi-step learner (a plain array's leading axis is never taken for time)
        return any(isinstance(a, MultiStepData) for a in args)

    def _update_window(self, args: tuple[Any, ...]) -> Any:
        if not self.rule.supports_windows:
            raise NotSupportedError(
                f"{type(self).__name__}: the rule {self.rule.name!r} cannot run multi-step windows "
                "(MultiStepData inputs); pass one step at a time."
            )
        wrapped = [a if isinstance(a, (MultiStepData, SingleStepData)) else MultiStepData(a) for a in args]
        lengths = {
            int(jnp.shape(leaf)[0]) for a in wrapped if isinstance(a, MultiStepData) for leaf in jax.tree.leaves(a.data)
        }
        if len(lengths) != 1:
            raise ValueError(
                f"{type(self).__name__}: the MultiStepData inputs of one call must share their leading (time) axis; "
                f"got lengths {sorted(lengths)}."
            )
        (steps,) = lengths
        per_step = [
            tuple(
                jax.tree.map(lambda v, t=t: v[t], a.data) if isinstance(a, MultiStepData) else a.data for a in wrapped
            )
            for t in range(steps)
        ]
        _ = self.graph
        self._check_args(per_step[0])
        weight_vals, other_vals = self._current_values()
        arg_leaves = [list(jax.tree.leaves(a)) for a in per_step]
        outputs, new_states, new_traces = self._built_fn(steps)(weight_vals, other_vals, arg_leaves, self.etrace.value)
        self._commit(new_states, new_traces)
        per_step_out = [self.graph.module_info.unflatten_outputs(o) for o in outputs]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step_out)
