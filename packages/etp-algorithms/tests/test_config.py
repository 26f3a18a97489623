"""ETraceConfig: validation, canonical form, replace/describe, and the learner each config builds.

Oracles: the learner built directly with the options written out here (the same numbers, to the
last bit, on a small RNN with a readout), BPTT (``jax.grad`` through the unrolled model) for the
default config on a leaky integrator, and the error messages read back (axis, value, nearest).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_algorithms
import etp_nn
import etp_primitives as etp
from etp_algorithms import _compile
from etp_algorithms._config import LEARNER_TABLE, ETraceConfig, learner_from_config, resolve_config
from etp_compiler import NotSupportedError

Array = jax.Array
B, I, H, O, T = 2, 3, 4, 2, 4
IO = "io_factorized"


@pytest.fixture(autouse=True)
def _float64() -> Any:
    with brainstate.environ.context(precision=64):
        yield


class Net(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.out = etp_nn.VanillaRNNCell(I, H), etp_nn.Linear(H, O)

    def update(self, x: Array) -> Array:
        return self.out(self.rnn(x))


def _net(seed: int = 5) -> Net:
    brainstate.random.seed(seed)
    net = Net()
    brainstate.nn.init_all_states(net, batch_size=B)
    return net


def _grads(learner: Any, xs: Array, ys: Array) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
        return learner.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")


def _data() -> tuple[Array, Array]:
    rng = np.random.default_rng(11)
    return jnp.asarray(rng.normal(size=(T, B, I))), jnp.asarray(rng.normal(size=(T, B, O)))


# name -> (config, the registered learner it builds, its constructor options written out, shared options)
CASES: dict[str, tuple[ETraceConfig, str, dict[str, Any], dict[str, Any]]] = {
    "d_rtrl": (ETraceConfig(), "d_rtrl", {}, {}),
    "ostl_recurrent": (ETraceConfig(), "ostl_recurrent", {}, {}),
    "es_d_rtrl": (ETraceConfig(trace_factorization=IO, decay=0.6), "es_d_rtrl", {"decay_or_rank": 0.6}, {}),
    "ostl_feedforward": (ETraceConfig(trace_factorization=IO, decay=1e-6), "ostl_feedforward", {}, {}),
    "snap-1": (ETraceConfig(recurrence_scope="coupled"), "snap", {"n": 1}, {}),
    "snap-2": (ETraceConfig(recurrence_scope="sparse_n", sparse_n=2), "snap", {"n": 2}, {}),
    "rtrl": (ETraceConfig(recurrence_scope="full"), "rtrl", {}, {}),
    "uoro": (ETraceConfig(trace_factorization="random_projection", recurrence_scope="coupled"), "uoro", {}, {"projection_key": 3}),
    "kf_rtrl": (ETraceConfig(trace_factorization="kronecker", recurrence_scope="full"), "kf_rtrl", {}, {"projection_key": 4}),
    "rflo": (ETraceConfig(learning_signal="random_feedback"), "rflo", {"feedback": "random"}, {"feedback_key": 2}),
    "three_factor": (ETraceConfig(learning_signal="modulatory"), "three_factor", {}, {"modulator": 0.5}),
    "eprop": (ETraceConfig(trace_filter="kappa", kappa=0.5), "eprop", {"feedback": "symmetric", "kappa_filter_decay": 0.5}, {}),
    "eprop-random": (
        ETraceConfig(learning_signal="random_feedback", trace_filter="kappa", kappa=0.5), "eprop",
        {"feedback": "random", "kappa_filter_decay": 0.5}, {"random_feedback_key": 1},
    ),
    "ottt": (ETraceConfig(trace_factorization=IO, decay=(0.7, 0.0)), "ottt", {"decay": 0.7}, {}),
    "dni": (ETraceConfig(learning_signal="bootstrapped"), "dni", {}, {}),
}  # fmt: skip

# what ostl_* are as configs: the config builds D_RTRL / ES_D_RTRL, the same rule under another name
BUILT_AS = {"ostl_recurrent": "d_rtrl", "ostl_feedforward": "es_d_rtrl"}


def test_every_row_of_the_table_has_a_case() -> None:
    rows = {row.name for row in LEARNER_TABLE}
    assert rows == {name for _, name, _, _ in CASES.values()} - set(BUILT_AS)
    registry = etp_algorithms.registered_learners()
    covered = {registry[name] for _, name, _, _ in CASES.values() if name in registry}
    assert set(registry.values()) <= covered, "a registered learner without its config case"
    for row in LEARNER_TABLE:
        assert not row.misses(row.example), row.name


@pytest.mark.parametrize("case", list(CASES))
def test_each_config_builds_its_learner_with_the_same_gradients(case: str) -> None:
    config, name, options, shared = CASES[case]
    registry = etp_algorithms.registered_learners()
    built_as = BUILT_AS.get(name, name)
    if built_as not in registry:  # a learner another change adds: until then a clear error naming it
        cls_name = next(row.class_name for row in LEARNER_TABLE if row.name == built_as)
        with pytest.raises(NotSupportedError, match=rf"'{built_as}' \({cls_name}\), which is not registered"):
            learner_from_config(_net(), config, **shared)
        return
    learner = learner_from_config(_net(), config, **shared)
    assert type(learner) is registry[built_as]
    direct = registry[name](_net(), **options, **shared)
    for attribute, value in options.items():
        attribute = {"decay_or_rank": "decay", "kappa_filter_decay": "kappa_filter_decay"}.get(attribute, attribute)
        if hasattr(direct, attribute):
            assert getattr(learner, attribute) == getattr(direct, attribute) == value, attribute
    xs, ys = _data()
    got, want = _grads(learner, xs, ys), _grads(direct, xs, ys)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(got)) > 1e-6  # not all zero


def test_build_method_and_resolve_config() -> None:
    config = ETraceConfig(recurrence_scope="sparse_n", sparse_n=3)
    cls, options = resolve_config(config)
    assert cls is etp_algorithms.SnAp and options == {"n": 3}
    learner = config.build(_net(), name="snap3")
    assert isinstance(learner, etp_algorithms.SnAp) and learner.n == 3 and learner.name == "snap3"
    with pytest.raises(ValueError, match=r"learner_from_config: the config sets \['n'\] of SnAp"):
        config.build(_net(), n=2)
    with pytest.raises(TypeError, match="expected an ETraceConfig"):
        learner_from_config(_net(), "d_rtrl")  # type: ignore[arg-type]


def test_unregistered_learner_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped name missing from the registry: NotSupportedError naming it and a registered alternative."""
    monkeypatch.delitem(_compile._LEARNERS, "rflo")
    with pytest.raises(NotSupportedError, match=r"'rflo' \(RFLO\), which is not registered") as info:
        learner_from_config(_net(), ETraceConfig(learning_signal="random_feedback"))
    assert "Nearest supported: learning_signal='symmetric', the learner 'd_rtrl'" in str(info.value)
    monkeypatch.setitem(_compile._LEARNERS, "rflo", etp_algorithms.RFLO)
    assert isinstance(learner_from_config(_net(), ETraceConfig(learning_signal="random_feedback")), etp_algorithms.RFLO)


