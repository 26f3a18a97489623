"""No silent failures (issue 19): each misuse of a learner gives the right result or a clear error, and a failed
call leaves every parameter, hidden state and trace as it was.

Oracles: the step written out by hand (``h' = a tanh(h) + x W + b``) and a learner compiled afresh on an
independent model with the same values (a misused learner must agree with it exactly, float64).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp_primitives as etp
from etp_algorithms import D_RTRL, ETraceAlgorithm, ETraceVmap
from etp_algorithms._checks import NonFiniteError
from etp_algorithms._three_factor import ThreeFactor
from etp_algorithms.extend import d_rtrl

Array = jax.Array
I, O, A = 3, 4, 0.8


class Proj(brainstate.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = brainstate.ParamState(
            {"weight": jnp.asarray(rng.normal(size=(I, O))), "bias": jnp.asarray(rng.normal(size=O))}
        )

    def __call__(self, x: Array) -> Array:
        return etp.matmul(x, self.w.value["weight"], self.w.value["bias"])


class Cell(brainstate.nn.Module):
    """``h' = A tanh(h) + x W + b`` with ``h`` created by ``init_state`` (new objects at each init)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.proj = Proj(seed)

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros((O,) if batch_size is None else (batch_size, O)))

    def update(self, x: Array) -> Array:
        self.h.value = A * jnp.tanh(self.h.value) + self.proj(x)
        return self.h.value


class MilliVoltCell(Cell):
    """The same cell reading its input in millivolts."""

    def update(self, v: Any) -> Array:
        return super().update(u.maybe_decimal(v / u.mV))


def oracle(h: Array, x: Array, proj: Proj) -> Array:
    w = proj.w.value
    return A * jnp.tanh(h) + x @ w["weight"] + w["bias"]


def made(cls: type[Cell] = Cell, seed: int = 0, batch: int | None = None) -> Cell:
    model = cls(seed)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def learner_of(model: Cell, example: Any, **kwargs: Any) -> ETraceAlgorithm:
    learner = ETraceAlgorithm(model, d_rtrl(), **kwargs)
    learner.compile_graph(example)
    return learner


def snapshot(learner: ETraceAlgorithm) -> list[np.ndarray]:
    values = [s.value for s in learner.model.states().values()] + [learner.etrace.value]
    return [np.array(v) for v in jax.tree.leaves(values)]


def assert_unchanged(before: list[np.ndarray], learner: ETraceAlgorithm) -> None:
    after = snapshot(learner)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


def grads_of(learner: ETraceAlgorithm, x: Any) -> dict[Any, Any]:
    params = learner.model.states(brainstate.ParamState)
    return brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), params)()


