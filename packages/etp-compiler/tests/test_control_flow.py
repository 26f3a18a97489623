"""``ControlFlowPolicy``: what the compiler does with each construct, what it refuses, and what it says."""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import pytest

import etp_compiler
import etp_primitives as etp
from etp_compiler import CompilationError, ControlFlowPolicy

Array = jax.Array


class Step(brainstate.nn.Module):
    def __init__(self, body: Any) -> None:
        super().__init__()
        self.body = body
        self.w = brainstate.ParamState(jnp.ones((3, 4)) * 0.1)
        self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

    def update(self, x: Array) -> Array:
        self.h.value = self.body(self, self.h.value, x)
        return self.h.value


def _graph(body: Any, policy: ControlFlowPolicy | None = None) -> etp_compiler.ETraceGraph:
    model = Step(body)
    brainstate.nn.init_all_states(model)
    return etp_compiler.compile_etrace_graph(model, jnp.ones((2, 3)), control_flow=policy, emit=False)


def _primitives(graph: etp_compiler.ETraceGraph) -> set[str]:
    return {e.primitive.name for e in graph.module_info.jaxpr.eqns}


def _actions(graph: etp_compiler.ETraceGraph) -> list[str]:
    return [r.message for r in graph.diagnostics if r.kind is etp_compiler.DiagnosticKind.CONTROL_FLOW_CONVERTED]


def sub_steps(n: int) -> Any:
    def body(m: Step, h: Array, x: Array) -> Array:
        return jax.lax.scan(lambda h, _: (0.9 * h + etp.matmul(x, m.w.value), None), h, None, length=n)[0]

    return body


def test_scans_are_unrolled_up_to_the_limit() -> None:
    graph = _graph(sub_steps(4))
    assert "scan" not in _primitives(graph) and len(graph.hidden_param_op_relations) == 4
    assert _actions(graph) == ["lax.scan of length 4: unrolled (the sub-steps composed into the step)"]
    with pytest.raises(
        CompilationError, match=r"lax.scan` in the model's step .* length 20, above .*scan_unroll_limit=16"
    ):
        _graph(sub_steps(20), ControlFlowPolicy(scan_descent="error"))
    kept = _graph(sub_steps(20))  # by default a longer scan stays a loop, one relation per sub-step
    assert "scan" in _primitives(kept)
    assert [r.substep.index for r in kept.hidden_param_op_relations if r.substep is not None] == list(range(20))
    assert "propagated through the scan without unrolling" in _actions(kept)[0]
    assert len(_graph(sub_steps(20), ControlFlowPolicy(scan_unroll_limit=20)).hidden_param_op_relations) == 20
    assert len(_graph(sub_steps(20), ControlFlowPolicy(scan_descent="unroll")).hidden_param_op_relations) == 20


def test_a_cond_is_if_converted_or_refused() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        return jax.lax.cond(jnp.sum(x) > 0, lambda h: 0.9 * h, lambda h: 0.5 * h, h) + etp.matmul(x, m.w.value)

    graph = _graph(body)
    assert "cond" not in _primitives(graph) and "select_n" in _primitives(graph)
    assert _actions(graph) == ["lax.cond with 2 branches: if-converted (every branch traced, outputs selected)"]
    with pytest.raises(CompilationError, match=r"ControlFlowPolicy\(cond='error'\) refuses it"):
        _graph(body, ControlFlowPolicy(cond="error"))


def test_a_cond_inside_a_scan_is_converted_too() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        def sub(h: Array, _: Any) -> tuple[Array, None]:
            h = jax.lax.cond(jnp.sum(h) > 1.0, lambda h: 0.5 * h, lambda h: h, h)
            return 0.9 * h + etp.matmul(x, m.w.value), None

        return jax.lax.scan(sub, h, None, length=3)[0]

    graph = _graph(body)
    assert not {"cond", "scan"} & _primitives(graph)
    assert len(_actions(graph)) == 4  # three conds (one per sub-step), then the scan


def test_a_data_dependent_while_loop_is_refused() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        return jax.lax.while_loop(lambda h: jnp.sum(h) < 1.0, lambda h: h + 0.1, h) + etp.matmul(x, m.w.value)

    with pytest.raises(CompilationError, match=r"lax.while_loop` .* reverse mode.*fori_loop with static bounds"):
        _graph(body)
    with pytest.raises(CompilationError, match="while_hidden='error'"):
        _graph(body, ControlFlowPolicy(while_hidden="error"))


