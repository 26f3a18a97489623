r"""SnAp-n: the influence matrix restricted to the entries reached in n steps (Menick et al. 2021).

Menick, Elsen, Evci, Osindero, Simonyan & Graves, "Practical Real Time Recurrent Learning with a
Sparse Approximation" (ICLR 2021). With the step :math:`h^t = F(h^{t-1}, \theta)`, :math:`\theta`
the trainable inputs of the model's relations (the weights of its ETP ops, each in its own
equation), the immediate influence :math:`I^t = \partial F/\partial\theta` and the full Jacobian
:math:`J^t = \partial F/\partial h^{t-1}`, SnAp-n keeps only the entries of the influence
:math:`M = \mathrm{d}h/\mathrm{d}\theta` that are non-zero after :math:`n` steps of RTRL from zero:

.. math::

    \mathcal{P}_1 = \mathrm{nz}(I), \qquad
    \mathcal{P}_{k+1} = \mathcal{P}_k \,\vee\, \mathrm{nz}(J)\,\mathcal{P}_k, \qquad
    M^t = \mathcal{P}_n \odot \big(J^t M^{t-1} + I^t\big),

and the gradient of a loss :math:`L^t` of step :math:`t` is the published one,
:math:`\partial L^t/\partial\theta = \partial L^t/\partial h^t \, M^t` (plus what does not go
through the hidden states). The patterns are static boolean masks, computed once at compile from
the actual Jacobians' non-zero structure: :math:`J` and :math:`I` are evaluated (one compiled ``jax.jacfwd`` / ``jax.jacrev``) at
16 random points (every floating input of the step standard normal: weights, states, arguments) and
OR-ed, so that an entry zero by accident at one point (a ReLU off, a zero weight, a spike function's
flat part) is not dropped. An entry zero at *every* random point is taken as structurally zero: a
ReLU unit off at all 16 points (probability :math:`2^{-16}` per unit) would lose its entries.

* ``n = 1`` keeps the immediate pattern: for a dense recurrent layer, the influence of
  :math:`W_{jk}` on unit :math:`k` only, what D-RTRL keeps. It then propagates that entry with
  the full Jacobian's diagonal :math:`J_{kk}` (through the ETP op too), where D-RTRL uses the
  diagonal with the ETP op held fixed; the two agree when the recurrence does not go through an
  ETP op (a leaky integrator with feed-forward input, where both are exact).
* ``n`` at least the number of steps the recurrence needs to connect every pair of units (at most
  the number of hidden units) keeps every entry: exact RTRL over the relations, equal to BPTT when
  every weight has a relation.

Weights without a relation (a GRU's reset gate, weights of plain JAX ops) get their
instantaneous gradient only, as with D-RTRL; :class:`RTRL` learns them exactly.

Memory and compute
------------------
Stored between steps: only the masked entries (one vector per relation input and hidden state,
gathered by static indices): :math:`\mathrm{nnz}(\mathcal{P}_n)` numbers, :math:`O(B\cdot P)` for
``n = 1`` on a dense layer. Each step scatters them into the dense influence, applies the step's
linearisation to it and to the unit tangents (:math:`2P` JVPs of the step, as RTRL's update) and
gathers the masked entries back: the *transient* memory and the compute of a step are those of
:class:`RTRL` (dense, :math:`O(B\cdot N\cdot P)`), and ``max_influence_bytes`` bounds that dense
size. SnAp here saves the memory held between steps, not the work of a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import CompilationError, ControlFlowPolicy, ETraceGraph, StatePath

from ._executor import StepValues, execute_step
from ._learner import ETraceAlgorithm
from ._peer_keywords import DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS, PeerKeywords
from ._rtrl import (
    DEFAULT_MAX_INFLUENCE_BYTES,
    _floating_paths,
    _theta_avals,
    as_targets,
    check_max_bytes,
    floating_transition,
    influence_bytes,
    influence_shapes,
    propagate_influence,
)
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import host_zeros

__all__ = ["SnAp", "SnApTrace", "snap", "snap_pattern"]

#: How many random points the sparsity pattern is the union over.
PATTERN_POINTS = 16

Pattern = dict[Any, dict[StatePath, np.ndarray]]

#: XLA options for the pattern's Jacobians, run at 16 small points once: an unoptimised build compiles in
#: half the time, which is most of the pattern's cost.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SnApTrace:
    r"""The masked entries of the influence :math:`M = \mathrm{d}h/\mathrm{d}\theta`.

    Attributes
    ----------
    keys : tuple
        ``(relation index, trainable key)`` of each :math:`\theta` (static).
    paths : tuple
        The hidden paths (static).
    values : tuple of tuple of jax.Array
        ``values[i][j]``: a vector of the pattern's entries of the block :math:`\mathrm{d}h_j/\mathrm{d}\theta_i`
        (shape ``(*h.shape, *theta.shape)``), in row-major order of the block.
    """

    keys: tuple[Any, ...] = field(metadata={"static": True})
    paths: tuple[StatePath, ...] = field(metadata={"static": True})
    values: tuple[tuple[jax.Array, ...], ...]


def _random_invals(graph: ETraceGraph, seed: int) -> list[np.ndarray]:
    """The step's inputs at a random point: every floating input (weights, states, arguments) standard normal.

    NumPy arrays: a ``jnp`` conversion would compile one small XLA program per input dtype and shape.
    """
    rng = np.random.default_rng(seed)
    invals = []
    for var in graph.module_info.jaxpr.invars:
        aval: Any = var.aval
        dtype = np.dtype(aval.dtype)
        if jnp.issubdtype(aval.dtype, jnp.inexact):
            invals.append(np.asarray(rng.normal(size=aval.shape)).astype(dtype))
        else:
            invals.append(np.zeros(aval.shape, dtype))
    return invals


def _step_jacobians(ctx: RuleContext) -> Any:
    """``invals -> (dh^t/dh^{t-1}, dh^t/dtheta)`` of the step at ``invals``, over its floating hidden states.

    One compiled function for every sampled point: run op by op, the weights' Jacobian pushes one
    tangent per weight entry through every op of the step (minutes at B=32, H=64); a closure per
    point would compile once per point.
    """

    def jacobians(invals: list[jax.Array]) -> Any:
        step, hf, w0 = floating_transition(ctx, execute_step(ctx.graph, invals), "relations")
        # one pass per column (forward mode) or per row (reverse mode) of dh^t/dtheta: the fewer
        n_h = sum(int(np.prod(v.shape)) for v in hf.values())
        n_w = sum(int(np.prod(v.shape)) for v in w0.values())
        jac_w = jax.jacrev if n_h < n_w else jax.jacfwd
        return jax.jacfwd(step, argnums=0)(hf, w0), jac_w(step, argnums=1)(hf, w0)

    return jax.jit(jacobians)


def _flat(blocks: Mapping[Any, Mapping[Any, Any]], rows: list[Any], cols: list[Any], sizes: dict[Any, int]) -> Any:
    """A ``(sum of row sizes, sum of column sizes)`` boolean matrix of ``blocks[row][col]``'s non-zeros."""
    return np.concatenate(
        [
            np.concatenate([np.asarray(blocks[r][c]).reshape(sizes[r], sizes[c]) != 0 for c in cols], axis=1)
            for r in rows
        ],
        axis=0,
    )


