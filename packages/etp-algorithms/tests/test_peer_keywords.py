"""braintrace 0.2.8's engine keywords on the learners whose 0.2.8 signature has them.

Oracles: each learner without the keywords (the same gradients, to the last bit, for the switches
that change nothing; the traces' storage dtype within float32 rounding, and the first step exactly),
the config table (``resolve_config``) for what a config describes, and braintrace 0.2.8's published
signatures (the parameter names and, where ours keeps 0.2.8's order, the positions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_nn
from etp_algorithms import (
    D_RTRL,
    ES_D_RTRL,
    KF_RTRL,
    UORO,
    ETraceConfig,
    OSTLFeedforward,
    OSTLRecurrent,
    SnAp,
    ThreeFactor,
)

B, I, H = 2, 3, 4

#: braintrace 0.2.8's D_RTRL parameters after the model (OSTLRecurrent's are the same)
D_RTRL_NAMES = (
    "name",
    "vjp_method",
    "fast_solve",
    "trace_dtype",
    "chunked_trace",
    "control_flow",
    "config",
    "random_feedback_key",
    "snap_max_jacobian_elements",
)

#: learner -> (constructor of ours, the parameters braintrace 0.2.8's signature lists after the model)
LEARNERS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "D_RTRL": (D_RTRL, D_RTRL_NAMES),
    "OSTLRecurrent": (OSTLRecurrent, D_RTRL_NAMES),
    "ES_D_RTRL": (
        lambda model, **kw: ES_D_RTRL(model, 0.5, **kw),
        ("decay_or_rank", "name", "vjp_method", "fast_solve", "control_flow", "config", "random_feedback_key"),
    ),
    "OSTLFeedforward": (OSTLFeedforward, ("decay_or_rank", "name")),
    "SnAp": (
        lambda model, **kw: SnAp(model, n=1, **kw),
        ("n", "name", "vjp_method", "fast_solve", "snap_max_jacobian_elements"),
    ),
    "ThreeFactor": (
        ThreeFactor,
        (
            "name",
            "vjp_method",
            "modulator",
            "fast_solve",
            "trace_dtype",
            "chunked_trace",
            "control_flow",
            "snap_max_jacobian_elements",
        ),
    ),
    "UORO": (
        UORO,
        (
            "name",
            "vjp_method",
            "fast_solve",
            "control_flow",
            "projection_key",
            "projection_eps",
            "random_feedback_key",
            "snap_max_jacobian_elements",
        ),
    ),
    "KF_RTRL": (KF_RTRL, ()),  # not in 0.2.8; takes UORO's keywords (the same constructor)
}

#: learner -> the keywords of 0.2.8's engine it accepts (what a test passes to every one)
SWITCHES = {
    "fast_solve": False,
    "chunked_trace": False,
    "random_feedback_key": jax.random.key(1),
    "snap_max_jacobian_elements": 1000,
}
ACCEPTS = {
    "D_RTRL": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
    "OSTLRecurrent": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
    "ES_D_RTRL": ("fast_solve", "random_feedback_key"),
    "OSTLFeedforward": ("fast_solve", "random_feedback_key"),
    "SnAp": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
    "ThreeFactor": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
    "UORO": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
    "KF_RTRL": ("fast_solve", "chunked_trace", "random_feedback_key", "snap_max_jacobian_elements"),
}
#: the learners that store traces in ``trace_dtype``
WITH_TRACE_DTYPE = ("D_RTRL", "OSTLRecurrent", "SnAp", "ThreeFactor", "UORO", "KF_RTRL")


def _model(seed: int = 0) -> brainstate.nn.Module:
    brainstate.random.seed(seed)
    model = etp_nn.GRUCell(I, H)
    brainstate.nn.init_all_states(model, batch_size=B)
    return model


def _gradients(make: Callable[..., Any], steps: int = 4, **keywords: Any) -> tuple[list[dict[Any, Any]], Any]:
    """The per-step online gradients of ``sum(h^t)`` and the learner, on a fresh model with fixed inputs."""
    model = _model()
    learner = make(model, **keywords)
    learner.compile_graph(jnp.zeros((B, I)))
    params = model.states(brainstate.ParamState)
    xs = np.random.default_rng(5).normal(size=(steps, B, I))
    grads = []
    for x in xs:
        grad = brainstate.transform.grad(lambda x: jnp.sum(learner(x)), params)(jnp.asarray(x))
        grads.append(jax.tree.map(np.asarray, grad))
    return grads, learner


def _parameters(cls: Any) -> list[str]:
    """The constructor's parameters after the model (brainstate's metaclass hides them from ``signature(cls)``)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]


