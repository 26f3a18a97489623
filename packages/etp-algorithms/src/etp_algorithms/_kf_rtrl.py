r"""KF-RTRL: Kronecker-factored real-time recurrent learning (Mujika, Meier & Steger, 2018).

For a dense relation :math:`y = \hat x W` (:math:`\hat x = [x, 1]` when the relation has a bias,
:math:`\hat x \in \mathbb{R}^{K}`, :math:`y \in \mathbb{R}^{N}`) feeding one hidden group of one
state position-wise (:math:`h_n` depends on :math:`y_n` only, :math:`D_f = \partial h/\partial y`),
the influence of :math:`W` on the hidden states of one sample is
:math:`M^t = \partial F/\partial h\, M^{t-1} + \hat x^t \otimes \mathrm{diag}(D_f^t)`, which keeps
a Kronecker form :math:`M \approx u \otimes A` (:math:`u \in \mathbb{R}^K`, :math:`A` of shape
``(hidden, N)``) under the random-sign update

.. math::

    u^t = c_1 p_1 u^{t-1} + c_2 p_2 \hat x^t, \qquad
    A^t = \frac{c_1}{p_1} \frac{\partial F}{\partial h} A^{t-1} + \frac{c_2}{p_2}\mathrm{diag}(D_f^t),

with :math:`c_1, c_2 \in \{\pm 1\}` independent random signs of each sample at each step (so
:math:`\mathbb{E}[u^t \otimes A^t] = u^{t-1}\otimes \partial F/\partial h A^{t-1} + \hat x^t\otimes
\mathrm{diag}(D_f^t)`: unbiased), and the variance-minimising scales of the paper's Lemma
(:math:`\rho = \sqrt{\lVert B\rVert/\lVert a\rVert}` for a term :math:`a\otimes B`)

.. math::

    p_1 = \sqrt{\frac{\lVert \partial F/\partial h\, A^{t-1}\rVert}{\lVert u^{t-1}\rVert + \epsilon}} + \epsilon,
    \qquad p_2 = \sqrt{\frac{\lVert D_f^t\rVert}{\lVert \hat x^t\rVert + \epsilon}} + \epsilon.

:math:`A` spans every floating hidden state of the model (``A[path]`` of shape
``(*h_path.shape, N)``), so the influence of a layer's weights on the next layers is kept too.
The gradient of step :math:`t`'s loss is the step's own VJP plus, per sample :math:`b`,
:math:`u_b^{t-1} \otimes (g_b^\top A_b^{t-1})` with :math:`g = \partial L^t/\partial h^{t-1}`
(the ``hidden_cotangents='previous'`` contract); the last entry of :math:`u` is the bias's factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

import etp_primitives as etp
from etp_compiler import CompilationError, HiddenParamOpRelation, StatePath

from ._executor import StepValues
from ._rtrl import _floating_paths
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext
from ._rule_helpers import host_zeros
from ._transition import hidden_transition
from ._uoro import RandomProjectionLearner, as_key_data, checked_epsilon

__all__ = ["KF_RTRL", "KF_RTRLTrace", "kf_rtrl"]

_DENSE = (etp.etp_mm_p, etp.etp_mv_p)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KF_RTRLTrace:
    r"""The Kronecker factors :math:`u \otimes A` of every dense relation, and the random key.

    Attributes
    ----------
    relations : tuple of int
        The relation indices (static, graph order).
    paths : tuple
        The floating hidden paths (static).
    impl : str
        The key's PRNG implementation (static).
    u : tuple of jax.Array
        Per relation, of ``x``'s shape with one more feature when the relation has a bias: ``(B, K)``
        for ``etp_mm``, ``(K,)`` for ``etp_mv``.
    A : tuple of tuple of jax.Array
        ``A[i][j]`` of shape ``(*h_paths[j].shape, N)`` (``N`` the relation's output features).
    key : jax.Array
        The raw key data of the next step's draws.
    """

    relations: tuple[int, ...] = field(metadata={"static": True})
    paths: tuple[StatePath, ...] = field(metadata={"static": True})
    impl: str = field(metadata={"static": True})
    u: tuple[jax.Array, ...]
    A: tuple[tuple[jax.Array, ...], ...]
    key: jax.Array


def _check_relation(index: int, relation: HiddenParamOpRelation) -> None:
    """Refuse, naming the relation, what KF-RTRL cannot factor."""
    name = getattr(relation.primitive, "name", repr(relation.primitive))
    where = f"relation {index} ({name}, weight {relation.weight_path})"
    lead = "KF_RTRL: KF-RTRL factors the influence of a dense matmul y = xW as u (x) A;"
    if relation.primitive not in _DENSE:
        raise CompilationError(
            f"{lead} {where} is a {name}, not a dense matmul (etp_mm / etp_mv); use RTRL, UORO or D_RTRL for "
            "this model, or write the layer with etp.matmul."
        )
    if len(relation.hidden_groups) != 1 or relation.hidden_groups[0].num_state != 1:
        states = [p for g in relation.hidden_groups for p in g.hidden_paths]
        raise CompilationError(
            f"{lead} {where} feeds the hidden states {states}, not one group of one state (the factor A is "
            "dh/dy of one state); use RTRL or UORO for this model."
        )
    group = relation.hidden_groups[0]
    y_aval: Any = relation.y_var.aval
    if not relation.y_to_hidden_positionwise.get(group.index, False) or tuple(y_aval.shape) != tuple(group.varshape):
        raise CompilationError(
            f"{lead} {where} reaches its state {group.hidden_paths[0]} not position-wise (h_n from y_n alone, "
            f"y of shape {tuple(y_aval.shape)} against the state's {tuple(group.varshape)}); use RTRL or UORO."
        )
    x_aval: Any = getattr(relation.x_var, "aval", None)
    if x_aval is None or len(x_aval.shape) not in (1, 2):
        raise CompilationError(
            f"{lead} {where} has an input x of shape {getattr(x_aval, 'shape', None)}, not (K,) or (B, K)."
        )


def _norm(arrays: Any, axes: int) -> jax.Array:
    """Per-sample Euclidean norm over all the arrays (the first ``axes`` axes kept)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(a), axis=tuple(range(axes, a.ndim))) for a in arrays))


