r"""The checks a learner call makes before it runs: inputs, states, copies, staging, finiteness.

Every check raises (or converts) before anything is written, so a failed call
leaves the parameters, hidden states and traces as they were.

* :class:`InputSignature` -- shape, dtype and unit (:mod:`saiunit`) of every
  input leaf, as compiled. A :class:`saiunit.Quantity` input of a compatible
  unit is converted to the compiled unit (``0.003 V`` to ``3 mV``); a missing,
  extra or incompatible unit raises.
* :class:`StateSignature` -- the identity, tree structure and leaf shapes of
  every state the compiled step reads. A state object that is no longer the
  model's (``brainstate.nn.init_all_states`` creates new ones, a replaced
  sub-module brings its own) is reported by :meth:`StateSignature.replaced`;
  a value of another shape or structure raises naming the state.
* :func:`check_finite` -- NaN / inf in a step's new states or traces raises
  naming the state or trace, before it is stored.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

from ._compat import inside_staging

__all__ = [
    "InputSignature",
    "NonFiniteError",
    "StateSignature",
    "check_finite",
    "refuse_inside_staging",
]


def _text(path: Sequence[Hashable]) -> str:
    return ".".join(map(str, path))


def _is_quantity(x: Any) -> bool:
    return isinstance(x, u.Quantity)


def _unit_of(leaf: Any) -> Any:
    """The unit of a leaf: a saiunit unit for a Quantity, ``None`` for a plain array or number."""
    return leaf.unit if _is_quantity(leaf) and not leaf.unit.is_unitless else None


def _mantissa_leaves(x: Any) -> list[Any]:
    """The leaves of ``x`` with every Quantity kept whole (``jax.tree.leaves`` would drop its unit)."""
    return list(jax.tree.leaves(x, is_leaf=_is_quantity))


class InputSignature:
    r"""Shape, dtype and unit of each input leaf a learner was compiled for.

    :meth:`leaves` turns a call's inputs into the plain leaves the compiled step takes:
    a Quantity in a unit of the compiled unit's dimension is converted, :math:`x_{\mathrm{mV}} =
    1000\, x_{\mathrm{V}}`; anything else that does not match raises, naming the input.

    Examples
    --------
    >>> import jax.numpy as jnp, saiunit as u
    >>> sig = InputSignature.of((jnp.zeros(2) * u.mV,), "Learner")
    >>> [float(v) for v in sig.leaves((jnp.array([0.003, 0.001]) * u.volt,))[0]]
    [3.0, 1.0]
    """

    def __init__(self, label: str, entries: list[tuple[tuple[int, ...], Any, Any]], treedef: Any = None) -> None:
        self.label = label
        self.entries = entries
        self.treedef = treedef

    @classmethod
    def of(cls, args: Sequence[Any], label: str) -> InputSignature:
        """The signature of the example inputs given to ``compile_graph``."""
        entries = []
        leaves, treedef = jax.tree.flatten(tuple(args), is_leaf=_is_quantity)
        for leaf in leaves:
            unit = _unit_of(leaf)
            value = leaf.mantissa if _is_quantity(leaf) else leaf
            entries.append((tuple(jnp.shape(value)), jnp.result_type(value), unit))
        return cls(label, entries, treedef)

    @property
    def shapes(self) -> list[tuple[tuple[int, ...], Any]]:
        """``(shape, dtype)`` of each input leaf (the form the sharding helpers read)."""
        return [(shape, dtype) for shape, dtype, _ in self.entries]

    def leaves(self, args: Sequence[Any]) -> list[Any]:
        """The plain (unit-free, compiled-unit) leaves of ``args``, checked against the signature."""
        label = self.label
        raw = _mantissa_leaves(tuple(args))
        values = []
        for index, leaf in enumerate(raw):
            want = self.entries[index][2] if index < len(self.entries) else None
            got = _unit_of(leaf)
            if want is None and got is not None:
                raise TypeError(
                    f"{label}: input {index} is a Quantity in {got}, but the learner was compiled for a plain "
                    f"array (no unit); its unit would be dropped. Pass x.to_decimal({got}) (or the unit the model "
                    "expects), or compile_graph(...) with inputs carrying the unit."
                )
            if want is not None and got is None:
                raise TypeError(
                    f"{label}: input {index} is a plain array, but the learner was compiled for inputs in {want}; "
                    f"give it its unit (x * u.{want}) so it is not read in the wrong unit."
                )
            if want is not None and not leaf.unit.has_same_dim(want):
                raise TypeError(
                    f"{label}: input {index} is in {got}, which cannot be converted to the compiled unit {want} "
                    "(another physical dimension)."
                )
            if _is_quantity(leaf):
                leaf = leaf.to_decimal(want) if want is not None else leaf.to_decimal()
            values.append(leaf)
        self._check_shapes(values)
        return values

    def _check_shapes(self, values: list[Any]) -> None:
        label = self.label
        given = [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in values]
        compiled = self.shapes
        if [s for s, _ in given] != [s for s, _ in compiled]:
            window = all(len(g) == len(c) + 1 and g[1:] == c for (g, _), (c, _) in zip(given, compiled, strict=False))
            hint = (
                " A window of steps (a leading time axis) is passed as MultiStepData(x): a plain call is one step."
                if window and len(given) == len(compiled)
                else ""
            )
            raise ValueError(
                f"{label}: input shapes {[s for s, _ in given]} differ from the compiled "
                f"{[s for s, _ in compiled]}; to change the batch size call reset_state(batch_size=...) "
                f"first, or compile_graph(...) with the new inputs.{hint}"
            )
        for index, ((_, got), (_, want)) in enumerate(zip(given, compiled, strict=True)):
            # a float of another precision runs the step in mixed precision, or fails deep in a rule
            if got != want and jnp.issubdtype(got, jnp.floating) and jnp.issubdtype(want, jnp.floating):
                raise TypeError(
                    f"{label}: input {index} is {jnp.dtype(got).name}, but the learner was compiled "
                    f"for {jnp.dtype(want).name} inputs; cast it (x.astype(jnp.{jnp.dtype(want).name})) or "
                    "compile_graph(...) with inputs of the new dtype."
                )

    def example_args(self, batch: tuple[int | None, int] | None = None) -> tuple[Any, ...]:
        """Zero inputs of the compiled shapes and structure (Quantities where compiled with a unit).

        ``batch=(old, new)``: leading axes of size ``old`` become ``new`` (``old=None``: a
        leading axis of size ``new`` is added).
        """
        out = []
        for shape, dtype, unit in self.entries:
            if batch is not None:
                old, new = batch
                shape = (new, *shape) if old is None else ((new, *shape[1:]) if shape[:1] == (old,) else shape)
            zeros = np.zeros(shape, dtype)
            out.append(zeros if unit is None else u.Quantity(zeros, unit=unit))
        return tuple(jax.tree.unflatten(self.treedef, out))


def tree_layout(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    """The tree structure and the ``(shape, dtype)`` of every leaf of ``tree``."""
    return jax.tree.structure(tree), [(tuple(jnp.shape(v)), jnp.result_type(v)) for v in jax.tree.leaves(tree)]


def check_layout(label: str, name: str, tree: Any, layout: tuple[Any, Any], hint: str) -> None:
    """Raise naming ``name`` when ``tree`` has not the structure and leaf shapes/dtypes of ``layout``."""
    treedef, leaves = layout
    if jax.tree.structure(tree) != treedef:
        raise ValueError(
            f"{label}: {name} has the structure {jax.tree.structure(tree)}, but the step was compiled for "
            f"{treedef} (a key missing or added?); {hint}"
        )
    shapes = tree_layout(tree)[1]
    if shapes != leaves:
        raise ValueError(
            f"{label}: {name} holds leaves of shapes/dtypes {[(s, jnp.dtype(d).name) for s, d in shapes]}, but the "
            f"step was compiled for {[(s, jnp.dtype(d).name) for s, d in leaves]}; {hint}"
        )


def model_states(model: brainstate.nn.Module) -> Mapping[Any, brainstate.State[Any]]:
    """``path -> state`` of every state of ``model``, as it holds them now."""
    return cast(Mapping[Any, brainstate.State[Any]], model.states())


class StateSignature:
    """The compiled states of a step: the objects, and the tree structure and leaf shapes of their values."""

    def __init__(self, label: str, states: Mapping[Any, brainstate.State[Any]]) -> None:
        self.label = label
        self.states = dict(states)
        self.layout = {path: tree_layout(s.value) for path, s in self.states.items()}

    def replaced(self, model: brainstate.nn.Module) -> list[str]:
        """Paths of compiled states that are no longer ``model``'s (re-initialised or replaced objects)."""
        current = {id(s) for s in model_states(model).values()}
        return [_text(path) for path, s in self.states.items() if id(s) not in current]

    def check_values(self) -> None:
        """Raise naming the state whose value no longer has the compiled structure or shapes."""
        for path, state in self.states.items():
            check_layout(
                self.label,
                f"state {_text(path)}",
                state.value,
                self.layout[path],
                "to change the batch size call learner.reset_state(batch_size=...); otherwise assign a value of "
                "the compiled structure and shapes, or compile_graph(...) again.",
            )


class NonFiniteError(FloatingPointError):
    """A learner step produced NaN or inf in a hidden state or an eligibility trace (``check_finite=True``)."""


def _non_finite(tree: Any) -> Any:
    leaves = [
        jnp.any(~jnp.isfinite(v)) for v in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(v), jnp.inexact)
    ]
    return jnp.any(jnp.stack(leaves)) if leaves else jnp.asarray(False)


def check_finite(label: str, named: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``named`` (name -> pytree) holding NaN or inf.

    Eagerly the error is raised before the caller stores anything; inside ``jit`` it is raised
    through ``brainstate.transform.jit_error_if`` when the compiled program runs.
    """
    for name, tree in named.items():
        bad = _non_finite(tree)
        message = (
            f"{label}: NaN or inf in {name} after this step; the step's results were not stored. Recover with "
            "learner.reset_state() (zero traces) and brainstate.nn.reset_all_states(model), lower the learning "
            "rate, or check the inputs."
        )
        if inside_staging():
            brainstate.transform.jit_error_if(bad, message)
        elif bool(bad):
            raise NonFiniteError(message)


def refuse_inside_staging(label: str, what: str) -> None:
    """Raise when called inside ``jit`` (or another staging transform): ``what`` changes the compiled structure."""
    if inside_staging():
        raise RuntimeError(
            f"{label}: {what} was called inside a jitted (staged) function; it recompiles the model's step and "
            "replaces the learner's states, which cannot happen while tracing. Call it outside jit, between "
            "jitted steps (the jitted step retraces for the new shapes)."
        )
