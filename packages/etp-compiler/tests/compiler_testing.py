"""Shared helpers of the compiler tests: step values, reference Jacobians, record look-ups."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import etp_compiler
from etp_compiler import CompilationRecord, DiagnosticKind, ETraceGraph, HiddenGroup, HiddenParamOpRelation, ModuleInfo


def compile_quiet(model: brainstate.nn.Module, *args: Any) -> ETraceGraph:
    """``compile_etrace_graph`` with its UserWarnings silenced (tests that check warnings do it themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return etp_compiler.compile_etrace_graph(model, *args)


def mantissas(tree: Any) -> list[Any]:
    """The leaves of ``tree`` with saiunit quantities reduced to their mantissas."""
    return [u.get_mantissa(leaf) for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, u.Quantity))]


def step_invals(minfo: ModuleInfo, *args: Any) -> list[Any]:
    """Values of ``minfo.jaxpr.invars``: the flattened arguments, then every state's leaves (mantissas)."""
    values = mantissas(args)
    for state in minfo.compiled_model_states:
        values.extend(mantissas(state.value))
    assert len(values) == len(minfo.jaxpr.invars)
    return values


def step_env(graph: ETraceGraph, *args: Any) -> dict[Any, Any]:
    """The value of every variable of the step jaxpr at the model's current states."""
    return etp_compiler.run_step(graph.module_info, step_invals(graph.module_info, *args))


def group_inputs(group: HiddenGroup, env: dict[Any, Any]) -> tuple[list[Any], list[Any]]:
    """``(hidden values h^{t-1}, constant values)`` of a group's transition."""
    return [env[v] for v in group.hidden_invars], [env[v] for v in group.transition_jaxpr_constvars]


def reference_blocks(group: HiddenGroup, hidden: Sequence[Any], consts: Sequence[Any]) -> np.ndarray:
    """Diagonal blocks ``(*varshape, S, S)`` of the full ``jax.jacfwd`` Jacobian of ``group.transition``."""
    size = int(np.size(hidden[0]))
    S = group.num_state
    full = jax.jit(jax.jacfwd(lambda hs, cs: jnp.stack([jnp.ravel(h) for h in group.transition(hs, cs)]), argnums=0))(
        list(hidden), list(consts)
    )
    blocks = np.zeros((size, S, S), dtype=np.asarray(full[0]).dtype)
    for j in range(S):
        jac_j = np.asarray(full[j]).reshape(S, size, size)  # (output state i, output position, input position)
        for i in range(S):
            blocks[:, i, j] = np.diagonal(jac_j[i])
    return blocks.reshape((*group.varshape, S, S))


def y_to_hidden_fn(relation: HiddenParamOpRelation, group: HiddenGroup, consts: Sequence[Any]) -> Callable[[Any], Any]:
    """``y -> stack of the group's new states`` (state axis last), evaluated with ``OpenJaxpr.evaluate``."""
    jaxpr, _ = relation.y_to_hidden[group.index]

    def fn(y: Any) -> Any:
        outs = jaxpr.evaluate(list(consts), y)
        return jnp.stack([jnp.broadcast_to(o, group.varshape) for o in outs], axis=-1)

    return fn


def reference_hidden_dim(
    relation: HiddenParamOpRelation, group: HiddenGroup, y: Any, consts: Sequence[Any]
) -> np.ndarray:
    """``dh_s[p] / dy[q(p)]`` from the full ``jax.jacfwd``, ``q(p)`` being ``p`` on y's trailing axes (NumPy broadcasting)."""
    full = np.asarray(jax.jit(jax.jacfwd(y_to_hidden_fn(relation, group, consts)))(y))  # (*varshape, S, *y.shape)
    varshape, y_shape = group.varshape, tuple(np.shape(y))
    out = np.zeros((*varshape, group.num_state), dtype=full.dtype)
    for position in itertools.product(*(range(n) for n in varshape)):
        trailing = position[len(varshape) - len(y_shape) :]
        source = tuple(0 if n == 1 else p for p, n in zip(trailing, y_shape, strict=True))
        out[position] = full[(*position, slice(None), *source)]
    return out


def records_of(graph: ETraceGraph, kind: DiagnosticKind) -> list[CompilationRecord]:
    return [r for r in graph.diagnostics if r.kind is kind]


def relation_by_path(graph: ETraceGraph, weight_path: Sequence[Hashable]) -> HiddenParamOpRelation:
    found = [r for r in graph.hidden_param_op_relations if r.weight_path == tuple(weight_path)]
    assert len(found) == 1, [r.weight_path for r in graph.hidden_param_op_relations]
    return found[0]


def leaf_value(minfo: ModuleInfo, leaf: tuple[tuple[Hashable, ...], tuple[Hashable, ...]]) -> Any:
    """The current value (mantissa) of a ParamState leaf ``(state path, key path)``."""
    path, keys = leaf
    value = minfo.weight_states[path].value
    for key in keys:
        value = value[key]
    return u.get_mantissa(value)


def eval_weight_fn(graph: ETraceGraph, relation: HiddenParamOpRelation, key: str, env: dict[Any, Any]) -> Any:
    """Evaluate ``relation.weight_fns[key]`` on the ParamState leaves named in ``trainable_paths``."""
    jaxpr, const_vars = relation.weight_fns[key]
    leaves = [leaf_value(graph.module_info, leaf) for leaf in relation.trainable_paths[key]]
    (out,) = jaxpr.evaluate([env[v] for v in const_vars], *leaves)
    return out