def test_an_etp_op_in_a_kept_construct_follows_the_policy() -> None:
    """A long scan that holds an ETP op but carries no hidden state: refused, or kept with instantaneous gradients."""

    def body(m: Step, h: Array, x: Array) -> Array:
        xs = jnp.broadcast_to(x, (20, *x.shape))
        ys = jax.lax.scan(lambda c, xi: (c, etp.matmul(xi, m.w.value)), 0.0, xs)[1]
        return 0.9 * h + jnp.mean(ys, axis=0) + x[:, :1]

    with pytest.raises(CompilationError, match="length 20"):
        _graph(body, ControlFlowPolicy(scan_descent="error"))
    kept = _graph(body)  # by default the loop is kept and its op gets one relation per sub-step
    assert "scan" in _primitives(kept) and len(kept.hidden_param_op_relations) == 20
    graph = _graph(body, ControlFlowPolicy(scan_descent="error", etp_in_control_flow="instantaneous"))
    assert "scan" in _primitives(graph) and not graph.hidden_param_op_relations
    assert _actions(graph) == ["lax.scan of length 20: left opaque, its ETP ops get instantaneous gradients"]


def test_control_flow_that_touches_nothing_is_left_alone() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        scale = jax.lax.scan(lambda c, _: (c * 1.1, None), jnp.ones(()), None, length=50)[0]
        return 0.9 * h + scale * etp.matmul(x, m.w.value)

    graph = _graph(body)
    assert "scan" in _primitives(graph) and _actions(graph) == []
    assert len(graph.hidden_param_op_relations) == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cond", "unroll", r"cond must be one of \('convert', 'error'\)"),
        ("while_hidden", "forward", "while_hidden must be one of"),
        ("etp_in_control_flow", "ignore", "etp_in_control_flow must be one of"),
        ("scan_descent", "descend", "scan_descent must be one of"),
        ("scan_unroll_limit", -1, "scan_unroll_limit must be a non-negative int"),
        ("scan_unroll_limit", 2.5, "scan_unroll_limit must be a non-negative int"),
    ],
)
def test_the_policy_is_checked(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControlFlowPolicy(**{field: value})


def test_a_kept_scan_inside_a_kept_scan_is_refused() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        def outer(h: Array, _: Any) -> tuple[Array, None]:
            return sub_steps(17)(m, h, x), None

        return jax.lax.scan(outer, h, None, length=18)[0]

    with pytest.raises(CompilationError, match=r"length 17 above .*scan_unroll_limit sits inside another scan"):
        _graph(body)
    graph = _graph(body, ControlFlowPolicy(scan_unroll_limit=17))  # the inner one unrolled: the outer kept
    assert "scan" in _primitives(graph) and len(graph.hidden_param_op_relations) == 18 * 17


def test_a_weight_computed_from_the_carry_inside_a_kept_scan_is_excluded_with_a_record() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        def sub_step(h: Array, _: Any) -> tuple[Array, None]:
            weight = m.w.value * jnp.mean(h)  # depends on the carried state: not one weight for every sub-step
            return 0.9 * h + etp.matmul(x, weight), None

        return jax.lax.scan(sub_step, h, None, length=20)[0]

    graph = _graph(body)
    assert graph.hidden_param_op_relations == []
    (record,) = [r for r in graph.diagnostics if r.kind is etp_compiler.DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE]
    assert "inside a lax.scan of length 20" in record.message and "['weight']" in record.message


def test_a_kept_scan_orders_its_relations_as_unrolling_does_and_names_their_inputs() -> None:
    def body(m: Step, h: Array, x: Array) -> Array:
        def sub_step(h: Array, _: Any) -> tuple[Array, None]:
            return 0.9 * h + etp.matmul(x, m.w.value) + etp.matmul(jnp.tanh(h), m.u.value), None

        return jax.lax.scan(sub_step, h, None, length=20)[0]

    orders = []
    for descent in ("auto", "unroll"):
        model = Step(body)
        model.u = brainstate.ParamState(jnp.eye(4) * 0.2)
        graph = etp_compiler.compile_etrace_graph(
            model, jnp.ones((2, 3)), control_flow=ControlFlowPolicy(scan_descent=descent), emit=False
        )
        orders.append([r.weight_path for r in graph.hidden_param_op_relations])
    assert orders[0] == orders[1] == [("w",), ("u",)] * 20
    model = Step(body)
    model.u = brainstate.ParamState(jnp.eye(4) * 0.2)
    graph = etp_compiler.compile_etrace_graph(model, jnp.ones((2, 3)), emit=False)
    minfo = graph.module_info
    w_op, u_op = graph.hidden_param_op_relations[:2]
    assert [w_op.substep.index, u_op.substep.index] == [0, 0]  # type: ignore[union-attr]
    # x of the first op is the step's input (a constant of the loop); that of the second, tanh(h_k), the loop's
    (x_var,) = minfo.arg_invars
    assert w_op.substep.eqn_inputs[0] is x_var and u_op.substep.eqn_inputs[0] is None  # type: ignore[union-attr]
    assert w_op.substep.eqn_inputs[1] is w_op.trainable_vars["weight"]  # type: ignore[union-attr]
    # held_eqns: the scan replaced by its twin, everything else the same equations
    (scan,) = [e for e in minfo.jaxpr.eqns if e.primitive.name == "scan"]
    held = minfo.held_eqns
    assert len(held) == len(minfo.jaxpr.eqns) and scan not in held
    (twin,) = [e for e in held if e.primitive.name == "scan"]
    assert twin.invars == scan.invars and twin.outvars == scan.outvars
    # the twin holds the ops' outputs: dh^t/dh^{t-1} is 0.9^20 there; through the loop itself u's path adds
    h_in = minfo.hidden_path_to_invar[("h",)]
    position = list(scan.invars).index(h_in)
    env = etp_compiler.run_step(minfo, minfo.current_inputs(jnp.ones((2, 3))))
    args = [etp_compiler.read_atom(env, v) for v in scan.invars]  # h^{t-1} = 0, so tanh'(h) = 1 in sub-step 0

    def carried(eqn: Any, h: Array) -> Array:
        return etp_compiler.bind_eqn(eqn, [h if i == position else a for i, a in enumerate(args)])[0]

    h0 = args[position]
    _, held = jax.jvp(lambda h: carried(twin, h), (h0,), (jnp.ones_like(h0),))
    _, through = jax.jvp(lambda h: carried(scan, h), (h0,), (jnp.ones_like(h0),))
    assert jnp.allclose(held, 0.9**20, rtol=1e-5)
    assert bool(jnp.all(through > 1.5 * 0.9**20))  # the recurrent weight's path adds to it


def test_reach_follows_a_scan_through_its_carry_and_cuts_equations_inside_it() -> None:
    def f(a: Array, b: Array) -> Any:
        def body(carry: tuple[Array, Array], _: Any) -> tuple[tuple[Array, Array], Array]:
            c1, c2 = carry
            return (c2, jnp.sin(a)), jnp.cos(b)  # a reaches c2 at once, c1 only through the carry

        return jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), None, length=3)

    jaxpr = jax.make_jaxpr(f)(1.0, 2.0).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    c1, c2, ys = scan.outvars
    a, b = jaxpr.invars
    from_a = etp_compiler.reach(jaxpr.eqns, {a})
    assert c1 in from_a and c2 in from_a and ys not in from_a
    from_b = etp_compiler.reach(jaxpr.eqns, {b})
    assert ys in from_b and c1 not in from_b and c2 not in from_b  # not every output of the loop
    (cos,) = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive.name == "cos"]
    assert ys not in etp_compiler.reach(jaxpr.eqns, {b}, cut={id(cos)})  # an equation inside the body cut
    assert ys not in etp_compiler.reach(jaxpr.eqns, {b}, stop={b})


