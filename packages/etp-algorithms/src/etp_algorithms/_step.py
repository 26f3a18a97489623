r"""Build a learner's step from a compiled graph and a :class:`LearningRule`, once.

:func:`build_step` returns a ``jax.custom_vjp`` function

.. code-block:: text

    step(weight_vals, other_vals, arg_leaves, traces) -> (outputs, new_states, new_traces)

whose forward pass runs the model's step and the rule's trace update, and
whose backward pass returns, for the cotangents of the outputs and of the new
states,

* the instantaneous VJP of the step (:math:`h^{t-1}` held fixed) for every
  parameter, plus
* for every weight with a relation, the rule's trace gradient, pulled back
  through the relation's weight transform to the ParamState leaves.

:func:`build_window` does the same over a window of steps: exact reverse mode
inside the window, the rule's window-start contraction for what came before.

``weight_vals`` holds the leaves of each ParamState (``module_info.weight_states``
order), ``other_vals`` those of every other compiled state (``module_info.other_state_paths``
order); :meth:`etp_compiler.ModuleInfo.flatten_inputs` puts them in the step's invar order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from etp_compiler import ETraceGraph, HiddenParamOpRelation, ModuleInfo, StatePath, read_atom, run_step

from ._executor import KeyedValues, execute_step
from ._rule import LearningRule, RelationGradients, RuleContext

__all__ = ["HiddenStateGradientWarning", "ModulatedCotangents", "build_step", "build_window"]


class HiddenStateGradientWarning(UserWarning):
    """A gradient was taken w.r.t. a learner's hidden states or traces, for which its step returns zero."""


def _primal(tree: Any) -> Any:
    """The values of a tree of ``jax.custom_vjp`` primals (``symbolic_zeros=True`` wraps each leaf)."""
    return jax.tree.map(lambda p: p.value, tree, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _perturbed(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))
    return any(bool(p.perturbed) for p in leaves if isinstance(p, CustomVJPPrimal))


def _instantiate(tree: Any) -> Any:
    """Cotangents with every symbolic zero made an array of zeros."""
    return jax.tree.map(
        lambda c: jnp.zeros(cast(Any, c.aval).shape, cast(Any, c.aval).dtype) if isinstance(c, SymbolicZero) else c,
        tree,
        is_leaf=lambda c: isinstance(c, SymbolicZero),
    )


class ModulatedCotangents(dict[StatePath, Any]):
    """``dL_dh`` of a modulated step: the mapping is :math:`\\partial L/\\partial h^t` as always, and
    :attr:`modulator` holds the caller's signal per hidden path (a three-factor rule uses it in place of
    :math:`\\partial L/\\partial h^t`; see :class:`etp_algorithms.ThreeFactor`)."""

    def __init__(self, cotangents: Mapping[StatePath, Any], modulator: Mapping[StatePath, Any]) -> None:
        super().__init__(cotangents)
        self.modulator = dict(modulator)