class Leaky(brainstate.nn.Module):
    def __init__(self, w: Array) -> None:
        super().__init__()
        self.w = brainstate.ParamState(w)
        self.h = brainstate.HiddenState(jnp.zeros((B, w.shape[1])))

    def update(self, x: Array) -> Array:
        self.h.value = 0.8 * self.h.value + etp.matmul(x, self.w.value)
        return self.h.value


def test_compile_with_the_default_config_equals_bptt() -> None:
    rng = np.random.default_rng(2)
    w, xs, ys = (jnp.asarray(rng.normal(size=s)) for s in ((I, H), (T, B, I), (T, B, H)))

    def bptt(w: Array) -> Array:
        h, total = jnp.zeros((B, H)), jnp.zeros(())
        for t in range(T):
            h = 0.8 * h + xs[t] @ w
            total = total + jnp.sum((h - ys[t]) ** 2)
        return total

    learner = etp_algorithms.compile(Leaky(w), ETraceConfig(), xs[0])
    assert type(learner) is etp_algorithms.D_RTRL
    got = learner.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")
    want = jax.grad(bptt)(w)
    assert float(jnp.max(jnp.abs(got[("w",)] - want))) <= 1e-12 * float(jnp.max(jnp.abs(want)))


@pytest.mark.filterwarnings("ignore:ETP primitive")
def test_compile_accepts_a_config() -> None:
    xs, ys = _data()
    config = ETraceConfig(trace_factorization=IO, decay=0.5)
    learner = etp_algorithms.compile(_net(), config, xs[0], batch_size=B, seed=1)
    assert type(learner) is etp_algorithms.ES_D_RTRL and learner.decay == 0.5
    direct = etp_algorithms.compile(_net(), "es_d_rtrl", xs[0], batch_size=B, seed=1, decay_or_rank=0.5)
    for a, b in zip(jax.tree.leaves(_grads(learner, xs, ys)), jax.tree.leaves(_grads(direct, xs, ys)), strict=True):
        np.testing.assert_array_equal(a, b)
    batched = etp_algorithms.compile(_net(), config, xs[0], batch_size=B, vmap=True)
    assert type(batched.module) is etp_algorithms.ES_D_RTRL and batched(xs[0]).shape == (B, O)
    with pytest.raises(ValueError, match=r"compile: the config sets \['decay_or_rank'\] of ES_D_RTRL"):
        etp_algorithms.compile(_net(), config, xs[0], batch_size=B, decay_or_rank=0.5)
    net = _net()
    before = {p: s.value for p, s in net.states().items()}
    with pytest.raises(NotSupportedError, match="update_schedule='window'"):
        etp_algorithms.compile(net, ETraceConfig(update_schedule="window", window_size=4), xs[0], batch_size=B)
    assert all(net.states()[p].value is v for p, v in before.items())  # nothing re-initialised


