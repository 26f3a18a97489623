r"""RTRL: exact real-time recurrent learning with the full influence matrix.

Write the model's step as :math:`h^t = F(h^{t-1}, \theta)`, with :math:`h` every
hidden state of the model (all groups, all layers, all positions and samples) and
:math:`\theta` every ParamState leaf the step reads. RTRL carries the influence
:math:`M^t = \mathrm{d}h^t/\mathrm{d}\theta` and propagates it with the *full*
Jacobian of the step (not its position-wise diagonal, as D-RTRL does):

.. math::

    M^t = \frac{\partial F}{\partial h}\Big|_t M^{t-1} + \frac{\partial F}{\partial \theta}\Big|_t,
    \qquad M^0 = 0.

The gradient of a loss :math:`L^t` of step :math:`t` is the step's own
(instantaneous) VJP plus the history term

.. math::

    \frac{\mathrm{d}L^t}{\mathrm{d}\theta} = \frac{\partial L^t}{\partial \theta}\Big|_{h^{t-1}}
        + \sum_{\text{paths } p} \Big\langle \frac{\partial L^t}{\partial h_p^{t-1}},\, M_p^{t-1} \Big\rangle,

which is the rule's ``hidden_cotangents='previous'`` contract. Over the ParamState
leaves (``gradient_targets='weights'``) this equals BPTT for any model the compiler
accepts: also a weight that reaches the hidden states only through another weight
(a GRU's reset gate) or through no ETP op at all.

Memory and compute
------------------
The influence of a leaf :math:`\theta_k` toward a hidden path :math:`p` has shape
``(*h_p.shape, *theta_k.shape)``: :math:`O(B\cdot N\cdot P)` for a batch :math:`B`,
:math:`N` hidden units and :math:`P` parameters, held in the hidden states' dtype
(and the old influence is kept as the residual of the step, so two copies live during
a step). Each step linearises :math:`F` once (:func:`jax.linearize`) and applies the
linear map to :math:`P` tangents :math:`(M^{t-1}_{:,j}, e_j)`, one per parameter
(``jax.vmap`` over the flattened parameter index of each leaf): the cost of :math:`P`
forward-mode passes (JVPs) of the step per step. Use it on small models, as the
oracle the approximate rules are checked against, or where the sequence is too long
for BPTT. The learner refuses, at compile, an influence above ``max_influence_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etp_compiler import CompilationError, ControlFlowPolicy, StatePath

from ._executor import StepValues
from ._learner import ETraceAlgorithm
from ._rule import HiddenCotangents, LearningRule, RuleContext
from ._rule_helpers import host_zeros
from ._transition import hidden_transition, trainable_inputs

__all__ = ["RTRL", "RTRLTrace", "influence_bytes", "influence_shapes", "propagate_influence", "rtrl"]

#: The default limit on the influence matrix: 1 GiB.
DEFAULT_MAX_INFLUENCE_BYTES = 2**30


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RTRLTrace:
    r"""The influence matrix :math:`M = \mathrm{d}h/\mathrm{d}\theta`, block by block.

    Attributes
    ----------
    keys : tuple
        The :math:`\theta` keys (static): ParamState leaves ``(state path, leaf key path)`` for
        ``wrt='weights'``, ``(relation index, trainable key)`` for ``wrt='relations'``.
    paths : tuple
        The hidden-state paths (static, ``module_info.hidden_path_to_outvar`` order; floating ones only).
    influence : tuple of tuple of jax.Array
        ``influence[i][j]`` of shape ``(*h_paths[j].shape, *theta_keys[i].shape)``: :math:`\mathrm{d}h_j/\mathrm{d}\theta_i`.
    """

    keys: tuple[Any, ...] = field(metadata={"static": True})
    paths: tuple[StatePath, ...] = field(metadata={"static": True})
    influence: tuple[tuple[jax.Array, ...], ...]

    def blocks(self) -> Iterator[tuple[Any, StatePath, jax.Array]]:
        """``(theta key, hidden path, block)`` for every block."""
        for key, row in zip(self.keys, self.influence, strict=True):
            for path, block in zip(self.paths, row, strict=True):
                yield key, path, block


def _floating_paths(ctx: RuleContext) -> tuple[StatePath, ...]:
    """Hidden paths whose state is floating point (integer states carry no influence)."""
    outvars = ctx.graph.module_info.hidden_path_to_outvar
    return tuple(p for p, v in outvars.items() if jnp.issubdtype(v.aval.dtype, jnp.inexact))  # type: ignore[attr-defined]


def _theta_avals(ctx: RuleContext, wrt: str) -> dict[Any, Any]:
    minfo = ctx.graph.module_info
    if wrt == "weights":
        return {leaf: var.aval for var, leaf in minfo.invar_to_weight_path.items()}
    return {
        (index, key): var.aval
        for index, relation in enumerate(ctx.graph.hidden_param_op_relations)
        for key, var in relation.trainable_vars.items()
    }


def influence_shapes(ctx: RuleContext, wrt: str = "weights") -> dict[Any, dict[StatePath, tuple[tuple[int, ...], Any]]]:
    """``theta key -> {hidden path: (shape, dtype)}`` of the dense influence blocks of ``ctx.graph``."""
    outvars = ctx.graph.module_info.hidden_path_to_outvar
    out: dict[Any, dict[StatePath, tuple[tuple[int, ...], Any]]] = {}
    for key, aval in _theta_avals(ctx, wrt).items():
        out[key] = {}
        for path in _floating_paths(ctx):
            h_aval: Any = outvars[path].aval
            out[key][path] = ((*h_aval.shape, *aval.shape), h_aval.dtype)
    return out


def influence_bytes(ctx: RuleContext, wrt: str = "weights") -> int:
    """Bytes of the dense influence matrix :math:`\\mathrm{d}h/\\mathrm{d}\\theta` of ``ctx.graph``."""
    return sum(
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        for per_path in influence_shapes(ctx, wrt).values()
        for shape, dtype in per_path.values()
    )


def propagate_influence(
    ctx: RuleContext,
    values: StepValues,
    influence: Mapping[Any, Mapping[StatePath, jax.Array]],
    wrt: str = "weights",
    history: bool = True,
    immediate: bool = True,
    mode: str | None = None,
) -> dict[Any, dict[StatePath, jax.Array]]:
    r"""One exact step :math:`M^t = \partial F/\partial h\, M^{t-1} + \partial F/\partial\theta`.

    ``influence[key][path]`` is the dense block of shape ``(*h.shape, *theta[key].shape)``; returns the
    new blocks (same keys and shapes). ``history=False`` leaves out the first term, ``immediate=False``
    the second. Two exact ways, chosen by their cost (``mode`` forces one):

    - ``'columns'`` (forward mode): :math:`F` is linearised once; for each :math:`\theta` key the linear
      map is vmapped over the flattened parameter index :math:`j` with tangents :math:`(M^{t-1}_{:, j},
      e_j)`: :math:`P` JVPs, whose batch the step's own batch structure keeps cheap.
    - ``'rows'`` (reverse mode, :func:`_propagate_by_rows`): one VJP per hidden entry, then a dense
      :math:`R \times R` by :math:`R \times P` product (:math:`R` hidden entries).

    The default picks ``'rows'`` when :math:`R^2 < 50\,(P + 6R)` (:func:`_cheaper_mode`): the rows cost
    is the product's :math:`R^2 P` multiply-adds at matrix-product speed; the columns cost is the
    :math:`P \times P` one-hot basis of the tangents and :math:`P` tangents of :math:`R` entries through
    the step's element-wise code, each element about 50 multiply-adds' worth of time (fitted to GRU and
    LIF steps from :math:`R = 128, P = 6208` to :math:`R = 1024, P = 13002` on the CI machine's CPU).
    """
    floating, h_float, theta = floating_transition(ctx, values, wrt)
    paths, hidden = list(h_float), h_float
    if mode is None:
        mode = _cheaper_mode(h_float, theta)
    if mode not in ("rows", "columns"):
        raise ValueError(f"propagate_influence: mode must be None, 'rows' or 'columns', got {mode!r}.")
    if mode == "rows":
        return _propagate_by_rows(floating, h_float, theta, influence, history, immediate)
    _, linear = jax.linearize(floating, h_float, theta)
    zeros = {k: jnp.zeros_like(v) for k, v in theta.items()}
    zero_h = {p: jnp.zeros_like(hidden[p]) for p in paths}
    new: dict[Any, dict[StatePath, jax.Array]] = {}
    for key, leaf in theta.items():
        size = int(np.prod(jnp.shape(leaf), dtype=np.int64))
        columns = {p: jnp.reshape(influence[key][p], (*jnp.shape(hidden[p]), size)) for p in paths}

        def column(m: dict[StatePath, jax.Array], j: jax.Array, key: Any = key, leaf: Any = leaf) -> Any:
            e = (jnp.arange(jnp.size(leaf)) == j).astype(leaf.dtype).reshape(jnp.shape(leaf))
            tangent_h = {p: m[p].astype(hidden[p].dtype) for p in paths} if history else zero_h
            return linear(tangent_h, {**zeros, key: e} if immediate else zeros)

        out = jax.vmap(column, in_axes=({p: -1 for p in paths}, 0), out_axes=-1)(columns, jnp.arange(size))
        new[key] = {p: jnp.reshape(out[p], jnp.shape(influence[key][p])).astype(influence[key][p].dtype) for p in paths}
    return new


def floating_transition(
    ctx: RuleContext, values: StepValues, wrt: str
) -> tuple[Any, dict[StatePath, Any], dict[Any, Any]]:
    """``(F, h, theta)``: the step as a function of its floating hidden states and trainable inputs alone
    (integer states held at ``values``), with their values at ``values``."""
    minfo = ctx.graph.module_info
    F = hidden_transition(ctx, values, wrt=wrt)
    paths = _floating_paths(ctx)
    hidden = {p: values.env[minfo.hidden_path_to_invar[p]] for p in minfo.hidden_path_to_outvar}
    fixed = {p: v for p, v in hidden.items() if p not in paths}

    def floating(h: dict[StatePath, jax.Array], w: dict[Any, jax.Array]) -> dict[StatePath, jax.Array]:
        new = F({**fixed, **h}, w)
        return {p: new[p] for p in paths}

    return floating, {p: hidden[p] for p in paths}, trainable_inputs(ctx, values, wrt=wrt)


def _cheaper_mode(hidden: Mapping[StatePath, jax.Array], theta: Mapping[Any, jax.Array]) -> str:
    """``'rows'`` when :math:`R^2 < 50 (P + 6R)` (see :func:`propagate_influence`), else ``'columns'``."""
    rows = sum(int(np.prod(jnp.shape(h), dtype=np.int64)) for h in hidden.values())
    columns = sum(int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in theta.values())
    return "rows" if rows * rows < 50 * (columns + 6 * rows) else "columns"


def _propagate_by_rows(
    floating: Any,
    hidden: dict[StatePath, jax.Array],
    theta: dict[Any, jax.Array],
    influence: Mapping[Any, Mapping[StatePath, jax.Array]],
    history: bool,
    immediate: bool,
) -> dict[Any, dict[StatePath, jax.Array]]:
    r""":func:`propagate_influence` by reverse mode, for fewer hidden entries :math:`R` than parameters :math:`P`.

    One VJP per hidden entry (:func:`jax.jacrev`) gives the rows of both :math:`\partial F/\partial h`
    (:math:`R \times R`) and :math:`\partial F/\partial\theta` (:math:`R \times P`); the history term is then
    one matrix product. The column form would push :math:`P` tangents (and a :math:`P \times P` one-hot
    basis) through the step: at a GRU of 32 units and batch 4 the copies of that basis alone took 60% of
    SnAp's step.
    """
    paths = list(hidden)
    sizes = {p: int(np.prod(jnp.shape(hidden[p]), dtype=np.int64)) for p in paths}
    jac = jax.jacrev(floating, argnums=(0, 1))(hidden, theta)
    # J[r, c] = dF_r/dh_c over the hidden entries of every path, in ``paths`` order
    J = jnp.concatenate(
        [jnp.concatenate([jnp.reshape(jac[q][0][p], (sizes[q], sizes[p])) for p in paths], axis=1) for q in paths],
        axis=0,
    )
    new: dict[Any, dict[StatePath, jax.Array]] = {}
    for key, leaf in theta.items():
        size = int(np.prod(jnp.shape(leaf), dtype=np.int64))
        total: Any = 0.0
        if immediate:
            total = jnp.concatenate([jnp.reshape(jac[q][1][key], (sizes[q], size)) for q in paths], axis=0)
        if history:
            M = jnp.concatenate([jnp.reshape(influence[key][p], (sizes[p], size)) for p in paths], axis=0)
            total = total + J @ M.astype(J.dtype)
        if not (history or immediate):
            total = jnp.zeros((sum(sizes.values()), size), J.dtype)
        new[key] = {}
        start = 0
        for p in paths:
            block = total[start : start + sizes[p]]
            start += sizes[p]
            new[key][p] = jnp.reshape(block, jnp.shape(influence[key][p])).astype(influence[key][p].dtype)
    return new


def contract_influence(
    influence: Mapping[Any, Mapping[StatePath, jax.Array]], dL_dh: HiddenCotangents
) -> dict[Any, jax.Array]:
    r"""``key -> sum_p <dL/dh_p, M[key][p]>`` (the contraction over each hidden state's axes)."""
    out: dict[Any, jax.Array] = {}
    for key, per_path in influence.items():
        total: Any = None
        for path, block in per_path.items():
            g = dL_dh[path]
            part = jnp.tensordot(g.astype(block.dtype), block, axes=jnp.ndim(g))
            total = part if total is None else total + part
        if total is not None:
            out[key] = total
    return out


def as_targets(grads: Mapping[Any, jax.Array], wrt: str) -> Any:
    """Gradients keyed by :math:`\\theta` key, as the rule's ``gradient_targets`` expect them."""
    if wrt == "weights":
        return dict(grads)
    by_relation: dict[int, dict[str, jax.Array]] = {}
    for (index, key), grad in grads.items():
        by_relation.setdefault(index, {})[key] = grad
    return by_relation


def _as_dict(traces: RTRLTrace) -> dict[Any, dict[StatePath, jax.Array]]:
    out: dict[Any, dict[StatePath, jax.Array]] = {}
    for key, path, block in traces.blocks():
        out.setdefault(key, {})[path] = block
    return out


def _of_dict(keys: tuple[Any, ...], paths: tuple[StatePath, ...], blocks: Mapping[Any, Any]) -> RTRLTrace:
    return RTRLTrace(keys, paths, tuple(tuple(blocks[k][p] for p in paths) for k in keys))


def check_max_bytes(value: Any, label: str) -> int:
    """``max_influence_bytes`` as a positive ``int`` (a ``TypeError``/``ValueError`` naming ``label`` otherwise)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{label}: max_influence_bytes must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{label}: max_influence_bytes must be a positive int, got {value!r}.")
    return int(value)


def rtrl(max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES, model_name: str = "the model") -> LearningRule:
    """The exact RTRL rule over the ParamState leaves (see the module docstring).

    ``init_traces`` raises :class:`etp_compiler.CompilationError` naming ``model_name``, the influence's
    byte count and the limit when the influence would exceed ``max_influence_bytes``.
    """
    limit = check_max_bytes(max_influence_bytes, "rtrl")

    def init_traces(ctx: RuleContext) -> RTRLTrace:
        size = influence_bytes(ctx, "weights")
        if size > limit:
            raise CompilationError(
                f"RTRL: the influence matrix dh/dtheta of {model_name} would take {size} bytes "
                f"({size / 2**20:.1f} MiB), above max_influence_bytes={limit}; use a smaller model or batch, "
                "raise max_influence_bytes, or use an approximate learner (D_RTRL, SnAp)."
            )
        shapes = influence_shapes(ctx, "weights")
        keys, paths = tuple(shapes), _floating_paths(ctx)
        return _of_dict(keys, paths, {k: {p: host_zeros(*shapes[k][p]) for p in paths} for k in keys})

    def update_traces(ctx: RuleContext, traces: RTRLTrace, values: StepValues) -> tuple[RTRLTrace, RTRLTrace]:
        new = propagate_influence(ctx, values, _as_dict(traces), "weights")
        # the backward pass contracts the old influence M^{t-1} with dL^t/dh^{t-1}
        return _of_dict(traces.keys, traces.paths, new), traces

    def gradients(ctx: RuleContext, traces: RTRLTrace, values: StepValues, dL_dh: HiddenCotangents) -> Any:
        return as_targets(contract_influence(_as_dict(traces), dL_dh), "weights")

    def trace_of(ctx: RuleContext, traces: RTRLTrace, index: int) -> dict[Any, dict[StatePath, jax.Array]]:
        """``{ParamState leaf: {hidden path: dh/dleaf}}`` of the leaves read by relation ``index``."""
        relation = ctx.graph.hidden_param_op_relations[index]
        leaves = ctx.graph.module_info.invar_to_weight_path
        read = [leaves[v] for jaxpr, _ in relation.weight_fns.values() for v in jaxpr.invars if v in leaves]
        influence = _as_dict(traces)
        return {leaf: influence[leaf] for leaf in read}

    return LearningRule(
        name="RTRL",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=gradients,
        # at a window's start the traces held are M^{start}: the same contraction with dL/dh^{start}
        window_start_gradients=gradients,
        trace_of=trace_of,
        hidden_cotangents="previous",
        gradient_targets="weights",
    )


class RTRL(ETraceAlgorithm):
    r"""Exact real-time recurrent learning: the full influence matrix :math:`\mathrm{d}h/\mathrm{d}\theta`.

    Propagates :math:`M^t = \partial F/\partial h\, M^{t-1} + \partial F/\partial\theta` over every
    hidden state of the model and every ParamState leaf of the step, with the full Jacobian of the
    step (see :mod:`etp_algorithms._rtrl`); the gradient adds
    :math:`\sum_p \langle\partial L^t/\partial h_p^{t-1}, M_p^{t-1}\rangle` to the step's own VJP.
    It equals BPTT for any model the compiler accepts.

    Memory: :math:`O(B\cdot N\cdot P)` (batch, hidden units, parameters), twice during a step.
    Compute: :math:`P` JVPs of the step per step (one linearisation, vmapped over the parameters).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: windows of steps (:class:`MultiStepData`), exact inside and across windows.
    max_influence_bytes : int
        The largest influence matrix accepted (default 1 GiB); a larger one is refused at compile
        with :class:`etp_compiler.CompilationError` giving its byte count.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import RTRL
    >>> cell = etp_nn.GRUCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = RTRL(cell)
    >>> _ = learner.compile_graph(jnp.zeros(2))
    >>> M = learner.get_etrace_of(cell.Wz.weight)  # dh/dW of the update gate's leaves
    >>> {leaf[1]: block[("h",)].shape for leaf, block in M.items()}  # (hidden, *leaf shape)
    {('weight',): (3, 5, 3), ('bias',): (3, 3)}
    >>> grads = brainstate.transform.grad(lambda: jnp.sum(learner(jnp.ones(2))), cell.states(brainstate.ParamState))()
    """

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
        *,
        control_flow: ControlFlowPolicy | None = None,
    ) -> None:
        limit = check_max_bytes(max_influence_bytes, "RTRL")
        super().__init__(
            model,
            rtrl(limit, model_name=type(model).__name__),
            name=name,
            vjp_method=vjp_method,
            control_flow=control_flow,
        )
        self.max_influence_bytes = limit
