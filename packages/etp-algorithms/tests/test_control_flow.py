"""Control flow inside a model's step: ``cond``, ``scan`` sub-steps, ``fori_loop`` with a fixed trip count.

The matrix {cond, scan, fori_loop} x {ETP op inside the construct, outside} x {D_RTRL, ES_D_RTRL}:

* D_RTRL on these leaky integrators (position-wise dynamics, feed-forward input) is exact, so its
  online gradient equals BPTT, ``jax.grad`` through the model itself with JAX's own ``cond`` /
  ``scan`` (float64, 1e-10);
* ES_D_RTRL (an approximation) gives on each model exactly what it gives on the same step written
  as straight-line code (``jnp.where`` / a Python loop): the conversion does not change the learner.
"""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algorithms_testing import Euler, _rel
from test_multi_step import _bptt_of

import etp_primitives as etp
from etp_algorithms import D_RTRL, ES_D_RTRL

Array = jax.Array
B, I, H, K, T = 2, 3, 4, 3, 5


class Model(brainstate.nn.Module):
    """A leaky integrator whose step uses one construct; ``straight=True`` writes the same step without it."""

    def __init__(self, construct: str, inside: bool, straight: bool = False, batch: int | None = B) -> None:
        super().__init__()
        rng = np.random.default_rng(7)
        self.construct, self.inside, self.straight = construct, inside, straight
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, H))) * 0.5)
        self.leak = jnp.asarray(rng.uniform(0.5, 0.9, size=H))
        self.h = brainstate.HiddenState(jnp.zeros((H,) if batch is None else (batch, H)))

    def init_state(self, batch_size: int | None = None, **kwargs: Any) -> None:
        self.h = brainstate.HiddenState(jnp.zeros((H,) if batch_size is None else (batch_size, H)))

    def _sub_steps(self, h: Array, x: Array, y: Array | None) -> Array:
        def body(h: Array) -> Array:
            drive = etp.matmul(x, self.w.value) if self.inside else y
            return self.leak * h + drive / K

        if self.straight:
            for _ in range(K):
                h = body(h)
            return h
        if self.construct == "scan":
            return jax.lax.scan(lambda h, _: (body(h), None), h, None, length=K)[0]
        return jax.lax.fori_loop(0, K, lambda i, h: body(h), h)  # static bounds: a scan

    def _switch(self, h: Array, x: Array, y: Array | None) -> Array:
        def on(h: Array) -> Array:
            return self.leak * h + (etp.matmul(x, self.w.value) if self.inside else y)

        def off(h: Array) -> Array:
            return 0.5 * self.leak * h + 2.0 * (etp.matmul(x, self.w.value) if self.inside else y)

        pred = jnp.sum(x) > 0.0
        if self.straight:
            return jnp.where(pred, on(h), off(h))
        return jax.lax.cond(pred, on, off, h)

    def update(self, x: Array) -> Array:
        y = None if self.inside else etp.matmul(x, self.w.value)
        step = self._switch if self.construct == "cond" else self._sub_steps
        self.h.value = step(self.h.value, x, y)
        return self.h.value


CASES = [(c, inside) for c in ("cond", "scan", "fori_loop") for inside in (True, False)]


def _data(rng: np.random.Generator) -> tuple[Array, Array]:
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    xs = xs.at[1].multiply(-1.0).at[3].set(jnp.abs(xs[3]))  # both branches of the cond are taken
    return xs, jnp.asarray(rng.normal(size=(T, B, H)))


def _online(model: Model, learner: Any, xs: Array, target: Array) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    return learner.etrace_grad(xs, target, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reduction="sum")


