"""SnAp-n: the influence restricted to the pattern reached in n steps.

Oracles: the immediate-influence pattern from ``jax.jacfwd`` of the executed step (computed here);
BPTT (``jax.grad`` through the unrolled model); D-RTRL where it is exact; and the masked-influence
rule of Menick et al. written out in this file (dense ``jax.jacfwd`` of the step, the mask grown here).
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import Driven, _rel
from test_multi_step import _bptt_of

import etp_nn
import etp_primitives as etp
from etp_algorithms import D_RTRL, ETraceVmap, MultiStepData, _rtrl
from etp_algorithms._snap import SnAp
from etp_algorithms.extend import execute_step

Array = jax.Array


class Ring(brainstate.nn.Module):
    """``h' = tanh(x W + c * roll(h) + h / 2)``: unit k reads unit k-1, so the pattern grows one unit per step."""

    def __init__(self, inputs: int = 3, units: int = 5, batch: int = 2) -> None:
        super().__init__()
        rng = np.random.default_rng(5)
        self.w = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(inputs, units)))})
        self.c = jnp.asarray(rng.uniform(0.5, 1.0, size=units))
        self.h = brainstate.HiddenState(jnp.zeros((batch, units)))

    def update(self, x: Array) -> Array:
        self.h.value = jnp.tanh(
            etp.matmul(x, self.w.value["weight"]) + self.c * jnp.roll(self.h.value, 1, -1) + self.h.value / 2
        )
        return self.h.value


class DrivenWithSkip(Driven):
    """A leaky integrator whose output also reads the weight directly (the weight is not hidden-only)."""

    def update(self, x: Any) -> Array:
        return super().update(x) + jnp.tanh(x @ self.w.value["weight"])


