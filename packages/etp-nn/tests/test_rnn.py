"""Recurrent cells: the documented equations, batching, jit/vmap, dtype, reset, ETP reachability, errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brainstate.nn import init
from nn_testing import param_leaves_reaching_etp

import etp_nn

N_IN, N_OUT, BATCH, STEPS = 3, 4, 3, 4


class NumpyNormal:
    """Initializer drawing from numpy: brainstate's random initializers compile for every new shape (slow)."""

    def __init__(self, scale: float, seed: int) -> None:
        self.scale, self.rng = scale, np.random.default_rng(seed)

    def __call__(self, shape: Any, **kwargs: Any) -> Any:
        return jnp.asarray(self.rng.normal(scale=self.scale, size=tuple(shape)))


W_INIT = NumpyNormal(0.6, seed=1)
BIAS = NumpyNormal(0.5, seed=2)  # non-zero biases, so the references check them too

Arr = np.ndarray[Any, Any]
States = dict[str, Arr]


def _sig(v: Arr) -> Arr:
    return 1.0 / (1.0 + np.exp(-v))


def _relu(v: Arr) -> Arr:
    return np.maximum(v, 0.0)


def _dense(layer: Any, v: Arr) -> Arr:
    """``v @ W + b`` from a Linear sub-layer's ParamState dict."""
    params = layer.weight.value
    out = v @ np.asarray(params["weight"])
    return out + np.asarray(params["bias"]) if "bias" in params else out


def _cat(*parts: Arr) -> Arr:
    return np.concatenate(parts, axis=-1)


# ---- the equations, written out from the parameter values ------------------------------------------------------