@pytest.mark.parametrize(("construct", "inside"), CASES)
def test_d_rtrl_on_leaky_integrators_with_control_flow_equals_bptt(
    construct: str, inside: bool, rng: np.random.Generator
) -> None:
    xs, target = _data(rng)
    model = Model(construct, inside)
    want = _bptt_of(model, xs, target)
    learner = D_RTRL(model)
    got = _online(model, learner, xs, target)
    relations = learner.graph.hidden_param_op_relations
    # inside a cond: one relation per branch; inside K sub-steps: one per sub-step
    assert len(relations) == ((2 if construct == "cond" else K) if inside else 1)
    kinds = [r.message for r in learner.graph.diagnostics if r.kind.value == "control_flow_converted"]
    assert kinds and ("if-converted" in kinds[0] if construct == "cond" else "unrolled" in kinds[0])
    assert _rel(got[("w",)], want[("w",)]) < 1e-10
    assert float(jnp.abs(want[("w",)]).max()) > 0


@pytest.mark.parametrize(("construct", "inside"), CASES)
def test_es_d_rtrl_sees_the_same_step_as_straight_line_code(
    construct: str, inside: bool, rng: np.random.Generator
) -> None:
    xs, target = _data(rng)
    grads = []
    for straight in (False, True):
        model = Model(construct, inside, straight)
        grads.append(_online(model, ES_D_RTRL(model, 0.8), xs, target))
    assert _rel(grads[0][("w",)], grads[1][("w",)]) < 1e-12


#: Constructor options of the registered learners that need one.
OPTIONS: dict[str, dict[str, Any]] = {"es_d_rtrl": {"decay_or_rank": 0.8}, "ottt": {"decay": 0.7}}


def _registered() -> list[tuple[str, type]]:
    from etp_algorithms import registered_learners

    seen: dict[type, str] = {}
    for name, cls in registered_learners().items():
        seen.setdefault(cls, name)  # an alias (pp_prop, esd_rtrl) is tested under its first name
    return sorted((name, cls) for cls, name in seen.items())


@pytest.mark.parametrize(("name", "cls"), _registered(), ids=[n for n, _ in _registered()])
def test_every_learner_takes_the_policy(name: str, cls: type, rng: np.random.Generator) -> None:
    """``control_flow=`` on every registered learner reaches the compiler: a limit below the sub-steps refuses."""
    from etp_compiler import CompilationError, ControlFlowPolicy

    xs, _ = _data(rng)
    model = Model("scan", inside=True)
    brainstate.nn.init_all_states(model, batch_size=B)
    options = OPTIONS.get(name, {})
    with pytest.raises(CompilationError, match=f"length {K}, above ControlFlowPolicy.scan_unroll_limit=2"):
        cls(model, **options, control_flow=ControlFlowPolicy(scan_unroll_limit=2, scan_descent="error")).compile_graph(
            xs[0]
        )
    learner = cls(model, **options, control_flow=ControlFlowPolicy(scan_unroll_limit=K))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.compile_graph(xs[0])
    assert len(learner.graph.hidden_param_op_relations) == K
    with pytest.raises(TypeError, match="control_flow must be an etp_compiler.ControlFlowPolicy"):
        cls(model, **options, control_flow={"scan_unroll_limit": 2})


@pytest.mark.parametrize(("construct", "inside"), CASES)
def test_rtrl_with_control_flow_equals_bptt(construct: str, inside: bool, rng: np.random.Generator) -> None:
    """Exact RTRL (the full influence) equals BPTT on every construct, as D_RTRL does on these integrators."""
    from etp_algorithms import RTRL

    xs, target = _data(rng)
    model = Model(construct, inside)
    brainstate.nn.init_all_states(model, batch_size=B)
    want = _bptt_of(model, xs, target)
    got = _online(model, RTRL(model), xs, target)
    assert _rel(got[("w",)], want[("w",)]) < 1e-10


