"""The one place where etp_primitives touches JAX internals.

JAX moves its extension points between releases; importing them here, and
nowhere else, keeps every other module on the public API and makes a JAX
upgrade a one-file change.
"""

from __future__ import annotations

from jax.core import ShapedArray
from jax.extend.core import Primitive, Var
from jax.interpreters import ad, batching, mlir

__all__ = ["Primitive", "ShapedArray", "Var", "ad", "batching", "mlir"]
