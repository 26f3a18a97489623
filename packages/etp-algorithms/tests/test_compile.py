"""``compile``: the learner it returns equals the one built by hand; names, options, seed, report, bad input."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_algorithms
import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL, ETraceAlgorithm, _compile, register_learner, registered_learners
from etp_compiler import CompilationError

Array = jax.Array
T, B, I, O, K = 4, 3, 4, 5, 2


class Leaky(brainstate.nn.Module):
    """``h' = a * tanh(h) + x W + b`` (ETP), output ``h R`` (ETP); ``h`` starts random when ``random_start``."""

    def __init__(self, seed: int = 5, random_start: bool = False) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.random_start = random_start
        self.w = brainstate.ParamState(
            {"weight": jnp.asarray(rng.normal(size=(I, O))), "bias": jnp.asarray(rng.normal(size=O))}
        )
        self.r = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(O, K)))})
        self.a = jnp.asarray(rng.uniform(0.5, 0.95, size=O))

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        shape = (O,) if batch_size is None else (batch_size, O)
        start = brainstate.random.normal(size=shape) if self.random_start else jnp.zeros(shape)
        self.h = brainstate.HiddenState(jnp.asarray(start, jnp.float64))

    def update(self, x: Array) -> Array:
        self.h.value = self.a * jnp.tanh(self.h.value) + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        return etp.matmul(self.h.value, self.r.value["weight"])


