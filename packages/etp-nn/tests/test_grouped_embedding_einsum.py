"""GroupedLinear and Embedding layers, and D_RTRL through einsum / grouped_matmul / embedding against BPTT.

Each learner test drives a leaky integrator (one leak per unit) with one op, ``h^t = a * h^{t-1} + y^t``,
and compares the gradient D_RTRL accumulates online (under ``jit``) with ``jax.grad`` through the
unrolled loop (float64).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import block_diag
from nn_testing import param_leaves_reaching_etp

import braintrace
import etp_nn
import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL

Array = jax.Array


def _block_diag(w: Array) -> Array:
    return block_diag(*[w[g] for g in range(w.shape[0])])


# ---------------------------------------------------------------------------------------------------------------
# GroupedLinear


def test_grouped_linear_formula_marker_and_reexport(rng: np.random.Generator) -> None:
    w = rng.normal(size=(3, 2, 4))
    b = rng.normal(size=12)
    layer = etp_nn.GroupedLinear(3, 6, 12, w_init=w, b_init=b)
    x = jnp.asarray(rng.normal(size=(5, 6)))
    np.testing.assert_allclose(layer(x), x @ _block_diag(jnp.asarray(w)) + b, rtol=1e-13)
    np.testing.assert_allclose(layer(x[0]), x[0] @ _block_diag(jnp.asarray(w)) + b, rtol=1e-13)
    np.testing.assert_allclose(jax.jit(lambda v: layer(v))(x), layer(x), rtol=1e-13)
    assert param_leaves_reaching_etp(layer, x) == {
        ("weight", "weight"): {"etp_grouped_mm"},
        ("weight", "bias"): {"etp_grouped_mm"},
    }
    assert param_leaves_reaching_etp(layer, x[0])[("weight", "weight")] == {"etp_grouped_mv"}
    assert braintrace.nn.GroupedLinear is etp_nn.GroupedLinear and "GroupedLinear" in braintrace.nn.__all__
    default = etp_nn.GroupedLinear(2, 4, 6)
    assert {k: v.shape for k, v in default.weight.value.items()} == {"weight": (2, 2, 3), "bias": (6,)}
    assert set(etp_nn.GroupedLinear(2, 4, 6, b_init=None).weight.value) == {"weight"}


def test_grouped_linear_errors() -> None:
    with pytest.raises(ValueError, match=r"GroupedLinear: in_features=5 is not divisible by num_groups=2"):
        etp_nn.GroupedLinear(2, 5, 4)
    with pytest.raises(ValueError, match=r"GroupedLinear: out_features=3 is not divisible by num_groups=2"):
        etp_nn.GroupedLinear(2, 4, 3)
    with pytest.raises(ValueError, match=r"GroupedLinear: num_groups must be a positive int, got 0"):
        etp_nn.GroupedLinear(0, 4, 4)
    with pytest.raises(ValueError, match=r"GroupedLinear: x must have 4 features"):
        etp_nn.GroupedLinear(2, 4, 4)(jnp.ones((3, 5)))
    with pytest.raises(TypeError, match=r"param_type must be brainstate.ParamState"):
        etp_nn.GroupedLinear(2, 4, 4, param_type=dict)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# D_RTRL through the three ops, against BPTT


class Leaky(brainstate.nn.Module):
    """``h^t = a * h^{t-1} + drive(x^t)``, the drive a layer or an op on ``self.w``."""

    def __init__(self, drive: Any, leak: Array, h_shape: tuple[int, ...], weights: dict[str, Array] | None = None):
        super().__init__()
        self.drive, self.leak = drive, leak
        if weights is not None:
            self.w = brainstate.ParamState(weights)
        self.h = brainstate.HiddenState(jnp.zeros(h_shape))

    def update(self, x: Any) -> Array:
        y = self.drive(x, self.w.value) if hasattr(self, "w") else self.drive(x)
        self.h.value = self.leak * self.h.value + y
        return self.h.value


def _online(model: Leaky, xs: Array, r: Array, learner_cls: Callable[..., Any] = D_RTRL) -> dict[Any, Array]:
    learner = learner_cls(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    assert len(learner.graph.hidden_param_op_relations) == 1
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x: brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), params)(x)
    )
    total: Any = None
    for t in range(xs.shape[0]):
        g = step(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return dict(total)


def _bptt(drive: Callable[[Any, Any], Array], weights: Any, xs: Array, leak: Array, r: Array) -> Any:
    def loss(w: Any) -> Array:
        h, total = jnp.zeros(r.shape), jnp.zeros(())
        for t in range(xs.shape[0]):
            h = leak * h + drive(xs[t], w)
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    return jax.grad(loss)(weights)


def _rel(got: Array, want: Array) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


EINSUMS = [("bi,io->bo", (3, 4), (4, 5)), ("ib,gio->bgo", (4, 3), (2, 4, 5)), ("bti,i->bt", (3, 2, 4), (4,))]


@pytest.mark.parametrize(("equation", "xs", "ws"), EINSUMS, ids=[e for e, _, _ in EINSUMS])
def test_d_rtrl_through_einsum_equals_bptt(
    equation: str, xs: tuple[int, ...], ws: tuple[int, ...], rng: np.random.Generator
) -> None:
    T = 6
    w = jnp.asarray(rng.normal(size=ws))
    inputs = jnp.asarray(rng.normal(size=(T, *xs)))
    y_shape = jnp.einsum(equation, inputs[0], w).shape
    leak = jnp.asarray(rng.uniform(0.5, 0.95, size=y_shape))
    r = jnp.asarray(rng.normal(size=y_shape))
    model = Leaky(lambda x, p: etp.einsum(equation, x, p["weight"]), leak, y_shape, {"weight": w})
    got = _online(model, inputs, r)[("w",)]["weight"]
    want = _bptt(lambda x, p: jnp.einsum(equation, x, p), w, inputs, leak, r)
    assert got.dtype == jnp.float64 and _rel(got, want) < 1e-10


def test_d_rtrl_through_grouped_linear_equals_bptt(rng: np.random.Generator) -> None:
    T, B = 6, 3
    layer = etp_nn.GroupedLinear(2, 6, 8, w_init=rng.normal(size=(2, 3, 4)), b_init=rng.normal(size=8))
    start = {k: jnp.copy(v) for k, v in layer.weight.value.items()}
    leak = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.95, size=8)), (B, 8))
    r = jnp.asarray(rng.normal(size=(B, 8)))
    inputs = jnp.asarray(rng.normal(size=(T, B, 6)))
    got = _online(Leaky(layer, leak, (B, 8)), inputs, r)[("drive", "weight")]
    want = _bptt(lambda x, p: x @ _block_diag(p["weight"]) + p["bias"], start, inputs, leak, r)
    for key in want:
        assert _rel(got[key], want[key]) < 1e-10, key


def test_d_rtrl_through_an_embedding_with_one_id_per_sequence_equals_bptt(rng: np.random.Generator) -> None:
    T, B, N, D = 7, 4, 9, 3
    table = rng.normal(size=(N, D))
    layer = etp_nn.Embedding(N, D, w_init=table)
    leak = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.95, size=D)), (B, D))
    r = jnp.asarray(rng.normal(size=(B, D)))
    ids = jnp.broadcast_to(jnp.asarray(rng.integers(0, N, size=B)), (T, B))  # one id per sequence
    learner = D_RTRL(Leaky(layer, leak, (B, D)))
    learner.compile_graph(ids[0])
    assert learner.get_etrace_of(layer.weight)[0]["weight"].shape == (B, D, 1)  # per gathered row
    got = _online(Leaky(layer, leak, (B, D)), ids, r)[("drive", "weight")]["weight"]
    want = _bptt(lambda i, w: w[i], jnp.asarray(table), ids, leak, r)
    assert _rel(got, want) < 1e-10


def test_es_d_rtrl_refuses_an_embedding_with_a_clear_error(rng: np.random.Generator) -> None:
    layer = etp_nn.Embedding(5, 3, w_init=rng.normal(size=(5, 3)))
    ids = jnp.zeros((2, 4), dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"embedding \(etp_embedding\).*Train embedding weights with D-RTRL"):
        _online(Leaky(layer, 0.8, (4, 3)), ids, jnp.ones((4, 3)), lambda m: ES_D_RTRL(m, 0.5))


def test_a_checked_embedding_runs_in_a_learner_and_raises_out_of_range(rng: np.random.Generator) -> None:
    layer = etp_nn.Embedding(5, 3, w_init=rng.normal(size=(5, 3)), mode="check")
    model = Leaky(layer, 0.8, (2, 3))
    learner = D_RTRL(model)
    learner.compile_graph(jnp.array([0, 1]))
    step = brainstate.transform.jit(lambda i: learner(i))
    np.testing.assert_allclose(step(jnp.array([4, 1])), 0.0 * 0.8 + np.asarray(layer.weight.value["weight"])[[4, 1]])
    with pytest.raises(Exception, match=r"indices must lie in \[0, 5\) .* from 1 to 5"):
        jax.block_until_ready(step(jnp.array([5, 1])))


def test_with_changing_ids_the_table_trace_is_exact_and_the_row_trace_is_not(rng: np.random.Generator) -> None:
    T, B, N, D = 6, 3, 5, 2
    table = rng.normal(size=(N, D))
    leak = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.95, size=D)), (B, D))
    r = jnp.asarray(rng.normal(size=(B, D)))
    ids = jnp.asarray(rng.integers(0, N, size=(T, B)))
    ids = ids.at[1].set((ids[0] + 1) % N)  # every position changes its id while its state remembers
    want = _bptt(lambda i, w: w[i], jnp.asarray(table), ids, leak, r)
    exact = etp_nn.Embedding(N, D, w_init=table, trace="table")
    assert param_leaves_reaching_etp(exact, ids[0]) == {("weight", "weight"): {"etp_mm"}}
    got_table = _online(Leaky(exact, leak, (B, D)), ids, r)[("drive", "weight")]["weight"]
    assert _rel(got_table, want) < 1e-10
    got_row = _online(Leaky(etp_nn.Embedding(N, D, w_init=table), leak, (B, D)), ids, r)[("drive", "weight")]["weight"]
    assert _rel(got_row, want) > 1e-3
    with pytest.raises(ValueError, match=r"Embedding: trace must be 'row' or 'table', got 'dense'"):
        etp_nn.Embedding(N, D, trace="dense")
    checked = etp_nn.Embedding(N, D, w_init=table, trace="table", mode="check")
    np.testing.assert_allclose(jax.jit(lambda i: checked(i))(jnp.array([0, 4])), table[[0, 4]], rtol=1e-13)
    with pytest.raises(Exception, match=r"indices must lie in \[0, 5\) .* from 0 to 5"):
        jax.block_until_ready(jax.jit(lambda i: checked(i))(jnp.array([0, 5])))


VMAP_CASES = {
    "einsum": (lambda x, w: etp.einsum("...i,io->...o", x, w), (4, 5), lambda rng, T, B: rng.normal(size=(T, B, 4))),
    "grouped": (lambda x, w: etp.grouped_matmul(x, w), (2, 2, 3), lambda rng, T, B: rng.normal(size=(T, B, 4))),
    "embedding": (etp.embedding, (6, 5), lambda rng, T, B: np.repeat(rng.integers(0, 6, size=(1, B)), T, axis=0)),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_a_vmapped_unbatched_learner_equals_the_batched_one(name: str, rng: np.random.Generator) -> None:
    """brainstate vmap of a one-sample D_RTRL learner (the op's batching rule keeps the marker) = the batched learner."""
    op, w_shape, make_inputs = VMAP_CASES[name]
    T, B = 4, 3
    w = jnp.asarray(rng.normal(size=w_shape))
    xs = jnp.asarray(make_inputs(rng, T, B))
    y_features = op(xs[0, 0], w).shape
    leak = jnp.asarray(rng.uniform(0.5, 0.95, size=y_features))
    r = jnp.asarray(rng.normal(size=(B, *y_features)))

    def drive(x: Any, p: Any) -> Array:
        return op(x, p["weight"])

    batched = Leaky(drive, leak, (B, *y_features), {"weight": w})
    learner_b = D_RTRL(batched)
    learner_b.compile_graph(xs[0])
    single = Leaky(drive, leak, y_features, {"weight": w})
    learner_s = D_RTRL(single)
    learner_s.compile_graph(xs[0, 0])
    single.h.value = jnp.broadcast_to(single.h.value, (B, *y_features))
    learner_s.etrace.value = jax.tree.map(lambda v: jnp.broadcast_to(v, (B, *jnp.shape(v))), learner_s.etrace.value)
    states = [single.h, learner_s.etrace]
    call_s = brainstate.transform.vmap(learner_s, in_axes=0, in_states={0: states}, out_states={0: states})
    total_b: Any = 0.0
    for t in range(T):
        g_b = brainstate.transform.grad(
            lambda x: jnp.sum(r * jnp.sin(learner_b(x))), batched.states(brainstate.ParamState)
        )(xs[t])
        g_s = brainstate.transform.grad(
            lambda x: jnp.sum(r * jnp.sin(call_s(x))), single.states(brainstate.ParamState)
        )(xs[t])
        np.testing.assert_allclose(g_s[("w",)]["weight"], g_b[("w",)]["weight"], rtol=1e-11, atol=1e-13)
        total_b = total_b + g_b[("w",)]["weight"]
    want = _bptt(drive, {"weight": w}, xs, leak, r)["weight"]
    assert _rel(total_b, want) < 1e-10
