"""The braintrace 0.2.8 keywords of the ops across the stack: the compiler finds the transformed weight, the learner is exact.

``matmul(x, w, b, weight_fn=f, bias_fn=g)`` (and ``kernel_fn`` on ``conv``, ``a_fn``/``b_fn`` on
``lora_matmul``, ``weight_fn`` on ``element_wise``) applies the transform inside the op, before the
marker. The compiler must trace the marker's trainable input back through the transform to the
ParamState, and D-RTRL must then learn the ParamState exactly where it is exact (leaky integrators
with a per-unit or scalar leak): oracle BPTT, ``jax.grad`` through the unrolled plain-JAX model with
the same transform, at 1e-10 in float64. Also: ``sparse_matmul`` with brainevent's CSR and CSC.
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
from jax import lax

import etp_compiler
import etp_primitives as etp
from etp_algorithms import D_RTRL

jax.config.update("jax_enable_x64", True)

Array = jax.Array
T, B, I, O = 5, 2, 3, 4
DN = ("NWC", "WIO", "NWC")


def _mask(shape: tuple[int, ...]) -> Array:
    return jnp.asarray(np.random.default_rng(3).random(shape) > 0.3, dtype=jnp.float64)


# name -> (etp op with keywords, the plain op with the transforms written out, weights, x shape, h shape, leak, primitive)
def _cases(rng: np.random.Generator) -> dict[str, tuple[Any, ...]]:
    def normal(*shape: int) -> Array:
        return jnp.asarray(rng.normal(size=shape))

    mask, kmask = _mask((I, O)), _mask((3, 2, O))
    per_unit = jnp.asarray(rng.uniform(0.5, 0.95, size=O))
    return {
        "matmul": (
            lambda x, w: etp.matmul(x, w["weight"], w["bias"], weight_fn=lambda v: jnp.tanh(v) * mask, bias_fn=jnp.exp),
            lambda x, w: x @ (jnp.tanh(w["weight"]) * mask) + jnp.exp(w["bias"]),
            {"weight": normal(I, O), "bias": normal(O)}, (B, I), (B, O), per_unit, etp.etp_mm_p,
        ),
        "conv": (
            lambda x, w: etp.conv(x, w["weight"], w["bias"], dimension_numbers=DN, kernel_fn=lambda k: k * kmask, bias_fn=jnp.tanh),
            lambda x, w: lax.conv_general_dilated(x, w["weight"] * kmask, (1,), "SAME", dimension_numbers=DN) + jnp.tanh(w["bias"]).reshape(1, 1, O),
            {"weight": normal(3, 2, O), "bias": normal(O)}, (B, 6, 2), (B, 6, O), jnp.asarray(0.8), etp.etp_conv_p,
        ),
        "lora": (
            lambda x, w: etp.lora_matmul(x, w["lora_b"], w["lora_a"], alpha=0.5, b_fn=jnp.tanh, a_fn=lambda a: a**2),
            lambda x, w: 0.5 * (x @ jnp.tanh(w["lora_b"]) @ w["lora_a"] ** 2),
            {"lora_b": normal(I, 2), "lora_a": normal(2, O)}, (B, I), (B, O), jnp.asarray(0.85), etp.etp_lora_mm_p,
        ),
        "element_wise": (
            lambda x, w: etp.element_wise(w["weight"], weight_fn=jnp.tanh) * x,
            lambda x, w: jnp.tanh(w["weight"]) * x,
            {"weight": normal(O)}, (B, O), (B, O), per_unit, etp.etp_elemwise_p,
        ),
    }  # fmt: skip


CASES = list(_cases(np.random.default_rng(0)))


class Driven(brainstate.nn.Module):
    def __init__(self, op: Callable[..., Array], weights: dict[str, Array], leak: Array, h_shape: tuple[int, ...]):
        super().__init__()
        self.op, self.leak = op, leak
        self.w = brainstate.ParamState(weights)
        self.h = brainstate.HiddenState(jnp.zeros(h_shape))

    def update(self, x: Array) -> Array:
        self.h.value = self.leak * self.h.value + self.op(x, self.w.value)
        return self.h.value


@pytest.mark.parametrize("name", CASES)
def test_compiler_traces_the_transformed_weight_to_its_param_state(name: str) -> None:
    op, _, weights, x_shape, h_shape, leak, primitive = _cases(np.random.default_rng(1))[name]
    model = Driven(op, weights, jnp.broadcast_to(leak, h_shape), h_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = etp_compiler.compile_etrace_graph(model, jnp.ones(x_shape))
    (relation,) = graph.hidden_param_op_relations
    assert relation.primitive is primitive
    assert relation.weight_path[0] == "w"


@pytest.mark.parametrize("name", CASES)
def test_d_rtrl_with_transforms_equals_bptt(name: str) -> None:
    rng = np.random.default_rng(2)
    op, plain, weights, x_shape, h_shape, leak, _ = _cases(rng)[name]
    leak = jnp.broadcast_to(leak, h_shape)
    xs = jnp.asarray(rng.normal(size=(T, *x_shape)))
    r = jnp.asarray(rng.normal(size=h_shape))

    model = Driven(op, weights, leak, h_shape)
    learner = D_RTRL(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    total: Any = None
    for t in range(T):
        g = brainstate.transform.grad(lambda x: jnp.sum(r * jnp.sin(learner(x))), params)(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    got = total[("w",)]

    def loss(w: dict[str, Array]) -> Array:
        h, value = jnp.zeros(h_shape), jnp.zeros(())
        for t in range(T):
            h = leak * h + plain(xs[t], w)
            value = value + jnp.sum(r * jnp.sin(h))
        return value

    want = jax.grad(loss)(weights)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == jnp.float64
        scale = float(jnp.max(jnp.abs(want[key])))
        assert float(jnp.max(jnp.abs(got[key] - want[key]))) <= 1e-10 * scale, key


@pytest.mark.parametrize("layout", ["CSR", "CSC"])
def test_sparse_matmul_takes_brainevent_matrices(layout: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brainevent = pytest.importorskip("brainevent")
    rng = np.random.default_rng(4)
    dense = np.where(rng.random((5, 3)) < 0.5, rng.normal(size=(5, 3)), 0.0)
    mat = getattr(brainevent, layout).fromdense(jnp.asarray(dense))
    assert etp.SparseStructure.from_sparse(mat).format == layout.lower()
    x = jnp.asarray(rng.normal(size=(2, 5)))
    data = jnp.asarray(mat.data)
    np.testing.assert_allclose(etp.sparse_matmul(x, data, sparse_mat=mat), x @ dense, rtol=1e-12, atol=1e-12)
    grad = jax.grad(lambda w: jnp.sum(etp.sparse_matmul(x, w, sparse_mat=mat, weight_fn=jnp.tanh)))(data)
    pattern = etp.SparseStructure.from_sparse(mat)
    want = jax.grad(lambda w: jnp.sum(x @ pattern.todense(jnp.tanh(w))))(data)
    np.testing.assert_allclose(grad, want, rtol=1e-12)
