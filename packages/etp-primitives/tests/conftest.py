"""Strict test settings for etp_primitives: float64 available, no silent rank promotion, seeded RNG."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def strict_rank_promotion() -> Iterator[None]:
    """No silent rank promotion inside the primitives (scoped: other packages' tests run in the same session)."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator per test: results never depend on test order."""
    return np.random.default_rng(20261120)