def close(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


X = jnp.asarray([0.3, -1.2, 2.0])

# ---------------------------------------------------------------------------------------------------------------
# 1. units


def test_quantity_fed_to_a_plain_learner_raises_and_changes_nothing() -> None:
    learner = learner_of(made(), jnp.zeros(I))
    learner(X)
    before = snapshot(learner)
    with pytest.raises(TypeError, match=r"input 0 is a Quantity in mV, but the learner was compiled for a plain array"):
        learner(X * u.mV)
    assert_unchanged(before, learner)


def test_compatible_units_are_converted_to_the_compiled_unit() -> None:
    model = made(MilliVoltCell)
    learner = learner_of(model, jnp.zeros(I) * u.mV)
    plain = learner_of(made(Cell), jnp.zeros(I))  # same seed: same weights, inputs as plain millivolt numbers
    h0 = jnp.array(model.h.value)
    got = learner(X * 1e-3 * u.volt)  # 0.3 mV given as 0.0003 V
    close(got, oracle(h0, X, model.proj))
    close(got, plain(X))
    close(learner.etrace.value, plain.etrace.value)
    close(grads_of(learner, X * u.mV), grads_of(plain, X))


def test_a_plain_array_fed_to_a_unit_learner_raises() -> None:
    learner = learner_of(made(MilliVoltCell), jnp.zeros(I) * u.mV)
    before = snapshot(learner)
    with pytest.raises(TypeError, match=r"input 0 is a plain array, but the learner was compiled for inputs in mV"):
        learner(X)
    with pytest.raises(TypeError, match=r"input 0 is in s, which cannot be converted to the compiled unit mV"):
        learner(X * u.second)
    assert_unchanged(before, learner)


# ---------------------------------------------------------------------------------------------------------------
# 2. re-initialised states, replaced sub-modules


def test_init_all_states_after_compile_is_followed() -> None:
    model = made()
    learner = learner_of(model, jnp.zeros(I))
    learner(X)
    learner(X)
    old_h = model.h
    old_value = np.array(old_h.value)
    brainstate.nn.init_all_states(model)  # new HiddenState objects
    assert model.h is not old_h
    got = learner(X)
    close(got, oracle(jnp.zeros(O), X, model.proj))
    np.testing.assert_array_equal(np.asarray(old_h.value), old_value)  # the old state is no longer written
    close(model.h.value, got)
    fresh = learner_of(made(), jnp.zeros(I))  # the same weights, from zero states: the learner must agree
    fresh(X)
    close(learner.etrace.value, fresh.etrace.value)
    close(grads_of(learner, X), grads_of(fresh, X))


def test_a_replaced_sub_module_is_followed() -> None:
    model = made()
    learner = learner_of(model, jnp.zeros(I))
    learner(X)
    model.proj = Proj(seed=7)
    h = jnp.array(model.h.value)
    got = learner(X)
    close(got, oracle(h, X, model.proj))
    grads = grads_of(learner, X)
    assert set(grads) == {("proj", "w")}
    other = made(seed=7)  # the new weights from the same hidden value, traces from zero at the replacement
    other.h.value = h
    fresh = learner_of(other, jnp.zeros(I))
    fresh(X)
    close(grads, grads_of(fresh, X))


def test_replaced_states_inside_jit_are_refused() -> None:
    model = made()
    learner = learner_of(model, jnp.zeros(I))
    brainstate.nn.init_all_states(model)
    before = snapshot(learner)
    with pytest.raises(RuntimeError, match=r"the model's states h were replaced since compile_graph"):
        brainstate.transform.jit(lambda x: learner(x))(X)
    assert_unchanged(before, learner)


# ---------------------------------------------------------------------------------------------------------------
# 3. copies and pickling


@pytest.mark.parametrize("copier", [copy.deepcopy, brainstate.graph.clone], ids=["deepcopy", "clone"])
def test_a_copy_drives_its_own_model(copier: Any) -> None:
    learner = learner_of(made(), jnp.zeros(I))
    learner(X)
    twin = copier(learner)
    assert twin.model is not learner.model
    before = snapshot(learner)
    out_copy = twin(2 * X)
    assert_unchanged(before, learner)  # the original's states and traces untouched
    out = learner(2 * X)  # from the same states: the same step
    close(out_copy, out)
    close(twin.etrace.value, learner.etrace.value)
    close(twin.model.h.value, learner.model.h.value)
    assert set(twin.param_states.values()).isdisjoint(learner.param_states.values())


def test_pickling_points_to_the_checkpoint_api() -> None:
    learner = learner_of(made(), jnp.zeros(I))
    with pytest.raises(TypeError, match=r"cannot be pickled.*save_checkpoint.*restore_checkpoint"):
        pickle.dumps(learner)


# ---------------------------------------------------------------------------------------------------------------
# 5. check_finite


def test_check_finite_names_the_state_and_stores_nothing() -> None:
    learner = learner_of(made(), jnp.zeros(I), check_finite=True)
    learner(X)
    before = snapshot(learner)
    bad = X.at[0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"NaN or inf in state h after this step.*reset_state"):
        learner(bad)
    assert_unchanged(before, learner)
    with pytest.raises(Exception, match=r"NaN or inf in state h"):
        jax.block_until_ready(brainstate.transform.jit(lambda x: learner(x))(bad))
    plain = D_RTRL(made())
    plain.compile_graph(jnp.zeros(I))
    assert not bool(jnp.all(jnp.isfinite(plain(bad))))  # off by default
    plain.reset_state()
    brainstate.nn.reset_all_states(plain.model)
    plain.check_finite = True
    with pytest.raises(NonFiniteError):
        plain(bad)


# ---------------------------------------------------------------------------------------------------------------
# 6. batch size, staging, assigned values of the wrong shape, foreign traces


def test_reset_state_with_a_batch_size_then_a_jitted_step() -> None:
    model = made(batch=2)
    learner = learner_of(model, jnp.zeros((2, I)))
    step = brainstate.transform.jit(lambda x: learner(x))
    step(jnp.ones((2, I)))
    learner.reset_state(batch_size=5)
    xs = jnp.tile(X, (5, 1))
    got = step(xs)
    assert got.shape == (5, O)
    fresh = learner_of(made(batch=5), jnp.zeros((5, I)))
    close(got, fresh(xs))
    close(learner.etrace.value, fresh.etrace.value)


def test_compile_and_reset_inside_jit_are_refused() -> None:
    learner = learner_of(made(batch=2), jnp.zeros((2, I)))
    before = snapshot(learner)
    with pytest.raises(RuntimeError, match=r"compile_graph\(\.\.\.\) was called inside a jitted"):
        brainstate.transform.jit(lambda x: learner.compile_graph(x) and 0)(jnp.ones((2, I)))
    with pytest.raises(RuntimeError, match=r"reset_state\(batch_size=\.\.\.\) was called inside a jitted"):
        brainstate.transform.jit(lambda: learner.reset_state(batch_size=3))()
    assert_unchanged(before, learner)


def test_assigned_values_of_the_wrong_shape_or_structure_are_named() -> None:
    model = made()
    learner = learner_of(model, jnp.zeros(I))
    learner(X)
    h = jnp.array(model.h.value)
    model.h.value = jnp.zeros(O + 1)
    before = snapshot(learner)
    with pytest.raises(ValueError, match=r"state h holds leaves of shapes/dtypes \[\(\(5,\), 'float64'\)\].*\(4,\)"):
        learner(X)
    assert_unchanged(before, learner)
    model.h.value = h
    w = model.proj.w.value
    model.proj.w.value = {"weight": w["weight"]}
    with pytest.raises(ValueError, match=r"state proj\.w has the structure .* \(a key missing or added\?\)"):
        learner(X)
    model.proj.w.value = w
    close(learner(X), oracle(h, X, model.proj))


def test_traces_of_another_batch_size_are_refused() -> None:
    learner = learner_of(made(batch=2), jnp.zeros((2, I)))
    other = learner_of(made(batch=3), jnp.zeros((3, I)))
    learner.etrace.value = other.etrace.value
    with pytest.raises(
        ValueError, match=r"the eligibility traces \(learner\.etrace\) holds leaves .*another batch size"
    ):
        learner(jnp.ones((2, I)))


# ---------------------------------------------------------------------------------------------------------------
# 7. brainstate vmap without in_states


def test_vmap_without_in_states_names_the_states_and_the_fix() -> None:
    learner = learner_of(made(), jnp.zeros(I))
    before = snapshot(learner)
    xs = jnp.stack([X, 2 * X])
    with pytest.raises(ValueError, match=r"states it writes h, etrace .* have no batch axis.*ETraceVmap"):
        brainstate.transform.vmap(learner)(xs)
    assert_unchanged(before, learner)


# ---------------------------------------------------------------------------------------------------------------
# 8. ThreeFactor's modulator through ETraceVmap


def test_etrace_vmap_splits_the_modulator_per_sample() -> None:
    xs = jnp.stack([X, -X, 0.5 * X])
    mods = jnp.asarray(np.random.default_rng(1).normal(size=(3, O)))
    per_sample = ThreeFactor(made())
    per_sample.compile_graph(jnp.zeros(I))
    batched = ETraceVmap(per_sample, axis_size=3)
    params = per_sample.model.states(brainstate.ParamState)

    def loss() -> tuple[Array, Array]:
        out = batched(xs, modulator=mods)
        return jnp.sum(out**2), out

    got = brainstate.transform.grad(loss, params, has_aux=True)()
    want_grads: Any = None
    for b in range(3):  # the unbatched learner, sample by sample from the same (zero) states
        single = ThreeFactor(made())
        single.compile_graph(jnp.zeros(I))
        sp = single.model.states(brainstate.ParamState)
        g = brainstate.transform.grad(lambda b=b, single=single: jnp.sum(single(xs[b], modulator=mods[b]) ** 2), sp)()
        close(got[1][b], single.model.h.value)
        want_grads = g if want_grads is None else jax.tree.map(jnp.add, want_grads, g)
    close(got[0], want_grads)


def test_etrace_vmap_gives_a_scalar_modulator_to_every_sample() -> None:
    xs = jnp.stack([X, -X, 0.5 * X])
    grads = []
    for modulator in (0.5, jnp.full((3, O), 0.5)):
        learner = ThreeFactor(made())
        learner.compile_graph(jnp.zeros(I))
        batched = ETraceVmap(learner, axis_size=3)
        params = learner.model.states(brainstate.ParamState)
        batched(xs, modulator=modulator)  # a first step, so the traces are not zero
        grads.append(brainstate.transform.grad(lambda b=batched, m=modulator: jnp.sum(b(xs, modulator=m)), params)())
    close(grads[0], grads[1])
    assert float(jnp.abs(grads[0][("proj", "w")]["weight"]).sum()) > 0


# ---------------------------------------------------------------------------------------------------------------
# 4. gradients w.r.t. hidden states


def test_a_gradient_wrt_hidden_states_warns_and_is_zero() -> None:
    from etp_algorithms._step import HiddenStateGradientWarning

    learner = learner_of(made(), jnp.zeros(I))
    learner(X)
    with pytest.warns(
        HiddenStateGradientWarning,
        match=r"hidden states or traces entering this step \(h, traces\) are differentiated.*returns zero",
    ):
        grads = brainstate.transform.grad(lambda: jnp.sum(learner(X) ** 2), learner.model.states())()
    np.testing.assert_array_equal(np.asarray(grads[("h",)]), np.zeros(O))


def test_parameter_gradients_over_steps_do_not_warn() -> None:
    import warnings

    learner = learner_of(made(), jnp.zeros(I))
    params = learner.model.states(brainstate.ParamState)

    def unrolled() -> Array:  # two steps in one gradient: the second reads the first's stored hidden value
        return jnp.sum(learner(X) ** 2) + jnp.sum(learner(-X) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = brainstate.transform.grad(unrolled, params)()
        jax.grad(lambda w: jnp.sum(w["weight"]))(params[("proj", "w")].value)
    assert float(jnp.abs(grads[("proj", "w")]["weight"]).sum()) > 0


def test_a_loop_of_steps_inside_one_gradient_warns_and_sums_the_online_gradients() -> None:
    from etp_algorithms._step import HiddenStateGradientWarning

    xs = jnp.stack([X, -X, 0.5 * X])
    looped = learner_of(made(), jnp.zeros(I))
    params = looped.model.states(brainstate.ParamState)

    def loop() -> Array:
        return jnp.sum(brainstate.transform.for_loop(lambda x: looped(x), xs) ** 2)

    with pytest.warns(HiddenStateGradientWarning, match=r"sum of the per-step online gradients"):
        got = brainstate.transform.grad(loop, params)()
    stepwise = learner_of(made(), jnp.zeros(I))  # one gradient per step, summed
    total: Any = None
    for x in xs:
        g = grads_of(stepwise, x)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    close(got, total)


def test_a_failed_compile_leaves_the_learner_as_it_was() -> None:
    """A compile that fails while creating the traces keeps the previous graph, traces and input signature."""
    from etp_algorithms import D_RTRL

    class FailsWhenAsked(D_RTRL):
        fail = False

        def init_etrace_state(self, *args: Any, **kwargs: Any) -> None:
            super().init_etrace_state(*args, **kwargs)
            if self.fail:
                raise RuntimeError("the traces could not be created")

    model = made(batch=2)
    learner = FailsWhenAsked(model)
    learner.compile_graph(jnp.zeros((2, I)))
    learner(jnp.ones((2, I)))
    graph, traces, inputs = learner.graph, snapshot(learner), learner._inputs
    learner.fail = True
    with pytest.raises(RuntimeError, match="the traces could not be created"):
        learner.compile_graph(jnp.zeros((2, I)))  # a new graph, and traces zeroed, had it succeeded
    assert learner.graph is graph and learner._inputs is inputs
    assert_unchanged(traces, learner)
    learner.fail = False
    out = learner(jnp.ones((2, I)))  # still the compiled learner of (2, I) inputs
    assert out.shape == (2, O)