def test_canonical_forms_and_properties() -> None:
    default = ETraceConfig()
    assert (default.is_factorized, default.recursion_x, default.recursion_f, default.decay_x) == (
        False, "jacobian", "jacobian", None,
    )  # fmt: skip
    assert not default.include_recurrent_mixing
    es = ETraceConfig(trace_factorization=IO, decay=np.float32(0.5))
    assert es.temporal_recursion == ("scalar_leak", "jacobian") and es.decay == (0.5, 0.5)
    assert type(es.decay_x) is float and es.is_factorized
    assert es == ETraceConfig(trace_factorization=IO, temporal_recursion=["scalar_leak", "jacobian"], decay=(0.5, 0.5))
    assert hash(es) == hash(ETraceConfig(trace_factorization=IO, decay=0.5))
    ottt = ETraceConfig(trace_factorization=IO, decay=(0.9, 0.0))
    assert (ottt.recursion_x, ottt.recursion_f, ottt.decay_x, ottt.decay_f) == ("scalar_leak", "none", 0.9, 0.0)
    none = ETraceConfig(trace_factorization=IO, temporal_recursion="none")
    assert none.temporal_recursion == ("none", "none") and none.decay == (0.0, 0.0)
    leak = ETraceConfig(temporal_recursion="scalar_leak", decay=0.0)
    assert (leak.temporal_recursion, leak.decay) == ("none", 0.0)
    assert ETraceConfig(temporal_recursion="scalar_leak", decay=0.3).decay_f == 0.3
    no_filter = ETraceConfig(trace_filter="kappa", kappa=0.0)
    assert (no_filter.trace_filter, no_filter.kappa) == ("none", None) and no_filter == default
    snap1 = ETraceConfig(recurrence_scope="sparse_n", sparse_n=1)
    assert (snap1.recurrence_scope, snap1.sparse_n, snap1.include_recurrent_mixing) == ("coupled", None, True)
    uoro = ETraceConfig(trace_factorization="random_projection", recurrence_scope="coupled")
    assert uoro.recurrence_scope == "full" and uoro == dataclasses.replace(uoro, recurrence_scope="full")
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.decay = 0.5  # type: ignore[misc]


def test_replace_and_describe() -> None:
    config = ETraceConfig(trace_factorization=IO, decay=0.9)
    other = config.replace(decay=0.5)
    assert other.decay == (0.5, 0.5) and config.decay == (0.9, 0.9)
    assert config.replace(decay=(0.9, 0.0)).recursion_f == "none"
    with pytest.raises(TypeError, match=r"unknown fields \['decays'\]; the fields are \['trace_factorization'"):
        config.replace(decays=0.5)
    with pytest.raises(ValueError, match="decay must be a float in"):
        config.replace(decay=1.5)
    text = config.describe()
    lines = text.splitlines()
    assert (
        lines[0]
        == "ETraceConfig(trace_factorization='io_factorized', temporal_recursion=('scalar_leak', 'jacobian'), decay=(0.9, 0.9))"
    )
    for axis in (
        "trace_factorization",
        "temporal_recursion",
        "recurrence_scope",
        "learning_signal",
        "trace_filter",
        "update_schedule",
    ):
        assert any(line.startswith(f"  {axis} = ") for line in lines), axis
    assert "a_x=0.9" in text and lines[-1] == "learner: ES_D_RTRL ('es_d_rtrl')"
    unsupported = ETraceConfig(temporal_recursion="scalar_leak", decay=0.5).describe()
    assert "eps <- 0.5 eps + seed" in unsupported
    assert unsupported.splitlines()[-1].startswith("learner: none (") and "'d_rtrl'" in unsupported


