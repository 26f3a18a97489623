"""Stage 2: hidden groups, their transitions and per-position Jacobian blocks."""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from compiler_testing import compile_quiet, group_inputs, records_of, reference_blocks, step_env

import etp_compiler
import etp_nn
import etp_primitives as etp
from etp_compiler import CompilationError, DiagnosticKind, DiagnosticLevel


class AdaptiveNeuron(brainstate.nn.Module):
    """Two hidden states mixed element-wise: membrane ``v`` and adaptation ``a``."""

    def __init__(self, n_in: int = 3, n: int = 4, batch: int | None = None) -> None:
        super().__init__()
        shape = (n,) if batch is None else (batch, n)
        self.w = brainstate.ParamState(jnp.linspace(-1.0, 1.0, n_in * n).reshape(n_in, n))
        self.v = brainstate.HiddenState(jnp.linspace(-0.5, 0.7, int(np.prod(shape))).reshape(shape))
        self.a = brainstate.HiddenState(jnp.linspace(0.2, 0.9, int(np.prod(shape))).reshape(shape))

    def update(self, x: Any) -> Any:
        v = 0.9 * jnp.tanh(self.v.value) - self.a.value**2 + etp.matmul(x, self.w.value)
        self.a.value = 0.8 * self.a.value + 0.3 * jnp.sin(v)
        self.v.value = v
        return v


class MixedByMatrix(brainstate.nn.Module):
    """Hidden states mixed across positions by a plain (non-ETP) matrix: not position-wise."""

    def __init__(self, n: int = 3, batch: int = 2) -> None:
        super().__init__()
        self.mix = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
        self.w = brainstate.ParamState(jnp.ones((2, n)) * 0.3)
        self.v = brainstate.HiddenState(jnp.linspace(-1.0, 1.0, batch * n).reshape(batch, n))
        self.a = brainstate.HiddenState(jnp.linspace(0.5, -0.4, batch * n).reshape(batch, n))

    def update(self, x: Any) -> Any:
        v = jnp.tanh(self.v.value @ self.mix) * self.a.value + etp.matmul(x, self.w.value)
        self.a.value = 0.5 * self.a.value + jnp.cos(self.v.value)
        self.v.value = v
        return v


@jax.custom_jvp
def spike(v: Any) -> Any:
    return (v > 0).astype(v.dtype)


@spike.defjvp
def _spike_jvp(primals: Any, tangents: Any) -> Any:
    (v,), (dv,) = primals, tangents
    return spike(v), dv / (1.0 + jnp.abs(v)) ** 2


class LIF(brainstate.nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.w = brainstate.ParamState(jnp.ones((3, n)) * 0.2)
        self.v = brainstate.HiddenState(jnp.linspace(-1.0, 1.5, n))

    def update(self, x: Any) -> Any:
        v = 0.9 * self.v.value + etp.matmul(x, self.w.value)
        s = spike(v - 0.5)
        self.v.value = v - 0.5 * s
        return s


class Leaky(brainstate.nn.Module):
    def __init__(self, n_in: int, n: int, batch: int | None = None, unit: Any = None) -> None:
        super().__init__()
        shape = (n,) if batch is None else (batch, n)
        self.w = brainstate.ParamState(jnp.ones((n_in, n)) * 0.1)
        value = jnp.linspace(0.1, 0.9, int(np.prod(shape))).reshape(shape)
        self.unit = unit
        self.h = brainstate.HiddenState(value if unit is None else value * unit)

    def update(self, x: Any) -> Any:
        y = etp.matmul(x, self.w.value)
        self.h.value = 0.7 * self.h.value + (y if self.unit is None else y * self.unit)
        return self.h.value


# ----------------------------------------------------------------------------------------------- grouping


def test_two_layer_stack_gives_one_group_per_layer() -> None:
    class Stack(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = etp_nn.ValinaRNNCell(3, 4)
            self.l2 = etp_nn.ValinaRNNCell(4, 5)

        def update(self, x: Any) -> Any:
            return self.l2(self.l1(x))

    model = Stack()
    brainstate.nn.init_all_states(model, batch_size=2)
    graph = compile_quiet(model, jnp.ones((2, 3)))
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("l1", "h"),), (("l2", "h"),)]
    assert [g.varshape for g in graph.hidden_groups] == [(2, 4), (2, 5)]
    assert [g.index for g in graph.hidden_groups] == [0, 1]
    assert all(g.num_state == 1 and g.is_positionwise for g in graph.hidden_groups)
    assert graph.hid_path_to_group[("l2", "h")] is graph.hidden_groups[1]
    assert not records_of(graph, DiagnosticKind.HIDDEN_GROUP_MERGED)
    # layer 1 reaches layer 2 only through layer 2's weight: the transition holds it constant
    assert graph.hidden_groups[1].hidden_invars == (graph.module_info.hidden_path_to_invar[("l2", "h")],)


