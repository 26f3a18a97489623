"""Stage 4: the perturbed step h^t = h_hat^t + delta and dL/d(delta) = dL/dh^t."""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from compiler_testing import compile_quiet, mantissas, step_invals

import etp_compiler
import etp_nn
import etp_primitives as etp
from etp_compiler import ETraceGraph


class RNNWithReadout(brainstate.nn.Module):
    def __init__(self, batch: int | None = None, unit: Any = None) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        shape = (4,) if batch is None else (batch, 4)
        self.unit = unit
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(3, 4))))
        self.r = brainstate.ParamState(jnp.asarray(rng.normal(size=(4, 2))))
        value = jnp.asarray(rng.normal(size=shape))
        self.h = brainstate.HiddenState(value if unit is None else value * unit)

    def update(self, x: Any) -> Any:
        h = self.h.value if self.unit is None else self.h.value.to_decimal(self.unit)
        h = jnp.tanh(0.8 * h + etp.matmul(x, self.w.value))
        self.h.value = h if self.unit is None else h * self.unit
        return etp.matmul(h, self.r.value)


def _perturbed(graph: ETraceGraph, invals: list[Any], deltas: list[Any]) -> list[Any]:
    perturb = graph.hidden_perturb
    return jax.core.eval_jaxpr(perturb.perturb_jaxpr.jaxpr, perturb.perturb_jaxpr.consts, *invals, *deltas)


def _hidden_out_index(graph: ETraceGraph, path: tuple[str, ...]) -> int:
    return list(graph.module_info.jaxpr.outvars).index(graph.module_info.hidden_path_to_outvar[path])


def _zeros(graph: ETraceGraph) -> list[Any]:
    return [jnp.zeros(v.aval.shape, v.aval.dtype) for v in graph.hidden_perturb.perturb_vars]


@pytest.mark.parametrize("batch", [None, 2])
def test_structure_of_the_perturbation(batch: int | None) -> None:
    model = RNNWithReadout(batch)
    x = jnp.ones(3) if batch is None else jnp.ones((batch, 3))
    graph = compile_quiet(model, x)
    perturb, minfo = graph.hidden_perturb, graph.module_info
    assert perturb.perturb_hidden_paths == (("h",),)
    assert perturb.perturb_hidden_states == (model.h,)
    n_in = len(minfo.jaxpr.invars)
    assert tuple(perturb.perturb_jaxpr.jaxpr.invars[n_in:]) == perturb.perturb_vars
    (var,) = perturb.perturb_vars
    assert var.aval.shape == model.h.value.shape and var.aval.dtype == jnp.float64
    assert len(perturb.perturb_jaxpr.jaxpr.outvars) == len(minfo.jaxpr.outvars)


def test_zero_perturbation_is_the_model_step() -> None:
    model = RNNWithReadout(batch=2)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    graph = compile_quiet(model, x)
    invals = step_invals(graph.module_info, x)
    outs = _perturbed(graph, invals, _zeros(graph))
    expected_out = model(x)  # runs the step eagerly and writes the new states
    np.testing.assert_allclose(outs[0], expected_out, rtol=1e-13)
    np.testing.assert_allclose(outs[_hidden_out_index(graph, ("h",))], model.h.value, rtol=1e-13)


def test_deltas_shift_hidden_outputs_and_everything_downstream() -> None:
    model = RNNWithReadout(batch=2)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    graph = compile_quiet(model, x)
    invals = step_invals(graph.module_info, x)
    base = _perturbed(graph, invals, _zeros(graph))
    delta = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4)))
    shifted = _perturbed(graph, invals, [delta])
    ih = _hidden_out_index(graph, ("h",))
    np.testing.assert_allclose(shifted[ih], base[ih] + delta, rtol=1e-14)
    np.testing.assert_allclose(shifted[0], (base[ih] + delta) @ model.r.value, rtol=1e-13)
    # run_step applies the same deltas
    env = etp_compiler.run_step(graph.module_info, invals, [delta])
    np.testing.assert_allclose(env[graph.module_info.out_vars[0]], shifted[0], rtol=1e-14)


def test_loss_gradient_wrt_delta_is_the_hidden_cotangent() -> None:
    model = RNNWithReadout(batch=2)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    target = jnp.asarray(np.random.default_rng(5).normal(size=(2, 2)))
    graph = compile_quiet(model, x)
    invals = step_invals(graph.module_info, x)

    def loss(deltas: list[Any]) -> Any:
        out = _perturbed(graph, invals, deltas)[0]
        return jnp.sum((out - target) ** 2)

    (grad,) = jax.grad(loss)(_zeros(graph))
    h_new = jnp.tanh(0.8 * model.h.value + x @ model.w.value)
    by_hand = 2 * (h_new @ model.r.value - target) @ model.r.value.T
    np.testing.assert_allclose(grad, by_hand, rtol=1e-12)


