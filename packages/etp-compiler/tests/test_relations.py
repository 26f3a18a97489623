"""Stage 3: weight -> hidden relations, their trainable leaves, weight functions and D_f."""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiler_testing import (
    compile_quiet,
    eval_weight_fn,
    leaf_value,
    records_of,
    reference_hidden_dim,
    relation_by_path,
    step_env,
)

import etp_compiler
import etp_nn
import etp_primitives as etp
from etp_compiler import DiagnosticKind, DiagnosticLevel


def _leaky(weight_fn: Any, n_in: int = 3, n: int = 4, batch: int | None = None) -> brainstate.nn.Module:
    """``h' = 0.6 h + matmul(x, weight_fn(self))``."""

    class Leaky(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(1)
            self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(n_in, n))))
            self.mask = jnp.asarray(rng.random((n_in, n)) > 0.5, dtype=jnp.float64)
            self.sign = jnp.asarray(np.where(rng.random((n_in, 1)) > 0.5, 1.0, -1.0) * np.ones((n_in, n)))
            shape = (n,) if batch is None else (batch, n)
            self.h = brainstate.HiddenState(jnp.zeros(shape))

        def update(self, x: Any) -> Any:
            self.h.value = 0.6 * self.h.value + etp.matmul(x, weight_fn(self))
            return self.h.value

    return Leaky()


# ----------------------------------------------------------------------------------------------- layers


def test_two_layer_stack_has_one_relation_per_layer() -> None:
    class Stack(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = etp_nn.ValinaRNNCell(3, 4)
            self.l2 = etp_nn.ValinaRNNCell(4, 5)

        def update(self, x: Any) -> Any:
            return self.l2(self.l1(x))

    model = Stack()
    brainstate.nn.init_all_states(model)
    graph = compile_quiet(model, jnp.ones(3))
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("l1", "W", "weight"), ("l2", "W", "weight")]
    first, second = graph.hidden_param_op_relations
    with pytest.raises(ValueError, match=r"does not reach hidden group 1 \(l2\.h\); it reaches groups \[0\]"):
        first.hidden_dim(graph.hidden_groups[1], jnp.zeros(4), [])
    for relation, group in zip(graph.hidden_param_op_relations, graph.hidden_groups, strict=True):
        path = relation.weight_path
        assert relation.primitive is etp.etp_mv_p
        assert relation.trainable_paths == {"weight": ((path, ("weight",)),), "bias": ((path, ("bias",)),)}
        assert set(relation.trainable_vars) == {"weight", "bias"}
        assert relation.hidden_groups == (group,)
        assert relation.connected_hidden_paths == group.hidden_paths
        assert relation.path_classification == {group.hidden_paths[0]: "all_direct"}
        assert relation.eqn_params == {"has_bias": True}
        assert relation.x_var is relation.eqn.invars[0] and relation.y_var is relation.eqn.outvars[0]
    included = records_of(graph, DiagnosticKind.RELATION_INCLUDED)
    assert [r.weight_path for r in included] == [("l1", "W", "weight"), ("l2", "W", "weight")]
    assert [r.context["hidden_group_indices"] for r in included] == [(0,), (1,)]
    assert all(r.level is DiagnosticLevel.INFO for r in included)


def test_gru_excludes_the_reset_gate_weight() -> None:
    cell = etp_nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell, batch_size=2)
    with pytest.warns(UserWarning, match=r"weight=\('Wr', 'weight'\)\) reaches a hidden state only through"):
        graph = etp_compiler.compile_etrace_graph(cell, jnp.ones((2, 3)))
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("Wz", "weight"), ("Wh", "weight")]
    for relation in graph.hidden_param_op_relations:
        assert relation.connected_hidden_paths == (("h",),)
        assert relation.primitive is etp.etp_mm_p
    (record,) = records_of(graph, DiagnosticKind.RELATION_EXCLUDED_WEIGHT_TO_WEIGHT)
    assert record.weight_path == ("Wr", "weight")
    assert record.hidden_paths == (("h",),)
    assert record.level is DiagnosticLevel.WARNING
    assert "non-parametric-tail" in record.message


