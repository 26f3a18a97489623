"""``FixedRandomFeedback`` and ``KappaFilter``, against the formulas written out (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etp_algorithms._feedback import FixedRandomFeedback, KappaFilter, check_kappa


def test_random_feedback_is_fixed_scaled_and_projects(rng: np.random.Generator) -> None:
    key = jax.random.PRNGKey(3)
    a = FixedRandomFeedback(2, 6, key, init_scale=0.3)
    b = FixedRandomFeedback(2, 6, key, init_scale=0.3)
    c = FixedRandomFeedback(2, 6, jax.random.PRNGKey(4), init_scale=0.3)
    assert a.matrix.shape == (6, 2)
    assert jnp.array_equal(a.matrix, b.matrix) and not jnp.allclose(a.matrix, c.matrix)
    assert jnp.allclose(a.matrix, 0.3 * jax.random.normal(key, (6, 2)), rtol=0, atol=1e-15)
    big = FixedRandomFeedback(200, 300, key, init_scale=0.1)
    assert abs(float(jnp.std(big.matrix)) - 0.1) < 0.005
    err = jnp.asarray(rng.normal(size=(4, 2)))
    want = np.einsum("bk,jk->bj", np.asarray(err), np.asarray(a.matrix))
    assert np.allclose(np.asarray(a.project(err)), want, rtol=0, atol=1e-12)
    assert "n_target=2" in repr(a)


def test_random_feedback_bad_input() -> None:
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="n_target must be a positive integer, got 0"):
        FixedRandomFeedback(0, 3, key)
    with pytest.raises(ValueError, match="init_scale must be > 0, got -1"):
        FixedRandomFeedback(2, 3, key, init_scale=-1.0)
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        FixedRandomFeedback(2, 3, "nokey")
    with pytest.raises(ValueError, match=r"trailing axis of size 2 \(n_target\), got shape \(4, 3\)"):
        FixedRandomFeedback(2, 3, key).project(jnp.zeros((4, 3)))


def test_kappa_filter_is_the_leaky_sum(rng: np.random.Generator) -> None:
    xs = rng.normal(size=(6, 3))
    f = KappaFilter({"e": jnp.zeros(3)}, 0.7)
    want = np.zeros(3)
    for x in xs:
        want = 0.7 * want + x
        got = f({"e": jnp.asarray(x)})
        assert np.allclose(np.asarray(got["e"]), want, rtol=0, atol=1e-12)
    assert np.allclose(np.asarray(f.value.value["e"]), want, rtol=0, atol=1e-12)
    f.reset_state()
    assert np.array_equal(np.asarray(f.value.value["e"]), np.zeros(3))
    zero = KappaFilter(jnp.zeros(3), 0.0)
    _ = zero(jnp.asarray(xs[0]))
    assert np.allclose(np.asarray(zero(jnp.asarray(xs[1]))), xs[1], rtol=0, atol=0)
    assert np.allclose(np.asarray(KappaFilter.step(jnp.asarray(xs[0]), jnp.asarray(xs[1]), 0.5)), 0.5 * xs[0] + xs[1])


@pytest.mark.parametrize("kappa", [1.0, -0.1, 2])
def test_kappa_outside_the_unit_interval_is_named(kappa: float) -> None:
    with pytest.raises(ValueError, match=rf"kappa must be in \[0, 1\).*got {float(kappa)!r}"):
        KappaFilter(jnp.zeros(2), kappa)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        check_kappa(kappa)


def test_kappa_filter_checks_the_structure() -> None:
    f = KappaFilter({"e": jnp.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="expected that of init_value"):
        f(jnp.zeros(2))