def _x_hat(relation: HiddenParamOpRelation, x: jax.Array) -> jax.Array:
    if "bias" in relation.trainable_vars:
        return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)
    return x


def kf_rtrl(projection_key: Any = 42, epsilon: float = 1e-7) -> LearningRule:
    """The KF-RTRL rule over the dense relations' trainable inputs (see the module docstring)."""
    key_data, impl = as_key_data(projection_key, "kf_rtrl")
    eps = checked_epsilon(epsilon, "kf_rtrl")

    def init_traces(ctx: RuleContext) -> KF_RTRLTrace:
        relations = ctx.graph.hidden_param_op_relations
        for index, relation in enumerate(relations):
            _check_relation(index, relation)
        paths = _floating_paths(ctx)
        outvars = ctx.graph.module_info.hidden_path_to_outvar
        us, As = [], []
        for relation in relations:
            x_aval: Any = relation.x_var.aval  # type: ignore[union-attr]
            k = x_aval.shape[-1] + (1 if "bias" in relation.trainable_vars else 0)
            us.append(host_zeros((*x_aval.shape[:-1], k), x_aval.dtype))
            n = relation.y_var.aval.shape[-1]  # type: ignore[attr-defined]
            As.append(tuple(host_zeros((*outvars[p].aval.shape, n), outvars[p].aval.dtype) for p in paths))  # type: ignore[attr-defined]
        return KF_RTRLTrace(tuple(range(len(relations))), paths, impl, tuple(us), tuple(As), jax.device_put(key_data))

    def update_traces(ctx: RuleContext, traces: KF_RTRLTrace, values: StepValues) -> tuple[KF_RTRLTrace, KF_RTRLTrace]:
        graph = ctx.graph
        minfo = graph.module_info
        F = hidden_transition(ctx, values, wrt="relations")
        paths = traces.paths
        hidden = {p: values.env[minfo.hidden_path_to_invar[p]] for p in minfo.hidden_path_to_outvar}
        fixed = {p: v for p, v in hidden.items() if p not in paths}
        h0 = {p: hidden[p] for p in paths}

        def floating(h: dict[StatePath, jax.Array]) -> dict[StatePath, jax.Array]:
            new = F({**fixed, **h}, {})
            return {p: new[p] for p in paths}

        _, linear = jax.linearize(floating, h0)
        key, draw = jax.random.split(jax.random.wrap_key_data(traces.key, impl=traces.impl))
        draws = jax.random.split(draw, max(len(traces.relations), 1))
        us, As = [], []
        for index, u, A in zip(traces.relations, traces.u, traces.A, strict=True):
            relation = graph.hidden_param_op_relations[index]
            group = relation.hidden_groups[0]
            x = _x_hat(relation, values.x_values[index]).astype(u.dtype)
            lead = x.ndim - 1  # 1 for a batch (etp_mm), 0 for etp_mv
            c = jax.random.rademacher(draws[index], (2, *x.shape[:-1]), u.dtype)
            # dF/dh A: one JVP per column of A (the relation's N outputs)
            JA = jax.vmap(linear, in_axes=-1, out_axes=-1)(dict(zip(paths, A, strict=True)))
            JA_t = tuple(JA[p].astype(a.dtype) for p, a in zip(paths, A, strict=True))
            Df = values.hidden_dims[(index, group.index)][..., 0]
            p1 = jnp.sqrt(_norm(JA_t, lead) / (_norm((u,), lead) + eps)) + eps
            p2 = jnp.sqrt(_norm((Df,), lead) / (_norm((x,), lead) + eps)) + eps
            c1, c2 = c[0], c[1]
            us.append(((c1 * p1)[..., None] * u + (c2 * p2)[..., None] * x).astype(u.dtype))
            own = group.hidden_paths[0]
            scale1, scale2 = c1 / p1, c2 / p2
            new_A = []
            for p, ja in zip(paths, JA_t, strict=True):
                a = scale1.reshape(scale1.shape + (1,) * (ja.ndim - lead)) * ja
                if p == own:
                    diag = Df[..., :, None] * jnp.eye(Df.shape[-1], dtype=ja.dtype)
                    a = a + scale2.reshape(scale2.shape + (1, 1)) * diag
                new_A.append(a.astype(ja.dtype))
            As.append(tuple(new_A))
        new = KF_RTRLTrace(traces.relations, paths, traces.impl, tuple(us), tuple(As), jax.random.key_data(key))
        # the backward pass contracts the old factors (M^{t-1}) with dL^t/dh^{t-1}
        return new, traces

    def gradients(
        ctx: RuleContext, traces: KF_RTRLTrace, values: StepValues, dL_dh: HiddenCotangents
    ) -> RelationGradients:
        grads: RelationGradients = {}
        for index, u, A in zip(traces.relations, traces.u, traces.A, strict=True):
            relation = ctx.graph.hidden_param_op_relations[index]
            lead = u.ndim - 1
            # G_b = sum_p g_{b,p}^T A_{b,p}: contract each state's (non-sample) axes
            G = etp.pairwise_sum(
                [
                    jnp.sum(dL_dh[p].astype(a.dtype)[..., None] * a, axis=tuple(range(lead, a.ndim - 1)))
                    for p, a in zip(traces.paths, A, strict=True)
                ]
            )
            full = jnp.einsum("...k,...n->kn", u, jnp.asarray(G).astype(u.dtype))
            out = {"weight": full[: relation.trainable_vars["weight"].aval.shape[0]]}  # type: ignore[attr-defined]
            if "bias" in relation.trainable_vars:
                out["bias"] = full[-1]
            grads[index] = out
        return grads

    def trace_of(ctx: RuleContext, traces: KF_RTRLTrace, index: int) -> dict[str, Any]:
        """``{'u': u, 'A': {path: A}}`` of relation ``index``."""
        i = traces.relations.index(index)
        return {"u": traces.u[i], "A": dict(zip(traces.paths, traces.A[i], strict=True))}

    return LearningRule(
        name="KF_RTRL",
        init_traces=init_traces,
        update_traces=update_traces,
        trace_gradients=gradients,
        window_start_gradients=gradients,
        trace_of=trace_of,
        hidden_cotangents="previous",
        gradient_targets="relations",
    )


