"""etp.embedding: a gather of rows (clamped, or checked), its VJP, and when its per-row D-RTRL trace is exact.

The D-RTRL tests drive a leaky integrator with the gathered rows, ``h^t = a * h^{t-1} + c * W[i^t]``
(``a`` per position and unit), and compare the gradient run from the primitive's rules with
``jax.grad`` through the unrolled loop (float64): exact when each position keeps its index, or when
the index changes only at steps with ``a = 0``; with changing indices and memory the documented
approximation (past sensitivities credited to the current row) is reproduced by the formula written out.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp_primitives as etp

Array = jax.Array
V, E = 7, 4


def _table(rng: np.random.Generator) -> Array:
    return jnp.asarray(rng.normal(size=(V, E)))


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_forward_jit_vmap_and_vjp(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    table = _table(rng)
    ids = rng.integers(0, V, size=shape)
    want = np.asarray(table)[ids]
    np.testing.assert_allclose(etp.embedding(jnp.asarray(ids), table), want, rtol=0)
    np.testing.assert_allclose(jax.jit(etp.embedding)(jnp.asarray(ids), table), want, rtol=0)
    np.testing.assert_allclose(etp.embedding(ids, table), want, rtol=0)  # NumPy ids
    cot = rng.normal(size=(*shape, E))
    _, pull = jax.vjp(lambda w: etp.embedding(jnp.asarray(ids), w), table)
    by_hand = np.zeros((V, E))
    np.add.at(by_hand, ids.reshape(-1), cot.reshape(-1, E))  # rows gathered twice get both cotangents
    np.testing.assert_allclose(pull(jnp.asarray(cot))[0], by_hand, rtol=1e-13)
    ids_b = jnp.asarray(rng.integers(0, V, size=(3, *shape)))
    mapped = jax.vmap(lambda i: etp.embedding(i, table))
    np.testing.assert_allclose(mapped(ids_b), np.asarray(table)[np.asarray(ids_b)], rtol=0)
    eqns = jax.make_jaxpr(mapped)(ids_b).jaxpr.eqns
    assert [e.primitive.name for e in eqns if etp.is_etp_primitive(e.primitive)] == ["etp_embedding"]


def test_out_of_range_indices_are_clamped_by_default(rng: np.random.Generator) -> None:
    table = _table(rng)
    ids = jnp.array([-3, -1, 0, V - 1, V, V + 5])
    want = np.asarray(table)[[0, 0, 0, V - 1, V - 1, V - 1]]  # clamped; a negative id is not counted from the end
    np.testing.assert_allclose(etp.embedding(ids, table), want, rtol=0)
    np.testing.assert_allclose(jax.jit(etp.embedding)(ids, table), want, rtol=0)
    g = jax.grad(lambda w: jnp.sum(etp.embedding(ids, w)))(table)
    np.testing.assert_allclose(g[:, 0], [3, 0, 0, 0, 0, 0, 3], rtol=0)


def test_check_mode_raises_eagerly_and_under_jit(rng: np.random.Generator) -> None:
    table = _table(rng)
    msg = r"embedding \(etp_embedding\): indices must lie in \[0, 7\) .* from -1 to 3 .* \(mode='check'\)"
    with pytest.raises(ValueError, match=msg):
        etp.embedding(jnp.array([-1, 3]), table, mode="check")
    checked = jax.jit(lambda i, w: etp.embedding(i, w, mode="check"))
    np.testing.assert_allclose(checked(jnp.array([1, 6]), table), np.asarray(table)[[1, 6]], rtol=0)
    with pytest.raises(Exception, match=r"indices must lie in \[0, 7\) .* from 2 to 9") as info:
        checked(jnp.array([2, 9]), table).block_until_ready()
    assert isinstance(info.value, (ValueError, jax.errors.JaxRuntimeError))


def test_bad_arguments_are_named(rng: np.random.Generator) -> None:
    table = _table(rng)
    with pytest.raises(TypeError, match=r"embedding \(etp_embedding\): indices must be an integer array .* float64"):
        etp.embedding(jnp.array([0.0, 1.0]), table)
    with pytest.raises(ValueError, match=r"mode must be one of \('clip', 'check'\), got 'wrap'"):
        etp.embedding(jnp.array([0]), table, mode="wrap")
    with pytest.raises(ValueError, match=r"weight must have shape \(num_embeddings, embedding_size\)"):
        etp.embedding(jnp.array([0]), jnp.ones(3))
    q = etp.embedding(jnp.array([1]), table * u.mV, weight_fn=lambda w: 2 * w)
    assert u.get_unit(q) == u.mV
    np.testing.assert_allclose(u.get_mantissa(q), 2 * np.asarray(table)[[1]], rtol=1e-13)


def _eqn(ids: Array, table: Array) -> Any:
    eqns = jax.make_jaxpr(etp.embedding)(ids, table).jaxpr.eqns
    return next(e for e in eqns if e.primitive is etp.etp_embedding_p)


def _online(ids: Array, table: Array, a: Array, c: Array, r: Array) -> Array:
    """D-RTRL from the primitive's rules; ``ids`` (T, B), ``a`` (T, B, E)."""
    eqn = _eqn(ids[0], table)
    p, params = eqn.primitive, eqn.params
    rules = etp.require_rules(p)
    trace = {
        k: v[..., 0]
        for k, v in rules["init_drtrl"](eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1]}, 1).items()
    }
    assert trace["weight"].shape == (ids.shape[1], E)  # per gathered row: no vocabulary axis
    grad, h = jnp.zeros_like(table), jnp.zeros((ids.shape[1], E))
    for t in range(ids.shape[0]):
        h = a[t] * h + c * etp.embedding(ids[t], table)
        trace = rules["yw_to_w"](a[t], trace, **params)
        seed = etp.drtrl_seed(p, ids[t], c, {"weight": table}, params)
        trace = {"weight": trace["weight"] + seed["weight"]}
        grad = grad + etp.drtrl_grad(p, ids[t], r * jnp.cos(h), trace, {"weight": table}, params)["weight"]
    return grad


