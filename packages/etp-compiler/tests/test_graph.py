"""The whole pipeline: ETraceGraph fields, the stage functions, and robustness on unusual models."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiler_testing import compile_quiet, group_inputs, step_env

import etp_compiler
import etp_nn
import etp_primitives as etp
from etp_compiler import CompilationError, ETraceGraph


class Stack(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn1 = etp_nn.ValinaRNNCell(5, 4)
        self.rnn2 = etp_nn.GRUCell(4, 3)

    def update(self, x: Any) -> Any:
        return self.rnn2(self.rnn1(x))


def test_graph_fields_and_stage_functions() -> None:
    model = Stack()
    brainstate.nn.init_all_states(model)
    x = jnp.ones(5)
    graph = compile_quiet(model, x)
    assert isinstance(graph, ETraceGraph)
    assert list(graph._asdict().keys()) == [
        "module_info",
        "hidden_groups",
        "hid_path_to_group",
        "hidden_param_op_relations",
        "hidden_perturb",
        "diagnostics",
    ]
    assert isinstance(graph.diagnostics, tuple)
    groups, mapping = etp_compiler.find_hidden_groups_from_module(model, x)  # braintrace's two values
    minfo = etp_compiler.extract_module_info(model, x)
    assert [g.hidden_paths for g in groups] == [g.hidden_paths for g in graph.hidden_groups]
    assert set(mapping) == set(graph.hid_path_to_group) == {("rnn1", "h"), ("rnn2", "h")}
    relations = etp_compiler.find_hidden_param_op_relations_from_module(model, x)
    assert [r.weight_path for r in relations] == [r.weight_path for r in graph.hidden_param_op_relations]
    assert [r.weight_path for r in relations] == [
        ("rnn1", "W", "weight"),
        ("rnn2", "Wz", "weight"),
        ("rnn2", "Wh", "weight"),
    ]
    # the stage-by-stage API over one ModuleInfo gives the same answer
    groups2, mapping2 = etp_compiler.find_hidden_groups_from_minfo(minfo)
    relations2 = etp_compiler.find_hidden_param_op_relations_from_minfo(minfo, mapping2)
    assert [r.weight_path for r in relations2] == [r.weight_path for r in relations]
    assert all(r.hidden_groups[0] is mapping2[r.connected_hidden_paths[0]] for r in relations2)
    perturb = etp_compiler.add_hidden_perturbation_from_minfo(minfo)
    assert perturb.perturb_hidden_paths == (("rnn1", "h"), ("rnn2", "h"))


def test_graph_is_deterministic() -> None:
    model = Stack()
    brainstate.nn.init_all_states(model)
    first = compile_quiet(model, jnp.ones(5))
    second = compile_quiet(model, jnp.ones(5))
    assert [r.message for r in first.diagnostics] == [r.message for r in second.diagnostics]
    assert [g.hidden_paths for g in first.hidden_groups] == [g.hidden_paths for g in second.hidden_groups]


# ----------------------------------------------------------------------------------------------- odd models


def _module(update: Callable[[Any, Any], Any], **states: Any) -> brainstate.nn.Module:
    class Odd(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, value in states.items():
                setattr(self, name, value)

        def update(self, x: Any) -> Any:
            return update(self, x)

    return Odd()


def _w(shape: tuple[int, ...] = (3, 3)) -> brainstate.ParamState[Any]:
    return brainstate.ParamState(jnp.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape))


def _h(n: int = 3) -> brainstate.HiddenState[Any]:
    return brainstate.HiddenState(jnp.linspace(0.1, 0.5, n))


def _set(state: Any, value: Any) -> Any:
    state.value = value
    return value


ODD_MODELS: dict[str, Callable[[], brainstate.nn.Module]] = {
    "etp output is the hidden state": lambda: _module(lambda m, x: _set(m.h, etp.matmul(x, m.w.value)), w=_w(), h=_h()),
    "two etp ops in series": lambda: _module(
        lambda m, x: _set(m.h, 0.5 * m.h.value + etp.matmul(etp.matmul(x, m.w.value), m.v.value)),
        w=_w(),
        v=_w(),
        h=_h(),
    ),
    "etp output reduced then spread": lambda: _module(
        lambda m, x: _set(m.h, m.h.value * jnp.sum(etp.matmul(x, m.w.value))), w=_w(), h=_h()
    ),
    "etp output through lax.cond": lambda: _module(
        lambda m, x: _set(m.h, 0.5 * m.h.value + jax.lax.cond(x[0] > 0, jnp.sin, jnp.cos, etp.matmul(x, m.w.value))),
        w=_w(),
        h=_h(),
    ),
    "scalar element-wise weight": lambda: _module(
        lambda m, x: _set(m.h, etp.element_wise(m.tau.value, jnp.exp) * m.h.value + x),
        tau=brainstate.ParamState(jnp.array(-0.5)),
        h=_h(),
    ),
    "hidden fed by another's new value": lambda: _module(
        lambda m, x: (
            _set(m.h, 0.5 * m.h.value + etp.matmul(x, m.w.value)),
            _set(m.g, jnp.tanh(m.h.value) * m.g.value),
        )[1],
        w=_w(),
        h=_h(),
        g=_h(),
    ),
    "no weight at all": lambda: _module(lambda m, x: _set(m.h, 0.5 * m.h.value + x), h=_h()),
    "integer hidden counter": lambda: _module(
        lambda m, x: (_set(m.n, m.n.value + 1), _set(m.h, 0.5 * m.h.value + etp.matmul(x, m.w.value)))[1],
        n=brainstate.HiddenState(jnp.zeros(3, dtype=jnp.int32)),
        w=_w(),
        h=_h(),
    ),
    "weight used twice": lambda: _module(
        lambda m, x: _set(m.h, 0.5 * m.h.value + etp.matmul(x, m.w.value) + etp.matmul(m.h.value, m.w.value)),
        w=_w(),
        h=_h(),
    ),
}

_GLOBAL_H = brainstate.HiddenState(jnp.zeros(3))

BAD_MODELS: dict[str, tuple[Callable[[], brainstate.nn.Module], str]] = {
    "hidden state read only": (
        lambda: _module(lambda m, x: m.h.value + etp.matmul(x, m.w.value), w=_w(), h=_h()),
        "never written",
    ),
    "hidden state outside the module": (
        lambda: _module(lambda m, x: _set(_GLOBAL_H, 0.5 * _GLOBAL_H.value + etp.matmul(x, m.w.value)), w=_w()),
        "not an attribute of the model",
    ),
    "no hidden state": (lambda: _module(lambda m, x: etp.matmul(x, m.w.value), w=_w()), "no hidden state"),
}


@pytest.mark.parametrize("name", sorted(ODD_MODELS))
def test_odd_models_compile_and_evaluate(name: str) -> None:
    model = ODD_MODELS[name]()
    x = jnp.array([0.5, -0.25, 1.0])
    graph = compile_quiet(model, x)
    graph.explain(file=io.StringIO())
    env = step_env(graph, x)
    for group in graph.hidden_groups:
        hidden, consts = group_inputs(group, env)
        if not all(jnp.issubdtype(h.dtype, jnp.floating) for h in hidden):
            continue
        blocks = group.jacobian_blocks(hidden, consts)
        assert blocks.shape == (*group.varshape, group.num_state, group.num_state)
        assert bool(jnp.all(jnp.isfinite(blocks)))
    for relation in graph.hidden_param_op_relations:
        for group in relation.hidden_groups:
            _, const_vars = relation.y_to_hidden[group.index]
            d_f = relation.hidden_dim(group, env[relation.y_var], [env[v] for v in const_vars])
            assert d_f.shape == (*group.varshape, group.num_state)
    n_in = len(graph.module_info.jaxpr.invars)
    assert len(graph.hidden_perturb.perturb_jaxpr.jaxpr.invars) == n_in + len(graph.module_info.hidden_states)


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_models_raise_a_compilation_error(name: str) -> None:
    factory, message = BAD_MODELS[name]
    with pytest.raises(CompilationError, match=message):
        etp_compiler.compile_etrace_graph(factory(), jnp.ones(3))