def _max_rel(got: Any, want: Any) -> float:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max(float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30)) for g, w in pairs)


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_the_signature_has_braintrace_0_2_8_names(learner: str) -> None:
    make, names = LEARNERS[learner]
    cls = {"ES_D_RTRL": ES_D_RTRL, "SnAp": SnAp}.get(learner, make)
    ours = _parameters(cls)
    assert set(names) <= set(ours), sorted(set(names) - set(ours))
    assert set(ACCEPTS[learner]) <= set(ours)


@pytest.mark.parametrize("learner", ["D_RTRL", "OSTLRecurrent", "ES_D_RTRL", "ThreeFactor"])
def test_braintrace_0_2_8_positional_order_is_kept(learner: str) -> None:
    """Where our signature keeps 0.2.8's order, a positional call of 0.2.8 reaches the same parameters."""
    make, names = LEARNERS[learner]
    cls = {"ES_D_RTRL": ES_D_RTRL}.get(learner, make)
    ours = _parameters(cls)
    assert ours[: len(names)] == list(names)


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_the_engine_switches_are_kept_and_change_nothing(learner: str) -> None:
    make, _ = LEARNERS[learner]
    keywords = {k: SWITCHES[k] for k in ACCEPTS[learner]}
    want, _ = _gradients(make)
    got, built = _gradients(make, **keywords)
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(jax.tree.leaves(step_got), jax.tree.leaves(step_want), strict=True):
            np.testing.assert_array_equal(a, b)
    for key, value in keywords.items():
        assert getattr(built, key) is value or getattr(built, key) == value


@pytest.mark.parametrize("learner", WITH_TRACE_DTYPE)
def test_trace_dtype_stores_the_traces_in_it(learner: str) -> None:
    make, _ = LEARNERS[learner]
    want, full = _gradients(make)
    got, stored = _gradients(make, trace_dtype=jnp.float32)
    floating = [leaf for leaf in jax.tree.leaves(stored.etrace.value) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    assert stored.trace_bytes() < full.trace_bytes()
    assert stored.trace_dtype == np.dtype(np.float32)
    # the first step's gradient is computed from the full-precision new traces; later steps start
    # from traces rounded to float32, so they differ from float64's by about its precision, not more
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    later = _max_rel(got[1:], want[1:])
    assert 0.0 < later < 1e-5, later


@pytest.mark.parametrize("dtype", [jnp.int32, "not a dtype", bool])
def test_a_trace_dtype_that_is_not_floating_is_named(dtype: Any) -> None:
    with pytest.raises(TypeError, match=r"D_RTRL: trace_dtype must be a floating dtype"):
        D_RTRL(_model(), trace_dtype=dtype)


def test_bad_switches_are_named() -> None:
    with pytest.raises(TypeError, match="ES_D_RTRL: fast_solve must be a bool, got 'yes'"):
        ES_D_RTRL(_model(), 0.5, fast_solve="yes")
    with pytest.raises(TypeError, match="D_RTRL: chunked_trace must be a bool, got 1"):
        D_RTRL(_model(), chunked_trace=1)
    with pytest.raises(ValueError, match="SnAp: snap_max_jacobian_elements must be a positive int, got 0"):
        SnAp(_model(), snap_max_jacobian_elements=0)


def test_a_config_of_this_learner_is_accepted() -> None:
    model = _model()
    assert D_RTRL(model, config=ETraceConfig()).config == ETraceConfig()
    assert OSTLRecurrent(model, config=ETraceConfig()).config == ETraceConfig()
    io = ETraceConfig(trace_factorization="io_factorized", decay=0.5)
    assert ES_D_RTRL(model, 0.5, config=io).decay == 0.5
    assert ES_D_RTRL(model, 3, config=io).decay == 0.5  # rank 3 is decay 0.5
    assert OSTLFeedforward(model, 0.5, config=io).decay == 0.5
    assert SnAp(model, n=2, config=ETraceConfig(recurrence_scope="sparse_n", sparse_n=2)).n == 2


def test_a_config_of_another_learner_is_refused_naming_it() -> None:
    model = _model()
    io = ETraceConfig(trace_factorization="io_factorized", decay=0.5)
    with pytest.raises(ValueError, match=r"D_RTRL: the config describes ES_D_RTRL\(\{'decay_or_rank': 0.5\}\)"):
        D_RTRL(model, config=io)
    with pytest.raises(ValueError, match="learner_from_config"):
        OSTLFeedforward(model, 0.5, config=ETraceConfig())
    with pytest.raises(ValueError, match="the config sets decay_or_rank=0.9 but the constructor got decay_or_rank=0.5"):
        ES_D_RTRL(model, 0.5, config=io.replace(decay=0.9))
    with pytest.raises(ValueError, match="the config sets n=2 but the constructor got n=1"):
        SnAp(model, n=1, config=ETraceConfig(recurrence_scope="sparse_n", sparse_n=2))
    with pytest.raises(TypeError, match="D_RTRL: config must be an ETraceConfig or None, got dict"):
        D_RTRL(model, config={"trace_factorization": "per_param"})
