"""Stage 1: the traced step, the state classification and the var <-> path maps."""

from __future__ import annotations

from typing import Any

import brainstate
import jax.numpy as jnp
import pytest
import saiunit as u

import etp_primitives as etp
from etp_compiler._errors import CompilationError
from etp_compiler._module_info import extract_module_info


class Leaky(brainstate.nn.Module):
    def __init__(self, n_in: int = 3, n: int = 4) -> None:
        super().__init__()
        self.w = brainstate.ParamState({"weight": jnp.ones((n_in, n)), "bias": jnp.zeros(n)})
        self.scale = brainstate.ParamState(jnp.ones(n))
        self.h = brainstate.HiddenState(jnp.zeros(n))
        self.log = brainstate.ShortTermState(jnp.zeros(n))

    def update(self, x: Any) -> Any:
        self.h.value = 0.9 * self.h.value + etp.matmul(x, self.w.value["weight"], self.w.value["bias"])
        self.log.value = self.h.value * self.scale.value
        return self.h.value.sum()


class Stack(brainstate.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Leaky(3, 4)
        self.b = Leaky(4, 2)

    def update(self, x: Any) -> Any:
        self.a(x)
        return self.b(self.a.h.value)


def test_states_are_classified_and_mapped_both_ways() -> None:
    model = Stack()
    minfo = extract_module_info(model, jnp.ones(3))
    assert set(minfo.hidden_states) == {("a", "h"), ("b", "h")}
    assert set(minfo.weight_states) == {("a", "w"), ("a", "scale"), ("b", "w"), ("b", "scale")}
    assert set(minfo.other_states) == {("a", "log"), ("b", "log")}
    assert len(minfo.compiled_model_states) == 8
    for path, var in minfo.hidden_path_to_invar.items():
        assert minfo.invar_to_hidden_path[var] == path
        assert var in minfo.jaxpr.invars
        assert minfo.hidden_path_to_outvar[path] in minfo.jaxpr.outvars
    for path, invars in minfo.weight_path_to_invars.items():
        for var in invars:
            assert minfo.invar_to_weight_path[var][0] == path
    # dict-valued ParamState: one invar per leaf, keyed by leaf.
    leaves = {minfo.invar_to_weight_path[v][1] for v in minfo.weight_path_to_invars[("a", "w")]}
    assert leaves == {("weight",), ("bias",)}
    assert minfo.invar_to_weight_path[minfo.weight_path_to_invars[("a", "scale")][0]] == (("a", "scale"), ())
    assert len(minfo.arg_invars) == 1 and len(minfo.out_vars) == 1
    # shapes of the traced vars are those of the states
    assert minfo.hidden_path_to_invar[("b", "h")].aval.shape == (2,)


def test_batched_and_unit_hidden_states() -> None:
    class Neuron(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 5)))
            self.V = brainstate.HiddenState(jnp.zeros((2, 5)) * u.mV)

        def update(self, x: Any) -> Any:
            self.V.value = 0.5 * self.V.value + etp.matmul(x, self.w.value) * u.mV
            return self.V.value

    minfo = extract_module_info(Neuron(), jnp.ones((2, 3)))
    assert minfo.hidden_path_to_invar[("V",)].aval.shape == (2, 5)


def test_no_hidden_state_is_a_compilation_error() -> None:
    class Plain(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4)))

        def update(self, x: Any) -> Any:
            return etp.matmul(x, self.w.value)

    with pytest.raises(CompilationError, match=r"no hidden state.*w \(ParamState\)"):
        extract_module_info(Plain(), jnp.ones(3))


def test_hidden_state_read_but_not_written() -> None:
    class Frozen(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            return self.h.value + x

    with pytest.raises(CompilationError, match=r"hidden state h is read but never written"):
        extract_module_info(Frozen(), jnp.ones(4))


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="brainstate.nn.Module"):
        extract_module_info(lambda x: x, jnp.ones(2))  # type: ignore[arg-type]


def test_state_changing_shape_with_the_input() -> None:
    class Growing(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x: Any) -> Any:
            self.h.value = self.h.value + etp.matmul(x, self.w.value)
            return self.h.value

    with pytest.raises(CompilationError, match=r"state h changes shape within one step, from \(4,\) to \(2, 4\)"):
        extract_module_info(Growing(), jnp.ones((2, 3)))


def test_state_changing_dtype_within_a_step() -> None:
    class Drifting(brainstate.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4), jnp.float32))
            self.h = brainstate.HiddenState(jnp.zeros(4, jnp.float32))

        def update(self, x: Any) -> Any:
            self.h.value = self.h.value + etp.matmul(x, self.w.value)
            return self.h.value

    with pytest.raises(CompilationError, match=r"state h changes dtype within one step, from float32 to float64"):
        extract_module_info(Drifting(), jnp.ones(3, jnp.float64))
