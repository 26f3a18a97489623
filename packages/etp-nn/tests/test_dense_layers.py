"""SignedWLinear, ScaledWSLinear, SparseLinear, LoRA, Embedding: formula, batching, transformations, dtype, marker.

References are written out in NumPy from the layer's parameters (no XLA compilation, so the tests stay fast).
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit.sparse as ss
from nn_testing import param_leaves_reaching_etp

import etp_nn

BATCHES = [None, (2, 3)]  # unbatched, and two leading batch axes (one axis is covered by the vmap tests)


def _x(rng: np.random.Generator, batch: tuple[int, ...] | None, n: int) -> np.ndarray:
    return rng.normal(size=(*(batch or ()), n))


def _close(actual: Any, want: Any) -> None:
    np.testing.assert_allclose(np.asarray(actual), want, rtol=1e-12, atol=1e-12)


def _check_transforms(layer: Any, xs: np.ndarray, want: np.ndarray) -> None:
    """Batched call, ``jit`` and ``vmap`` (over the first axis, i.e. unbatched calls) agree with ``want``."""
    x = jnp.asarray(xs)
    out = layer(x)
    _close(out, want)
    _close(jax.jit(lambda v: layer(v))(x), want)
    _close(jax.vmap(layer)(x), want)
    _close(layer(x[0]), want[0])
    assert out.dtype == jnp.float64


# ---------------------------------------------------------------------------------------------------------------
# SignedWLinear


@pytest.mark.parametrize(("sign_kind", "bias"), [(None, True), ("per_input", False), ("full", True)])
@pytest.mark.parametrize("batch", BATCHES)
def test_signed_formula(
    rng: np.random.Generator, sign_kind: str | None, bias: bool, batch: tuple[int, ...] | None
) -> None:
    w, b = rng.normal(size=(3, 5)), rng.normal(size=(5,))
    if sign_kind is None:
        sign, sign_full = None, np.ones((3, 5))
    elif sign_kind == "per_input":
        sign = np.array([1.0, -1.0, 1.0])
        sign_full = np.broadcast_to(sign[:, None], (3, 5))
    else:
        sign = np.where(rng.uniform(size=(3, 5)) > 0.5, 1.0, -1.0)
        sign_full = sign
    layer = etp_nn.SignedWLinear(3, 5, w_init=w, w_sign=sign, b_init=b if bias else None)
    x = _x(rng, batch, 3)
    y = layer(jnp.asarray(x))
    _close(y, x @ (np.abs(w) * sign_full) + (b if bias else 0.0))
    assert y.dtype == jnp.float64
    assert set(layer.weight.value) == ({"weight", "bias"} if bias else {"weight"})


def test_signed_transforms_and_marker(rng: np.random.Generator) -> None:
    w, sign = rng.normal(size=(3, 5)), np.array([1.0, 1.0, -1.0])
    layer = etp_nn.SignedWLinear(3, 5, w_init=w, w_sign=sign, b_init=np.zeros(5))
    xs = _x(rng, (4,), 3)
    _check_transforms(layer, xs, xs @ (np.abs(w) * sign[:, None]))
    x = jnp.asarray(xs)
    assert param_leaves_reaching_etp(layer, x) == {("weight", "weight"): {"etp_mm"}, ("weight", "bias"): {"etp_mm"}}
    assert param_leaves_reaching_etp(layer, x[0]) == {("weight", "weight"): {"etp_mv"}, ("weight", "bias"): {"etp_mv"}}


def test_signed_errors() -> None:
    layer = etp_nn.SignedWLinear(3, 5, w_init=np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"SignedWLinear: x must have 3 features .* got shape \(4, 2\)"):
        layer(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"SignedWLinear: w_sign must be broadcastable to shape \(3, 5\).*\(2, 5\)"):
        etp_nn.SignedWLinear(3, 5, w_sign=np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"SignedWLinear: w_init must give an array of shape \(3, 5\).*\(5, 3\)"):
        etp_nn.SignedWLinear(3, 5, w_init=np.ones((5, 3)))


# ---------------------------------------------------------------------------------------------------------------
# ScaledWSLinear


def _standardised(w: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """The documented formula: per output column, centre over inputs and divide by sqrt(fan_in * var + eps)."""
    fan_in = w.shape[0]
    mean = w.mean(axis=0)
    var = ((w - mean) ** 2).mean(axis=0)
    return gain * (w - mean) / np.sqrt(fan_in * var + eps)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch", BATCHES)
def test_scaled_ws_formula(rng: np.random.Generator, masked: bool, batch: tuple[int, ...] | None) -> None:
    w, b, gain = rng.normal(size=(3, 5)), rng.normal(size=(5,)), rng.uniform(0.5, 2.0, size=(5,))
    mask = (rng.uniform(size=(3, 5)) > 0.3).astype(float) if masked else None
    layer = etp_nn.ScaledWSLinear(3, 5, w_init=w, b_init=b, w_mask=mask, eps=1e-3)
    layer.weight.value = {**layer.weight.value, "gain": jnp.asarray(gain)}
    w_eff = _standardised(w, gain, 1e-3) * (mask if masked else 1.0)
    x = _x(rng, batch, 3)
    y = layer(jnp.asarray(x))
    _close(y, x @ w_eff + b)
    assert y.dtype == jnp.float64


def test_scaled_ws_statistics_and_no_gain(rng: np.random.Generator) -> None:
    w = rng.normal(loc=3.0, size=(3, 5))
    layer = etp_nn.ScaledWSLinear(3, 5, w_init=w, b_init=None, ws_gain=False, eps=0.0)
    assert set(layer.weight.value) == {"weight"}
    w_hat = np.asarray(layer.standardized_weight())
    np.testing.assert_allclose(w_hat.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose((w_hat**2).sum(axis=0), 1.0, rtol=1e-12)  # unit column norm with gain 1, eps 0
    x = _x(rng, (4,), 3)
    _close(layer(jnp.asarray(x)), x @ _standardised(w, np.ones(5), 0.0))


def test_scaled_ws_transforms_and_marker(rng: np.random.Generator) -> None:
    w = rng.normal(size=(3, 5))
    mask = (rng.uniform(size=(3, 5)) > 0.5).astype(float)
    layer = etp_nn.ScaledWSLinear(3, 5, w_init=w, w_mask=mask)
    xs = _x(rng, (4,), 3)
    _check_transforms(layer, xs, xs @ (_standardised(w, np.ones(5), 1e-4) * mask))
    x = jnp.asarray(xs)
    leaves = {("weight", "weight"), ("weight", "bias"), ("weight", "gain")}
    assert param_leaves_reaching_etp(layer, x) == {k: {"etp_mm"} for k in leaves}
    assert param_leaves_reaching_etp(layer, x[0]) == {k: {"etp_mv"} for k in leaves}


def test_scaled_ws_errors() -> None:
    layer = etp_nn.ScaledWSLinear(3, 5, w_init=np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"ScaledWSLinear: x must have 3 features .* got shape \(2, 4\)"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"ScaledWSLinear: w_mask must be broadcastable to shape \(3, 5\)"):
        etp_nn.ScaledWSLinear(3, 5, w_mask=np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"ScaledWSLinear: eps must be a non-negative float"):
        etp_nn.ScaledWSLinear(3, 5, eps=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# SparseLinear

# one fixed (3, 5) pattern (8 stored values, an empty column, a full row), so every test reuses the compiled ops
_PATTERN = np.array([[1, 0, 1, 0, 1], [0, 0, 1, 0, 1], [1, 1, 1, 0, 1]], dtype=bool)


def _sparse_dense(rng: np.random.Generator) -> np.ndarray:
    return np.where(_PATTERN, rng.normal(size=_PATTERN.shape) + 3.0, 0.0)  # no accidental zero among stored values


@pytest.mark.parametrize(("fmt", "bias"), [(ss.CSR, True), (ss.CSC, False), (ss.COO, True)])
@pytest.mark.parametrize("batch", BATCHES)
def test_sparse_formula(rng: np.random.Generator, fmt: Any, bias: bool, batch: tuple[int, ...] | None) -> None:
    dense = _sparse_dense(rng)
    mat = fmt.fromdense(jnp.asarray(dense))
    b = rng.normal(size=(5,))
    layer = etp_nn.SparseLinear(mat, b_init=b if bias else None)
    assert layer.weight.value["weight"].shape == (mat.nse,) == (int(_PATTERN.sum()),)
    x = _x(rng, batch, 3)
    y = layer(jnp.asarray(x))
    _close(y, x @ dense + (b if bias else 0.0))
    assert y.dtype == jnp.float64
    # new values in storage order: the dense reference is built by saiunit from the same pattern
    new = rng.normal(size=(mat.nse,))
    layer.weight.value = {**layer.weight.value, "weight": jnp.asarray(new)}
    dense_new = np.asarray(mat.with_data(jnp.asarray(new)).todense())
    _close(layer(jnp.asarray(x)), x @ dense_new + (b if bias else 0.0))


def test_sparse_transforms_and_marker(rng: np.random.Generator) -> None:
    dense = _sparse_dense(rng)
    layer = etp_nn.SparseLinear(ss.CSR.fromdense(jnp.asarray(dense)), b_init=np.zeros(5))
    xs = _x(rng, (4,), 3)
    _check_transforms(layer, xs, xs @ dense)
    x = jnp.asarray(xs)
    want_mm = {("weight", "weight"): {"etp_sp_mm"}, ("weight", "bias"): {"etp_sp_mm"}}
    assert param_leaves_reaching_etp(layer, x) == want_mm
    want_mv = {("weight", "weight"): {"etp_sp_mv"}, ("weight", "bias"): {"etp_sp_mv"}}
    assert param_leaves_reaching_etp(layer, x[0]) == want_mv


def test_sparse_errors(rng: np.random.Generator) -> None:
    with pytest.raises(TypeError, match=r"SparseLinear: spar_mat must be a saiunit.sparse.CSR, CSC or COO .*ndarray"):
        etp_nn.SparseLinear(np.eye(3))
    with pytest.raises(TypeError, match=r"SparseLinear: spar_mat must be .* got ArrayImpl of shape \(3, 3\)"):
        etp_nn.SparseLinear(jnp.eye(3))
    layer = etp_nn.SparseLinear(ss.COO.fromdense(jnp.asarray(_sparse_dense(rng))))
    with pytest.raises(ValueError, match=r"SparseLinear: x must have 3 features .* got shape \(2, 5\)"):
        layer(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"SparseLinear: b_init must give an array of shape \(5,\)"):
        etp_nn.SparseLinear(ss.COO.fromdense(jnp.asarray(_sparse_dense(rng))), b_init=np.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize(("with_base", "bias"), [(False, True), (True, False)])
@pytest.mark.parametrize("batch", BATCHES)
def test_lora_formula(rng: np.random.Generator, with_base: bool, bias: bool, batch: tuple[int, ...] | None) -> None:
    B, A = rng.normal(size=(3, 2)), rng.normal(size=(2, 5))
    b, w0 = rng.normal(size=(5,)), rng.normal(size=(3, 5))
    base = etp_nn.Linear(3, 5, w_init=jnp.asarray(w0), b_init=None) if with_base else None
    layer = etp_nn.LoRA(3, 2, 5, alpha=0.5, base_module=base, B_init=B, A_init=A, b_init=b if bias else None)
    x = _x(rng, batch, 3)
    y = layer(jnp.asarray(x))
    _close(y, 0.5 * x @ B @ A + (b if bias else 0.0) + (x @ w0 if with_base else 0.0))
    assert y.dtype == jnp.float64
    assert set(layer.weight.value) == ({"lora_b", "lora_a", "bias"} if bias else {"lora_b", "lora_a"})


def test_lora_default_init_is_base(rng: np.random.Generator) -> None:
    base = etp_nn.Linear(3, 5, w_init=jnp.asarray(rng.normal(size=(3, 5))))
    layer = etp_nn.LoRA(3, 2, 5, base_module=base, B_init=rng.normal(size=(3, 2)))  # default A_init: zeros
    assert not np.any(np.asarray(layer.weight.value["lora_a"]))  # A starts at zero: the adapter is a no-op
    x = jnp.asarray(_x(rng, (4,), 3))
    _close(layer(x), np.asarray(base(x)))


def test_lora_transforms_and_marker(rng: np.random.Generator) -> None:
    B, A, w0 = rng.normal(size=(3, 2)), rng.normal(size=(2, 5)), rng.normal(size=(3, 5))
    base = etp_nn.Linear(3, 5, w_init=jnp.asarray(w0), b_init=jnp.zeros(5))
    layer = etp_nn.LoRA(3, 2, 5, alpha=2.0, base_module=base, B_init=B, A_init=A, b_init=np.zeros(5))
    xs = _x(rng, (4,), 3)
    _check_transforms(layer, xs, 2.0 * xs @ B @ A + xs @ w0)
    x = jnp.asarray(xs)
    for arg, lora, dense in ((x, "etp_lora_mm", "etp_mm"), (x[0], "etp_lora_mv", "etp_mv")):
        assert param_leaves_reaching_etp(layer, arg) == {
            ("weight", "lora_b"): {lora},
            ("weight", "lora_a"): {lora},
            ("weight", "bias"): {lora},
            ("base_module", "weight", "weight"): {dense},
            ("base_module", "weight", "bias"): {dense},
        }


def test_lora_errors() -> None:
    layer = etp_nn.LoRA(3, 2, 5, B_init=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"LoRA: x must have 3 features .* got shape \(2, 4\)"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"LoRA: A_init must give an array of shape \(2, 5\).*\(5, 2\)"):
        etp_nn.LoRA(3, 2, 5, A_init=np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"LoRA: lora_rank must be a positive int, got 0"):
        etp_nn.LoRA(3, 0, 5)
    with pytest.raises(TypeError, match=r"LoRA: alpha must be a Python number"):
        etp_nn.LoRA(3, 2, 5, alpha=jnp.ones(2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"LoRA: base_module must be callable .*\(\.\.\., 3\) to \(\.\.\., 5\)"):
        etp_nn.LoRA(3, 2, 5, base_module=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Embedding


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_embedding_formula(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    table = rng.normal(size=(7, 5))
    layer = etp_nn.Embedding(7, 5, w_init=table)
    ids = rng.integers(0, 7, size=shape)
    y = layer(jnp.asarray(ids))
    assert y.shape == (*shape, 5)
    _close(y, table[ids])
    assert y.dtype == jnp.float64
    _close(layer(ids), table[ids])  # NumPy ids (and Python ints) are accepted as well


def test_embedding_transforms_and_marker(rng: np.random.Generator) -> None:
    table = rng.normal(size=(7, 5))
    layer = etp_nn.Embedding(7, 5, w_init=table)
    ids = jnp.asarray(rng.integers(0, 7, size=(4,)))
    _close(jax.jit(lambda v: layer(v))(ids), table[np.asarray(ids)])
    _close(jax.vmap(layer)(ids), table[np.asarray(ids)])
    assert set(layer.weight.value) == {"weight"}
    assert param_leaves_reaching_etp(layer, ids) == {("weight", "weight"): {"etp_embedding"}}
    assert param_leaves_reaching_etp(layer, ids[0]) == {("weight", "weight"): {"etp_embedding"}}
    # under jit the ids are not concrete: an out-of-range id is clamped (mode='clip', as JAX's gather)
    _close(jax.jit(lambda v: layer(v))(jnp.array([1, 2, -1, 7])), table[[1, 2, 0, 6]])
    checked = etp_nn.Embedding(7, 5, w_init=table, mode="check")
    _close(jax.jit(lambda v: checked(v))(jnp.array([1, 6])), table[[1, 6]])
    with pytest.raises(Exception, match=r"indices must lie in \[0, 7\) .* from 1 to 7"):
        jax.jit(lambda v: checked(v))(jnp.array([1, 7])).block_until_ready()


def test_embedding_errors() -> None:
    layer = etp_nn.Embedding(7, 5, w_init=np.zeros((7, 5)))
    with pytest.raises(ValueError, match=r"Embedding: indices must lie in \[0, 7\) .* from 0 to 7 .* shape \(3,\)"):
        layer(jnp.array([0, 3, 7]))
    with pytest.raises(ValueError, match=r"Embedding: indices must lie in \[0, 7\) .* from -1 to 2"):
        layer(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match=r"Embedding: indices must be an integer array .* dtype float64"):
        layer(jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"Embedding: num_embeddings must be a positive int, got 0"):
        etp_nn.Embedding(0, 5)
    with pytest.raises(ValueError, match=r"Embedding: mode must be one of \('clip', 'check'\), got 'wrap'"):
        etp_nn.Embedding(3, 5, mode="wrap")


def test_default_initialisers() -> None:
    """The default initialisers give the documented shapes and the environment's float64."""
    # one random shape, (3, 5), so the random-number kernels compile once
    layers = {
        etp_nn.SignedWLinear(3, 5): {"weight": (3, 5)},
        etp_nn.ScaledWSLinear(3, 5): {"weight": (3, 5), "bias": (5,), "gain": (5,)},
        etp_nn.LoRA(3, 5, 2): {"lora_b": (3, 5), "lora_a": (5, 2)},
        etp_nn.Embedding(3, 5): {"weight": (3, 5)},
    }
    for layer, shapes in layers.items():
        assert isinstance(layer, brainstate.nn.Module)
        assert {k: tuple(v.shape) for k, v in layer.weight.value.items()} == shapes
        assert all(v.dtype == jnp.float64 for v in layer.weight.value.values())
