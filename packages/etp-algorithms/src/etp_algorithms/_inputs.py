"""Input markers for learner calls: one step, or a window of steps along a leading time axis."""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["SingleStepData", "MultiStepData"]


@jax.tree_util.register_pytree_node_class
class SingleStepData:
    """An input that is the same at every step of a window (no time axis)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def tree_flatten(self) -> tuple[tuple[Any], None]:
        return (self.data,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any]) -> SingleStepData:
        return cls(children[0])


@jax.tree_util.register_pytree_node_class
class MultiStepData:
    """An input with a leading time axis: one learner call processes every step of it as a window.

    Inside the window the gradient is exact reverse mode; the eligibility
    traces carry the dependence on earlier windows. A window covering the
    whole sequence (from reset traces) gives exactly the BPTT gradient.
    """

    def __init__(self, data: Any) -> None:
        self.data = data

    def tree_flatten(self) -> tuple[tuple[Any], None]:
        return (self.data,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any]) -> MultiStepData:
        return cls(children[0])