def _refuse_integer_inputs(ctx: RuleContext) -> None:
    """A clear error for a relation whose input is integer (an embedding's indices): no sample covers every index.

    The pattern is sampled at random points of the step; an integer-indexed op (a gather of rows) reaches other
    entries of its weight for other indices, so a sampled pattern would silently drop entries of the influence.
    """
    for index, relation in enumerate(ctx.graph.hidden_param_op_relations):
        aval = getattr(relation.x_var, "aval", None)
        if aval is not None and not jnp.issubdtype(aval.dtype, jnp.inexact):
            weight = ".".join(map(str, relation.weight_path))
            raise CompilationError(
                f"SnAp: relation {index} ({relation.primitive.name}, weight {weight}) takes integer inputs "
                f"(dtype {aval.dtype}); its static sparsity pattern, sampled at random points of the step, cannot "
                "cover every index such an op may read. Use RTRL (exact), D_RTRL or UORO for this model."
            )


def snap_pattern(ctx: RuleContext, n: int, points: int = PATTERN_POINTS) -> Pattern:
    r"""The SnAp-n pattern :math:`\mathcal{P}_n` of ``ctx.graph``: ``(relation, key) -> {path: bool mask}``.

    Each mask has the shape of the dense block ``(*h.shape, *theta.shape)``. Computed from
    the Jacobians of the step (one compiled function) at ``points`` random points (OR-ed; see the module docstring).
    """
    n = check_n(n)
    _refuse_integer_inputs(ctx)
    shapes = influence_shapes(ctx, "relations")
    keys, paths = list(shapes), list(_floating_paths(ctx))
    minfo = ctx.graph.module_info
    sizes: dict[Any, int] = {p: int(np.prod(minfo.hidden_path_to_outvar[p].aval.shape)) for p in paths}  # type: ignore[attr-defined]
    sizes.update({k: int(np.prod(aval.shape)) for k, aval in _theta_avals(ctx, "relations").items()})
    # compiled ahead, outside the compile-time-eval context below: traced inside it, every op of the step on
    # a constant would run (and compile) eagerly, one XLA compile each
    jacobians = _step_jacobians(ctx).lower(_random_invals(ctx.graph, 1234)).compile(_QUICK_COMPILE)
    with jax.ensure_compile_time_eval():
        J: Any = None
        immediate: Any = None
        for point in range(points):
            dh, dw = jacobians(_random_invals(ctx.graph, 1234 + point))
            Jh = _flat(dh, paths, paths, sizes)
            Iw = _flat(dw, paths, keys, sizes)
            J = Jh if J is None else J | Jh
            immediate = Iw if immediate is None else immediate | Iw
        pattern = immediate
        for _ in range(n - 1):
            grown = pattern | ((J.astype(np.float32) @ pattern.astype(np.float32)) > 0)
            if np.array_equal(grown, pattern):
                break
            pattern = grown
    out: Pattern = {}
    row = 0
    row_of = {}
    for p in paths:
        row_of[p] = row
        row += sizes[p]
    col = 0
    for k in keys:
        out[k] = {}
        for p in paths:
            block = pattern[row_of[p] : row_of[p] + sizes[p], col : col + sizes[k]]
            out[k][p] = block.reshape(shapes[k][p][0])
        col += sizes[k]
    return out