def test_multi_state_neuron_forms_one_merged_group() -> None:
    graph = compile_quiet(AdaptiveNeuron(), jnp.ones(3))
    (group,) = graph.hidden_groups
    assert set(group.hidden_paths) == {("v",), ("a",)}
    assert group.num_state == 2 and group.varshape == (4,) and group.is_positionwise
    assert {id(s) for s in group.hidden_states} == {id(graph.module_info.hidden_states[p]) for p in group.hidden_paths}
    (record,) = records_of(graph, DiagnosticKind.HIDDEN_GROUP_MERGED)
    assert record.level is DiagnosticLevel.INFO
    assert set(record.hidden_paths or ()) == {("v",), ("a",)}
    assert record.context["hidden_group_index"] == 0


def test_lstm_cell_has_one_group_with_h_and_c() -> None:
    cell = etp_nn.LSTMCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    graph = compile_quiet(cell, jnp.ones((2, 3)))
    (group,) = graph.hidden_groups
    assert set(group.hidden_paths) == {("h",), ("c",)}
    assert group.varshape == (2, 4) and group.is_positionwise
    assert graph.hid_path_to_group[("h",)] is graph.hid_path_to_group[("c",)] is group


def test_states_of_different_shapes_are_split_with_a_record() -> None:
    class Uneven(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((2, 4)))
            self.h = brainstate.HiddenState(jnp.zeros(4))
            self.g = brainstate.HiddenState(jnp.zeros(3))

        def update(self, x: Any) -> Any:
            self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value)
            self.g.value = 0.5 * self.g.value + self.h.value[:3]
            return self.g.value

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = etp_compiler.compile_etrace_graph(Uneven(), jnp.ones(2))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "depend on each other but have different shapes" in messages[0]
    assert "does not broadcast to hidden state g of shape (3,)" in messages[1]
    assert sorted(g.hidden_paths for g in graph.hidden_groups) == [(("g",),), (("h",),)]
    (record,) = records_of(graph, DiagnosticKind.STATE_MISMATCH)
    assert record.level is DiagnosticLevel.WARNING
    assert record.context["shapes"] == {("h",): (4,), ("g",): (3,)}


@pytest.mark.parametrize("batch", [None, 3])
def test_batched_and_unbatched_states(batch: int | None) -> None:
    model = AdaptiveNeuron(batch=batch)
    x = jnp.ones(3) if batch is None else jnp.ones((batch, 3))
    graph = compile_quiet(model, x)
    (group,) = graph.hidden_groups
    assert group.varshape == ((4,) if batch is None else (batch, 4))
    hidden, consts = group_inputs(group, step_env(graph, x))
    blocks = group.jacobian_blocks(hidden, consts)
    assert blocks.shape == (*group.varshape, 2, 2)
    np.testing.assert_allclose(blocks, reference_blocks(group, hidden, consts), rtol=1e-12, atol=1e-14)