def test_lstm_includes_all_four_gates() -> None:
    cell = etp_nn.LSTMCell(3, 4)
    brainstate.nn.init_all_states(cell)
    graph = compile_quiet(cell, jnp.ones(3))
    (group,) = graph.hidden_groups
    paths = [r.weight_path for r in graph.hidden_param_op_relations]
    assert paths == [("Wi", "weight"), ("Wf", "weight"), ("Wg", "weight"), ("Wo", "weight")]
    for relation in graph.hidden_param_op_relations:
        assert relation.hidden_groups == (group,)
        expected = {("h",)} if relation.weight_path[0] == "Wo" else {("h",), ("c",)}
        assert set(relation.connected_hidden_paths) == expected
    assert not [r for r in graph.diagnostics if r.level is not DiagnosticLevel.INFO]


# ----------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "name, weight_fn",
    [
        ("mask", lambda m: m.w.value * m.mask),
        ("sign", lambda m: jnp.abs(m.w.value) * m.sign),
    ],
)
def test_transformed_weight_is_traced_to_its_param_state(name: str, weight_fn: Any) -> None:
    model = _leaky(weight_fn)
    graph = compile_quiet(model, jnp.ones(3))
    relation = relation_by_path(graph, ("w",))
    assert relation.trainable_paths == {"weight": ((("w",), ()),)}
    env = step_env(graph, jnp.ones(3))
    np.testing.assert_allclose(eval_weight_fn(graph, relation, "weight", env), weight_fn(model), rtol=1e-14)
    # the weight function is a function of the leaf: a new leaf value gives the new transformed weight
    jaxpr, consts = relation.weight_fns["weight"]
    other = jnp.arange(12.0).reshape(3, 4) - 6.0
    (out,) = jaxpr.evaluate([env[v] for v in consts], other)
    model.w.value = other
    np.testing.assert_allclose(out, weight_fn(model), rtol=1e-14)


def test_standardised_weight_uses_both_leaves_of_one_param_state() -> None:
    def scaled_ws(m: Any) -> Any:
        w = m.w.value["weight"]
        return (w - w.mean(0)) / jnp.sqrt(w.var(0) + 1e-4) * m.w.value["gain"]

    class WS(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(2)
            self.w = brainstate.ParamState(
                {"weight": jnp.asarray(rng.normal(size=(3, 4))), "gain": jnp.linspace(0.5, 2.0, 4)}
            )
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x: Any) -> Any:
            self.h.value = 0.6 * self.h.value + etp.matmul(x, scaled_ws(self))
            return self.h.value

    model = WS()
    graph = compile_quiet(model, jnp.ones((2, 3)))
    relation = relation_by_path(graph, ("w",))
    assert set(relation.trainable_paths["weight"]) == {(("w",), ("weight",)), (("w",), ("gain",))}
    jaxpr, _ = relation.weight_fns["weight"]
    assert len(jaxpr.invars) == 2
    minfo = graph.module_info
    producers = {v: e for e in minfo.jaxpr.eqns for v in e.outvars}
    traced = etp_compiler.trace_var_to_params(relation.trainable_vars["weight"], producers, minfo.invar_to_weight_path)
    assert traced == relation.trainable_paths["weight"]
    env = step_env(graph, jnp.ones((2, 3)))
    np.testing.assert_allclose(eval_weight_fn(graph, relation, "weight", env), scaled_ws(model), rtol=1e-13)


