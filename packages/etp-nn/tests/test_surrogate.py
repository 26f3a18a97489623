"""Surrogate spike functions: Heaviside forward, the documented derivative backward, transformations, dtypes."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp_nn


def _sigmoid_prime(x: np.ndarray, alpha: float) -> np.ndarray:
    sig = 1.0 / (1.0 + np.exp(-alpha * x))
    return alpha * sig * (1.0 - sig)


def _triangle(x: np.ndarray, width: float) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x) / width) / width


def _arctan_prime(x: np.ndarray, alpha: float) -> np.ndarray:
    return alpha / (2.0 * (1.0 + (math.pi / 2.0 * alpha * x) ** 2))


def _gaussian_prime(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-(x**2) / (2.0 * sigma**2)) / (math.sqrt(2.0 * math.pi) * sigma)


# (function, class, keyword, value, documented derivative)
CASES: list[
    tuple[Callable[..., Any], type[etp_nn.Surrogate], str, float, Callable[[np.ndarray, float], np.ndarray]]
] = [
    (etp_nn.surrogate.sigmoid, etp_nn.SigmoidSurrogate, "alpha", 4.0, _sigmoid_prime),
    (etp_nn.surrogate.sigmoid, etp_nn.SigmoidSurrogate, "alpha", 10.0, _sigmoid_prime),
    (etp_nn.surrogate.piecewise_linear, etp_nn.PiecewiseLinearSurrogate, "width", 1.0, _triangle),
    (etp_nn.surrogate.piecewise_linear, etp_nn.PiecewiseLinearSurrogate, "width", 0.3, _triangle),
    (etp_nn.surrogate.arctan, etp_nn.ArctanSurrogate, "alpha", 2.0, _arctan_prime),
    (etp_nn.surrogate.gaussian, etp_nn.GaussianSurrogate, "sigma", 0.5, _gaussian_prime),
]
IDS = [f"{fn.__name__}-{key}={value}" for fn, _, key, value, _ in CASES]
POINTS = np.array([-3.0, -1.0, -0.4, -0.1, -1e-9, 0.0, 1e-9, 0.05, 0.25, 0.7, 1.5, 4.0])


@pytest.mark.parametrize(("fn", "cls", "key", "value", "prime"), CASES, ids=IDS)
def test_forward_is_heaviside(fn: Any, cls: Any, key: str, value: float, prime: Any) -> None:
    x = jnp.asarray(POINTS)
    spikes = fn(x, **{key: value})
    np.testing.assert_array_equal(spikes, (POINTS > 0).astype(np.float64))
    assert spikes.dtype == jnp.float64 and spikes.shape == x.shape
    np.testing.assert_array_equal(cls(**{key: value})(x), spikes)


@pytest.mark.parametrize(("fn", "cls", "key", "value", "prime"), CASES, ids=IDS)
def test_grad_is_documented_derivative(fn: Any, cls: Any, key: str, value: float, prime: Any) -> None:
    want = prime(POINTS, value)
    grad = jax.vmap(jax.grad(lambda x: fn(x, **{key: value})))(jnp.asarray(POINTS))
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-300)
    assert grad.dtype == jnp.float64
    assert float(jax.grad(fn)(0.0, **{key: value})) > 0.0
    # the class form: same gradient, and .grad evaluates the same derivative
    surrogate = cls(**{key: value})
    np.testing.assert_allclose(jax.vmap(jax.grad(surrogate))(jnp.asarray(POINTS)), want, rtol=1e-12)
    np.testing.assert_allclose(surrogate.grad(jnp.asarray(POINTS)), want, rtol=1e-12)
    # jvp of an array input: tangent is g'(x) * t
    t = jnp.linspace(-1.0, 1.0, POINTS.size)
    _, tangent = jax.jvp(surrogate, (jnp.asarray(POINTS),), (t,))
    np.testing.assert_allclose(tangent, want * np.asarray(t), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(("fn", "cls", "key", "value", "prime"), CASES, ids=IDS)
def test_derivative_integrates_to_one(fn: Any, cls: Any, key: str, value: float, prime: Any) -> None:
    """g' is the derivative of a step from 0 to 1 (checked by a fine trapezoid sum of the autodiff gradient)."""
    x = jnp.linspace(-30.0, 30.0, 24_001)
    grad = jax.vmap(jax.grad(cls(**{key: value})))(x)
    total = float(jnp.trapezoid(grad, x))
    # arctan's heavy tails leave ~1/(pi^2 alpha L / 2) outside [-L, L]
    assert total == pytest.approx(1.0, abs=1e-2 if fn is etp_nn.surrogate.arctan else 1e-6)


