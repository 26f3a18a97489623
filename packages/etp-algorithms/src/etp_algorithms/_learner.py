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

from etp_compiler import (
    CompilationError,
    CompilationReport,
    ControlFlowPolicy,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceGraph,
    NotSupportedError,
    StatePath,
)

from ._checks import (
    InputSignature,
    StateSignature,
    check_finite,
    check_layout,
    model_states,
    refuse_inside_staging,
    tree_layout,
)
from ._compat import inside_staging, is_batched
from ._driver import SequenceDriverMixin
from ._executor import ETraceGraphExecutor
from ._hidden_only import hidden_only_keys
from ._inputs import MultiStepData, SingleStepData
from ._peer_keywords import PeerKeywords, with_trace_dtype
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
        #: ids of the hidden-state leaves the last call stored (a value not among them is "fresh")
        self.committed: frozenset[int] = frozenset()
        self.fresh = False


#: What :meth:`ETraceAlgorithm.compile_graph` sets besides the executor's graph and the traces.
_COMPILED_ATTRIBUTES = (
    "_hidden_only",
    "_built",
    "_recompile_on_next_call",
    "_inputs",
    "_arg_shapes",
    "_state_sig",
    "_trace_layout",
)


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
    check_finite : bool
        Debug mode: every step checks its new hidden states and traces for NaN / inf and raises
        :class:`~etp_algorithms._checks.NonFiniteError` naming the first bad one, before storing
        anything (also settable later: ``learner.check_finite = True``). Costs one reduction per state.
    peer_keywords : PeerKeywords, optional
        braintrace 0.2.8's engine keywords (``trace_dtype``, ``config``, ...) as a learner's constructor
        checked them (see :mod:`etp_algorithms._peer_keywords`): the config must describe this learner,
        the traces are stored in ``trace_dtype``, and each keyword is kept as an attribute.

    Notes
    -----
    Every call checks its inputs against the compiled ones (shapes, float dtypes, saiunit units:
    a Quantity of a compatible unit is converted to the compiled unit, a missing or extra unit
    raises) and the model's states: states replaced since compiling (``brainstate.nn.init_all_states``
    creates new objects) make the learner recompile for them, with zero traces; a state value of
    another shape or structure raises naming it. A copy (``copy.deepcopy``, ``brainstate.graph.clone``)
    recompiles for its own model at its first use and keeps the copied traces. See the
    "Pitfalls and checks" page.

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

    #: Whether the learner runs on a step with a lax.scan kept as a loop (its ops one relation per sub-step).
    #: Every built-in learner does. A rule that finds its ops' equations in the step by identity (rather
    #: than through StepValues, hidden_transition or ModuleInfo.held_eqns) opts out with False.
    takes_scan_substeps: bool = True

    def __init__(
        self,
        model: brainstate.nn.Module,
        rule: LearningRule,
        name: str | None = None,
        vjp_method: str = "single-step",
        *,
        control_flow: ControlFlowPolicy | None = None,
        check_finite: bool = False,
        peer_keywords: PeerKeywords | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        label = type(self).__name__
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(f"{label} expects a brainstate.nn.Module, got {type(model).__name__}.")
        if not isinstance(rule, LearningRule):
            raise TypeError(f"{label} expects a LearningRule as its rule, got {type(rule).__name__}.")
        if peer_keywords is not None:
            peer_keywords.check_config(type(self))
            rule = with_trace_dtype(rule, peer_keywords.trace_dtype)
            for attribute, value in peer_keywords.attributes().items():
                setattr(self, attribute, value)
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
        self._inputs: InputSignature | None = None
        self._state_sig: StateSignature | None = None
        self.check_finite = bool(check_finite)
        self._trace_layout: Any = None
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
        self._own_executor()
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

    def _emit_compiler_warnings(self, graph: ETraceGraph) -> None:
        """The compiler's warnings, each once, less those this learner's rule makes untrue.

        A rule with ``gradient_targets='weights'`` (RTRL, UORO) carries the history of every
        ParamState leaf, so a weight the compiler keeps out of its relations (one that reaches a hidden
        state only through another weight, a GRU's reset-gate weight) still gets its full online
        gradient: the compiler's "gets its instantaneous gradient" does not hold for it.
        """
        whole_history = self.rule.gradient_targets == "weights"
        seen: set[str] = set()
        for record in graph.diagnostics:
            if record.level is not DiagnosticLevel.WARNING or record.message in seen:
                continue
            if whole_history and record.kind is DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT:
                continue
            seen.add(record.message)
            warnings.warn(record.message, UserWarning, stacklevel=4)

    def compile_graph(self, *args: Any) -> ETraceGraph:
        """Compile the model's step for inputs shaped like ``args`` and initialise the traces.

        Refused inside ``jit``: compile between jitted steps.
        """
        refuse_inside_staging(type(self).__name__, "compile_graph(...)")
        # a failed compile (the compiler, a learner's check of the graph, the traces' creation) leaves the
        # learner as it was: its graph, its traces and what it knows of its inputs
        saved = {name: getattr(self, name, None) for name in _COMPILED_ATTRIBUTES}
        executor, graph_before, traces = self._executor, self._executor._graph, self.etrace.value
        try:
            return self._compile_graph(args)
        except BaseException:
            for name, value in saved.items():
                setattr(self, name, value)
            executor._graph = graph_before
            self._executor = executor
            self.etrace.value = traces
            raise

    def _compile_graph(self, args: tuple[Any, ...]) -> ETraceGraph:
        if self._executor.model is not self.model:  # a copy: compile its own model
            self._executor = ETraceGraphExecutor(self.model, control_flow=self._executor.control_flow)
        graph = self._executor.compile_graph(*args, emit=False)
        substeps = [r for r in graph.hidden_param_op_relations if r.substep is not None]
        if substeps and not self.takes_scan_substeps:
            first = substeps[0]
            raise CompilationError(
                f"{type(self).__name__} cannot learn {type(self.model).__name__}: the ETP op of weight "
                f"{'.'.join(map(str, first.weight_path))} sits inside a lax.scan of length {first.substep.length} "  # type: ignore[union-attr]
                "that the compiler keeps as a loop (above ControlFlowPolicy.scan_unroll_limit), and this learner "
                "reads the step's equations one op at a time (takes_scan_substeps=False), which a loop hides. Pass "
                "control_flow=ControlFlowPolicy(scan_descent='unroll') (or a scan_unroll_limit of at least the "
                "length) to unroll the loop, or use a built-in learner (every one takes a kept loop)."
            )
        self._emit_compiler_warnings(graph)
        if self.learns_nothing_online(graph):
            warnings.warn(
                f"{type(self).__name__}: no weight of {type(self.model).__name__} gets an eligibility trace (no ETP "
                f"primitive drives one of its hidden states), so every weight learns from its instantaneous gradient "
                f"alone. A weight opts in through {OPT_IN}.",
                NoEligibilityTraceWarning,
                stacklevel=3,
            )
        # a rule given dL/dh^{t-1} returns only history terms: the VJP must hold every direct term
        self._hidden_only = hidden_only_keys(graph) if self.rule.hidden_cotangents == "new" else frozenset()
        self._built = _BuiltSteps()
        self._recompile_on_next_call = False
        self._inputs = InputSignature.of(args, type(self).__name__)
        self._arg_shapes = self._inputs.shapes
        self._state_sig = StateSignature(type(self).__name__, self.path_to_states)
        self.init_etrace_state()
        return graph

    def _own_executor(self) -> None:
        """Recompile a copy of a learner (deepcopy / ``brainstate.graph.clone``) for its own model.

        A copy shares the original's compiled graph, whose states are the original model's; it gets
        its own graph here, keeping the copied traces.
        """
        if self._executor.model is self.model or self._inputs is None:
            return
        label = type(self).__name__
        if inside_staging():
            raise RuntimeError(
                f"{label}: this learner is a copy (copy.deepcopy / brainstate.graph.clone) still bound to the "
                "original model's states; call it once outside jit (or compile_graph(...)) so it compiles its own."
            )
        kept = self.etrace.value
        self.compile_graph(*self._inputs.example_args())
        if tree_layout(kept) == self._trace_layout:
            self.etrace.value = kept

    def _check_model_states(self, args: tuple[Any, ...]) -> None:
        """Follow re-initialised or replaced states (recompile) and check the state values' shapes."""
        sig = self._state_sig
        if sig is None:
            return
        replaced = sig.replaced(self.model)
        if replaced:
            if inside_staging():
                raise RuntimeError(
                    f"{type(self).__name__}: the model's states {', '.join(replaced)} were replaced since "
                    "compile_graph (brainstate.nn.init_all_states creates new state objects; so does replacing a "
                    "sub-module) inside a jitted function; call learner.compile_graph(*inputs) outside jit, or "
                    "reset values with brainstate.nn.reset_all_states(model) / learner.reset_state(), which keep them."
                )
            self.compile_graph(*args)
            sig = self._state_sig
            assert sig is not None
        sig.check_values()
        check_layout(
            type(self).__name__,
            "the eligibility traces (learner.etrace)",
            self.etrace.value,
            self._trace_layout,
            "traces restored from a learner of another batch size or model? Restore traces of this learner's "
            "compiled shapes, or call learner.reset_state() for zero traces.",
        )
        self._check_mapped(args)

    def _check_mapped(self, args: tuple[Any, ...]) -> None:
        """Under ``vmap`` with batched inputs, every state the step writes must be mapped too."""
        if not any(is_batched(leaf) for leaf in jax.tree.leaves(args)):
            return
        minfo = self.graph.module_info
        written = {p: minfo.state_at(p) for p in minfo.state_outvars}
        unmapped = [_text(p) for p, s in written.items() if not any(is_batched(v) for v in jax.tree.leaves(s.value))]
        if jax.tree.leaves(self.etrace.value) and not any(is_batched(v) for v in jax.tree.leaves(self.etrace.value)):
            unmapped.append("etrace (the learner's EligibilityTrace)")
        if unmapped:
            raise ValueError(
                f"{type(self).__name__} is called under vmap with batched inputs, but the states it writes "
                f"{', '.join(unmapped)} have no batch axis (vmap's in_states leave them out), so each sample would "
                "write into one shared value. Wrap the per-sample learner in etp_algorithms.ETraceVmap(learner), "
                "which maps every state but the parameters, or pass in_states=learner.states(lambda p, s: not "
                "isinstance(s, brainstate.ParamState)) (and the same out_states) to brainstate.transform.vmap."
            )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled (its compiled graph holds JAX programs and the model's state "
            "objects); save it with etp_algorithms.save_checkpoint(learner, path) and load it into a learner "
            "built the same way with etp_algorithms.restore_checkpoint(learner, path)."
        )

    def learns_nothing_online(self, graph: ETraceGraph) -> bool:
        """Whether this learner's rule carries no history on ``graph``: a relation rule on a graph without relations."""
        return self.rule.gradient_targets == "relations" and not graph.hidden_param_op_relations

    def init_etrace_state(self) -> None:
        """(Re)create zero traces for the compiled graph."""
        self.etrace.value = self.rule.init_traces(self.context)
        self._trace_layout = tree_layout(self.etrace.value)

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Reset the traces; with ``batch_size``, also re-initialise the model's states for that batch size
        (the step is recompiled at the next call)."""
        if batch_size is not None:
            refuse_inside_staging(type(self).__name__, "reset_state(batch_size=...)")
            compiled = self._inputs if self._executor.is_compiled else None
            hidden = {p: jnp.shape(s.value) for p, s in self.hidden_states.items()} if compiled else {}
            brainstate.nn.init_all_states(self.model, batch_size=batch_size)
            if compiled is not None and hidden:
                # recompile now for the new batch (a jitted step retraces with the same trace structure)
                path, old = next(iter(hidden.items()))
                now = model_states(self.model)
                new = jnp.shape(now[path].value) if path in now else old
                old_batch = old[0] if len(new) == len(old) and old else None
                try:
                    self.compile_graph(*compiled.example_args((old_batch, batch_size)))
                    return
                except Exception:  # inputs whose batch axis is not the leading one: compile at the next call
                    pass
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
        """The step (``steps=None``) or a window of ``steps``, built once per graph and VJP shortcuts.

        A step is built apart for hidden values that are not the ones this learner stored last
        (``self._built.fresh``, set by :meth:`update`; see :func:`build_step`).
        """
        fresh = self._built.fresh and steps is None
        key = (id(self.graph), self._hidden_only, steps, fresh)
        built = self._built.functions
        if key not in built:
            ctx = self.context
            built[key] = build_step(ctx, self.rule, fresh) if steps is None else build_window(ctx, self.rule, steps)
        return built[key]

    def _hidden_leaves(self) -> list[Any]:
        return [leaf for s in self.graph.module_info.hidden_states.values() for leaf in jax.tree.leaves(s.value)]

    def _check_args(self, args: tuple[Any, ...]) -> list[Any]:
        """The step's argument leaves: shapes, float dtypes and units checked (units converted)."""
        assert self._inputs is not None
        return self._inputs.leaves(args)

    def _check_finite(self, new_states: Mapping[StatePath, Any], new_traces: Any) -> None:
        if not self.check_finite:
            return
        named: dict[str, Any] = {f"state {_text(p)}": v for p, v in new_states.items()}
        for key, leaf in jax.tree_util.tree_flatten_with_path(new_traces)[0]:
            named[f"eligibility trace {jax.tree_util.keystr(key)}"] = leaf
        check_finite(type(self).__name__, named)

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
        self._own_executor()
        if not self._executor.is_compiled:
            if self._recompile_on_next_call:
                self.compile_graph(*args)
            else:
                _ = self.graph  # raises the clear error
        self._check_model_states(args)
        arg_leaves = self._check_args(args)
        step_modulator = self._step_modulator(modulator)
        weight_vals, other_vals = self._current_values()
        extra = () if step_modulator is None else (step_modulator,)
        self._built.fresh = any(id(leaf) not in self._built.committed for leaf in self._hidden_leaves())
        outputs, new_states, new_traces = self._built_fn(None)(
            weight_vals, other_vals, arg_leaves, self.etrace.value, *extra
        )
        self._check_finite(new_states, new_traces)
        self._commit(new_states, new_traces)
        return self.graph.module_info.unflatten_outputs(outputs)

    def _current_values(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Leaves of the ParamStates (``weight_states`` order) and of every other state (``other_state_paths``)."""
        return self.graph.module_info.current_state_leaves()

    def _commit(self, new_states: Mapping[StatePath, list[Any]], new_traces: Any) -> None:
        """Write a successful call's results back (nothing is written before everything succeeded)."""
        self.graph.module_info.write_states(new_states)
        self.etrace.value = new_traces
        self._built.committed = frozenset(id(leaf) for leaf in self._hidden_leaves())

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
        self._check_model_states(per_step[0])
        arg_leaves = [self._check_args(a) for a in per_step]
        weight_vals, other_vals = self._current_values()
        outputs, new_states, new_traces = self._built_fn(steps)(weight_vals, other_vals, arg_leaves, self.etrace.value)
        self._check_finite(new_states, new_traces)
        self._commit(new_states, new_traces)
        per_step_out = [self.graph.module_info.unflatten_outputs(o) for o in outputs]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step_out)