def test_element_wise_param_is_traced_through_fn() -> None:
    class Gate(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tau = brainstate.ParamState(jnp.linspace(-2.0, 2.0, 4))
            self.w = brainstate.ParamState(jnp.ones((3, 4)) * 0.2)
            self.h = brainstate.HiddenState(jnp.linspace(0.1, 0.8, 4))

        def update(self, x: Any) -> Any:
            alpha = etp.element_wise(self.tau.value, jax.nn.sigmoid)
            self.h.value = alpha * self.h.value + etp.matmul(x, self.w.value)
            return self.h.value

    model = Gate()
    graph = compile_quiet(model, jnp.ones(3))
    relation = relation_by_path(graph, ("tau",))
    assert relation.primitive is etp.etp_elemwise_p
    assert relation.x_var is None
    assert relation.trainable_paths == {"weight": ((("tau",), ()),)}
    assert relation.connected_hidden_paths == (("h",),)
    env = step_env(graph, jnp.ones(3))
    np.testing.assert_allclose(
        eval_weight_fn(graph, relation, "weight", env), jax.nn.sigmoid(model.tau.value), rtol=1e-14
    )
    group = graph.hidden_groups[0]
    _, consts = relation.y_to_hidden[group.index]
    d_f = relation.hidden_dim(group, env[relation.y_var], [env[v] for v in consts])
    np.testing.assert_allclose(d_f[..., 0], model.h.value, rtol=1e-14)  # d(alpha h + y)/d alpha = h


def test_weight_composed_by_another_etp_op_keeps_the_whole_weight_function() -> None:
    class Factored(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = brainstate.ParamState(jnp.linspace(-1.0, 1.0, 6).reshape(3, 2))
            self.b = brainstate.ParamState(jnp.linspace(0.5, -0.5, 8).reshape(2, 4))
            self.h = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            self.h.value = 0.5 * self.h.value + etp.matmul(x, etp.matmul(self.a.value, self.b.value))
            return self.h.value

    model = Factored()
    with pytest.warns(UserWarning, match="only through another trainable ETP primitive"):
        graph = etp_compiler.compile_etrace_graph(model, jnp.ones(3))
    (relation,) = graph.hidden_param_op_relations
    assert relation.primitive is etp.etp_mv_p and relation.eqn.invars[0] in graph.module_info.arg_invars
    assert relation.trainable_paths["weight"] == ((("a",), ()), (("b",), ()))
    env = step_env(graph, jnp.ones(3))
    np.testing.assert_allclose(
        eval_weight_fn(graph, relation, "weight", env), model.a.value @ model.b.value, rtol=1e-14
    )


def test_nested_jit_around_an_etp_call_is_found() -> None:
    def jitted(m: Any) -> Any:
        return jax.jit(lambda w, mask: jax.jit(jnp.multiply)(w, mask))(m.w.value, m.mask)

    class Jitted(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _leaky(jitted)

        def update(self, x: Any) -> Any:
            return brainstate.transform.jit(self.inner)(x)  # a jit that carries the states in and out

    model = Jitted()
    graph = compile_quiet(model, jnp.ones(3))
    nested = graph.module_info.stateful_fn.get_jaxpr(jnp.ones(3)).jaxpr.eqns
    assert [e.primitive.name for e in nested if not etp.is_etp_primitive(e.primitive)] == ["jit"]
    (relation,) = graph.hidden_param_op_relations
    assert relation.weight_path == ("inner", "w")
    assert relation.eqn in graph.module_info.jaxpr.eqns
    env = step_env(graph, jnp.ones(3))
    np.testing.assert_allclose(
        eval_weight_fn(graph, relation, "weight", env), model.inner.w.value * model.inner.mask, rtol=1e-14
    )


def test_etp_call_inside_custom_jvp_is_inlined_with_a_record() -> None:
    @jax.custom_jvp
    def dense(x: Any, w: Any) -> Any:
        return etp.matmul(x, w)

    @dense.defjvp
    def _dense_jvp(primals: Any, tangents: Any) -> Any:
        (x, w), (dx, dw) = primals, tangents
        return dense(x, w), etp.matmul(dx, w) + etp.matmul(x, dw)

    model = _leaky(lambda m: m.w.value)
    model.update = lambda x: _custom_update(model, dense, x)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="'dense' contains an ETP primitive"):
        graph = etp_compiler.compile_etrace_graph(model, jnp.ones(3))
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("w",)]
    (record,) = records_of(graph, DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW)
    assert record.context == {"construct": "dense"}


def _custom_update(model: Any, dense: Any, x: Any) -> Any:
    model.h.value = 0.6 * model.h.value + dense(x, model.w.value)
    return model.h.value


# ----------------------------------------------------------------------------------------------- exclusions


class _Readout(brainstate.nn.Module):
    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.cell = etp_nn.ValinaRNNCell(3, 4)
        self.out = etp_nn.Linear(4, 2)

    def update(self, x: Any) -> Any:
        h = self.cell(x)
        return self.out(h) + self.out(2 * h) if self.twice else self.out(h)


def test_readout_is_non_temporal_and_warns_once_per_compile() -> None:
    model = _Readout(twice=True)
    brainstate.nn.init_all_states(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = etp_compiler.compile_etrace_graph(model, jnp.ones(3))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "has no connected hidden states" in messages[0]
    assert caught[0].filename == __file__  # points at the caller of compile_etrace_graph
    records = records_of(graph, DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL)
    assert len(records) == 2  # one per equation; one warning per distinct message
    assert {r.weight_path for r in records} == {("out", "weight")}
    assert all(r.hidden_paths is None and r.level is DiagnosticLevel.WARNING for r in records)
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("cell", "W", "weight")]

    model = _Readout()
    brainstate.nn.init_all_states(model)
    with pytest.warns(UserWarning, match=r"weight=\('out', 'weight'\)\) has no connected hidden states"):
        etp_compiler.compile_etrace_graph(model, jnp.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        etp_compiler.compile_etrace_graph(model, jnp.ones(3), emit=False)


def test_weight_that_is_not_a_param_state_is_excluded() -> None:
    class Constant(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = jnp.ones((3, 4))
            self.scale = brainstate.ShortTermState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros(4))
            self.g = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w) + etp.matmul(x, self.scale.value)
            self.g.value = 0.5 * self.g.value + etp.element_wise(jnp.ones(4))
            return self.h.value

    with pytest.warns(UserWarning, match="does not come from any brainstate.ParamState"):
        graph = etp_compiler.compile_etrace_graph(Constant(), jnp.ones(3))
    assert graph.hidden_param_op_relations == []
    records = records_of(graph, DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE)
    assert [r.primitive for r in records] == [etp.etp_mv_p, etp.etp_mv_p, etp.etp_elemwise_p]
    assert all(r.weight_path is None and r.level is DiagnosticLevel.WARNING for r in records)


def test_weight_computed_from_a_hidden_state_is_excluded() -> None:
    class Modulated(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            self.h.value = 0.5 * self.h.value + etp.matmul(x, self.w.value * self.h.value)
            return self.h.value

    with pytest.warns(UserWarning, match="depends on the model input or a hidden state"):
        graph = etp_compiler.compile_etrace_graph(Modulated(), jnp.ones(3))
    assert graph.hidden_param_op_relations == []
    (record,) = records_of(graph, DiagnosticKind.RELATION_EXCLUDED_NO_PARAMSTATE)
    assert record.weight_path is None


def test_output_not_broadcastable_to_the_hidden_state_is_excluded() -> None:
    class Sliced(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 8)))
            self.h = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            y = etp.matmul(x, self.w.value)
            self.h.value = 0.5 * self.h.value + jax.nn.sigmoid(y[:4]) * jnp.tanh(y[4:])
            return self.h.value

    with pytest.warns(
        UserWarning, match=r"output of shape \(8,\) does not broadcast to hidden state h of shape \(4,\)"
    ):
        graph = etp_compiler.compile_etrace_graph(Sliced(), jnp.ones(3))
    assert graph.hidden_param_op_relations == []
    (record,) = records_of(graph, DiagnosticKind.RELATION_EXCLUDED_SHAPE_MISMATCH)
    assert record.weight_path == ("w",) and record.hidden_paths == (("h",),)