def test_unit_carrying_hidden_state() -> None:
    model = Leaky(3, 4, batch=2, unit=u.mV)
    graph = compile_quiet(model, jnp.ones((2, 3)))
    (group,) = graph.hidden_groups
    assert group.hidden_paths == (("h",),) and group.varshape == (2, 4)
    hidden, consts = group_inputs(group, step_env(graph, jnp.ones((2, 3))))
    np.testing.assert_allclose(hidden[0], u.get_mantissa(model.h.value))
    np.testing.assert_allclose(group.jacobian_blocks(hidden, consts), np.full((2, 4, 1, 1), 0.7), rtol=1e-14)


def test_nested_jit_around_the_hidden_update_is_inlined() -> None:
    class Jitted(Leaky):
        def update(self, x: Any) -> Any:
            @jax.jit
            def step(h: Any, x: Any, w: Any) -> Any:
                return jax.jit(lambda h: 0.7 * h)(h) + jax.jit(etp.matmul)(x, w)

            self.h.value = step(self.h.value, x, self.w.value)
            return self.h.value

    graph = compile_quiet(Jitted(3, 4), jnp.ones(3))
    names = {e.primitive.name for e in graph.module_info.jaxpr.eqns}
    assert "pjit" not in names and "jit" not in names and "etp_mv" in names
    (group,) = graph.hidden_groups
    hidden, consts = group_inputs(group, step_env(graph, jnp.ones(3)))
    np.testing.assert_allclose(group.jacobian_blocks(hidden, consts), np.full((4, 1, 1), 0.7), rtol=1e-14)


# ----------------------------------------------------------------------------------------------- transitions


def test_transition_holds_etp_outputs_constant_and_reproduces_the_step() -> None:
    model = AdaptiveNeuron()
    x = jnp.array([0.3, -0.2, 0.5])
    graph = compile_quiet(model, x)
    (group,) = graph.hidden_groups
    assert not any(etp.is_etp_primitive(e.primitive) for e in group.transition_jaxpr.eqns)
    (mm,) = [e for e in graph.module_info.jaxpr.eqns if etp.is_etp_primitive(e.primitive)]
    assert mm.outvars[0] in group.transition_jaxpr_constvars
    env = step_env(graph, x)
    hidden, consts = group_inputs(group, env)
    new = group.transition(hidden, consts)
    for value, outvar in zip(new, group.hidden_outvars, strict=True):
        np.testing.assert_allclose(value, env[outvar], rtol=1e-14)
    # the transition is the model's step (old states -> new states)
    v_old, a_old = model.v.value, model.a.value
    v = 0.9 * jnp.tanh(v_old) - a_old**2 + x @ model.w.value
    expected = {("v",): v, ("a",): 0.8 * a_old + 0.3 * jnp.sin(v)}
    for path, value in zip(group.hidden_paths, new, strict=True):
        np.testing.assert_allclose(value, expected[path], rtol=1e-13)


def test_positionwise_blocks_match_jacfwd_and_the_hand_derivative() -> None:
    model = AdaptiveNeuron(batch=2)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    graph = compile_quiet(model, x)
    (group,) = graph.hidden_groups
    hidden, consts = group_inputs(group, step_env(graph, x))
    blocks = group.jacobian_blocks(hidden, consts)
    np.testing.assert_allclose(blocks, reference_blocks(group, hidden, consts), rtol=1e-12, atol=1e-14)
    # by hand: v' = 0.9 tanh(v) - a^2 + y, a' = 0.8 a + 0.3 sin(v')
    v, a = model.v.value, model.a.value
    v_new = 0.9 * jnp.tanh(v) - a**2 + x @ model.w.value
    dv_dv, dv_da = 0.9 / jnp.cosh(v) ** 2, -2 * a
    da_dv, da_da = 0.3 * jnp.cos(v_new) * dv_dv, 0.8 + 0.3 * jnp.cos(v_new) * dv_da
    index = {p: i for i, p in enumerate(group.hidden_paths)}
    iv, ia = index[("v",)], index[("a",)]
    np.testing.assert_allclose(blocks[..., iv, iv], dv_dv, rtol=1e-12)
    np.testing.assert_allclose(blocks[..., iv, ia], dv_da, rtol=1e-12)
    np.testing.assert_allclose(blocks[..., ia, iv], da_dv, rtol=1e-12)
    np.testing.assert_allclose(blocks[..., ia, ia], da_da, rtol=1e-12)