def test_two_layer_stack_cotangents_match_a_hand_written_step() -> None:
    class Stack(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = etp_nn.ValinaRNNCell(3, 4, activation="tanh")
            self.l2 = etp_nn.ValinaRNNCell(4, 2, activation="tanh")

        def update(self, x: Any) -> Any:
            return self.l2(self.l1(x))

    model = Stack()
    brainstate.nn.init_all_states(model)
    model.l1.h.value = jnp.array([0.2, -0.4, 0.6, 0.1])
    model.l2.h.value = jnp.array([-0.3, 0.5])
    x = jnp.array([0.3, -0.7, 1.1])
    graph = compile_quiet(model, x)
    assert graph.hidden_perturb.perturb_hidden_paths == (("l1", "h"), ("l2", "h"))
    invals = step_invals(graph.module_info, x)
    p1, p2 = model.l1.W.weight.value, model.l2.W.weight.value
    h1_old, h2_old = model.l1.h.value, model.l2.h.value
    c = jnp.array([1.5, -0.5])

    def by_hand(d1: Any, d2: Any) -> Any:
        h1 = jnp.tanh(jnp.concatenate([x, h1_old]) @ p1["weight"] + p1["bias"]) + d1
        h2 = jnp.tanh(jnp.concatenate([h1, h2_old]) @ p2["weight"] + p2["bias"]) + d2
        return jnp.sum(c * h2) + jnp.sum(h1**2)

    def compiled(d1: Any, d2: Any) -> Any:
        outs = _perturbed(graph, invals, [d1, d2])
        h1 = outs[_hidden_out_index(graph, ("l1", "h"))]
        return jnp.sum(c * outs[0]) + jnp.sum(h1**2)

    d1, d2 = jnp.array([0.1, -0.2, 0.3, 0.0]), jnp.array([-0.4, 0.2])
    np.testing.assert_allclose(compiled(d1, d2), by_hand(d1, d2), rtol=1e-13)
    zeros = (jnp.zeros(4), jnp.zeros(2))
    got_grads, want_grads = jax.jit(jax.grad(compiled, (0, 1)))(*zeros), jax.jit(jax.grad(by_hand, (0, 1)))(*zeros)
    for got, want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_unit_carrying_state_is_perturbed_in_its_mantissa() -> None:
    model = RNNWithReadout(unit=u.mV)
    x = jnp.ones(3)
    graph = compile_quiet(model, x)
    (var,) = graph.hidden_perturb.perturb_vars
    assert var.aval.shape == (4,) and var.aval.dtype == jnp.float64
    invals = step_invals(graph.module_info, x)
    minfo = graph.module_info
    h_index = list(minfo.jaxpr.invars).index(minfo.hidden_path_to_invar[("h",)])
    np.testing.assert_allclose(invals[h_index], mantissas(model.h.value)[0])
    delta = jnp.full(4, 0.25)
    base, shifted = _perturbed(graph, invals, _zeros(graph)), _perturbed(graph, invals, [delta])
    ih = _hidden_out_index(graph, ("h",))
    np.testing.assert_allclose(shifted[ih] - base[ih], delta, rtol=1e-14)


class _Copies(brainstate.nn.Module):
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
def test_each_hidden_state_gets_its_own_delta(how: str) -> None:
    graph = compile_quiet(_Copies(how), jnp.ones(4))
    invals = step_invals(graph.module_info, jnp.ones(4))
    paths = graph.hidden_perturb.perturb_hidden_paths
    deltas = {("h",): jnp.full(4, 0.5), ("g",): jnp.full(4, -2.0)}
    base = _perturbed(graph, invals, _zeros(graph))
    shifted = _perturbed(graph, invals, [deltas[p] for p in paths])
    ih, ig = _hidden_out_index(graph, ("h",)), _hidden_out_index(graph, ("g",))
    np.testing.assert_allclose(shifted[ih], base[ih] + deltas[("h",)])
    # g^t = h^t in the "shared" model is an ETP-free path h^t -> g^t, already in the traces:
    # g^t is computed from the unperturbed h^t
    np.testing.assert_allclose(shifted[ig], base[ig] + deltas[("g",)])


def test_perturbation_from_module_matches_the_graph() -> None:
    model = RNNWithReadout()
    graph = compile_quiet(model, jnp.ones(3))
    perturb = etp_compiler.add_hidden_perturbation_from_module(model, jnp.ones(3))
    assert perturb.perturb_hidden_paths == graph.hidden_perturb.perturb_hidden_paths
    invals = step_invals(graph.module_info, jnp.ones(3))
    delta = [jnp.full(4, 0.1)]
    for a, b in zip(
        jax.core.eval_jaxpr(perturb.perturb_jaxpr.jaxpr, perturb.perturb_jaxpr.consts, *invals, *delta),
        _perturbed(graph, invals, delta),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-14)


# ----------------------------------------------------------------------------------------------- consistency with D_f


class _StackLSTM(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = etp_nn.LSTMCell(3, 4)
        self.gru = etp_nn.GRUCell(4, 4)

    def update(self, x: Any) -> Any:
        return self.gru(self.lstm(x)) * 2.0 + self.lstm.c.value


class _Neuron(brainstate.nn.Module):
    """Two states mixed element-wise, an unbatched element-wise weight broadcast onto batched states."""

    def __init__(self) -> None:
        super().__init__()
        self.tau = brainstate.ParamState(jnp.linspace(-1.0, 1.0, 4))
        self.w = brainstate.ParamState(jnp.linspace(-0.5, 0.5, 12).reshape(3, 4))
        self.v = brainstate.HiddenState(jnp.linspace(-0.8, 0.9, 8).reshape(2, 4))
        self.a = brainstate.HiddenState(jnp.linspace(0.3, 0.6, 8).reshape(2, 4))

    def update(self, x: Any) -> Any:
        alpha = etp.element_wise(self.tau.value, jax.nn.sigmoid)
        v = alpha * jnp.tanh(self.v.value) + jnp.sin(etp.matmul(x, self.w.value)) - self.a.value
        self.a.value = 0.7 * self.a.value + 0.2 * v**2
        self.v.value = jnp.tanh(v) * self.a.value
        return self.v.value


def _init(model: brainstate.nn.Module, batch: int | None) -> brainstate.nn.Module:
    brainstate.nn.init_all_states(model, batch_size=batch)
    rng = np.random.default_rng(7)
    for state in model.states(brainstate.HiddenState).values():
        state.value = jnp.asarray(rng.normal(size=state.value.shape))
    return model


@pytest.mark.parametrize(
    "factory, x",
    [
        (lambda: _init(etp_nn.LSTMCell(3, 4), 2), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)),
        (lambda: _init(etp_nn.GRUCell(3, 4), None), jnp.array([0.4, -0.9, 1.3])),
        (lambda: _init(_StackLSTM(), None), jnp.array([0.4, -0.9, 1.3])),
        (_Neuron, jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)),
    ],
    ids=["lstm", "gru", "lstm-gru-stack", "two-state-neuron"],
)
def test_cotangents_and_hidden_dims_give_the_exact_one_step_gradient(factory: Any, x: Any) -> None:
    """For every included op: dL/dy = sum_s g_s * D_f,s (summed over broadcast axes), g_s = dL/d(delta_s).

    This is what the online learners rely on at the first step (zero traces); it fails if the
    perturbation reaches paths that D_f already contains, e.g. an LSTM's c^t -> h^t.
    """
    from etp_compiler._jaxpr_walk import eval_eqns

    model = factory()
    graph = compile_quiet(model, x)
    minfo = graph.module_info
    invals = step_invals(minfo, x)
    weights = jnp.asarray(np.random.default_rng(8).normal(size=minfo.out_vars[0].aval.shape))

    def loss(outs: list[Any]) -> Any:
        return jnp.sum(weights * outs[0])

    cotangents = jax.grad(lambda ds: loss(_perturbed(graph, invals, ds)))(_zeros(graph))
    g = dict(zip(graph.hidden_perturb.perturb_hidden_paths, cotangents, strict=True))
    env = etp_compiler.run_step(minfo, invals)
    assert graph.hidden_param_op_relations
    for relation in graph.hidden_param_op_relations:

        def loss_of_y_shift(shift: Any, y_var: Any = relation.y_var) -> Any:
            values = dict(zip(minfo.jaxpr.constvars, minfo.closed_jaxpr.consts, strict=True))
            values.update(zip(minfo.jaxpr.invars, invals, strict=True))
            eval_eqns(minfo.jaxpr.eqns, values, override=lambda v, value: value + shift if v is y_var else value)
            return loss([values[v] for v in minfo.out_vars])

        y = env[relation.y_var]
        exact = jax.grad(loss_of_y_shift)(jnp.zeros_like(y))
        estimate = jnp.zeros(np.shape(y))
        for group in relation.hidden_groups:
            _, const_vars = relation.y_to_hidden[group.index]
            d_f = relation.hidden_dim(group, y, [env[v] for v in const_vars])
            term = sum(g[p] * d_f[..., i] for i, p in enumerate(group.hidden_paths))
            estimate = estimate + jnp.sum(term, axis=tuple(range(np.ndim(term) - np.ndim(y))))
        np.testing.assert_allclose(estimate, exact, rtol=1e-10, atol=1e-12, err_msg=str(relation.weight_path))
