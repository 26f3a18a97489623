"""Strict test settings for etp_primitives: float64 available, no silent rank promotion, seeded RNG."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator per test: results never depend on test order."""
    return np.random.default_rng(20261120)