def test_not_positionwise_transition_gives_exact_diagonal_blocks() -> None:
    model = MixedByMatrix()
    x = jnp.array([[0.2, -0.1], [0.4, 0.3]])
    with pytest.warns(UserWarning, match="mixes positions"):
        graph = etp_compiler.compile_etrace_graph(model, x)
    (group,) = graph.hidden_groups
    assert not group.is_positionwise and group.num_state == 2 and group.varshape == (2, 3)
    (record,) = records_of(graph, DiagnosticKind.TRANSITION_NOT_POSITIONWISE)
    assert record.level is DiagnosticLevel.WARNING
    assert set(record.hidden_paths or ()) == {("v",), ("a",)}
    hidden, consts = group_inputs(group, step_env(graph, x))
    blocks = group.jacobian_blocks(hidden, consts)
    reference = reference_blocks(group, hidden, consts)
    np.testing.assert_allclose(blocks, reference, rtol=1e-12, atol=1e-14)
    # a forward-mode product with ones would sum off-diagonal terms: the blocks are really the diagonal
    _, ones_product = jax.jvp(
        lambda *hs: group.transition(hs, consts), tuple(hidden), tuple(jnp.ones_like(h) for h in hidden)
    )
    iv = group.hidden_paths.index(("v",))
    assert not np.allclose(ones_product[iv], blocks[..., iv, :].sum(-1))
    # by hand: dv'[b, k]/dv[b, k] = a[b, k] (1 - tanh^2((v M)[b, k])) M[k, k]
    z = model.v.value @ model.mix
    np.testing.assert_allclose(
        blocks[..., iv, iv], model.a.value * (1 - jnp.tanh(z) ** 2) * jnp.diagonal(model.mix), rtol=1e-12
    )


