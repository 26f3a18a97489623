"""Names: the clear class name is the real one (reprs and errors say it) and the historical spelling an alias;
``import braintrace`` exports the step-data wrappers, ``NotSupportedError`` and every public name of etp_algorithms."""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
import etp_algorithms
import etp_compiler
import etp_nn

# ---------------------------------------------------------------------------------------------------------------
# Class names: the clear one is the real one, the historical spelling an alias


def test_vanilla_rnn_cell_is_the_real_name(rng: np.random.Generator) -> None:
    assert etp_nn.ValinaRNNCell is etp_nn.VanillaRNNCell
    assert braintrace.nn.ValinaRNNCell is braintrace.nn.VanillaRNNCell is etp_nn.VanillaRNNCell
    assert etp_nn.VanillaRNNCell.__name__ == etp_nn.VanillaRNNCell.__qualname__ == "VanillaRNNCell"
    cell = etp_nn.ValinaRNNCell(3, 4, w_init=jnp.asarray(rng.normal(size=(7, 4))))
    assert repr(cell).startswith("VanillaRNNCell(") and "Valina" not in repr(cell)
    brainstate.nn.init_all_states(cell)
    with pytest.raises(ValueError, match=r"^VanillaRNNCell: x must have 3 features") as info:
        cell(jnp.ones(5))
    assert "Valina" not in str(info.value)
    assert {"VanillaRNNCell", "ValinaRNNCell"} <= set(etp_nn.__all__) & set(braintrace.nn.__all__)


# ---------------------------------------------------------------------------------------------------------------
# import braintrace


def test_braintrace_exports_the_step_data_wrappers() -> None:
    assert braintrace.SingleStepData is etp_algorithms.SingleStepData
    assert braintrace.MultiStepData is etp_algorithms.MultiStepData
    assert {"SingleStepData", "MultiStepData"} <= set(braintrace.__all__)


def test_braintrace_exports_not_supported_error() -> None:
    assert braintrace.NotSupportedError is etp_compiler.NotSupportedError
    assert issubclass(braintrace.NotSupportedError, Exception) and "NotSupportedError" in braintrace.__all__


def test_braintrace_exports_the_compiler_names_of_0_2_8() -> None:
    for name in ("NotSupportedError", "add_hidden_perturbation_in_module", "add_hidden_perturbation_from_minfo"):
        assert name in braintrace.__all__, name
        assert getattr(braintrace, name) is getattr(etp_compiler, name), name


def test_braintrace_reexports_every_public_name_of_the_algorithms() -> None:
    names = [name for name in etp_algorithms.__all__ if name != "__version__"]
    assert {"D_RTRL", "ES_D_RTRL", "ETraceAlgorithm"} <= set(names)
    for name in names:
        assert name in braintrace.__all__, name
        assert getattr(braintrace, name) is getattr(etp_algorithms, name), name
    assert braintrace.__version__ == etp_nn.__version__  # not etp_algorithms' (the star import comes first)
    assert len(braintrace.__all__) == len(set(braintrace.__all__))
    for name in braintrace.__all__:
        assert hasattr(braintrace, name), name