def test_etp_inside_scan_not_touching_hidden_state_is_recorded() -> None:
    class Scanned(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.eye(3) * 0.5)
            self.h = brainstate.HiddenState(jnp.zeros(3))

        def update(self, x: Any) -> Any:
            z = jax.lax.scan(lambda c, _: (etp.matmul(c, self.w.value), None), x, None, length=2)[0]
            self.h.value = 0.5 * self.h.value + x
            return self.h.value + z

    kept = etp_compiler.ControlFlowPolicy(
        scan_unroll_limit=1, scan_descent="error", etp_in_control_flow="instantaneous"
    )
    with pytest.warns(UserWarning, match=r"an ETP primitive sits inside `scan`"):
        graph = etp_compiler.compile_etrace_graph(Scanned(), jnp.ones(3), control_flow=kept)
    (record,) = records_of(graph, DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW)
    assert record.context == {"construct": "scan"} and record.level is DiagnosticLevel.WARNING
    assert graph.hidden_param_op_relations == []
    # by default the short scan is unrolled: its ops are seen, and they reach no hidden state (a readout-like path)
    graph = etp_compiler.compile_etrace_graph(Scanned(), jnp.ones(3), emit=False)
    assert not records_of(graph, DiagnosticKind.PRIMITIVE_INSIDE_CONTROL_FLOW)
    assert len(records_of(graph, DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL)) == 2
    assert graph.hidden_param_op_relations == []