def test_a_kept_scan_stacks_the_states_the_rest_of_its_body_reads() -> None:
    """``tanh(h)`` feeding a recurrent weight reads the carried state: each sub-step's ``h_k`` is stacked (a boundary
    value of the body, carried: e-prop's observable from sub-step 1 on), with zeros added where it is read."""

    def body(m: Step, h: Array, x: Array) -> Array:
        def sub_step(h: Array, _: Any) -> tuple[Array, None]:
            return 0.9 * h + etp.matmul(x, m.w.value) + etp.matmul(jnp.tanh(h), m.u.value), None

        return jax.lax.scan(sub_step, h, None, length=20)[0]

    model = Step(body)
    model.u = brainstate.ParamState(jnp.eye(4) * 0.2)
    model.h.value = jnp.full((2, 4), 0.3)
    graph = etp_compiler.compile_etrace_graph(model, jnp.ones((2, 3)), emit=False)
    minfo = graph.module_info
    (scan,) = minfo.descent_scans
    assert scan.boundary_carried == (True,)
    stack, eps = scan.boundary_stack_var(0), scan.boundary_eps_var(0)
    assert stack.aval.shape == eps.aval.shape == (20, 2, 4)
    env = etp_compiler.run_step(minfo, minfo.current_inputs(jnp.ones((2, 3))))
    h, want = jnp.full((2, 4), 0.3), []
    for _ in range(20):
        want.append(h)
        h = 0.9 * h + jnp.ones((2, 3)) @ model.w.value + jnp.tanh(h) @ model.u.value
    assert jnp.allclose(env[stack], jnp.stack(want), rtol=1e-6)
    assert jnp.allclose(env[minfo.hidden_path_to_outvar[("h",)]], h, rtol=1e-6)
    # feed-forward sub-steps: nothing of the transition is read off it, nothing stacked
    (plain,) = _graph(sub_steps(20)).module_info.descent_scans
    assert plain.boundary_carried == ()