def build_step(ctx: RuleContext, rule: LearningRule, fresh_hidden: bool = False) -> Any:
    """The ``custom_vjp`` step of ``ctx.graph`` learning by ``rule`` (see the module docstring).

    An optional fifth input, a list of modulator arrays (one per hidden state, in
    ``module_info.hidden_path_to_outvar`` order, each of the state's shape), is handed to the rule's
    ``trace_gradients`` as ``dL_dh.modulator`` (a :class:`ModulatedCotangents`); it gets a zero cotangent.

    ``fresh_hidden``: the hidden values entering this call are not the outputs of the learner's previous
    step; if such a value (or a trace) is differentiated, the step warns (:class:`HiddenStateGradientWarning`):
    its gradient w.r.t. hidden states and traces is zero, not :math:`\\partial L/\\partial h^{t-1}`.
    """
    graph = ctx.graph
    minfo = graph.module_info
    weight_paths = list(minfo.weight_states)
    hidden_paths = list(minfo.hidden_path_to_outvar)
    # weights whose only route to the loss is their relation's hidden states are left out of the
    # VJP: the rule's trace contraction supplies their instantaneous term (see _hidden_only)
    skipped = {
        v for index, key in ctx.hidden_only for v in graph.hidden_param_op_relations[index].weight_fns[key][0].invars
    }
    keep = [[var not in skipped for var in minfo.weight_path_to_invars[p]] for p in weight_paths]
    previous = rule.hidden_cotangents == "previous"
    other_paths = list(minfo.other_state_paths)
    hidden_slots = [other_paths.index(p) for p in hidden_paths]

    def forward(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> tuple[Any, Any]:
        values = execute_step(graph, minfo.flatten_inputs(weight_vals, other_vals, arg_leaves))
        new_traces, residual = rule.update_traces(ctx, traces, values)
        return (values.outputs, values.state_values, new_traces), (values, residual)

    @jax.custom_vjp
    def step(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any, *modulator: Any) -> Any:
        return forward(weight_vals, other_vals, arg_leaves, traces)[0]

    def step_fwd(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any, *modulator: Any) -> Any:
        hidden_in = [other_vals[slot] for slot in hidden_slots]
        if fresh_hidden and (_perturbed(hidden_in) or _perturbed(traces)):
            warnings.warn(
                f"{rule.name}: the hidden states or traces entering this step "
                f"({', '.join('.'.join(map(str, p)) for p in hidden_paths)}, traces) are differentiated, and the "
                "step returns zero for them, not dL/dh: an online learner holds the hidden state entering a step "
                "fixed and carries its dependence on the parameters in the traces. For a gradient w.r.t. hidden "
                "states or traces, take it w.r.t. the parameters only (model.states(brainstate.ParamState)); for "
                "dL/dh differentiate the model without a learner. Steps in a loop inside one gradient give the sum "
                "of the per-step online gradients; take one gradient per step (or etrace_grad) to avoid this warning.",
                HiddenStateGradientWarning,
                stacklevel=2,
            )
        weight_vals, other_vals, arg_leaves, traces, modulator = _primal(
            (weight_vals, other_vals, arg_leaves, traces, modulator)
        )
        out, (values, residual) = forward(weight_vals, other_vals, arg_leaves, traces)
        return out, (weight_vals, other_vals, arg_leaves, traces, values, residual, modulator)

    def step_bwd(res: Any, cotangents: Any) -> Any:
        weight_vals, other_vals, arg_leaves, traces, values, residual, modulator = res
        ct_outputs, ct_states, _ = _instantiate(cotangents)
        w_diff = [[v for v, k in zip(vals, row, strict=True) if k] for vals, row in zip(weight_vals, keep, strict=True)]

        def merge(w_sub: Any) -> list[list[Any]]:
            out = []
            for vals, row, sub in zip(weight_vals, keep, w_sub, strict=True):
                it = iter(sub)
                out.append([next(it) if k else v for v, k in zip(vals, row, strict=True)])
            return out

        def perturbed(w_sub: Any, a: Any, deltas: Any) -> Any:
            outs, states = minfo.read_outputs(
                run_step(minfo, minfo.flatten_inputs(merge(w_sub), other_vals, a), deltas)
            )
            return outs, KeyedValues.of(states)

        if previous:
            # dL/dh^{t-1}: the cotangent of the step's hidden inputs, weights and inputs held fixed
            def plain(w_sub: Any, a: Any, hidden: Any) -> Any:
                others = list(other_vals)
                for slot, value in zip(hidden_slots, hidden, strict=True):
                    others[slot] = [value]
                outs, states = minfo.read_outputs(run_step(minfo, minfo.flatten_inputs(merge(w_sub), others, a)))
                return outs, KeyedValues.of(states)

            _, pullback = jax.vjp(plain, w_diff, arg_leaves, [other_vals[slot][0] for slot in hidden_slots])
        else:
            avals: list[Any] = [minfo.hidden_path_to_outvar[p].aval for p in hidden_paths]
            zeros = [jnp.zeros(a.shape, a.dtype) for a in avals]
            _, pullback = jax.vjp(perturbed, w_diff, arg_leaves, zeros)
        g_sub, g_args, g_deltas = pullback((ct_outputs, ct_states))
        g_weights = []
        for vals, row, sub in zip(weight_vals, keep, g_sub, strict=True):
            it = iter(sub)
            g_weights.append([next(it) if k else jnp.zeros_like(v) for v, k in zip(vals, row, strict=True)])
        dL_dh: dict[StatePath, Any] = dict(zip(hidden_paths, g_deltas, strict=True))
        if modulator:
            dL_dh = ModulatedCotangents(dL_dh, dict(zip(hidden_paths, modulator[0], strict=True)))
        trace_grads = rule.trace_gradients(ctx, residual, values._replace(output_cotangents=list(ct_outputs)), dL_dh)
        leaf_grads = _leaf_gradients(rule, graph, trace_grads, values.env, minfo.weight_env(weight_vals))
        g_weights = _add_leaf_grads(minfo, g_weights, leaf_grads)
        zero = jax.tree.map(jnp.zeros_like, (other_vals, traces))
        return (g_weights, zero[0], g_args, zero[1], *jax.tree.map(jnp.zeros_like, modulator))

    step.defvjp(step_fwd, step_bwd, symbolic_zeros=True)
    return step


def build_window(ctx: RuleContext, rule: LearningRule, steps: int) -> Any:
    """A ``custom_vjp`` over ``steps`` steps: exact reverse mode inside, the rule's traces at the window start.

    ``arg_leaves`` is a list of ``steps`` lists of argument leaves; the outputs a list of ``steps`` output lists.
    """
    window_start = rule.window_start_gradients
    if window_start is None:
        raise ValueError(f"{rule.name}: the rule has no window_start_gradients; it cannot run multi-step windows.")
    graph = ctx.graph
    minfo = graph.module_info
    other_paths = minfo.other_state_paths
    hidden_paths = list(minfo.hidden_path_to_outvar)
    single = build_step(ctx, rule)

    def final_states(others: Any) -> KeyedValues:
        return KeyedValues.of({p: v for p, v in zip(other_paths, others, strict=True) if p in minfo.state_outvars})

    def advance(others: Any, new_states: Mapping[StatePath, Any]) -> list[Any]:
        return [new_states[p] if p in new_states else v for p, v in zip(other_paths, others, strict=True)]

    def unrolled(weight_vals: Any, other_vals: Any, arg_leaves: Any, traces: Any) -> Any:
        outputs = []
        for t in range(steps):
            out, new_states, traces = single.fun(weight_vals, other_vals, arg_leaves[t], traces)
            other_vals = advance(other_vals, new_states)
            outputs.append(out)
        return outputs, final_states(other_vals), traces

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
                values = execute_step(graph, minfo.flatten_inputs(w, others, a[t]))
                others = advance(others, values.state_values)
                outputs.append(values.outputs)
            return outputs, final_states(others)

        _, pullback = jax.vjp(plain, weight_vals, other_vals, arg_leaves)
        g_weights, g_others, g_args = pullback((ct_outputs, ct_states))
        # the window's start state depends on the weights through the traces: contract them
        by_path = dict(zip(other_paths, g_others, strict=True))
        dL_dh = {p: by_path[p][0] for p in hidden_paths}
        first = execute_step(graph, minfo.flatten_inputs(weight_vals, other_vals, arg_leaves[0]))
        trace_grads = window_start(ctx, traces, first, dL_dh)
        leaf_grads = _leaf_gradients(rule, graph, trace_grads, first.env, minfo.weight_env(weight_vals))
        g_weights = _add_leaf_grads(minfo, g_weights, leaf_grads)
        zero_others = jax.tree.map(jnp.zeros_like, other_vals)
        return g_weights, zero_others, g_args, jax.tree.map(jnp.zeros_like, traces)

    window.defvjp(window_fwd, window_bwd)
    return window


def _leaf_gradients(
    rule: LearningRule, graph: ETraceGraph, grads: Any, env: Mapping[Any, Any], weight_env: dict[Any, Any]
) -> dict[Any, jax.Array]:
    """The rule's gradients keyed by ParamState leaf var: pulled back from the relations', or as given per leaf."""
    if rule.gradient_targets == "relations":
        return _pull_back_to_leaves(graph.hidden_param_op_relations, grads, env, weight_env)
    minfo = graph.module_info
    var_of = {leaf: var for var, leaf in minfo.invar_to_weight_path.items()}
    unknown = [leaf for leaf in grads if leaf not in var_of]
    if unknown:
        raise ValueError(
            f"{rule.name}: gradients for {unknown}, which are not ParamState leaves of the step "
            f"(expected (state path, leaf key path) keys among {sorted(var_of, key=repr)})."
        )
    return {var_of[leaf]: grad for leaf, grad in grads.items()}


def _add_leaf_grads(minfo: ModuleInfo, g_weights: Any, leaf_grads: dict[Any, jax.Array]) -> list[list[Any]]:
    """Add trace gradients (keyed by leaf var) to the VJP's gradients (``weight_states`` order), in each leaf's dtype."""
    index = {
        var: (i, j)
        for i, path in enumerate(minfo.weight_states)
        for j, var in enumerate(minfo.weight_path_to_invars[path])
    }
    out = [list(g) for g in g_weights]
    for var, grad in leaf_grads.items():
        i, j = index[var]
        out[i][j] = out[i][j] + jnp.asarray(grad, dtype=jnp.result_type(out[i][j]))
    return out


def _pull_back_to_leaves(
    relations: Sequence[HiddenParamOpRelation],
    trace_grads: RelationGradients,
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
            const_vals = [read_atom(env, v) for v in consts]

            def weight_fn(*leaves: Any, jaxpr: Any = jaxpr, const_vals: Any = const_vals) -> Any:
                (result,) = jaxpr.evaluate(const_vals, *leaves)
                return result

            primal, pullback = jax.vjp(weight_fn, *[weight_env[v] for v in leaf_vars])
            # traces may be kept in a wider dtype than the weight (float64 inputs, float32 weights)
            for var, g in zip(leaf_vars, pullback(jnp.asarray(grad, dtype=primal.dtype)), strict=True):
                out[var] = out[var] + g if var in out else g
    return out