def test_weight_reaching_hidden_directly_and_through_another_weight_is_tail_bounded() -> None:
    class Skip(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = brainstate.ParamState(jnp.ones((3, 4)) * 0.1)
            self.w2 = brainstate.ParamState(jnp.ones((4, 4)) * 0.2)
            self.h = brainstate.HiddenState(jnp.zeros(4))
            self.g = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            y1 = etp.matmul(x, self.w1.value)
            self.h.value = 0.5 * self.h.value + y1
            self.g.value = 0.5 * self.g.value + etp.matmul(y1, self.w2.value)
            return self.h.value

    graph = compile_quiet(Skip(), jnp.ones(3))
    relation = relation_by_path(graph, ("w1",))
    assert relation.connected_hidden_paths == (("h",),)
    assert relation.path_classification == {("h",): "all_direct"}
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("w1",), ("w2",)]

    class Both(Skip):
        def update(self, x: Any) -> Any:
            y1 = etp.matmul(x, self.w1.value)
            self.h.value = 0.5 * self.h.value + y1 + etp.matmul(y1, self.w2.value)
            self.g.value = 0.5 * self.g.value + x.sum()
            return self.h.value

    graph = compile_quiet(Both(), jnp.ones(3))
    relation = relation_by_path(graph, ("w1",))
    assert relation.path_classification == {("h",): "partly_through_weight"}
    (record,) = records_of(graph, DiagnosticKind.TRANSITION_TAIL_BOUNDED)
    assert record.weight_path == ("w1",) and record.hidden_paths == (("h",),)


# ----------------------------------------------------------------------------------------------- D_f


class _TwoState(brainstate.nn.Module):
    def __init__(self, batch: int | None = None) -> None:
        super().__init__()
        shape = (4,) if batch is None else (batch, 4)
        size = int(np.prod(shape))
        self.tau = brainstate.ParamState(jnp.linspace(-1.0, 1.0, 4))
        self.w = brainstate.ParamState(jnp.linspace(-0.5, 0.5, 12).reshape(3, 4))
        self.v = brainstate.HiddenState(jnp.linspace(-0.8, 0.9, size).reshape(shape))
        self.a = brainstate.HiddenState(jnp.linspace(0.3, 0.6, size).reshape(shape))

    def update(self, x: Any) -> Any:
        alpha = etp.element_wise(self.tau.value, jax.nn.sigmoid)  # (4,), broadcast onto (batch, 4)
        v = alpha * jnp.tanh(self.v.value) + jnp.sin(etp.matmul(x, self.w.value)) - self.a.value
        self.a.value = 0.7 * self.a.value + 0.2 * v**2
        self.v.value = v
        return v