def check_n(n: Any) -> int:
    """``n`` as an ``int >= 1`` (a ``TypeError``/``ValueError`` naming the value otherwise)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"SnAp: n must be an int >= 1 (the number of steps of the pattern), got {n!r}.")
    if n < 1:
        raise ValueError(f"SnAp: n must be an int >= 1 (the number of steps of the pattern), got {n!r}.")
    return int(n)


def snap(
    n: int = 1, max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES, model_name: str = "the model"
) -> LearningRule:
    """The SnAp-n rule over the relations' trainable inputs (see the module docstring)."""
    n = check_n(n)
    limit = check_max_bytes(max_influence_bytes, "SnAp")
    cache: dict[int, tuple[ETraceGraph, dict[tuple[Any, StatePath], Any]]] = {}

    def indices(ctx: RuleContext) -> dict[tuple[Any, StatePath], Any]:
        hit = cache.get(id(ctx.graph))
        if hit is not None and hit[0] is ctx.graph:
            return hit[1]
        shapes = influence_shapes(ctx, "relations")
        pattern = snap_pattern(ctx, n)
        out = {}
        for key, per_path in pattern.items():
            for path, mask in per_path.items():
                h_ndim = len(ctx.graph.module_info.hidden_path_to_outvar[path].aval.shape)  # type: ignore[attr-defined]
                shape = shapes[key][path][0]
                columns = int(np.prod(shape[h_ndim:], dtype=np.int64))
                flat = np.flatnonzero(mask.reshape(-1))
                out[key, path] = (flat, flat // columns, flat % columns, shape, columns)
        cache.clear()  # one graph at a time: a recompiled learner replaces it
        cache[id(ctx.graph)] = (ctx.graph, out)
        return out

    def dense(ctx: RuleContext, traces: SnApTrace) -> dict[Any, dict[StatePath, jax.Array]]:
        index = indices(ctx)
        out: dict[Any, dict[StatePath, jax.Array]] = {}
        for key, row in zip(traces.keys, traces.values, strict=True):
            for path, vals in zip(traces.paths, row, strict=True):
                flat, _, _, shape, _ = index[key, path]
                size = int(np.prod(shape, dtype=np.int64))
                block = jnp.zeros(size, vals.dtype).at[flat].set(vals, unique_indices=True)
                out.setdefault(key, {})[path] = block.reshape(shape)
        return out

    def gather(ctx: RuleContext, traces: SnApTrace, blocks: Mapping[Any, Mapping[StatePath, jax.Array]]) -> SnApTrace:
        index = indices(ctx)
        vals = tuple(tuple(jnp.reshape(blocks[k][p], -1)[index[k, p][0]] for p in traces.paths) for k in traces.keys)
        return SnApTrace(traces.keys, traces.paths, vals)

    def init_traces(ctx: RuleContext) -> SnApTrace:
        size = influence_bytes(ctx, "relations")
        if size > limit:
            raise CompilationError(
                f"SnAp: the dense influence matrix dh/dtheta of {model_name}, which each step computes "
                f"before masking, would take {size} bytes ({size / 2**20:.1f} MiB), above "
                f"max_influence_bytes={limit}; use a smaller model or batch, raise max_influence_bytes, "
                "or use D_RTRL."
            )
        index = indices(ctx)
        shapes = influence_shapes(ctx, "relations")
        keys, paths = tuple(shapes), _floating_paths(ctx)
        vals = tuple(tuple(host_zeros((len(index[k, p][0]),), shapes[k][p][1]) for p in paths) for k in keys)
        return SnApTrace(keys, paths, vals)

    def update_traces(ctx: RuleContext, traces: SnApTrace, values: StepValues) -> tuple[SnApTrace, Any]:
        old = dense(ctx, traces)
        history = propagate_influence(ctx, values, old, "relations", immediate=False)  # J M^{t-1}
        immediate = propagate_influence(ctx, values, old, "relations", history=False)  # I^t
        total = {k: {p: history[k][p] + immediate[k][p] for p in history[k]} for k in history}
        # M^t = P_n * (J M^{t-1} + I^t); the residual also holds P_n * (J M^{t-1}), the part beyond the VJP's
        new = gather(ctx, traces, total)
        return new, (new, gather(ctx, traces, history))

    def trace_gradients(ctx: RuleContext, residual: Any, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        full, without_immediate = residual
        grads = {}
        for key in full.keys:
            # the step's VJP holds dL/dh^t I^t, except for the keys left out of it (their only route is h)
            source = full if ctx.keeps_instantaneous(*key) else without_immediate
            grads[key] = _contract_key(ctx, source, key, dL_dh)
        return as_targets(grads, "relations")

    def _contract_key(ctx: RuleContext, traces: SnApTrace, key: Any, dL_dh: HiddenCotangents) -> jax.Array:
        index = indices(ctx)
        row = traces.values[traces.keys.index(key)]
        total: jax.Array | None = None
        for path, vals in zip(traces.paths, row, strict=True):
            _, rows, cols, shape, columns = index[key, path]
            g = jnp.reshape(dL_dh[path], -1).astype(vals.dtype)
            part = jnp.zeros(columns, vals.dtype).at[cols].add(g[rows] * vals)
            part = part.reshape(shape[jnp.ndim(dL_dh[path]) :])
            total = part if total is None else total + part
        assert total is not None, "a relation drives at least one hidden state"
        return total

    def window_start_gradients(
        ctx: RuleContext, traces: SnApTrace, values: StepValues, dL_dh: HiddenCotangents
    ) -> RelationGradients:
        grads = {key: _contract_key(ctx, traces, key, dL_dh) for key in traces.keys}
        out: RelationGradients = as_targets(grads, "relations")
        return out

    def trace_of(ctx: RuleContext, traces: SnApTrace, index: int) -> dict[str, dict[StatePath, jax.Array]]:
        """``{trainable key: {hidden path: dense masked dh/dtheta}}`` of relation ``index``."""
        blocks = dense(ctx, traces)
        return {key: blocks[(r, key)] for r, key in traces.keys if r == index}

    return LearningRule(
        name=f"SnAp-{n}",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=trace_gradients,
        window_start_gradients=window_start_gradients,
        trace_of=trace_of,
    )


class SnAp(ETraceAlgorithm):
    r"""SnAp-n: RTRL with the influence restricted to the entries reached in ``n`` steps (Menick et al. 2021).

    :math:`M^t = \mathcal{P}_n \odot (J^t M^{t-1} + I^t)` over the relations' trainable inputs, with the
    static pattern :math:`\mathcal{P}_n` of the step's Jacobians (see :mod:`etp_algorithms._snap`); the
    gradient is :math:`\partial L^t/\partial h^t\, M^t`. ``n=1`` keeps the immediate pattern; ``n`` as
    large as the recurrence's reach keeps everything (exact RTRL over the relations).

    Memory held between steps: the pattern's entries only. Per step: the dense influence transiently,
    :math:`2P` JVPs of the step (as :class:`RTRL`).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    n : int
        The pattern's number of steps, ``>= 1`` (default 2, as braintrace 0.2.8's ``SnAp``).
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
    max_influence_bytes : int
        The largest dense influence accepted (computed transiently each step); default 1 GiB.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key
        braintrace 0.2.8's engine keywords (:mod:`etp_algorithms._peer_keywords`): ``trace_dtype`` is the
        traces' storage dtype, ``config`` must describe this learner, the others are checked and kept.
    snap_max_jacobian_elements : int
        braintrace 0.2.8's limit on its block Jacobian, which SnAp here does not build (its limit is
        ``max_influence_bytes``); checked and kept.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import SnAp
    >>> cell = etp_nn.VanillaRNNCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = SnAp(cell, n=1)
    >>> _ = learner.compile_graph(jnp.zeros(2))
    >>> mask = learner.pattern[(0, "weight")][("h",)]  # dh/dW of shape (hidden, inputs + hidden, hidden)
    >>> mask.shape, int(mask.sum())  # n=1: W[j, k] reaches unit k only
    ((3, 5, 3), 15)
    >>> grads = brainstate.transform.grad(lambda: jnp.sum(learner(jnp.ones(2))), cell.states(brainstate.ParamState))()
    """

    def __init__(
        self,
        model: Any,
        n: int = 2,
        name: str | None = None,
        vjp_method: str = "single-step",
        max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
        *,
        control_flow: ControlFlowPolicy | None = None,
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        config: Any = None,
        random_feedback_key: Any = None,
        snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS,
    ) -> None:
        n = check_n(n)
        limit = check_max_bytes(max_influence_bytes, "SnAp")
        keywords = (fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements)
        peer = PeerKeywords(type(self).__name__, *keywords, own_options={"n": n})
        super().__init__(
            model,
            snap(n, limit, model_name=type(model).__name__),
            name=name,
            vjp_method=vjp_method,
            control_flow=control_flow,
            peer_keywords=peer,
        )
        self.n = n
        self.max_influence_bytes = limit

    @property
    def pattern(self) -> Pattern:
        """The static pattern :math:`\\mathcal{P}_n`: ``(relation, key) -> {hidden path: bool mask}`` (dense shapes)."""
        return snap_pattern(self.context, self.n)