def _learner(model: Any, xs: Array, **options: Any) -> SnAp:
    learner = SnAp(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    return learner


def _online(learner: Any, xs: Array, target: Array) -> Any:
    return learner.etrace_grad(xs, target, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")


def _errors(got: Any, want: Any) -> list[float]:
    assert set(got) == set(want)
    return [_rel(a, b) for p in want for a, b in zip(jax.tree.leaves(got[p]), jax.tree.leaves(want[p]), strict=True)]


def _vanilla(rng: np.random.Generator, steps: int = 5) -> tuple[Any, Array, Array]:
    brainstate.random.seed(3)
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    return cell, jnp.asarray(rng.normal(size=(steps, 2, 3))), jnp.asarray(rng.normal(size=(steps, 2, 4)))


def test_snap1_pattern_is_the_immediate_influence(rng: np.random.Generator) -> None:
    cell, xs, _ = _vanilla(rng)
    learner = _learner(cell, xs, n=1)
    graph = learner.graph
    minfo = graph.module_info
    # the step at random points, differentiated with respect to each relation's trainable input (a leaf here);
    # the cell is a ReLU RNN, so one point has units off (accidental zeros): OR over 16 points
    points = [[jnp.asarray(rng.normal(size=v.aval.shape)) for v in minfo.jaxpr.invars] for _ in range(16)]
    (path,) = minfo.hidden_path_to_outvar
    pattern = learner.pattern
    nnz = 0
    one_point_misses = False
    for r, relation in enumerate(graph.hidden_param_op_relations):
        for key, var in relation.trainable_vars.items():
            i = next(i for i, v in enumerate(minfo.jaxpr.invars) if v is var)
            want = np.zeros(pattern[(r, key)][path].shape, bool)
            for invals in points:

                def step(leaf: Array, i: int = i, invals: list[Array] = invals) -> Array:
                    vals = list(invals)
                    vals[i] = leaf
                    return execute_step(graph, vals).state_values[path][0]

                nonzero = np.asarray(jax.jacfwd(step)(invals[i])) != 0
                one_point_misses |= not np.array_equal(nonzero | want, nonzero)
                want |= nonzero
            assert np.array_equal(pattern[(r, key)][path], want), (r, key)
            nnz += int(want.sum())
    assert one_point_misses  # a single point would not have been enough
    # W[j, k] (and bias[k]) reach unit k of every sample only: (7 + 1) * 4 entries per sample
    assert nnz == 2 * (7 + 1) * 4
    assert learner.trace_bytes() == nnz * 8  # only the masked entries are stored


@pytest.mark.parametrize("skip", [False, True])
def test_snap1_is_exact_on_a_leaky_integrator(skip: bool, rng: np.random.Generator) -> None:
    """Feed-forward input, position-wise leak: the true influence lies in the immediate pattern, so SnAp-1 is exact
    (as D-RTRL is); with the skip the weight also reaches the output directly (the VJP holds that term)."""
    weights = {"weight": jnp.asarray(rng.normal(size=(4, 5))), "bias": jnp.asarray(rng.normal(size=5))}
    leak = jnp.broadcast_to(jnp.asarray(rng.uniform(0.5, 0.95, size=5)), (3, 5))
    xs = jnp.asarray(rng.normal(size=(6, 3, 4)))
    target = jnp.asarray(rng.normal(size=(6, 3, 5)))

    def op(x: Array, w: Any) -> Array:
        return etp.matmul(x, w["weight"], w["bias"])

    make = DrivenWithSkip if skip else Driven
    model = make(op, weights, leak, (3, 5))
    want = _bptt_of(model, xs, target)
    got = _online(_learner(model, xs, n=1), xs, target)
    assert max(_errors(got, want)) < 1e-10
    if not skip:
        model = Driven(op, weights, leak, (3, 5))
        d_rtrl = D_RTRL(model)
        d_rtrl.compile_graph(xs[0])
        assert max(_errors(got, _online(d_rtrl, xs, target))) < 1e-10


def test_snap_with_a_full_pattern_equals_bptt_on_a_dense_rnn(rng: np.random.Generator) -> None:
    cell, xs, target = _vanilla(rng)
    want = _bptt_of(cell, xs, target)
    learner = _learner(cell, xs, n=4)  # n >= the number of hidden units
    assert all(mask.all() for per_path in learner.pattern.values() for mask in per_path.values())
    assert max(_errors(_online(learner, xs, target), want)) < 1e-10
    # SnAp-1 on the same network is an approximation (the guard that the test can fail)
    assert max(_errors(_online(_learner(cell, xs, n=1), xs, target), want)) > 1e-3


def _ring_data(rng: np.random.Generator, steps: int = 6) -> tuple[Ring, Array, Array]:
    return Ring(), jnp.asarray(rng.normal(size=(steps, 2, 3))), jnp.asarray(rng.normal(size=(steps, 2, 5)))


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_snap2_equals_the_masked_influence_rule_written_out(
    mode: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In both ways of propagating the dense influence (a VJP per hidden entry, or a JVP per weight)."""
    monkeypatch.setattr(_rtrl, "_cheaper_mode", lambda hidden, theta: mode)
    model, xs, target = _ring_data(rng)
    c, W0 = model.c, model.w.value["weight"]

    def F(h: Array, W: Array, x: Array) -> Array:
        return jnp.tanh(x @ W + c * jnp.roll(h, 1, -1) + h / 2)

    # the pattern, grown here from the Jacobians' structure at a random point
    h_r, W_r, x_r = (jnp.asarray(rng.normal(size=s)) for s in ((2, 5), (3, 5), (2, 3)))
    S_h = np.asarray(jax.jacfwd(F, argnums=0)(h_r, W_r, x_r)).reshape(10, 10) != 0
    mask = np.asarray(jax.jacfwd(F, argnums=1)(h_r, W_r, x_r)).reshape(10, 15) != 0
    mask = mask | ((S_h.astype(int) @ mask.astype(int)) > 0)  # n = 2
    mask = jnp.asarray(mask.reshape(2, 5, 3, 5))
    # unit k of a sample: W[:, k] and W[:, k - 1], per input
    assert int(mask.sum()) == 2 * 5 * 3 * 2

    h, M, want = jnp.zeros((2, 5)), jnp.zeros((2, 5, 3, 5)), jnp.zeros((3, 5))
    for t in range(xs.shape[0]):
        J_h = jax.jacfwd(F, argnums=0)(h, W0, xs[t])
        J_w = jax.jacfwd(F, argnums=1)(h, W0, xs[t])
        M = mask * (jnp.tensordot(J_h, M, axes=2) + J_w)
        h = F(h, W0, xs[t])
        want = want + jnp.tensordot(2 * (h - target[t]), M, axes=2)  # dL^t/dh^t M^t

    learner = _learner(model, xs, n=2)
    assert np.array_equal(learner.pattern[(0, "weight")][("h",)], mask)
    got = _online(learner, xs, target)[("w",)]["weight"]
    assert _rel(got, want) < 1e-10
    # and it is not the exact gradient
    model2, _, _ = _ring_data(rng)
    assert _rel(got, _bptt_of(model2, xs, target)[("w",)]["weight"]) > 1e-3


@pytest.mark.parametrize("vjp_method", ["single-step", "multi-step"])
def test_snap_on_the_ring_with_n_units_equals_bptt(vjp_method: str, rng: np.random.Generator) -> None:
    """The ring connects every pair of units in 5 steps: SnAp-5 is exact, step by step or in windows of 2."""
    model, xs, target = _ring_data(rng)
    want = _bptt_of(model, xs, target)
    learner = _learner(model, xs, n=5, vjp_method=vjp_method)
    assert learner.pattern[(0, "weight")][("h",)].all()
    if vjp_method == "multi-step":

        def window_loss(x: Array, y: Array) -> Array:
            return jnp.sum((learner(MultiStepData(x)) - y) ** 2, axis=(1, 2))

        got = learner.etrace_grad(xs, target, step_fn=window_loss, chunk_size=2, reduction="sum")
    else:
        got = _online(learner, xs, target)
    assert max(_errors(got, want)) < 1e-10


def test_snap_unbatched_step_by_step(rng: np.random.Generator) -> None:
    """No batch axis, the hand loop of per-step gradients: the full pattern on a dense RNN equals BPTT."""
    brainstate.random.seed(3)
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell)
    xs, target = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 4)))
    want = _bptt_of(cell, xs, target)
    learner = _learner(cell, xs, n=3)
    params = cell.states(brainstate.ParamState)
    total = None
    for t in range(5):
        g = brainstate.transform.grad(lambda t=t: jnp.sum((learner(xs[t]) - target[t]) ** 2), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    assert max(_errors(total, want)) < 1e-10


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_n_is_named(bad: Any) -> None:
    cell = etp_nn.VanillaRNNCell(3, 4)
    brainstate.nn.init_all_states(cell)
    with pytest.raises((TypeError, ValueError), match=rf"SnAp: n must be an int >= 1 .*got {bad!r}"):
        SnAp(cell, n=bad)


def test_a_too_large_dense_influence_is_refused(rng: np.random.Generator) -> None:
    cell, xs, _ = _vanilla(rng)
    size = 2 * 4 * (7 * 4 + 4) * 8
    with pytest.raises(
        ValueError, match=rf"VanillaRNNCell, which each step computes before masking, would take {size}"
    ):
        _learner(cell, xs, n=1, max_influence_bytes=size - 1)


@pytest.mark.parametrize("n", [1, 4])
def test_a_vmapped_per_sample_snap_equals_the_batched_one(n: int, rng: np.random.Generator) -> None:
    """ETraceVmap of one sample's SnAp gives the batched learner's gradients (the pattern is per sample)."""
    xs, target = jnp.asarray(rng.normal(size=(4, 2, 3))), jnp.asarray(rng.normal(size=(4, 2, 4)))
    grads = []
    for vmapped in (False, True):
        brainstate.random.seed(3)
        cell = etp_nn.VanillaRNNCell(3, 4, activation="tanh")
        brainstate.nn.init_all_states(cell, batch_size=None if vmapped else 2)
        learner = _learner(cell, xs[:, 0] if vmapped else xs, n=n)
        call = ETraceVmap(learner, axis_size=2) if vmapped else learner
        params = cell.states(brainstate.ParamState)
        total = None
        for t in range(4):
            g = brainstate.transform.grad(lambda t=t, call=call: jnp.sum((call(xs[t]) - target[t]) ** 2), params)()
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        grads.append(total)
    assert max(_errors(grads[1], grads[0])) < 1e-10
    if n == 4:  # and the full pattern is exact
        brainstate.random.seed(3)
        cell = etp_nn.VanillaRNNCell(3, 4, activation="tanh")
        brainstate.nn.init_all_states(cell, batch_size=2)
        assert max(_errors(grads[1], _bptt_of(cell, xs, target))) < 1e-10


def test_snap_float32_is_close_to_float64(rng: np.random.Generator) -> None:
    model, xs, target = _ring_data(rng)
    start = {path: state.value for path, state in model.states().items()}
    got64 = _online(_learner(model, xs, n=2), xs, target)
    for path, state in model.states().items():  # the same start, in float32
        state.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), start[path])
    model.c = model.c.astype(jnp.float32)
    x32, y32 = xs.astype(jnp.float32), target.astype(jnp.float32)
    learner = _learner(model, x32, n=2)
    assert all(v.dtype == jnp.float32 for row in learner.etrace.value.values for v in row)
    got32 = _online(learner, x32, y32)
    a, b = got32[("w",)]["weight"], got64[("w",)]["weight"]
    assert a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
    assert _rel(a, b) < 1e-4


def test_an_integer_indexed_op_is_refused_with_the_relation_named() -> None:
    """An embedding's sampled pattern would cover only the rows its sample read: refused, not silently sparse."""
    import etp_primitives as etp
    from etp_compiler import CompilationError

    class Embedded(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((5, 3)))
            self.h = brainstate.HiddenState(jnp.zeros((2, 3)))

        def update(self, ids: jax.Array) -> jax.Array:
            self.h.value = 0.5 * jnp.tanh(self.h.value) + etp.embedding(ids, self.w.value)
            return self.h.value

    model = Embedded()
    with pytest.raises(CompilationError, match=r"SnAp: relation 0 \(etp_embedding, weight w\) takes integer inputs"):
        SnAp(model).compile_graph(jnp.zeros((2,), jnp.int32))