class KF_RTRL(RandomProjectionLearner):
    r"""Kronecker-factored RTRL: an unbiased estimate :math:`u\otimes A` of each dense relation's influence.

    For every relation :math:`y = \hat x W` (``etp.matmul``, :math:`\hat x = [x, 1]` with a bias, so
    the bias is the last row of the factored weight) feeding one state position-wise, each sample
    carries :math:`u` (``K`` entries) and :math:`A` (hidden states by ``N`` outputs) with
    :math:`\mathbb{E}[u\otimes A] = \mathrm{d}h/\mathrm{d}W`:

    .. math::

        u^t = c_1 p_1 u^{t-1} + c_2 p_2 \hat x^t, \qquad
        A^t = \frac{c_1}{p_1}\frac{\partial F}{\partial h}A^{t-1} + \frac{c_2}{p_2}\mathrm{diag}(D_f^t),

    :math:`c_1, c_2 = \pm 1` drawn per sample and step from a key held in the traces,
    :math:`p_1, p_2` the variance-minimising scales (see :mod:`etp_algorithms._kf_rtrl`). The
    gradient adds :math:`\sum_b u_b^{t-1}\otimes(g_b^\top A_b^{t-1})`,
    :math:`g = \partial L^t/\partial h^{t-1}`, to the step's own VJP.

    Unbiased: the gradient of every dense relation's weight and bias, for any model whose trainable
    ETP ops are all dense matmuls feeding one state each position-wise (a vanilla RNN, a GRU, stacks
    of them; :math:`\partial F/\partial h` is the step's full Jacobian, across layers). Approximate:
    each draw (variance growing with the sequence length). Weights with no relation (a GRU's reset
    gate) get their instantaneous gradient only. A model with another trainable ETP op (element-wise,
    conv, sparse, LoRA) or a relation feeding several states (an LSTM's cell) is refused at compile
    with a :class:`etp_compiler.CompilationError` naming the relation.

    Memory per relation: :math:`O(B\,(K + H N))` (batch, inputs, all hidden units, outputs), twice
    during a step. Compute: :math:`N` JVPs of the step per relation per step (one linearisation).

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    projection_key : jax.Array or int
        A JAX PRNG key (:func:`jax.random.key` / :func:`jax.random.PRNGKey`) or an ``int`` seed
        (default 42): the start of the key sequence of the signs (a reset starts it again).
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: windows of steps, exact inside, the factors at the window's start across.
    epsilon : float
        The guard :math:`\epsilon` of :math:`p_1, p_2`.
    projection_eps : float, optional
        braintrace 0.2.8's name for ``epsilon``; when given, it is the guard used.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements
        braintrace 0.2.8's engine keywords, as :class:`~etp_algorithms.UORO` takes them (``trace_dtype``: the
        traces' storage dtype; ``config`` must describe this learner; the others are checked and kept).

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import KF_RTRL
    >>> cell = etp_nn.VanillaRNNCell(2, 3)
    >>> _ = brainstate.nn.init_all_states(cell, batch_size=4)
    >>> learner = KF_RTRL(cell, projection_key=jax.random.key(0))
    >>> _ = learner.compile_graph(jnp.zeros((4, 2)))
    >>> _ = learner(jnp.ones((4, 2)))
    >>> factors = learner.get_etrace_of(cell.W.weight)
    >>> factors["u"].shape, factors["A"][("h",)].shape  # (B, in + hidden + 1), (B, hidden, N)
    ((4, 6), (4, 3, 3))
    """

    _rule_factory = staticmethod(kf_rtrl)