@pytest.mark.parametrize("batch", [None, 2])
def test_hidden_dim_equals_the_jacobian_diagonal(batch: int | None) -> None:
    x = jnp.linspace(-1.0, 2.0, 3) if batch is None else jnp.linspace(-1.0, 2.0, 3 * batch).reshape(batch, 3)
    graph = compile_quiet(_TwoState(batch), x)
    assert not records_of(graph, DiagnosticKind.TRANSITION_NOT_POSITIONWISE)
    (group,) = graph.hidden_groups
    env = step_env(graph, x)
    for path, y_shape in [(("w",), group.varshape), (("tau",), (4,))]:
        relation = relation_by_path(graph, path)
        assert relation.y_to_hidden_positionwise == {group.index: True}
        assert tuple(relation.y_var.aval.shape) == y_shape
        _, const_vars = relation.y_to_hidden[group.index]
        consts = [env[v] for v in const_vars]
        y = env[relation.y_var]
        d_f = relation.hidden_dim(group, y, consts)
        assert d_f.shape == (*group.varshape, 2)
        np.testing.assert_allclose(d_f, reference_hidden_dim(relation, group, y, consts), rtol=1e-12, atol=1e-14)


def test_hidden_dim_by_hand_for_the_broadcast_case() -> None:
    model = _TwoState(batch=2)
    x = jnp.linspace(-1.0, 2.0, 6).reshape(2, 3)
    graph = compile_quiet(model, x)
    (group,) = graph.hidden_groups
    env = step_env(graph, x)
    relation = relation_by_path(graph, ("tau",))
    _, const_vars = relation.y_to_hidden[group.index]
    d_f = relation.hidden_dim(group, env[relation.y_var], [env[v] for v in const_vars])
    alpha = jax.nn.sigmoid(model.tau.value)
    v_new = alpha * jnp.tanh(model.v.value) + jnp.sin(x @ model.w.value) - model.a.value
    dv = jnp.tanh(model.v.value)  # dv'[b, n] / d alpha[n]
    index = {p: i for i, p in enumerate(group.hidden_paths)}
    np.testing.assert_allclose(d_f[..., index[("v",)]], dv, rtol=1e-13)
    np.testing.assert_allclose(d_f[..., index[("a",)]], 0.4 * v_new * dv, rtol=1e-13)


def test_hidden_dim_for_a_state_the_op_does_not_reach_is_zero() -> None:
    cell = etp_nn.LSTMCell(3, 4)
    brainstate.nn.init_all_states(cell)
    x = jnp.array([0.5, -1.0, 2.0])
    cell.h.value = jnp.linspace(-0.5, 0.5, 4)
    cell.c.value = jnp.linspace(0.2, -0.9, 4)
    graph = compile_quiet(cell, x)
    (group,) = graph.hidden_groups
    env = step_env(graph, x)
    relation = relation_by_path(graph, ("Wo", "weight"))
    _, const_vars = relation.y_to_hidden[group.index]
    consts = [env[v] for v in const_vars]
    d_f = relation.hidden_dim(group, env[relation.y_var], consts)
    ic = group.hidden_paths.index(("c",))
    np.testing.assert_array_equal(d_f[..., ic], 0.0)
    np.testing.assert_allclose(d_f, reference_hidden_dim(relation, group, env[relation.y_var], consts), rtol=1e-12)
    # output gate: h = sigmoid(y_o) tanh(c)
    c_new = env[graph.module_info.hidden_path_to_outvar[("c",)]]
    o = jax.nn.sigmoid(env[relation.y_var])
    np.testing.assert_allclose(d_f[..., 1 - ic], o * (1 - o) * jnp.tanh(c_new), rtol=1e-12)


def test_weight_leaf_values_are_the_param_state_values() -> None:
    cell = etp_nn.GRUCell(2, 3)
    brainstate.nn.init_all_states(cell)
    graph = compile_quiet(cell, jnp.ones(2))
    relation = relation_by_path(graph, ("Wz", "weight"))
    env = step_env(graph, jnp.ones(2))
    for key, leaves in relation.trainable_paths.items():
        (leaf,) = leaves
        np.testing.assert_array_equal(leaf_value(graph.module_info, leaf), cell.Wz.weight.value[key])
        np.testing.assert_array_equal(eval_weight_fn(graph, relation, key, env), cell.Wz.weight.value[key])