BAD: list[tuple[dict[str, Any], str]] = [
    ({"trace_factorization": "per_parameter"}, r"trace_factorization must be one of 'per_param', 'io_factorized', 'random_projection', 'kronecker'; got 'per_parameter'"),
    ({"temporal_recursion": "leak"}, r"temporal_recursion must be one of 'jacobian', 'scalar_leak', 'none'; got 'leak'"),
    ({"recurrence_scope": "dense"}, r"recurrence_scope must be one of 'diagonal', 'coupled', 'sparse_n', 'full'"),
    ({"learning_signal": "random"}, r"learning_signal must be one of 'symmetric', 'random_feedback', 'modulatory', 'bootstrapped'; got 'random'"),
    ({"trace_filter": "lowpass"}, r"trace_filter must be one of 'none', 'kappa'"),
    ({"update_schedule": "epoch"}, r"update_schedule must be one of 'per_step', 'window', 'sequence_end'"),
    ({"learning_signal": None}, r"learning_signal must be one of .*; got None"),
    ({"trace_factorization": IO, "temporal_recursion": ("scalar_leak",), "decay": 0.5}, r"temporal_recursion must be a value or a pair"),
    ({"trace_factorization": IO, "decay": (0.5, 0.5, 0.5)}, r"decay must be a float or a pair"),
    ({"trace_factorization": IO, "decay": 1.0}, r"decay must be a float in \[0, 1\); got 1.0"),
    ({"trace_factorization": IO, "decay": -0.1}, r"decay must be a float in \[0, 1\); got -0.1"),
    ({"trace_factorization": IO, "decay": 3}, r"decay must be a float in \[0, 1\), never an int or a rank \(a rank r stands for the decay \(r-1\)/\(r\+1\), here 0.5\)"),
    ({"trace_factorization": IO, "decay": True}, r"decay must be a number, got the bool True"),
    ({"trace_factorization": IO, "decay": "0.5"}, r"decay must be a Python, NumPy or concrete 0-d JAX number"),
    ({"trace_factorization": IO}, r"decay_x 'scalar_leak' needs a decay"),
    ({"trace_factorization": IO, "temporal_recursion": ("jacobian", "jacobian"), "decay": 0.5}, r"x-side 'jacobian' is impossible under io_factorized"),
    ({"trace_factorization": IO, "temporal_recursion": ("none", "jacobian"), "decay": 0.5}, r"decay_x 'none' keeps no past, so it takes no decay"),
    ({"decay": 0.5}, r"decay has no role with temporal_recursion='jacobian' under per_param"),
    ({"temporal_recursion": "scalar_leak"}, r"decay 'scalar_leak' needs a decay"),
    ({"temporal_recursion": "none", "decay": 0.5}, r"'none' keeps no past"),
    ({"temporal_recursion": ("scalar_leak", "jacobian"), "decay": 0.5}, r"temporal_recursion takes a pair \(x-side, f-side\) only under io_factorized, not 'per_param'"),
    ({"temporal_recursion": "scalar_leak", "decay": (0.5, 0.5)}, r"decay takes a pair .* only under io_factorized"),
    ({"trace_filter": "kappa"}, r"trace_filter 'kappa' needs its coefficient"),
    ({"trace_filter": "kappa", "kappa": 1.0}, r"kappa must be a float in \[0, 1\); got 1.0"),
    ({"trace_filter": "kappa", "kappa": -0.5}, r"kappa must be a float in \[0, 1\)"),
    ({"kappa": 0.5}, r"kappa is the coefficient of trace_filter='kappa'; got kappa=0.5 with trace_filter='none'"),
    ({"trace_factorization": IO, "decay": 0.5, "trace_filter": "kappa", "kappa": 0.5}, r"trace_filter 'kappa' needs trace_factorization='per_param'"),
    ({"recurrence_scope": "sparse_n"}, r"recurrence_scope 'sparse_n' needs its order"),
    ({"recurrence_scope": "sparse_n", "sparse_n": 0}, r"sparse_n must be an int >= 1; got 0"),
    ({"recurrence_scope": "sparse_n", "sparse_n": True}, r"sparse_n must be an int >= 1; got True"),
    ({"recurrence_scope": "sparse_n", "sparse_n": 2.0}, r"sparse_n must be an int >= 1; got 2.0"),
    ({"sparse_n": 2}, r"sparse_n is the order of recurrence_scope='sparse_n'; got sparse_n=2 with 'diagonal'"),
    ({"recurrence_scope": "coupled", "temporal_recursion": "scalar_leak", "decay": 0.5}, r"recurrence_scope 'coupled' changes what enters the Jacobian D, but the trace does not use D"),
    ({"trace_factorization": IO, "recurrence_scope": "full", "decay": (0.5, 0.0)}, r"recurrence_scope 'full' changes what enters"),
    ({"update_schedule": "window"}, r"update_schedule 'window' needs its length"),
    ({"update_schedule": "window", "window_size": 0}, r"window_size must be an int >= 1; got 0"),
    ({"window_size": 3}, r"window_size is the length of update_schedule='window'; got window_size=3 with 'per_step'"),
    ({"trace_factorization": "random_projection"}, r"recurrence_scope must be 'full' under 'random_projection', which estimates the full influence matrix \(braintrace spells it 'coupled'\); got 'diagonal'"),
    ({"trace_factorization": "kronecker", "recurrence_scope": "full", "decay": 0.5}, r"under 'kronecker' the estimator carries its own recursion"),
    ({"trace_factorization": "random_projection", "recurrence_scope": "full", "temporal_recursion": "none"}, r"under 'random_projection' the estimator carries its own recursion"),
    ({"trace_factorization": "random_projection", "recurrence_scope": "full", "trace_filter": "kappa", "kappa": 0.5}, r"'kappa' needs trace_factorization='per_param'"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_values_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ETraceConfig(**kwargs)


UNSUPPORTED: list[tuple[ETraceConfig, list[str]]] = [
    (ETraceConfig(temporal_recursion="scalar_leak", decay=0.5), ["no learner implements temporal_recursion='scalar_leak'", "Nearest supported: temporal_recursion='jacobian', the learner 'd_rtrl' (D_RTRL), e.g. ETraceConfig()"]),
    (ETraceConfig(temporal_recursion="none"), ["temporal_recursion='none'", "'d_rtrl'"]),
    (ETraceConfig(trace_factorization=IO, decay=(0.9, 0.5)), ["decay=(0.9, 0.5)", "decay shared by both sides (decay_x == decay_f), the learner 'es_d_rtrl' (ES_D_RTRL)", "decay=(0.5, 0.5)"]),
    (ETraceConfig(trace_factorization=IO, recurrence_scope="coupled", decay=0.5), ["recurrence_scope='coupled'", "recurrence_scope='diagonal', the learner 'es_d_rtrl'"]),
    (ETraceConfig(trace_factorization=IO, temporal_recursion="none"), ["temporal_recursion=('none', 'none')", "'es_d_rtrl'"]),
    (ETraceConfig(update_schedule="window", window_size=4), ["update_schedule='window'", "update_schedule='per_step', the learner 'd_rtrl'"]),
    (ETraceConfig(update_schedule="sequence_end"), ["update_schedule='sequence_end'", "update_schedule='per_step'"]),
    (ETraceConfig(trace_factorization="random_projection", recurrence_scope="full", learning_signal="random_feedback"), ["learning_signal='random_feedback'", "learning_signal='symmetric', the learner 'uoro' (UORO)"]),
    (ETraceConfig(trace_factorization=IO, decay=0.5, learning_signal="modulatory"), ["learning_signal='modulatory'", "learning_signal='symmetric', the learner 'es_d_rtrl'"]),
    (ETraceConfig(recurrence_scope="full", learning_signal="modulatory"), ["learning_signal='modulatory'", "'rtrl'"]),
]  # fmt: skip


@pytest.mark.parametrize(("config", "fragments"), UNSUPPORTED, ids=[str(i) for i in range(len(UNSUPPORTED))])
def test_unsupported_configs_name_axis_value_and_nearest(config: ETraceConfig, fragments: list[str]) -> None:
    with pytest.raises(NotSupportedError) as info:
        learner_from_config(_net(), config)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert isinstance(info.value, NotImplementedError)


def test_nearest_keeps_the_factorization(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTTT's rule without OTTT: ES-D-RTRL (2 axes off, factorised) is nearer than D-RTRL (2 axes, per_param)."""
    monkeypatch.delitem(_compile._LEARNERS, "ottt", raising=False)
    with pytest.raises(NotSupportedError) as info:
        learner_from_config(_net(), ETraceConfig(trace_factorization=IO, decay=(0.9, 0.0)))
    message = str(info.value)
    assert "'ottt' (OTTT), which is not registered" in message
    assert "Nearest supported: temporal_recursion=('scalar_leak', 'jacobian'); decay shared by both sides" in message
    assert "the learner 'es_d_rtrl' (ES_D_RTRL)" in message and "decay=(0.9, 0.9))" in message
