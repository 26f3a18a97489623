r"""Small pure helpers that learning rules share (exported by :mod:`etp_algorithms.extend`).

Shapes: a relation :math:`y = \mathrm{op}(x, W)` drives hidden groups of
``varshape`` with :math:`S` states per position. When an unbatched op feeds
batched states (the weight is shared over the batch), ``y`` has fewer axes
than the group: the first :func:`extra_axes` axes of the group are broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import etp_primitives as etp
from etp_compiler import ETraceGraph, HiddenGroup, HiddenParamOpRelation, StatePath, eval_jaxpr

from ._compat import is_tracer
from ._executor import StepValues
from ._hidden_only import reach
from ._rule import HiddenCotangents, RuleContext

__all__ = [
    "as_scalar",
    "coupling",
    "contract_states",
    "extra_axes",
    "host_zeros",
    "instantaneous_gradient",
    "map_extra",
    "relation_weights",
    "rule_shapes",
    "stack_states",
    "sum_over_samples",
    "weight_shaped_batched",
]


def as_scalar(value: Any, what: str) -> int | float:
    """A hyper-parameter given as a Python, NumPy or concrete 0-d JAX number, as a Python ``int`` or ``float``.

    Integer types (``int``, ``np.int64``, an integer 0-d array) give an ``int``, floating types a
    ``float``; ``bool``, other types, arrays with more than one element and traced values raise a
    ``TypeError`` naming ``what`` and the value.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> from etp_algorithms.extend import as_scalar
    >>> as_scalar(np.float32(0.5), "decay"), as_scalar(np.int64(3), "rank"), as_scalar(jnp.array(0.25), "decay")
    (0.5, 3, 0.25)
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a number, got the bool {value!r}.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and not is_tracer(value):
        if value.shape == () and (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            array = np.asarray(value)
            return int(array) if np.issubdtype(array.dtype, np.integer) else float(array)
    raise TypeError(
        f"{what} must be a Python, NumPy or concrete 0-d JAX number (not traced, not an array of several "
        f"elements), got {value!r} of type {type(value).__name__}."
    )


def host_zeros(shape: Sequence[int], dtype: Any) -> jax.Array:
    """A zero array made on the host and transferred.

    ``jnp.zeros`` compiles a broadcast for every new shape; a learner creates a dozen
    trace shapes at compile time and again at every reset.
    """
    zeros: jax.Array = jax.device_put(np.zeros(tuple(shape), dtype))  # jnp.asarray compiles a staging program
    return zeros


def rule_shapes(rule: Callable[..., Any], *args: Any) -> Any:
    """The shapes and dtypes a trace ``init_*`` rule would return, without running it."""
    return jax.eval_shape(lambda: rule(*args))


def extra_axes(relation: HiddenParamOpRelation, group: HiddenGroup) -> int:
    """Leading hidden axes that ``y`` broadcasts over (an unbatched op feeding batched states)."""
    y_aval: Any = relation.y_var.aval
    return len(group.varshape) - len(y_aval.shape)


def map_extra(fn: Callable[..., Any], extra: int, in_axes: tuple[Any, ...]) -> Callable[..., Any]:
    """``fn`` vmapped ``extra`` times (over the leading broadcast axes of a group)."""
    for _ in range(extra):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn


def relation_weights(relation: HiddenParamOpRelation, values: StepValues) -> dict[str, Any]:
    """``trainable key -> value`` of the relation's trainable inputs in this step."""
    return {key: values.env[var] for key, var in relation.trainable_vars.items()}


def stack_states(group: HiddenGroup, per_state: Mapping[StatePath, Any]) -> jax.Array:
    """The group's per-state arrays (keyed by hidden path) stacked on a trailing S axis."""
    return jnp.stack([per_state[p] for p in group.hidden_paths], axis=-1)


def contract_states(group: HiddenGroup, g: HiddenCotangents, per_state: Any, extra: int) -> Any:
    r"""``sum_s g_s * per_state[..., s]``, also summed over the ``extra`` leading hidden axes.

    The sum over the :math:`S` states is written as element-wise adds (:func:`etp_primitives.pairwise_sum`),
    never as a ``jnp.sum`` over a minor axis: XLA's CPU backend hands that reduction to a slow fusion,
    while adds of slices fuse with the element-wise work.
    """
    total = etp.pairwise_sum([g[path] * per_state[..., s] for s, path in enumerate(group.hidden_paths)])
    return etp.sum_leading_axes(total, total.ndim - extra)


def instantaneous_gradient(
    ctx: RuleContext, index: int, values: StepValues, dL_dh: HiddenCotangents
) -> dict[str, jax.Array]:
    r"""Step :math:`t`'s own hidden-path term of relation ``index``:
    :math:`\mathrm{xy\_to\_dw}(x^t, \sum_{g, s} g^t_s D^t_{f,s})` per trainable key.

    Exact when :math:`y \mapsto h^t` is position-wise. A rule whose estimate includes this term
    subtracts it for the keys the step's VJP differentiated (``not ctx.keeps_instantaneous(index, key)``).
    """
    relation = ctx.graph.hidden_param_op_relations[index]
    xy_to_dw = etp.require_rules(relation.primitive, "xy_to_dw")["xy_to_dw"]
    cot: Any = 0.0
    for group in relation.hidden_groups:
        Df = values.hidden_dims[(index, group.index)]
        cot = cot + contract_states(group, dL_dh, Df, extra_axes(relation, group))
    result: dict[str, jax.Array] = xy_to_dw(
        values.x_values[index], cot, relation_weights(relation, values), **relation.eqn_params
    )
    return result


def coupling(graph: ETraceGraph, group: HiddenGroup) -> tuple[tuple[bool, ...], ...]:
    """``[s][s']``: whether ``h_s^t`` depends on ``h_{s'}^{t-1}`` with the relations' outputs held fixed.

    A false entry means the Jacobian block :math:`D_{ss'}` is structurally zero.
    """
    minfo = graph.module_info
    eqns = list(minfo.jaxpr.eqns)
    cut = {id(relation.eqn) for relation in graph.hidden_param_op_relations}
    rows = []
    for path in group.hidden_paths:
        out = minfo.hidden_path_to_outvar[path]
        rows.append(
            tuple(
                out in reach(eqns, {minfo.hidden_path_to_invar[source]}, stop=set(), cut=cut)
                for source in group.hidden_paths
            )
        )
    return tuple(rows)


#: Batches up to this size are contracted sample by sample (see :func:`sum_over_samples`).
PER_SAMPLE_LIMIT = 128


def weight_shaped_batched(primitive: Any, eps: Mapping[str, Any], weights: Mapping[str, Any], g: Any, x: Any) -> bool:
    """Whether every trace leaf is ``(batch, *weight.shape[, S])``: its contraction is element-wise per sample."""
    if not etp.is_batched_primitive(primitive) or x is None or g.ndim < 2:
        return False
    batch = g.shape[0]
    if not 1 < batch <= PER_SAMPLE_LIMIT or jnp.shape(x)[0] != batch:
        return False

    def weight_shaped(key: str, shape: tuple[int, ...]) -> bool:
        return key in weights and shape == (batch, *jnp.shape(weights[key]))

    return all(weight_shaped(key, tuple(leaf.shape)) for key, value in eps.items() for leaf in value)


def sum_over_samples(one: Callable[..., dict[str, Any]], *operands: Any) -> Any:
    """``one`` on each sample's slices of ``operands`` (leading batch axis), summed pairwise.

    Slicing the operands before an element-wise contraction lets XLA fuse the whole
    contraction into one pass over the trace; a batched product followed by a reduction over
    the batch axis materialises the product, or on XLA's CPU backend becomes a reduction many
    times slower. To keep the B-fold unroll cheap to trace, each operand is split once and
    ``one`` is traced once, on the first sample, its jaxpr replayed on the others.
    """
    leaves, structure = jax.tree.flatten(operands)
    batch = int(jnp.shape(leaves[0])[0])
    per_sample = list(zip(*(jax.lax.split(leaf, [1] * batch, axis=0) for leaf in leaves), strict=True))
    closed, shapes = jax.make_jaxpr(lambda *sample: one(*jax.tree.unflatten(structure, sample)), return_shape=True)(
        *per_sample[0]
    )
    out_tree = jax.tree.structure(shapes)
    replayed = [eval_jaxpr(closed.jaxpr, closed.consts, *sample) for sample in per_sample]
    return etp.pairwise_sum([jax.tree.unflatten(out_tree, outputs) for outputs in replayed])