def _bptt(ids: Array, table: Array, a: Array, c: Array, r: Array) -> Array:
    def loss(w: Array) -> Array:
        h, total = jnp.zeros((ids.shape[1], E)), jnp.zeros(())
        for t in range(ids.shape[0]):
            h = a[t] * h + c * w[ids[t]]
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    return jax.grad(loss)(table)


def _rel(got: Array, want: Array) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _leak(rng: np.random.Generator, T: int, B: int) -> tuple[Array, Array, Array]:
    a = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.95, size=(B, E))), (T, B, E))
    return a, jnp.asarray(rng.uniform(0.2, 1.0, size=(B, E))), jnp.asarray(rng.normal(size=(B, E)))


def test_drtrl_is_exact_when_each_position_keeps_its_index(rng: np.random.Generator) -> None:
    T, B = 8, 4
    table = _table(rng)
    ids = jnp.broadcast_to(jnp.asarray([3, 0, 3, 6]), (T, B))  # two positions share row 3
    a, c, r = _leak(rng, T, B)
    assert _rel(_online(ids, table, a, c, r), _bptt(ids, table, a, c, r)) < 1e-10


def test_drtrl_is_exact_when_the_index_changes_only_where_the_memory_is_cut(rng: np.random.Generator) -> None:
    """Sequences of 3 steps, each with its own index, the state reset (a = 0) at each sequence start."""
    T, B = 9, 3
    table = _table(rng)
    per_sequence = rng.integers(0, V, size=(3, B))
    ids = jnp.asarray(np.repeat(per_sequence, 3, axis=0))
    a, c, r = _leak(rng, T, B)
    a = a.at[jnp.array([3, 6])].set(0.0)
    assert _rel(_online(ids, table, a, c, r), _bptt(ids, table, a, c, r)) < 1e-10


def test_with_changing_indices_and_memory_past_sensitivities_go_to_the_current_row(rng: np.random.Generator) -> None:
    T, B = 6, 3
    table = _table(rng)
    ids = jnp.asarray(rng.integers(0, V, size=(T, B)))
    ids = ids.at[1].set((ids[0] + 1) % V)  # the index changes at least once at every position
    a, c, r = _leak(rng, T, B)
    got = _online(ids, table, a, c, r)
    assert _rel(got, _bptt(ids, table, a, c, r)) > 1e-3  # not the exact gradient
    # the documented approximation, written out: e^t = a e^{t-1} + c regardless of the index,
    # dL/dW[v] = sum_t sum_{p: i_p^t = v} g_p^t e_p^t
    e, h = np.zeros((B, E)), np.zeros((B, E))
    want = np.zeros((V, E))
    for t in range(T):
        e = np.asarray(a[t]) * e + np.asarray(c)
        h = np.asarray(a[t]) * h + np.asarray(c) * np.asarray(table)[np.asarray(ids[t])]
        np.add.at(want, np.asarray(ids[t]), np.asarray(r) * np.cos(h) * e)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_xy_to_dw_is_the_vjp_and_refuses_filtered_indices(rng: np.random.Generator) -> None:
    table = _table(rng)
    ids = jnp.asarray(rng.integers(0, V, size=(5,)))
    eqn = _eqn(ids, table)
    rule = etp.ETP_RULES_XY_TO_DW[etp.etp_embedding_p]
    cot = jnp.asarray(rng.normal(size=(5, E)))
    _, pull = jax.vjp(lambda w: w[ids], table)
    np.testing.assert_allclose(rule(ids, cot, {"weight": table}, **eqn.params)["weight"], pull(cot)[0], rtol=1e-13)
    with pytest.raises(
        TypeError, match=r"xy_to_dw rule got an input of dtype float64.*Train embedding weights with D-RTRL"
    ):
        rule(0.5 * ids, cot, {"weight": table}, **eqn.params)