@pytest.mark.parametrize(("fn", "cls", "key", "value", "prime"), CASES[::2] + CASES[-1:], ids=IDS[::2] + IDS[-1:])
def test_jit_and_vmap(fn: Any, cls: Any, key: str, value: float, prime: Any, rng: np.random.Generator) -> None:
    surrogate = cls(**{key: value})
    x = jnp.asarray(rng.normal(size=(4, 5)))
    eager = surrogate(x)
    np.testing.assert_array_equal(jax.jit(surrogate)(x), eager)
    np.testing.assert_array_equal(jax.vmap(surrogate)(x), eager)
    np.testing.assert_array_equal(jax.jit(lambda x: fn(x, **{key: value}))(x), eager)
    loss_grad = jax.grad(lambda x: jnp.sum(surrogate(x) * jnp.arange(5.0)))
    grad = loss_grad(x)
    np.testing.assert_allclose(jax.jit(loss_grad)(x), grad, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda r: jnp.sum(surrogate(r) * jnp.arange(5.0))))(x), grad)
    np.testing.assert_allclose(grad, prime(np.asarray(x), value) * np.arange(5.0), rtol=1e-12, atol=1e-300)


def test_shape_parameter_gets_no_gradient_and_may_be_traced() -> None:
    assert float(jax.grad(etp_nn.surrogate.sigmoid, argnums=1)(0.3, 4.0)) == 0.0
    grad = jax.jit(jax.grad(etp_nn.surrogate.sigmoid))(0.0, 8.0)
    assert float(grad) == pytest.approx(2.0, rel=1e-12)  # alpha / 4


def test_dtypes() -> None:
    x32 = jnp.asarray([-1.0, 1.0], dtype=jnp.float32)
    assert etp_nn.surrogate.sigmoid(x32).dtype == jnp.float32
    assert jax.grad(lambda x: etp_nn.surrogate.gaussian(x).sum())(x32).dtype == jnp.float32
    ints = etp_nn.surrogate.arctan(jnp.asarray([-1, 0, 2]))
    assert ints.dtype == jnp.float64
    np.testing.assert_array_equal(ints, [0.0, 0.0, 1.0])


def test_dimensionless_quantity_accepted_other_units_rejected() -> None:
    ratio = (jnp.asarray([0.5, 1.5]) * u.mV - 1.0 * u.mV) / (1.0 * u.mV)
    np.testing.assert_array_equal(etp_nn.surrogate.sigmoid(ratio), [0.0, 1.0])
    np.testing.assert_array_equal(etp_nn.surrogate.sigmoid(u.Quantity(jnp.asarray([-1.0, 1.0]))), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"sigmoid: x must be dimensionless .* unit mV"):
        etp_nn.surrogate.sigmoid(jnp.asarray([0.5]) * u.mV)


def test_classes_are_frozen_hashable_values() -> None:
    a, b = etp_nn.SigmoidSurrogate(alpha=2.0), etp_nn.SigmoidSurrogate(alpha=2.0)
    assert a == b and hash(a) == hash(b) and a != etp_nn.SigmoidSurrogate()
    with pytest.raises(AttributeError):
        a.alpha = 3.0  # type: ignore[misc]
    assert etp_nn.SigmoidSurrogate().alpha == 4.0 and etp_nn.PiecewiseLinearSurrogate().width == 1.0
    # functools.partial of the function form is equivalent
    x = jnp.linspace(-1.0, 1.0, 7)
    partial = functools.partial(etp_nn.surrogate.sigmoid, alpha=2.0)
    np.testing.assert_array_equal(partial(x), a(x))
    np.testing.assert_allclose(jax.vmap(jax.grad(partial))(x), jax.vmap(jax.grad(a))(x), rtol=1e-15)
    # usable as a static jit argument
    apply = jax.jit(lambda x, f: f(x), static_argnums=1)
    np.testing.assert_array_equal(apply(jnp.asarray([-1.0, 2.0]), a), [0.0, 1.0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: etp_nn.SigmoidSurrogate(alpha=0.0), r"SigmoidSurrogate: alpha must be > 0"),
        (lambda: etp_nn.PiecewiseLinearSurrogate(width=-1.0), r"PiecewiseLinearSurrogate: width must be > 0"),
        (lambda: etp_nn.GaussianSurrogate(sigma=0.0), r"GaussianSurrogate: sigma must be > 0"),
        (lambda: etp_nn.surrogate.arctan(jnp.ones(2), alpha=-2.0), r"arctan: alpha must be > 0"),
    ],
)
def test_bad_shape_parameters(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_surrogate_is_an_importable_module() -> None:
    import importlib

    module = importlib.import_module("etp_nn.surrogate")
    assert module is etp_nn.surrogate
    assert set(module.__all__) == {
        "sigmoid", "piecewise_linear", "arctan", "gaussian", "Surrogate",
        "SigmoidSurrogate", "PiecewiseLinearSurrogate", "ArctanSurrogate", "GaussianSurrogate",
    }  # fmt: skip
    for name in ("Surrogate", "SigmoidSurrogate", "PiecewiseLinearSurrogate", "ArctanSurrogate", "GaussianSurrogate"):
        assert getattr(module, name) is getattr(etp_nn, name)
