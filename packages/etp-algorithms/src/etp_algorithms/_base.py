r"""``ETraceAlgorithm``: the common frame of the online learners.

A learner wraps a model. :meth:`compile_graph` compiles the model's step
(:mod:`etp_compiler`) and creates the eligibility traces; each call
:meth:`update` runs one step of the model, updates the traces and returns the
model's output. The output is produced by a ``jax.custom_vjp`` function whose
backward pass returns, for a loss :math:`L^t` of that output,

* for every weight with a relation: the eligibility-trace gradient
  (subclass rule) plus the instantaneous term of step :math:`t`;
* for every other parameter (plain JAX ops, readouts, weights excluded by the
  tail rule): the instantaneous gradient :math:`\partial L^t/\partial\theta`
  with :math:`h^{t-1}` held fixed (exact for a readout).

So an ordinary ``brainstate.transform.grad(loss, params)`` gives the online
gradient of the step, in memory independent of the sequence length.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import ETraceGraph, HiddenGroup, HiddenParamOpRelation, StatePath, eval_eqns, is_var, run_step

from ._executor import ETraceGraphExecutor, KeyedValues, StepValues
from ._hidden_only import hidden_only_keys
from ._inputs import MultiStepData, SingleStepData

__all__ = ["ETraceAlgorithm", "EligibilityTrace"]


class EligibilityTrace(brainstate.ShortTermState):
    """The state holding a learner's eligibility traces (filter states by this type to find them)."""


def host_zeros(shape: Sequence[int], dtype: Any) -> jax.Array:
    """A zero array made on the host and transferred.

    ``jnp.zeros`` compiles a broadcast for every new shape; a learner creates a dozen
    trace shapes at :meth:`ETraceAlgorithm.compile_graph` and again at every reset.
    """
    zeros: jax.Array = jax.device_put(np.zeros(tuple(shape), dtype))  # jnp.asarray compiles a staging program
    return zeros


def rule_shapes(rule: Any, *args: Any) -> Any:
    """The shapes and dtypes a trace ``init_*`` rule would return, without running it."""
    return jax.eval_shape(lambda: rule(*args))


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(map(str, path))


