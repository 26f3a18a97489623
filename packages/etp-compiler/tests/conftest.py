"""Compiler tests: float64 available, seeded RNG; ``compiler_testing`` (beside this file) holds shared helpers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261120)


@pytest.fixture(autouse=True)
def float64_environment() -> Iterator[None]:
    """brainstate casts initial parameters to the environment precision: make it float64."""
    import brainstate

    with brainstate.environ.context(precision=64):
        yield