def test_custom_jvp_surrogate_is_used_in_the_blocks() -> None:
    model = LIF()
    x = jnp.array([1.0, -0.5, 2.0])
    graph = compile_quiet(model, x)
    (group,) = graph.hidden_groups
    assert group.is_positionwise
    assert any(e.primitive.name == "custom_jvp_call" for e in group.transition_jaxpr.eqns)
    hidden, consts = group_inputs(group, step_env(graph, x))
    blocks = group.jacobian_blocks(hidden, consts)
    v = 0.9 * model.v.value + x @ model.w.value
    np.testing.assert_allclose(blocks[..., 0, 0], 0.9 * (1 - 0.5 / (1 + jnp.abs(v - 0.5)) ** 2), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- bad structures


class _Layer(brainstate.nn.Module):
    def __init__(self, construct: str) -> None:
        super().__init__()
        self.construct = construct
        self.w = brainstate.ParamState(jnp.ones((3, 4)))
        self.h = brainstate.HiddenState(jnp.zeros(4))

    def update(self, x: Any) -> Any:
        y = etp.matmul(x, self.w.value)
        h = self.h.value
        if self.construct == "scan":
            h = jax.lax.scan(lambda c, _: (0.5 * c + y, None), h, None, length=3)[0]
        elif self.construct == "cond":
            h = jax.lax.cond(x[0] > 0, lambda c: 0.5 * c + y, lambda c: c - y, h)
        else:
            h = jax.lax.while_loop(lambda c: c[0] < 10.0, lambda c: c + y + 1.0, h)
        self.h.value = h
        return h


class _Outer(brainstate.nn.Module):
    def __init__(self, construct: str) -> None:
        super().__init__()
        self.layer = _Layer(construct)

    def update(self, x: Any) -> Any:
        return self.layer(x)


@pytest.mark.parametrize(
    ("construct", "policy", "message"),
    [
        (
            "scan",
            etp_compiler.ControlFlowPolicy(scan_unroll_limit=2, scan_descent="error"),
            r"`lax.scan` .* length 3, above .*limit=2",
        ),
        ("cond", etp_compiler.ControlFlowPolicy(cond="error"), r"`lax.cond` .*cond='error'"),
        ("while", None, r"`lax.while_loop` .* data-dependent trip count"),
    ],
)
def test_hidden_update_inside_control_flow_is_converted_or_refused(construct: str, policy: Any, message: str) -> None:
    """By default a scan of sub-steps is unrolled and a cond if-converted; a policy that refuses them, or a
    data-dependent while loop, is a CompilationError naming the construct."""
    if policy is not None:
        graph = etp_compiler.compile_etrace_graph(_Outer(construct), jnp.ones(3), emit=False)
        assert construct not in {e.primitive.name for e in graph.module_info.jaxpr.eqns}
        assert graph.hidden_param_op_relations
    with pytest.raises(CompilationError, match=message):
        etp_compiler.compile_etrace_graph(_Outer(construct), jnp.ones(3), control_flow=policy)


def test_hidden_state_written_with_its_old_value_or_a_constant_is_an_error() -> None:
    class Bad(brainstate.nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how = how
            self.w = brainstate.ParamState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros(4))
            self.g = brainstate.HiddenState(jnp.zeros(4))
            self.c = jnp.arange(4.0)

        def update(self, x: Any) -> Any:
            self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value)
            self.g.value = self.g.value if self.how == "own" else self.c
            return self.h.value

    with pytest.raises(CompilationError, match=r"hidden state g is written with its own old value"):
        etp_compiler.compile_etrace_graph(Bad("own"), jnp.ones(3))
    with pytest.raises(CompilationError, match=r"hidden state g is written with a constant"):
        etp_compiler.compile_etrace_graph(Bad("const"), jnp.ones(3))


class _Copies(brainstate.nn.Module):
    """Hidden states whose new value is another state's value, the input, or shared with another state."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = brainstate.ParamState(jnp.ones((4, 4)) * 0.1)
        self.h = brainstate.HiddenState(jnp.linspace(0.1, 0.4, 4))
        self.g = brainstate.HiddenState(jnp.linspace(-0.3, 0.3, 4))

    def update(self, x: Any) -> Any:
        old = self.h.value
        self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value)
        self.g.value = {"delay": old, "shared": self.h.value, "input": x}[self.how]
        return self.h.value


@pytest.mark.parametrize("how", ["delay", "shared", "input"])
def test_every_hidden_state_gets_its_own_new_variable(how: str) -> None:
    graph = compile_quiet(_Copies(how), jnp.ones(4))
    minfo = graph.module_info
    outvars = list(minfo.hidden_path_to_outvar.values())
    assert len(set(outvars)) == 2
    produced = {v for e in minfo.jaxpr.eqns for v in e.outvars}
    assert all(v in produced for v in outvars)
    assert {minfo.outvar_to_hidden_path[v] for v in outvars} == {("h",), ("g",)}
    if how == "input":
        assert sorted(g.hidden_paths for g in graph.hidden_groups) == [(("g",),), (("h",),)]
    else:
        (group,) = graph.hidden_groups
        hidden, consts = group_inputs(group, step_env(graph, jnp.ones(4)))
        blocks = group.jacobian_blocks(hidden, consts)
        np.testing.assert_allclose(blocks, reference_blocks(group, hidden, consts), rtol=1e-12)
        ih, ig = group.hidden_paths.index(("h",)), group.hidden_paths.index(("g",))
        np.testing.assert_allclose(blocks[:, ig, ih], 1.0 if how == "delay" else 0.5)
