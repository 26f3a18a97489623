"""Every registered learner on the ops of issue 18 (einsum, grouped_matmul, embedding).

A leaky integrator ``h' = a * h + op(x, W)`` (position-wise dynamics, feed-forward input) is the model
on which the per-unit learners are exact, so their online gradient (summed over the steps) equals
BPTT, ``jax.grad`` through the unrolled model (float64). The embedding reads one id per sample for the
whole sequence: with a changing id its per-row trace is an approximation (see ``etp_primitives``'
embedding). The other learners (approximations or estimates) must give finite, non-zero gradients,
and the ones that cannot run an op refuse it with an error naming it.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_algorithms
import etp_primitives as etp

B, I, H, V, T = 2, 4, 6, 5, 3
OPS = ("einsum", "grouped_matmul", "embedding")
#: Constructor options of the learners that need one.
OPTIONS: dict[str, dict[str, Any]] = {
    "es_d_rtrl": {"decay_or_rank": 0.8},
    "ottt": {"decay": 0.7},
    "uoro": {"projection_key": 0},
    "kf_rtrl": {"projection_key": 0},
    "rflo": {"feedback": "symmetric"},
}
#: Exact on a leaky integrator driven by a feed-forward op (equal to BPTT).
EXACT = {"d_rtrl", "rtrl", "snap", "ostl_recurrent", "three_factor", "rflo", "eprop"}
#: (learner, op) pairs refused with a clear error: (exception type, pattern of its message).
REFUSED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    **{("kf_rtrl", op): (Exception, "KF-RTRL factors the influence of a dense matmul") for op in OPS},
    ("snap", "embedding"): (Exception, r"SnAp: relation 0 \(etp_embedding, weight w\) takes integer inputs"),
    **{(name, "embedding"): (TypeError, "the input of an embedding is its integer indices")
       for name in ("es_d_rtrl", "ostl_feedforward", "ottt")},
}  # fmt: skip


class Leaky(brainstate.nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.op = op
        shape = {"einsum": (I, H), "grouped_matmul": (2, I // 2, H // 2), "embedding": (V, H)}[op]
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=shape)))
        self.a = jnp.linspace(0.5, 0.9, H)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros((batch_size or 1, H)))

    def update(self, x: jax.Array) -> jax.Array:
        if self.op == "einsum":
            y = etp.einsum("bi,ih->bh", x, self.w.value)
        elif self.op == "grouped_matmul":
            y = etp.grouped_matmul(x, self.w.value)
        else:
            y = etp.embedding(x, self.w.value)
        self.h.value = self.a * self.h.value + y
        return self.h.value


def _inputs(op: str) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(1)
    if op == "embedding":
        xs = jnp.asarray(np.broadcast_to(np.array([1, 3]), (T, B)).copy(), jnp.int32)  # one id per sample
    else:
        xs = jnp.asarray(rng.normal(size=(T, B, I)))
    return xs, jnp.asarray(rng.normal(size=(T, B, H)))


def _learners() -> list[str]:
    first: dict[type, str] = {}
    for name, cls in etp_algorithms.registered_learners().items():
        first.setdefault(cls, name)
    return sorted(first.values())


def _bptt(op: str, xs: jax.Array, ys: jax.Array) -> jax.Array:
    model = Leaky(op)
    brainstate.nn.init_all_states(model, batch_size=B)
    params = model.states(brainstate.ParamState)

    def loss() -> jax.Array:
        return sum(jnp.sum((model(xs[t]) - ys[t]) ** 2) for t in range(T))

    return brainstate.transform.grad(loss, params)()[("w",)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", _learners())
def test_every_learner_runs_the_new_ops(name: str, op: str) -> None:
    xs, ys = _inputs(op)
    model = Leaky(op)

    def build() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner = etp_algorithms.compile(model, name, xs[0], batch_size=B, **OPTIONS.get(name, {}))
        params = model.states(brainstate.ParamState)
        total: Any = 0.0
        for t in range(T):
            g = brainstate.transform.grad(lambda x, y=ys[t]: jnp.sum((learner(x) - y) ** 2), params)(xs[t])
            total = total + g[("w",)]
        return total

    if (name, op) in REFUSED:
        kind, message = REFUSED[(name, op)]
        with pytest.raises(kind, match=message):
            build()
        return
    got = build()
    assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.abs(got).max()) > 0
    if name in EXACT:
        want = _bptt(op, xs, ys)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)
