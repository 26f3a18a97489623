"""ETraceGraphExecutor: one step's outputs, new states, D, D_f and x against hand-derived oracles."""

from __future__ import annotations

import warnings
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp_nn
import etp_primitives as etp
from etp_algorithms import ETraceGraphExecutor


class TwoState(brainstate.nn.Module):
    """v' = a_vv v + a_va a + y ; a' = a_av tanh(v') + a_aa a, with y = x W (etp_mm)."""

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.w = brainstate.ParamState({"weight": jnp.asarray(rng.normal(size=(3, 4)))})
        self.coef = jnp.asarray(rng.uniform(0.1, 0.9, size=(4, 4)))  # a_vv, a_va, a_av, a_aa per unit
        self.v = brainstate.HiddenState(jnp.asarray(rng.normal(size=(2, 4))))
        self.a = brainstate.HiddenState(jnp.asarray(rng.normal(size=(2, 4))))

    def update(self, x: Any) -> Any:
        y = etp.matmul(x, self.w.value["weight"])
        vvv, vva, vav, vaa = self.coef
        v = vvv * self.v.value + vva * self.a.value + y
        self.a.value = vav * jnp.tanh(v) + vaa * self.a.value
        self.v.value = v
        return v.sum()


def test_two_state_group_jacobian_and_hidden_dim(rng: np.random.Generator) -> None:
    model = TwoState(rng)
    executor = ETraceGraphExecutor(model)
    x = jnp.asarray(rng.normal(size=(2, 3)))
    graph = executor.compile_graph(x)
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("v",), ("a",))]
    v0, a0 = model.v.value, model.a.value
    values = executor.step(executor.current_invals(x))
    vvv, vva, vav, vaa = model.coef
    y = x @ model.w.value["weight"]
    v1 = vvv * v0 + vva * a0 + y
    sech2 = 1 - jnp.tanh(v1) ** 2
    D = values.jacobians[0]
    assert D.shape == (2, 4, 2, 2)
    np.testing.assert_allclose(D[..., 0, 0], jnp.broadcast_to(vvv, (2, 4)), rtol=1e-12)
    np.testing.assert_allclose(D[..., 0, 1], jnp.broadcast_to(vva, (2, 4)), rtol=1e-12)
    np.testing.assert_allclose(D[..., 1, 0], vav * sech2 * vvv, rtol=1e-12)
    np.testing.assert_allclose(D[..., 1, 1], vav * sech2 * vva + vaa, rtol=1e-12)
    Df = values.hidden_dims[(0, 0)]
    np.testing.assert_allclose(Df[..., 0], jnp.ones((2, 4)), rtol=1e-12)
    np.testing.assert_allclose(Df[..., 1], vav * sech2, rtol=1e-12)
    np.testing.assert_allclose(values.x_values[0], x)
    np.testing.assert_allclose(values.outputs[0], v1.sum(), rtol=1e-12)
    np.testing.assert_allclose(values.state_values[("v",)][0], v1, rtol=1e-12)
    # the model's own step agrees, and the executor did not touch the states
    np.testing.assert_allclose(model.v.value, v0)
    model(x)
    np.testing.assert_allclose(model.v.value, v1, rtol=1e-12)


@pytest.mark.parametrize("batch", [None, 3])
def test_gru_trace_quantities(rng: np.random.Generator, batch: int | None) -> None:
    cell = etp_nn.GRUCell(3, 5)
    brainstate.nn.init_all_states(cell, batch_size=batch)
    cell.h.value = jnp.asarray(rng.normal(size=cell.h.value.shape))
    x = jnp.asarray(rng.normal(size=(3,) if batch is None else (batch, 3)))
    executor = ETraceGraphExecutor(cell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = executor.compile_graph(x)
    names = [r.weight_path for r in graph.hidden_param_op_relations]
    assert names == [("Wz", "weight"), ("Wh", "weight")]
    values = executor.step(executor.current_invals(x))
    h = cell.h.value

    def lin(layer: etp_nn.Linear, inp: Any) -> Any:
        return inp @ layer.weight.value["weight"] + layer.weight.value["bias"]

    xh = jnp.concatenate([x, h], axis=-1)
    yz, yr = lin(cell.Wz, xh), lin(cell.Wr, xh)
    z, r = jax.nn.sigmoid(yz), jax.nn.sigmoid(yr)
    yh = lin(cell.Wh, jnp.concatenate([x, r * h], axis=-1))
    h_cand = jnp.tanh(yh)
    np.testing.assert_allclose(values.jacobians[0][..., 0, 0], 1 - z, rtol=1e-10)
    np.testing.assert_allclose(values.hidden_dims[(0, 0)][..., 0], z * (1 - z) * (h_cand - h), rtol=1e-10)
    np.testing.assert_allclose(values.hidden_dims[(1, 0)][..., 0], z * (1 - h_cand**2), rtol=1e-10)
    np.testing.assert_allclose(values.state_values[("h",)][0], (1 - z) * h + z * h_cand, rtol=1e-10)


def test_perturbation_shifts_new_hidden_states(rng: np.random.Generator) -> None:
    model = TwoState(rng)
    executor = ETraceGraphExecutor(model)
    x = jnp.asarray(rng.normal(size=(2, 3)))
    executor.compile_graph(x)
    plain = executor.step(executor.current_invals(x))
    delta_v, delta_a = jnp.ones((2, 4)), 2 * jnp.ones((2, 4))
    perturbed = executor.step(executor.current_invals(x), [delta_v, delta_a])
    np.testing.assert_allclose(perturbed.state_values[("v",)][0], plain.state_values[("v",)][0] + 1.0, rtol=1e-12)
    # the output sums v' after the perturbation: shifted by 8 units of 1
    np.testing.assert_allclose(perturbed.outputs[0], plain.outputs[0] + 8.0, rtol=1e-12)


def test_executor_errors() -> None:
    with pytest.raises(TypeError, match="brainstate.nn.Module"):
        ETraceGraphExecutor(lambda x: x)  # type: ignore[arg-type]
    cell = etp_nn.GRUCell(3, 5)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(RuntimeError, match=r"GRUCell: call compile_graph"):
        ETraceGraphExecutor(cell).step([])
