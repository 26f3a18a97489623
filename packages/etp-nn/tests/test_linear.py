"""Linear: the documented formula, batching, transformations, dtype, and the ETP marker."""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_testing import param_leaves_reaching_etp

import etp_nn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [None, (4,), (2, 3)])
def test_linear_formula(rng: np.random.Generator, bias: bool, batch: tuple[int, ...] | None) -> None:
    w = jnp.asarray(rng.normal(size=(3, 5)))
    b = jnp.asarray(rng.normal(size=(5,)))
    layer = etp_nn.Linear(3, 5, w_init=w, b_init=b if bias else None)
    x = jnp.asarray(rng.normal(size=(*(batch or ()), 3)))
    want = x @ w + (b if bias else 0.0)
    np.testing.assert_allclose(layer(x), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda x: layer(x))(x), want, rtol=1e-12)
    assert layer(x).dtype == jnp.float64


def test_linear_mask_and_vmap(rng: np.random.Generator) -> None:
    w = jnp.asarray(rng.normal(size=(3, 5)))
    mask = jnp.asarray(rng.uniform(size=(3, 5)) > 0.5, dtype=w.dtype)
    layer = etp_nn.Linear(3, 5, w_init=w, w_mask=mask)
    xs = jnp.asarray(rng.normal(size=(6, 3)))
    np.testing.assert_allclose(jax.vmap(layer)(xs), xs @ (w * mask), rtol=1e-12)
    assert param_leaves_reaching_etp(layer, xs) == {("weight", "weight"): {"etp_mm"}, ("weight", "bias"): {"etp_mm"}}
    assert param_leaves_reaching_etp(layer, xs[0]) == {("weight", "weight"): {"etp_mv"}, ("weight", "bias"): {"etp_mv"}}


def test_linear_wrong_features() -> None:
    layer = etp_nn.Linear(3, 5)
    with pytest.raises(ValueError, match=r"Linear: x must have 3 features .* got shape \(4, 2\)"):
        layer(jnp.ones((4, 2)))


def test_linear_parameter_structure() -> None:
    layer = etp_nn.Linear(3, 5)
    assert isinstance(layer.weight, brainstate.ParamState)
    assert set(layer.weight.value) == {"weight", "bias"}
    assert set(etp_nn.Linear(3, 5, b_init=None).weight.value) == {"weight"}