class PlainRNN(brainstate.nn.Module):
    """No ETP primitive: ``h' = tanh(h U + x W)``, output ``h R``, all plain JAX ops."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(1)
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, O))))
        self.u = brainstate.ParamState(jnp.asarray(rng.normal(size=(O, O)) * 0.3))
        self.r = brainstate.ParamState(jnp.asarray(rng.normal(size=(O, K))))
        self.h = brainstate.HiddenState(jnp.asarray(rng.normal(size=O)))

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros(O))

    def update(self, x: Array) -> Array:
        self.h.value = jnp.tanh(self.h.value @ self.u.value + x @ self.w.value)
        return self.h.value @ self.r.value


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readout's exclusion warning
        yield


def _by_hand(cls: Callable[..., ETraceAlgorithm], x0: Array, batch_size: int | None, **options: Any) -> ETraceAlgorithm:
    model = Leaky()
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    learner = cls(model, **options)
    learner.compile_graph(x0)
    return learner


def _grads_over(learner: ETraceAlgorithm, xs: Array, target: Array) -> list[Any]:
    params = learner.model.states(brainstate.ParamState)
    return [
        brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(xs[t]) for t in range(len(xs))
    ]


def _close(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("algorithm", "cls", "options"),
    [
        ("d_rtrl", D_RTRL, {}),
        ("D_RTRL", D_RTRL, {}),
        (D_RTRL, D_RTRL, {}),
        ("es_d_rtrl", ES_D_RTRL, {"decay_or_rank": 0.7}),
        (" ESD_RTRL ", ES_D_RTRL, {"decay_or_rank": 0.7}),
        ("pp_prop", ES_D_RTRL, {"decay_or_rank": 3}),
        ("d_rtrl", D_RTRL, {"vjp_method": "multi-step"}),
    ],
)
@pytest.mark.parametrize("batch_size", [None, B])
def test_compile_equals_the_learner_built_by_hand(
    algorithm: Any,
    cls: type[ETraceAlgorithm],
    options: dict[str, Any],
    batch_size: int | None,
    rng: np.random.Generator,
) -> None:
    lead = () if batch_size is None else (batch_size,)
    xs = jnp.asarray(rng.normal(size=(T, *lead, I)))
    target = jnp.asarray(rng.normal(size=(*lead, K)))
    model = Leaky()
    learner = etp_algorithms.compile(model, algorithm, xs[0], batch_size=batch_size, **options)
    assert type(learner) is cls and learner.model is model and learner.is_compiled
    assert model.h.value.shape == (*lead, O)
    assert learner.vjp_method == options.get("vjp_method", "single-step")
    reference = _by_hand(cls, xs[0], batch_size, **options)
    if learner.vjp_method == "multi-step":  # one window of T steps
        params = learner.model.states(brainstate.ParamState)
        ref_params = reference.model.states(brainstate.ParamState)
        window = etp_algorithms.MultiStepData
        got = brainstate.transform.grad(lambda x: jnp.sum((learner(window(x)) - target) ** 2), params)(xs)
        want = brainstate.transform.grad(lambda x: jnp.sum((reference(window(x)) - target) ** 2), ref_params)(xs)
        _close(got, want)
    else:
        _close(_grads_over(learner, xs, target), _grads_over(reference, xs, target))
    _close(learner.etrace.value, reference.etrace.value)
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(learner.etrace.value))


def test_seed_makes_the_initial_states_reproducible(rng: np.random.Generator) -> None:
    x0 = jnp.zeros((B, I))
    starts = []
    for seed in (11, 11, 12):
        model = Leaky(random_start=True)
        etp_algorithms.compile(model, "d_rtrl", x0, batch_size=B, seed=seed)
        starts.append(np.asarray(model.h.value))
    np.testing.assert_array_equal(starts[0], starts[1])
    assert np.abs(starts[0] - starts[2]).max() > 1e-3
    # the global RNG is not reseeded by compile(seed=...)
    before = np.asarray(brainstate.random.normal(size=(3,)))
    etp_algorithms.compile(Leaky(random_start=True), "d_rtrl", x0, batch_size=B, seed=11)
    after = np.asarray(brainstate.random.normal(size=(3,)))
    assert np.abs(before - after).max() > 0


def test_verbose_prints_the_report_and_trace_memory(capsys: pytest.CaptureFixture[str]) -> None:
    x0 = jnp.zeros(I)
    learner = etp_algorithms.compile(Leaky(), "d_rtrl", x0)
    assert capsys.readouterr().out == ""
    learner = etp_algorithms.compile(Leaky(), "d_rtrl", x0, verbose=1)
    out = capsys.readouterr().out
    assert out == f"{learner.report.to_str(1)}\nEligibility-trace memory: {learner.trace_bytes()} bytes\n"
    assert "w  via etp_mv -> hidden group(s) [0]" in out
    assert "Group 0: h  (shape (5,), 1 state(s))" in out
    assert "r  (relation_excluded_non_temporal)" in out
    # D_RTRL's traces: eps of the weight (I, O) and of the bias (O,), float64
    assert learner.trace_bytes() == (I * O + O) * 8
    learner = etp_algorithms.compile(Leaky(), "d_rtrl", x0, verbose=2)
    assert "Compiler warnings and errors:" in capsys.readouterr().out
    assert learner.show_graph(verbose=False, return_msg=True) == (
        f"{learner.report.to_str(1)}\nEligibility-trace memory: {learner.trace_bytes()} bytes"
    )
    assert capsys.readouterr().out == ""
    assert learner.show_graph() is None
    assert "Compiler warnings and errors:" in capsys.readouterr().out


def test_learner_state_paths() -> None:
    learner = etp_algorithms.compile(Leaky(), "d_rtrl", jnp.zeros(I))
    model = learner.model
    assert learner.path_to_states == {("w",): model.w, ("r",): model.r, ("h",): model.h}
    assert learner.state_id_to_path[id(model.h)] == ("h",)
    assert learner.report.etrace_weights == [(("w",), [0])]


def test_unknown_name_and_bad_arguments() -> None:
    x0 = jnp.zeros(I)
    model = Leaky()
    names = ", ".join(sorted(registered_learners()))
    assert {"d_rtrl", "es_d_rtrl", "pp_prop", "rtrl", "snap", "rflo"} <= set(registered_learners())
    with pytest.raises(ValueError, match=re.escape(f"unknown algorithm name 'rtlr'; valid names: {names}")):
        etp_algorithms.compile(model, "rtlr", x0)
    with pytest.raises(TypeError, match="algorithm must be a learner class"):
        etp_algorithms.compile(model, int, x0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one example input"):
        etp_algorithms.compile(model, "d_rtrl")
    with pytest.raises(ValueError, match="verbose must be 0, 1, 2 or 3"):
        etp_algorithms.compile(model, "d_rtrl", x0, verbose=4)
    with pytest.raises(ValueError, match="needs batch_size"):
        etp_algorithms.compile(model, "d_rtrl", x0, vmap=True)
    with pytest.raises(ValueError, match=r"carry the batch axis .* got an input of shape \(4,\)"):
        etp_algorithms.compile(model, "d_rtrl", x0, vmap=True, batch_size=B)
    with pytest.raises(TypeError, match=r"ES_D_RTRL\(model, \*\*options\) failed with options \[\].*decay_or_rank"):
        etp_algorithms.compile(model, "es_d_rtrl", x0)
    with pytest.raises(TypeError, match="model must be a brainstate.nn.Module"):
        etp_algorithms.compile(lambda x: x, "d_rtrl", x0)  # type: ignore[arg-type]


def test_model_without_etp_primitive(rng: np.random.Generator) -> None:
    model = PlainRNN()
    h0 = np.asarray(model.h.value)
    model.h.value = model.h.value + 1.0
    h1 = np.asarray(model.h.value)  # compile's init_all_states sets h to zeros; the failure puts h1 back
    with pytest.raises(CompilationError) as caught:
        etp_algorithms.compile(model, "d_rtrl", jnp.zeros(I))
    message = str(caught.value)
    assert "PlainRNN" in message and "no ETP primitive drives" in message
    for op in ("matmul", "conv", "element_wise", "sparse_matmul", "lora_matmul", "etp_nn"):
        assert op in message
    assert "w (plain JAX ops only)" in message
    np.testing.assert_array_equal(model.h.value, h1)  # the failed call changed no state
    assert np.abs(h1 - h0).max() == 1.0

    # built directly, a learner accepts the model, with a warning: every parameter gets its instantaneous gradient
    learner = D_RTRL(model)
    with pytest.warns(etp_algorithms.NoEligibilityTraceWarning) as record:
        learner.compile_graph(jnp.zeros(I))
    (warned,) = [w for w in record if issubclass(w.category, etp_algorithms.NoEligibilityTraceWarning)]
    assert str(warned.message).startswith("D_RTRL: no weight of PlainRNN gets an eligibility trace")
    assert "matmul" in str(warned.message)
    assert warned.filename == __file__  # points at the caller's line
    x, target = jnp.asarray(rng.normal(size=I)), jnp.asarray(rng.normal(size=K))
    h_prev = model.h.value
    params = model.states(brainstate.ParamState)
    got = brainstate.transform.grad(lambda x: jnp.sum((learner(x) - target) ** 2), params)(x)

    def one_step(w: Array, u: Array, r: Array) -> Array:
        return jnp.sum((jnp.tanh(h_prev @ u + x @ w) @ r - target) ** 2)

    want = jax.grad(one_step, argnums=(0, 1, 2))(params[("w",)].value, params[("u",)].value, params[("r",)].value)
    for key, expected in zip((("w",), ("u",), ("r",)), want, strict=True):
        np.testing.assert_allclose(got[key], expected, rtol=1e-12)


def test_register_learner() -> None:
    class SlowRTRL(D_RTRL):
        pass

    register_learner("Slow_RTRL", SlowRTRL)
    try:
        assert registered_learners()["slow_rtrl"] is SlowRTRL
        learner = etp_algorithms.compile(Leaky(), "slow_rtrl", jnp.zeros(I))
        assert type(learner) is SlowRTRL
        register_learner("slow_rtrl", SlowRTRL)  # the same class again: fine
        with pytest.raises(ValueError, match="'d_rtrl' is already the name of D_RTRL"):
            register_learner("d_rtrl", SlowRTRL)
        with pytest.raises(TypeError, match="is not a subclass of ETraceAlgorithm"):
            register_learner("x", object)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="non-empty string"):
            register_learner(" ", SlowRTRL)
    finally:
        _compile._LEARNERS.pop("slow_rtrl", None)  # leave the registry as the other tests expect it
    assert "slow_rtrl" not in registered_learners() and registered_learners()["d_rtrl"] is D_RTRL