class ETraceAlgorithm(brainstate.nn.Module):
    """Base class of the online learners; see :class:`D_RTRL` and :class:`ES_D_RTRL`.

    Parameters
    ----------
    model : brainstate.nn.Module
        The model, with states initialised.
    name : str, optional
    """

    def __init__(self, model: brainstate.nn.Module, name: str | None = None) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(f"{type(self).__name__} expects a brainstate.nn.Module, got {type(model).__name__}.")
        self.model = model
        self._executor = ETraceGraphExecutor(model)
        self._arg_shapes: list[tuple[tuple[int, ...], Any]] | None = None
        self._recompile_on_next_call = False
        self._hidden_only: frozenset[tuple[int, str]] = frozenset()
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

    def compile_graph(self, *args: Any) -> ETraceGraph:
        """Compile the model's step for inputs shaped like ``args`` and initialise the traces."""
        graph = self._executor.compile_graph(*args)
        self._hidden_only = hidden_only_keys(graph)
        self._recompile_on_next_call = False
        self._arg_shapes = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in jax.tree.leaves(args)]
        self.init_etrace_state()
        return graph

    def init_etrace_state(self) -> None:
        """(Re)create zero traces for the compiled graph."""
        self.etrace.value = self._initial_traces()

    def reset_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        """Reset the traces; with ``batch_size``, also re-initialise the model's states for that batch size
        (the step is recompiled at the next call)."""
        if batch_size is not None:
            brainstate.nn.init_all_states(self.model, batch_size=batch_size)
            self._executor._graph = None
            self._arg_shapes = None
            self.etrace.value = {}
            self._recompile_on_next_call = True
            return
        if self.is_compiled:
            self.init_etrace_state()

    def trace_bytes(self) -> int:
        """Bytes held by the eligibility traces (independent of the sequence length)."""
        return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self.etrace.value)))

    def get_etrace_of(self, weight: brainstate.State[Any] | Sequence[Hashable]) -> Any:
        """The traces of the relation(s) whose weight is ``weight`` (a ParamState or its path)."""
        path = self._path_of(weight)
        traces: Any = self._relation_traces(self.etrace.value)
        found = {
            index: traces[index]
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

    def _leaf_vars(self, index: int, key: str) -> tuple[Any, ...]:
        return tuple(self.graph.hidden_param_op_relations[index].weight_fns[key][0].invars)

    # ---------------------------------------------------------------- subclass hooks
    def _relation_traces(self, value: Any) -> Any:
        """``relation index -> traces`` inside the trace state's value."""
        return value

    def _initial_traces(self) -> dict[int, Any]:
        raise NotImplementedError

    def _update_traces(self, traces: Any, values: StepValues, weights: dict[Any, Any]) -> tuple[Any, Any]:
        """Return ``(new traces, residual for the backward pass)``."""
        raise NotImplementedError

    def _trace_gradients(
        self, residual: Any, values: StepValues, g_hidden: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        """Return ``relation index -> {trainable key: dL/d(trainable input)}`` from the traces.

        For the keys in :attr:`_hidden_only` the step's VJP did not differentiate the weight: the
        result must include the instantaneous hidden-path term ``xy_to_dw(x, sum_s g_s D_f,s)``
        (see :mod:`._hidden_only`); for the others the VJP holds it already.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- the step
    def _check_args(self, args: tuple[Any, ...]) -> None:
        assert self._arg_shapes is not None
        given = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in jax.tree.leaves(args)]
        if [s for s, _ in given] != [s for s, _ in self._arg_shapes]:
            raise ValueError(
                f"{type(self).__name__}: input shapes {[s for s, _ in given]} differ from the compiled "
                f"{[s for s, _ in self._arg_shapes]}; to change the batch size call reset_state(batch_size=...) "
                "first, or compile_graph(...) with the new inputs."
            )

    def update(self, *args: Any) -> Any:
        """Run one step (or a window, with :class:`MultiStepData` inputs); return the model's output.

        The model's states and the traces are updated only after the whole
        call succeeded.
        """
        if self._is_window(args):
            return self._update_window(args)
        if not self._executor.is_compiled:
            if self._recompile_on_next_call:
                self.compile_graph(*args)
            else:
                _ = self.graph  # raises the clear error
        self._check_args(args)
        weight_vals, other_vals = self._current_values()
        outputs, new_states, new_traces = self._step_fn()(
            weight_vals, other_vals, list(jax.tree.leaves(args)), self.etrace.value
        )
        self._commit(new_states, new_traces)
        out_tree: Any = self.graph.module_info.out_treedef.children()[0]
        return jax.tree.unflatten(out_tree, outputs)

    def _current_values(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Leaves of the ParamStates (``weight_states`` order) and of every other state (compiled order)."""
        minfo = self.graph.module_info
        weight_vals = [jax.tree.leaves(state.value) for state in minfo.weight_states.values()]
        other_vals = [
            jax.tree.leaves(state.value)
            for state in minfo.compiled_model_states
            if minfo.state_paths[id(state)] not in minfo.weight_states
        ]
        return weight_vals, other_vals

    def _commit(self, new_states: Mapping[StatePath, list[Any]], new_traces: Any) -> None:
        """Write a successful call's results back (nothing is written before everything succeeded)."""
        minfo = self.graph.module_info
        for path, leaves in new_states.items():
            state = _state_at(minfo, path)
            state.value = jax.tree.unflatten(jax.tree.structure(state.value), leaves)
        self.etrace.value = new_traces

    def _is_window(self, args: tuple[Any, ...]) -> bool:
        if any(isinstance(a, MultiStepData) for a in args):
            return True
        return getattr(self, "vjp_method", "single-step") == "multi-step" and not all(
            isinstance(a, SingleStepData) for a in args
        )

    def _update_window(self, args: tuple[Any, ...]) -> Any:
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
        outputs, new_states, new_traces = self._window_fn(steps)(weight_vals, other_vals, arg_leaves, self.etrace.value)
        self._commit(new_states, new_traces)
        out_tree: Any = self.graph.module_info.out_treedef.children()[0]
        per_step_out = [jax.tree.unflatten(out_tree, o) for o in outputs]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step_out)

    def _window_fn(self, steps: int) -> Any:
        """A custom_vjp over a window: exact reverse mode inside, traces at the window start outside."""
        minfo = self.graph.module_info
        weight_paths = list(minfo.weight_states)
        order = [minfo.state_paths[id(s)] for s in minfo.compiled_model_states]
        other_paths = [p for p in order if p not in minfo.weight_states]
        hidden_paths = list(minfo.hidden_path_to_outvar)
        single = self._step_fn()

        def unrolled(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
            outputs = []
            for t in range(steps):
                out, new_states, traces = single.fun(weight_vals, other_vals, arg_leaves[t], traces)
                other_vals = [
                    new_states[p] if p in new_states else v for p, v in zip(other_paths, other_vals, strict=True)
                ]
                outputs.append(out)
            final = KeyedValues.of(
                {p: v for p, v in zip(other_paths, other_vals, strict=True) if p in minfo.state_outvars}
            )
            return outputs, final, traces

        @jax.custom_vjp
        def window(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
            return unrolled(weight_vals, other_vals, arg_leaves, traces)

        def window_fwd(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
            return unrolled(weight_vals, other_vals, arg_leaves, traces), (weight_vals, other_vals, arg_leaves, traces)

        def window_bwd(res: Any, cotangents: Any) -> Any:
            weight_vals, other_vals, arg_leaves, traces = res
            ct_outputs, ct_states, _ = cotangents

            def plain(w: Any, others: Any, a: Any) -> Any:
                outputs = []
                for t in range(steps):
                    values = self._executor.step(_assemble(minfo, weight_paths, w, others, a[t]))
                    others = [
                        values.state_values[p] if p in values.state_values else v
                        for p, v in zip(other_paths, others, strict=True)
                    ]
                    outputs.append(values.outputs)
                final = KeyedValues.of(
                    {p: v for p, v in zip(other_paths, others, strict=True) if p in minfo.state_outvars}
                )
                return outputs, final

            _, pullback = jax.vjp(plain, weight_vals, other_vals, arg_leaves)
            g_weights, g_others, g_args = pullback((ct_outputs, ct_states))
            # the window's start state depends on the weights through the traces: contract them
            by_path = dict(zip(other_paths, g_others, strict=True))
            lam = {p: by_path[p][0] for p in hidden_paths}
            first = self._executor.step(_assemble(minfo, weight_paths, weight_vals, other_vals, arg_leaves[0]))
            w_env = _weight_env(minfo, weight_paths, weight_vals)
            trace_grads = self._window_start_gradients(traces, first, lam, w_env)
            leaf_grads = _pull_back_to_leaves(self.graph.hidden_param_op_relations, trace_grads, first.env, w_env)
            g_weights = _add_leaf_grads(minfo, weight_paths, g_weights, leaf_grads)
            zero_others = jax.tree.map(jnp.zeros_like, other_vals)
            return g_weights, zero_others, g_args, jax.tree.map(jnp.zeros_like, traces)

        window.defvjp(window_fwd, window_bwd)
        return window

    def _window_start_gradients(
        self, traces: Any, first: StepValues, lam: dict[StatePath, Any], weights: dict[Any, Any]
    ) -> dict[int, dict[str, jax.Array]]:
        """Contract the traces held at a window's start with ``dL/dh`` of that start state."""
        raise NotImplementedError(f"{type(self).__name__} does not support multi-step windows yet.")

    def _step_fn(self) -> Any:
        minfo = self.graph.module_info
        weight_paths = list(minfo.weight_states)

        def assemble(weight_vals: Any, other_vals: Any, arg_leaves: Any) -> list[Any]:
            return _assemble(minfo, weight_paths, weight_vals, other_vals, arg_leaves)

        def weight_env(weight_vals: Any) -> dict[Any, Any]:
            return _weight_env(minfo, weight_paths, weight_vals)

        def forward(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> tuple[Any, Any]:
            values = self._executor.step(assemble(weight_vals, other_vals, arg_leaves))
            new_traces, residual = self._update_traces(traces, values, weight_env(weight_vals))
            return (values.outputs, values.state_values, new_traces), (values, residual)

        @jax.custom_vjp
        def step(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
            return forward(weight_vals, other_vals, arg_leaves, traces)[0]

        def step_fwd(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
            out, (values, residual) = forward(weight_vals, other_vals, arg_leaves, traces)
            return out, (weight_vals, other_vals, arg_leaves, traces, values, residual)

        def step_bwd(res: Any, cotangents: Any) -> Any:
            weight_vals, other_vals, arg_leaves, traces, values, residual = res
            ct_outputs, ct_states, _ = cotangents
            hidden_paths = list(minfo.hidden_path_to_outvar)
            written = list(minfo.state_outvars)

            # weights whose only route to the loss is their relation's hidden states are left out of
            # the VJP: the trace contraction supplies their instantaneous term (see _hidden_only)
            skipped = {v for index, key in self._hidden_only for v in self._leaf_vars(index, key)}
            keep = [[var not in skipped for var in minfo.weight_path_to_invars[p]] for p in weight_paths]
            w_diff = [
                [v for v, k in zip(vals, row, strict=True) if k] for vals, row in zip(weight_vals, keep, strict=True)
            ]

            def merge(w_sub: Any) -> list[list[Any]]:
                out = []
                for vals, row, sub in zip(weight_vals, keep, w_sub, strict=True):
                    it = iter(sub)
                    out.append([next(it) if k else v for v, k in zip(vals, row, strict=True)])
                return out

            def perturbed(w_sub: Any, a: Any, deltas: Any) -> Any:
                env = run_step(minfo, assemble(merge(w_sub), other_vals, a), deltas)
                outs = [env[v] if is_var(v) else v.val for v in minfo.out_vars]
                states = KeyedValues.of(
                    {p: [env[v] if is_var(v) else v.val for v in minfo.state_outvars[p]] for p in written}
                )
                return outs, states

            avals: list[Any] = [minfo.hidden_path_to_outvar[p].aval for p in hidden_paths]
            zeros = [jnp.zeros(a.shape, a.dtype) for a in avals]
            _, pullback = jax.vjp(perturbed, w_diff, arg_leaves, zeros)
            g_sub, g_args, g_deltas = pullback((ct_outputs, ct_states))
            g_weights = []
            for vals, row, sub in zip(weight_vals, keep, g_sub, strict=True):
                it = iter(sub)
                g_weights.append([next(it) if k else jnp.zeros_like(v) for v, k in zip(vals, row, strict=True)])
            g_hidden = dict(zip(hidden_paths, g_deltas, strict=True))
            w_env = weight_env(weight_vals)
            trace_grads = self._trace_gradients(residual, values, g_hidden, w_env)
            leaf_grads = _pull_back_to_leaves(self.graph.hidden_param_op_relations, trace_grads, values.env, w_env)
            g_weights = _add_leaf_grads(minfo, weight_paths, g_weights, leaf_grads)
            zero = jax.tree.map(jnp.zeros_like, (other_vals, traces))
            return g_weights, zero[0], g_args, zero[1]

        step.defvjp(step_fwd, step_bwd)
        return step


def _assemble(
    minfo: Any, weight_paths: list[StatePath], weight_vals: Any, other_vals: Any, arg_leaves: Any
) -> list[Any]:
    """The step's invar values from weights, the other states' leaves (compiled order) and argument leaves."""
    by_path = dict(zip(weight_paths, weight_vals, strict=True))
    others = iter(other_vals)
    leaves = list(arg_leaves)
    for state in minfo.compiled_model_states:
        path = minfo.state_paths[id(state)]
        leaves.extend(by_path[path] if path in by_path else next(others))
    return leaves


def _weight_env(minfo: Any, weight_paths: list[StatePath], weight_vals: Any) -> dict[Any, Any]:
    """``ParamState leaf var -> value``."""
    return {
        var: value
        for path, vals in zip(weight_paths, weight_vals, strict=True)
        for var, value in zip(minfo.weight_path_to_invars[path], vals, strict=True)
    }


def _add_leaf_grads(
    minfo: Any, weight_paths: list[StatePath], g_weights: Any, leaf_grads: dict[Any, jax.Array]
) -> list[list[Any]]:
    """Add trace gradients (keyed by leaf var) to the VJP's gradients, in each leaf's dtype."""
    index = {
        var: (i, j) for i, path in enumerate(weight_paths) for j, var in enumerate(minfo.weight_path_to_invars[path])
    }
    out = [list(g) for g in g_weights]
    for var, grad in leaf_grads.items():
        i, j = index[var]
        out[i][j] = out[i][j] + jnp.asarray(grad, dtype=jnp.result_type(out[i][j]))
    return out


def _literal_value(atom: Any) -> Any:
    """The value of a jaxpr literal."""
    return atom.val


def _state_at(minfo: Any, path: StatePath) -> brainstate.State[Any]:
    for state in minfo.compiled_model_states:
        if minfo.state_paths[id(state)] == path:
            return state  # type: ignore[no-any-return]
    raise KeyError(path)


def _pull_back_to_leaves(
    relations: Sequence[HiddenParamOpRelation],
    trace_grads: dict[int, dict[str, jax.Array]],
    env: Mapping[Any, Any],
    weight_env: dict[Any, Any],
) -> dict[Any, jax.Array]:
    """Map gradients w.r.t. each relation's trainable inputs back to the ParamState leaves (VJP of ``weight_fns``)."""
    out: dict[Any, jax.Array] = {}
    for index, grads in trace_grads.items():
        relation = relations[index]
        for key, grad in grads.items():
            jaxpr, consts = relation.weight_fns[key]
            leaf_vars = list(jaxpr.invars)
            const_vals = [env[v] if is_var(v) else _literal_value(v) for v in consts]

            def weight_fn(*leaves: Any, jaxpr: Any = jaxpr, const_vals: Any = const_vals) -> Any:
                local: dict[Any, Any] = dict(zip(jaxpr.constvars, const_vals, strict=True))
                local.update(zip(jaxpr.invars, leaves, strict=True))
                eval_eqns(jaxpr.eqns, local)
                (result,) = [local[v] if is_var(v) else v.val for v in jaxpr.outvars]
                return result

            primal, pullback = jax.vjp(weight_fn, *[weight_env[v] for v in leaf_vars])
            # traces may be kept in a wider dtype than the weight (float64 inputs, float32 weights)
            for var, g in zip(leaf_vars, pullback(jnp.asarray(grad, dtype=primal.dtype)), strict=True):
                out[var] = out[var] + g if var in out else g
    return out


def group_state_index(group: HiddenGroup, path: StatePath) -> int:
    return group.hidden_paths.index(path)