def quiet(fn: Any) -> Any:
    """``fn()`` with the learners' compile-time notes silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def online(call: Any, model: Any, xs: Array, target: Array) -> Any:
    """The gradients of a squared error summed over the steps, one ``grad`` per step through ``call``."""
    params = model.states(brainstate.ParamState)
    total: Any = None
    for t in range(T):
        g = brainstate.transform.grad(lambda x, y=target[t]: jnp.sum((call(x) - y) ** 2), params)(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


@pytest.mark.parametrize(("construct", "inside"), CASES)
@pytest.mark.parametrize("kind", ["d_rtrl", "es_d_rtrl"])
def test_etrace_vmap_of_control_flow_models(construct: str, inside: bool, kind: str, rng: np.random.Generator) -> None:
    """A per-sample learner vmapped over the batch: each sample takes its own ``cond`` branch.

    D_RTRL equals the sum of per-sample BPTT gradients (each sample a model of its own, float64);
    ES_D_RTRL equals its own per-sample learners run one by one (the conversion commutes with vmap).
    """
    from etp_algorithms import ETraceVmap, compile

    xs, target = _data(rng)
    options = OPTIONS.get(kind, {})

    vmapped = quiet(
        lambda: compile(Model(construct, inside, batch=None), kind, xs[0], batch_size=B, vmap=True, **options)
    )
    assert isinstance(vmapped, ETraceVmap)
    got = online(vmapped, vmapped.module.model, xs, target)
    if kind == "d_rtrl":
        parts = [_bptt_of(Model(construct, inside, batch=None), xs[:, b], target[:, b]) for b in range(B)]
    else:
        parts = []
        for b in range(B):
            model = Model(construct, inside, batch=None)
            learner = quiet(lambda m=model: compile(m, kind, xs[0, 0], **options))
            parts.append(online(learner, model, xs[:, b], target[:, b]))
    want = jax.tree.map(lambda *a: sum(a), *parts)
    assert _rel(got[("w",)], want[("w",)]) < 1e-10
    assert float(jnp.abs(want[("w",)]).max()) > 0


KEPT = 32


def _kept_and_unrolled(
    cls: type, xs: Array, target: Array, *, k: int = KEPT, limit: int = 16, options: Any = None, **model: Any
) -> list[Any]:
    """The online gradients of ``cls`` with the loop kept (above ``limit``) and unrolled, after checking the graphs."""
    from etp_compiler import ControlFlowPolicy

    name = next((n for n, c in _registered() if c is cls), "")
    grads = []
    order = []
    for descent in ("auto", "unroll"):
        net = Euler(k, **model)
        learner = cls(
            net,
            **(options or OPTIONS.get(name, {})),
            control_flow=ControlFlowPolicy(scan_unroll_limit=limit, scan_descent=descent),
        )
        grads.append(_online(net, learner, xs, target))
        relations = learner.graph.hidden_param_op_relations
        scans = [e for e in learner.graph.module_info.jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == (1 if descent == "auto" else 0)  # kept as one loop, or unrolled
        assert len(relations) == k * (2 if model.get("recurrent") else 1)
        order.append([r.weight_path for r in relations])
        if descent == "auto":
            assert [r.substep.index for r in relations if r.substep is not None] == sorted(
                list(range(k)) * (2 if model.get("recurrent") else 1)
            )  # sub-step-major, as unrolling orders them
            said = [r.message for r in learner.graph.diagnostics if "propagated through the scan" in r.message]
            assert said
    assert order[0] == order[1]
    return grads


@pytest.mark.parametrize("kind", ["d_rtrl", "eprop"])
def test_etrace_vmap_of_a_kept_scan(kind: str, rng: np.random.Generator) -> None:
    """A per-sample learner with its loop kept, vmapped over the batch: D_RTRL equals the sum of per-sample BPTT
    gradients; e-prop (a recurrent weight inside the loop) its own per-sample learners run one by one."""
    from etp_algorithms import compile
    from etp_compiler import ControlFlowPolicy

    xs, target = _data(rng)
    policy = ControlFlowPolicy(scan_unroll_limit=2)
    recurrent = kind == "eprop"

    def sample() -> Euler:
        return Euler(4, recurrent=recurrent, jitter=True, B=None)

    vmapped = quiet(lambda: compile(sample(), kind, xs[0], batch_size=B, vmap=True, control_flow=policy))
    assert vmapped.module.graph.module_info.descent_scans  # the loop is kept
    got = online(vmapped, vmapped.module.model, xs, target)
    if kind == "d_rtrl":
        parts = [_bptt_of(sample(), xs[:, b], target[:, b]) for b in range(B)]
    else:
        parts = []
        for b in range(B):
            model = sample()
            learner = quiet(lambda m=model: compile(m, kind, xs[0, 0], control_flow=policy))
            parts.append(online(learner, model, xs[:, b], target[:, b]))
    want = jax.tree.map(lambda *a: sum(a), *parts)
    for path in want:
        assert _rel(got[path], want[path]) < 1e-10, path
        assert float(jnp.abs(want[path]).max()) > 0


def test_d_rtrl_through_a_kept_scan_of_euler_sub_steps_equals_bptt(rng: np.random.Generator) -> None:
    """32 Euler sub-steps above the unroll limit stay a loop; D_RTRL stays exact (float64) and equals unrolling."""
    xs, target = _data(rng)
    want = _bptt_of(Euler(KEPT), xs, target)
    kept, unrolled = _kept_and_unrolled(D_RTRL, xs, target)
    assert _rel(kept[("w",)], want[("w",)]) < 1e-10
    assert _rel(kept[("w",)], unrolled[("w",)]) < 1e-10
    assert float(jnp.abs(want[("w",)]).max()) > 0


LEARNERS = _registered()


@pytest.mark.parametrize("jitter", [False, True], ids=["fixed-input", "scanned-input"])
@pytest.mark.parametrize(("name", "cls"), LEARNERS, ids=[n for n, _ in LEARNERS])
def test_every_learner_on_a_kept_scan_gives_what_unrolling_gives(
    name: str, cls: type, jitter: bool, rng: np.random.Generator
) -> None:
    """Every learner on 4 Euler sub-steps kept as a loop (limit 2): the gradients of the unrolled step (float64)."""
    xs, target = _data(rng)
    kept, unrolled = _kept_and_unrolled(cls, xs, target, k=4, limit=2, jitter=jitter)
    assert _rel(kept[("w",)], unrolled[("w",)]) < 1e-10
    assert float(jnp.abs(kept[("w",)]).max()) > 0


@pytest.mark.parametrize(("name", "cls"), LEARNERS, ids=[n for n, _ in LEARNERS])
def test_every_learner_on_a_kept_scan_with_a_recurrent_weight_inside_gives_what_unrolling_gives(
    name: str, cls: type, rng: np.random.Generator
) -> None:
    """A recurrent weight inside the loop too (both are approximations for most learners, the same one).

    For e-prop each sub-step's state h_k, which tanh(h_k) reads, is an observable of the unit: the loop
    keeps them as its boundary values, with their own learning signals."""
    xs, target = _data(rng)
    kept, unrolled = _kept_and_unrolled(cls, xs, target, k=4, limit=2, recurrent=True)
    for path in (("w",), ("u",)):
        assert _rel(kept[path], unrolled[path]) < 1e-10, path
        assert float(jnp.abs(kept[path]).max()) > 0


def test_rtrl_on_a_kept_scan_with_a_recurrent_weight_inside_equals_bptt(rng: np.random.Generator) -> None:
    from etp_algorithms import RTRL

    xs, target = _data(rng)
    want = _bptt_of(Euler(4, recurrent=True), xs, target)
    kept, _ = _kept_and_unrolled(RTRL, xs, target, k=4, limit=2, recurrent=True)
    for path in (("w",), ("u",)):
        assert _rel(kept[path], want[path]) < 1e-10, path


@pytest.mark.parametrize(
    "options",
    [{"feedback": "random", "random_feedback_key": 3}, {"kappa_filter_decay": 0.5}],
    ids=["random-feedback", "filtered"],
)
def test_eprop_on_a_kept_scan_with_a_recurrent_weight_inside_gives_what_unrolling_gives(
    options: dict[str, Any], rng: np.random.Generator
) -> None:
    from etp_algorithms import EProp

    xs, target = _data(rng)
    kept, unrolled = _kept_and_unrolled(EProp, xs, target, k=4, limit=2, options=options, recurrent=True, jitter=True)
    for path in (("w",), ("u",)):
        assert _rel(kept[path], unrolled[path]) < 1e-10, path
        assert float(jnp.abs(kept[path]).max()) > 0


@pytest.mark.parametrize("name", ["d_rtrl", "eprop", "ottt", "rflo", "snap"])
def test_a_kept_reverse_scan_gives_what_unrolling_gives(name: str, rng: np.random.Generator) -> None:
    """A scan over its inputs backwards (its first iteration is the last slot), a recurrent weight inside."""
    cls = dict(LEARNERS)[name]
    xs, target = _data(rng)
    kept, unrolled = _kept_and_unrolled(cls, xs, target, k=4, limit=2, recurrent=True, jitter=True, reverse=True)
    for path in (("w",), ("u",)):
        assert _rel(kept[path], unrolled[path]) < 1e-10, path
        assert float(jnp.abs(kept[path]).max()) > 0


class TwoUnits(brainstate.nn.Module):
    """A loop of sub-steps of one state ``a`` (a recurrent weight inside) whose per-sub-step drive, stacked, also
    drives a second state ``b`` after the loop. Kept, the loop makes ``a`` and ``b`` one hidden group whose
    transition is not position-wise (unrolled, two groups)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(5)
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, H))) * 0.5)
        self.u = brainstate.ParamState(jnp.asarray(rng.normal(size=(H, H))) * 0.3)
        self.a = brainstate.HiddenState(jnp.zeros((B, H)))
        self.b = brainstate.HiddenState(jnp.zeros((B, H)))

    def update(self, x: Array) -> Array:
        def sub_step(a: Array, _: Any) -> tuple[Array, Array]:
            drive = etp.matmul(x, self.w.value)
            return a + 0.5 * (-a + drive + etp.matmul(jnp.tanh(a), self.u.value)), drive

        self.a.value, drives = jax.lax.scan(sub_step, self.a.value, None, length=4)
        self.b.value = 0.5 * self.b.value + jnp.mean(drives, axis=0)
        return self.a.value + self.b.value