def ref_vanilla(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    h = _relu(_dense(cell.W, _cat(x, s["h"])))
    return {"h": h}, h


def ref_gru(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    h = s["h"]
    z = _sig(_dense(cell.Wz, _cat(x, h)))
    r = _sig(_dense(cell.Wr, _cat(x, h)))
    cand = np.tanh(_dense(cell.Wh, _cat(x, r * h)))
    h = (1 - z) * h + z * cand
    return {"h": h}, h


def ref_lstm(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    xh = _cat(x, s["h"])
    i, f = _sig(_dense(cell.Wi, xh)), _sig(_dense(cell.Wf, xh))
    g, o = np.tanh(_dense(cell.Wg, xh)), _sig(_dense(cell.Wo, xh))
    c = f * s["c"] + i * g
    h = o * np.tanh(c)
    return {"h": h, "c": c}, h


def ref_mgu(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    h = s["h"]
    f = _sig(_dense(cell.Wf, _cat(x, h)))
    cand = np.tanh(_dense(cell.Wh, _cat(x, f * h)))
    h = (1 - f) * h + f * cand
    return {"h": h}, h


def ref_minimal(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    h = s["h"]
    z = np.tanh(_dense(cell.Wx, x))
    u = _sig(_dense(cell.Wu, _cat(z, h)))
    h = u * h + (1 - u) * z
    return {"h": h}, h


def ref_urlstm(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    xh = _cat(x, s["h"])
    fp, rp, up, op = (_dense(layer, xh) for layer in (cell.Wf, cell.Wr, cell.Wu, cell.Wo))
    b_f = np.asarray(cell.forget_bias.value)
    f, r = _sig(fp + b_f), _sig(rp - b_f)
    g = r * (1 - (1 - f) ** 2) + (1 - r) * f**2
    c = g * s["c"] + (1 - g) * np.tanh(up)
    h = _sig(op) * np.tanh(c)
    return {"h": h, "c": c}, h


def ref_mingru(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    z = _sig(_dense(cell.Wz, x))
    h = (1 - z) * s["h"] + z * _dense(cell.Wh, x)
    return {"h": h}, h


def ref_minlstm(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    f, i = _sig(_dense(cell.Wf, x)), _sig(_dense(cell.Wi, x))
    h = f / (f + i) * s["h"] + i / (f + i) * _dense(cell.Wh, x)
    return {"h": h}, h


def ref_lru(cell: Any, s: States, x: Arr) -> tuple[States, Arr]:
    """The complex form, evaluated with numpy complex numbers."""
    lam = np.exp(-np.exp(np.asarray(cell.nu_log.value)) + 1j * np.exp(np.asarray(cell.theta_log.value)))
    gamma = np.exp(np.asarray(cell.gamma_log.value))
    bx = _dense(cell.B_re, x) + 1j * _dense(cell.B_im, x)
    h = lam * (s["h_re"] + 1j * s["h_im"]) + gamma * bx
    c_re, c_im = cell.C_re.weight.value, cell.C_im.weight.value
    c = np.asarray(c_re["weight"]) + 1j * np.asarray(c_im["weight"])  # (out, in), row-vector convention
    y = np.real(h @ c) + np.asarray(c_re["bias"]) + np.asarray(cell.D.value) * x
    return {"h_re": np.real(h), "h_im": np.imag(h)}, y


@dataclass(frozen=True)
class Case:
    make: Callable[..., Any]
    ref: Callable[[Any, States, Arr], tuple[States, Arr]]
    states: tuple[str, ...]
    n_y: int = N_OUT


CASES: dict[str, Case] = {
    # built through the historical alias; the key is the class's real name, the one its errors say (issue 14)
    "VanillaRNNCell": Case(
        lambda **kw: etp_nn.ValinaRNNCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_vanilla, ("h",)
    ),
    "GRUCell": Case(lambda **kw: etp_nn.GRUCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_gru, ("h",)),
    "LSTMCell": Case(lambda **kw: etp_nn.LSTMCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_lstm, ("h", "c")),
    "MGUCell": Case(lambda **kw: etp_nn.MGUCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_mgu, ("h",)),
    "MinimalRNNCell": Case(
        lambda **kw: etp_nn.MinimalRNNCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_minimal, ("h",)
    ),
    "URLSTMCell": Case(
        lambda **kw: etp_nn.URLSTMCell(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_urlstm, ("h", "c")
    ),
    "MiniGRU": Case(lambda **kw: etp_nn.MiniGRU(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_mingru, ("h",)),
    "MiniLSTM": Case(lambda **kw: etp_nn.MiniLSTM(N_IN, N_OUT, w_init=W_INIT, b_init=BIAS, **kw), ref_minlstm, ("h",)),
    "LRUCell": Case(
        lambda **kw: etp_nn.LRUCell(N_IN, N_OUT, r_min=0.4, r_max=0.95, w_init=W_INIT, b_init=BIAS, **kw),
        ref_lru,
        ("h_re", "h_im"),
        n_y=N_IN,
    ),
}
NAMES = list(CASES)


def _random_states(rng: np.random.Generator, case: Case, batch: int | None) -> States:
    shape = (N_OUT,) if batch is None else (batch, N_OUT)
    return {name: rng.normal(size=shape) for name in case.states}


def _set_states(cell: Any, values: States) -> None:
    for name, value in values.items():
        getattr(cell, name).value = jnp.asarray(value)


def _get_states(cell: Any, case: Case) -> States:
    return {name: np.asarray(getattr(cell, name).value) for name in case.states}


def _run(step: Callable[[Any], Any], cell: Any, case: Case, h0: States, xs: Arr) -> tuple[Arr, States]:
    _set_states(cell, h0)
    ys = np.stack([np.asarray(step(jnp.asarray(x))) for x in xs])
    return ys, _get_states(cell, case)


# ---- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [None, BATCH])
@pytest.mark.parametrize("name", NAMES)
def test_cell_matches_equations(rng: np.random.Generator, name: str, batch: int | None) -> None:
    case = CASES[name]
    cell = case.make()
    brainstate.nn.init_all_states(cell, batch_size=batch)
    h0 = _random_states(rng, case, batch)
    xs = rng.normal(size=(STEPS, *(() if batch is None else (batch,)), N_IN))

    ys, final = _run(cell, cell, case, h0, xs)

    s = h0
    for t in range(STEPS):
        s, y = case.ref(cell, s, xs[t])
        np.testing.assert_allclose(ys[t], y, rtol=1e-10, atol=1e-12, err_msg=f"{name} step {t}")
    for state_name in case.states:
        np.testing.assert_allclose(final[state_name], s[state_name], rtol=1e-10, atol=1e-12)
        assert final[state_name].dtype == np.float64
    assert ys.dtype == np.float64
    assert ys.shape == (STEPS, *(() if batch is None else (batch,)), case.n_y)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_match_batched(rng: np.random.Generator, name: str) -> None:
    case = CASES[name]
    cell = case.make()
    h0 = _random_states(rng, case, BATCH)
    xs = rng.normal(size=(STEPS, BATCH, N_IN))

    brainstate.nn.init_all_states(cell, batch_size=BATCH)
    ys, final = _run(cell, cell, case, h0, xs)

    brainstate.nn.init_all_states(cell, batch_size=BATCH)
    ys_jit, final_jit = _run(brainstate.transform.jit(cell), cell, case, h0, xs)
    np.testing.assert_allclose(ys_jit, ys, rtol=1e-12, atol=1e-14)

    # an unbatched cell, vmapped over the batch axis of its states and input
    brainstate.nn.init_all_states(cell)
    assert getattr(cell, case.states[0]).value.shape == (N_OUT,)
    hidden = cell.states(brainstate.HiddenState)
    vmapped = brainstate.transform.vmap(cell, in_states=hidden, out_states=hidden)
    ys_vmap, final_vmap = _run(vmapped, cell, case, h0, xs)
    np.testing.assert_allclose(ys_vmap, ys, rtol=1e-12, atol=1e-14)

    for state_name in case.states:
        np.testing.assert_allclose(final_jit[state_name], final[state_name], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(final_vmap[state_name], final[state_name], rtol=1e-12, atol=1e-14)
    assert ys_jit.dtype == ys_vmap.dtype == np.float64


@pytest.mark.parametrize("name", NAMES)
def test_states_are_hidden_and_reset(rng: np.random.Generator, name: str) -> None:
    case = CASES[name]
    cell = case.make(state_init=init.Constant(0.25))
    brainstate.nn.init_all_states(cell, batch_size=BATCH)
    hidden = cell.states(brainstate.HiddenState)
    assert {path[-1] for path in hidden} == set(case.states)
    for state_name in case.states:
        state = getattr(cell, state_name)
        assert type(state) is brainstate.HiddenState
        assert state.value.shape == (BATCH, N_OUT)
        assert state.value.dtype == jnp.float64
        np.testing.assert_array_equal(state.value, 0.25)
    # everything that is not a parameter is a hidden state
    non_param = {path for path, state in cell.states().items() if not isinstance(state, brainstate.ParamState)}
    assert non_param == set(hidden)

    for x in rng.normal(size=(2, BATCH, N_IN)):
        cell(jnp.asarray(x))
    assert not np.allclose(getattr(cell, case.states[0]).value, 0.25)

    cell.reset_state(batch_size=BATCH)
    for state_name in case.states:
        np.testing.assert_array_equal(getattr(cell, state_name).value, np.full((BATCH, N_OUT), 0.25))
    brainstate.nn.reset_all_states(cell)  # no batch size: back to (out,)
    for state_name in case.states:
        np.testing.assert_array_equal(getattr(cell, state_name).value, np.full((N_OUT,), 0.25))


@pytest.mark.parametrize("batch", [None, BATCH])
@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_reaches_an_etp_primitive(rng: np.random.Generator, name: str, batch: int | None) -> None:
    cell = CASES[name].make()
    brainstate.nn.init_all_states(cell, batch_size=batch)
    x = jnp.asarray(rng.normal(size=(*(() if batch is None else (batch,)), N_IN)))
    reached = param_leaves_reaching_etp(cell, x)
    dense = "etp_mv" if batch is None else "etp_mm"
    expected = {}
    for path, state in cell.states(brainstate.ParamState).items():
        owner = cell
        for key in path[:-1]:
            owner = getattr(owner, key)
        if isinstance(owner, etp_nn.Linear):
            for leaf in state.value:
                expected[(*path, leaf)] = {dense}
        else:
            expected[path] = {"etp_elemwise"}
    assert reached == expected
    assert reached and all(reached.values())
    if name == "GRUCell":  # Wr reaches etp_mm/etp_mv too; excluding it (only via Wh) is the compiler's decision
        assert {reached[(layer, "weight", "weight")] == {dense} for layer in ("Wz", "Wr", "Wh")} == {True}
    # one Linear per gate, each with its own (..., out) output: every gate's weight and bias reaches etp_mm/etp_mv
    gate_layers = {"LSTMCell": ("Wi", "Wf", "Wg", "Wo"), "URLSTMCell": ("Wf", "Wr", "Wu", "Wo")}.get(name, ())
    for layer in gate_layers:
        assert reached[(layer, "weight", "weight")] == reached[(layer, "weight", "bias")] == {dense}
    if name == "URLSTMCell":
        assert set(reached) == {
            *((layer, "weight", leaf) for layer in gate_layers for leaf in ("weight", "bias")),
            ("forget_bias",),
        }
        assert reached[("forget_bias",)] == {"etp_elemwise"}
    if name == "LSTMCell":
        assert set(reached) == {(layer, "weight", leaf) for layer in gate_layers for leaf in ("weight", "bias")}


def test_parameter_structure_and_gru_attribute_order() -> None:
    gru = etp_nn.GRUCell(10, 64, w_init=W_INIT)
    brainstate.nn.init_all_states(gru)
    text = repr(gru)
    # brainstate 0.5 prints ``in_size=(10,), out_size=(64,)``; 0.6 prints ``(10,) -> (64,)``
    sizes = ["in_size=(10,)", "out_size=(64,)"] if "in_size=" in text else ["(10,) -> (64,)"]
    fields = [*sizes, "state_initializer=", "activation=", "Wz=", "Wr=", "Wh=", "h="]
    positions = [text.index(field) for field in fields]
    assert positions == sorted(positions)
    assert (gru.Wz.in_size, gru.Wz.out_size) == ((74,), (64,))

    def params(cell: Any) -> set[tuple[Any, ...]]:
        return set(cell.states(brainstate.ParamState))

    assert params(etp_nn.ValinaRNNCell(3, 4, w_init=W_INIT)) == {("W", "weight")}
    lstm = etp_nn.LSTMCell(3, 4, w_init=W_INIT)
    assert params(lstm) == {("Wi", "weight"), ("Wf", "weight"), ("Wg", "weight"), ("Wo", "weight")}
    for layer in (lstm.Wi, lstm.Wf, lstm.Wg, lstm.Wo):
        assert layer.weight.value["weight"].shape == (7, 4)
        assert layer.weight.value["bias"].shape == (4,)
    lstm_text = repr(lstm)
    assert [lstm_text.index(f"{gate}=") for gate in ("Wi", "Wf", "Wg", "Wo")] == sorted(
        lstm_text.index(f"{gate}=") for gate in ("Wi", "Wf", "Wg", "Wo")
    )
    assert params(etp_nn.MGUCell(3, 4, w_init=W_INIT)) == {("Wf", "weight"), ("Wh", "weight")}
    assert params(etp_nn.MinimalRNNCell(3, 4, w_init=W_INIT)) == {("Wx", "weight"), ("Wu", "weight")}
    assert etp_nn.MinimalRNNCell(3, 4, w_init=W_INIT).Wu.weight.value["weight"].shape == (8, 4)
    urlstm = etp_nn.URLSTMCell(3, 4, w_init=W_INIT)
    assert params(urlstm) == {("Wf", "weight"), ("Wr", "weight"), ("Wu", "weight"), ("Wo", "weight"), ("forget_bias",)}
    for layer in (urlstm.Wf, urlstm.Wr, urlstm.Wu, urlstm.Wo):
        assert layer.weight.value["weight"].shape == (7, 4)
        assert layer.weight.value["bias"].shape == (4,)
    assert urlstm.forget_bias.value.shape == (4,)
    assert params(etp_nn.MiniGRU(3, 4, w_init=W_INIT)) == {("Wz", "weight"), ("Wh", "weight")}
    assert params(etp_nn.MiniLSTM(3, 4, w_init=W_INIT)) == {("Wf", "weight"), ("Wi", "weight"), ("Wh", "weight")}
    assert params(etp_nn.LRUCell(3, 4, w_init=W_INIT)) == {
        ("nu_log",),
        ("theta_log",),
        ("gamma_log",),
        ("B_re", "weight"),
        ("B_im", "weight"),
        ("C_re", "weight"),
        ("C_im", "weight"),
        ("D",),
    }
    assert etp_nn.VanillaRNNCell is etp_nn.ValinaRNNCell
    assert (
        etp_nn.GRUCell(3, 4, w_init=W_INIT).num_in == 3 and etp_nn.GRUCell((2, 3), (5, 4), w_init=W_INIT).num_out == 4
    )


def test_activation_by_name_or_callable(rng: np.random.Generator) -> None:
    by_name = etp_nn.ValinaRNNCell(3, 4, w_init=W_INIT, activation="tanh")
    assert by_name.activation is jax.nn.tanh
    by_callable = etp_nn.ValinaRNNCell(3, 4, w_init=by_name.W.weight.value["weight"], activation=jnp.tanh)
    brainstate.nn.init_all_states(by_name)
    brainstate.nn.init_all_states(by_callable)
    x = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(by_name(x), by_callable(x), rtol=1e-14)
    assert etp_nn.MiniGRU(3, 4, w_init=W_INIT).activation is jax.nn.identity
    with pytest.raises(ValueError, match=r"GRUCell: activation must be a callable or the name of a function in jax.nn"):
        etp_nn.GRUCell(3, 4, activation="no_such_function")
    with pytest.raises(TypeError, match=r"LSTMCell: activation must be a callable"):
        etp_nn.LSTMCell(3, 4, activation=3)  # type: ignore[arg-type]


def test_initialisations_follow_the_papers() -> None:
    d = 8
    ur = etp_nn.URLSTMCell(3, d, w_init=W_INIT)
    gate = jax.nn.sigmoid(ur.forget_bias.value)  # uniform gate initialisation: sigma(b_f) ~ U[1/d, 1 - 1/d]
    assert ur.forget_bias.value.dtype == jnp.float64
    assert bool(jnp.all((gate >= 1 / d) & (gate <= 1 - 1 / d)))
    assert float(jnp.std(ur.forget_bias.value)) > 0
    np.testing.assert_array_equal(etp_nn.URLSTMCell(3, 2, w_init=W_INIT).forget_bias.value, np.zeros(2))
    np.testing.assert_array_equal(
        etp_nn.URLSTMCell(3, 4, w_init=W_INIT, forget_bias_init=init.Constant(1.0)).forget_bias.value, 1.0
    )

    lru = etp_nn.LRUCell(3, 16, r_min=0.5, r_max=0.9, max_phase=np.pi, w_init=W_INIT)
    magnitude = np.exp(-np.exp(np.asarray(lru.nu_log.value)))
    phase = np.exp(np.asarray(lru.theta_log.value))
    assert np.all((magnitude >= 0.5 - 1e-12) & (magnitude <= 0.9 + 1e-12))
    assert np.all((phase > 0) & (phase <= np.pi))
    np.testing.assert_allclose(np.exp(np.asarray(lru.gamma_log.value)), np.sqrt(1 - magnitude**2), rtol=1e-12)
    assert lru.nu_log.value.dtype == lru.D.value.dtype == jnp.float64
    assert "bias" not in lru.B_re.weight.value and "bias" not in lru.C_im.weight.value
    with pytest.raises(ValueError, match=r"LRUCell: r_min and r_max must satisfy 0 <= r_min < r_max <= 1"):
        etp_nn.LRUCell(3, 4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match=r"LRUCell: max_phase must be positive"):
        etp_nn.LRUCell(3, 4, max_phase=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_the_cell(name: str) -> None:
    cell = CASES[name].make()
    with pytest.raises(RuntimeError, match=rf"{name}: state '{CASES[name].states[0]}' is used before it exists.*"):
        cell(jnp.ones(N_IN))
    with pytest.raises(RuntimeError, match=r"brainstate\.nn\.init_all_states"):
        cell.reset_state()

    brainstate.nn.init_all_states(cell, batch_size=BATCH)
    with pytest.raises(ValueError, match=rf"{name}: x must have {N_IN} features .* got shape \({BATCH}, 2\)"):
        cell(jnp.ones((BATCH, 2)))
    with pytest.raises(ValueError, match=rf"{name}: input batch shape \(2,\) .* state's batch shape \({BATCH},\)"):
        cell(jnp.ones((2, N_IN)))
    with pytest.raises(ValueError, match=rf"{name}: input batch shape \(\) .* state's batch shape \({BATCH},\)"):
        cell(jnp.ones(N_IN))

    named = CASES[name].make(name="enc")
    brainstate.nn.init_all_states(named)
    with pytest.raises(ValueError, match=rf"{name}\('enc'\): x must have {N_IN} features"):
        named(jnp.ones(N_IN + 1))
