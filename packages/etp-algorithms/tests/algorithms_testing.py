"""Shared models and oracles of the learner tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit.sparse as ss

import etp_primitives as etp

Array = jax.Array


class Euler(brainstate.nn.Module):
    """A leaky integrator integrated with ``k`` Euler sub-steps of a ``lax.scan`` (a per-sub-step input too).

    ``recurrent``: a recurrent weight inside the loop too; ``jitter``: the input of the op changes per
    sub-step (a scanned input added to ``x``); ``reverse``: the scan runs over its inputs backwards.
    """

    def __init__(
        self,
        k: int,
        recurrent: bool = False,
        jitter: bool = False,
        B: int | None = 2,
        I: int = 3,
        H: int = 4,
        reverse: bool = False,
    ) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.k, self.recurrent, self.reverse = k, recurrent, reverse
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, H))) * 0.5)
        if recurrent:
            self.u = brainstate.ParamState(jnp.asarray(rng.normal(size=(H, H))) * 0.3)
        self.noise = jnp.asarray(rng.normal(size=(k, H))) * 0.1
        self.jitter = jnp.asarray(rng.normal(size=(k, I))) * (0.5 if jitter else 0.0)
        self.h = brainstate.HiddenState(jnp.zeros((H,) if B is None else (B, H)))  # B=None: one sample

    def update(self, x: Array) -> Array:
        def sub_step(h: Array, scanned: tuple[Array, Array]) -> tuple[Array, None]:
            noise, jitter = scanned
            drive = etp.matmul(x + jitter, self.w.value) + noise
            if self.recurrent:
                drive = drive + etp.matmul(jnp.tanh(h), self.u.value)
            return h + (-h + drive) * (2.0 / self.k), None

        self.h.value = jax.lax.scan(sub_step, self.h.value, (self.noise, self.jitter), reverse=self.reverse)[0]
        return self.h.value


class Driven(brainstate.nn.Module):
    def __init__(
        self, op: Callable[..., Array], weights: dict[str, Array], leak: Array, h_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.op, self.leak = op, leak
        self.w = brainstate.ParamState(weights)
        self.h = brainstate.HiddenState(jnp.zeros(h_shape))

    def update(self, x: Any) -> Array:
        self.h.value = self.leak * self.h.value + self.op(x, self.w.value)
        return self.h.value


def _cases(
    rng: np.random.Generator,
) -> dict[str, tuple[Callable[..., Array], dict[str, Array], Array | None, Array, tuple[int, ...]]]:
    def normal(*shape: int) -> Array:
        return jnp.asarray(rng.normal(size=shape))

    T, B, I, O = 16, 3, 4, 5
    per_unit = jnp.asarray(rng.uniform(0.5, 0.95, size=O))
    dense = np.where(rng.uniform(size=(I, O)) < 0.5, rng.normal(size=(I, O)), 0.0)
    csr = ss.CSR.fromdense(jnp.asarray(dense))
    c1 = dict(strides=(1,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    c2 = dict(strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return {
        "mm+bias": (lambda x, w: etp.matmul(x, w["weight"], w["bias"]), {"weight": normal(I, O), "bias": normal(O)}, normal(T, B, I), per_unit, (B, O)),
        "mv+bias": (lambda x, w: etp.matmul(x, w["weight"], w["bias"]), {"weight": normal(I, O), "bias": normal(O)}, normal(T, I), per_unit, (O,)),
        "elemwise-batched": (lambda x, w: etp.element_wise(w["weight"], fn=jnp.tanh) * x, {"weight": normal(O)}, normal(T, B, O), per_unit, (B, O)),
        "sparse-csr+bias": (lambda x, w: etp.sparse_matmul(x, w["weight"], sparse_mat=csr, bias=w["bias"]), {"weight": normal(csr.nse), "bias": normal(O)}, normal(T, B, I), per_unit, (B, O)),
        "conv1d+bias": (lambda x, w: etp.conv(x, w["weight"], w["bias"], **c1), {"weight": normal(3, 2, 4), "bias": normal(4)}, normal(T, B, 6, 2), jnp.asarray(0.8), (B, 6, 4)),
        "conv2d+bias": (lambda x, w: etp.conv(x, w["weight"], w["bias"], **c2), {"weight": normal(2, 2, 2, 3), "bias": normal(3)}, normal(T, B, 4, 4, 2), jnp.asarray(0.7), (B, 4, 4, 3)),
        "lora+bias": (lambda x, w: etp.lora_matmul(x, w["lora_b"], w["lora_a"], alpha=0.7, bias=w["bias"]), {"lora_b": normal(I, 2), "lora_a": normal(2, O), "bias": normal(O)}, normal(T, B, I), jnp.asarray(0.85), (B, O)),
    }  # fmt: skip


CASES = list(_cases(np.random.default_rng(0)))


def _bptt(
    op: Callable[..., Array],
    weights: dict[str, Array],
    xs: Array,
    leak: Array,
    h_shape: tuple[int, ...],
    r: Array,
    steps: int,
) -> dict[str, Array]:
    def loss(w: dict[str, Array]) -> Array:
        h, total = jnp.zeros(h_shape), jnp.zeros(())
        for t in range(steps):
            h = leak * h + op(xs[t], w)
            total = total + jnp.sum(r * jnp.sin(h))
        return total

    return jax.grad(loss)(weights)


def _rel(got: Array, want: Array) -> float:
    return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-300))
