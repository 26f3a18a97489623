"""The one place where etp_algorithms touches JAX internals."""

from __future__ import annotations

from jax.extend.core import jaxpr_as_fun

__all__ = ["jaxpr_as_fun"]