def test_eprop_refuses_a_kept_loop_whose_unit_mixes_positions_and_says_to_unroll_it() -> None:
    from etp_algorithms import EProp
    from etp_compiler import ControlFlowPolicy, NotSupportedError

    learner = EProp(TwoUnits(), control_flow=ControlFlowPolicy(scan_unroll_limit=2))
    with (
        pytest.raises(
            NotSupportedError,
            match=r"EProp: the transition of hidden group 0 \(a, b\) mixes positions and, inside a lax.scan kept as a "
            r"loop, feeds values it computes to ETP ops.*\(scan_descent='unroll'\)",
        ),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # D-RTRL's notes on the merged group
        learner.compile_graph(jnp.ones((B, I)))
    assert not learner._executor.is_compiled
    unrolled = EProp(TwoUnits(), control_flow=ControlFlowPolicy(scan_descent="unroll"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unrolled.compile_graph(jnp.ones((B, I)))
    assert len(unrolled.graph.hidden_param_op_relations) == 8


def test_a_learner_that_opts_out_refuses_a_kept_scan(rng: np.random.Generator) -> None:
    from etp_compiler import CompilationError, ControlFlowPolicy

    class OneOpAtATime(D_RTRL):
        takes_scan_substeps = False

    xs, _ = _data(rng)
    learner = OneOpAtATime(Euler(KEPT))
    with pytest.raises(CompilationError, match=r"OneOpAtATime cannot learn Euler: the ETP op of weight w .* length 32"):
        learner.compile_graph(xs[0])
    assert not learner._executor.is_compiled
    unrolled = OneOpAtATime(Euler(KEPT), control_flow=ControlFlowPolicy(scan_descent="unroll"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unrolled.compile_graph(xs[0])
    assert len(unrolled.graph.hidden_param_op_relations) == KEPT
