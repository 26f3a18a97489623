"""The one jaxpr evaluator of etp_compiler: bind the inputs, bind every equation, read the atoms.

Every re-evaluation the compiler and the learners do (a group's transition,
a relation's :math:`y \\to h` map or weight transform, the step itself, the
re-trace that inlines nested calls) goes through :func:`eval_jaxpr` (or, when
the values of intermediate variables are wanted too, :func:`eval_jaxpr_env`
and :func:`eval_eqns`), and every atom is read with :func:`read_atom`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeGuard

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, OpenJaxpr, Var

__all__ = ["bind_eqn", "bind_inputs", "eval_eqns", "eval_jaxpr", "eval_jaxpr_env", "is_var", "read_atom"]

#: ``bind(eqn, input values) -> output values``: how :func:`eval_eqns` evaluates one equation.
EqnBinder = Callable[[JaxprEqn, Sequence[Any]], Sequence[Any]]


def is_var(atom: Any) -> TypeGuard[Var]:
    """Whether ``atom`` is a jaxpr variable (not a literal).

    Examples
    --------
    >>> import jax
    >>> from etp_compiler import is_var
    >>> jaxpr = jax.make_jaxpr(lambda x: x + 1.0)(2.0).jaxpr
    >>> [is_var(a) for a in jaxpr.eqns[0].invars]
    [True, False]
    """
    return isinstance(atom, Var) and not isinstance(atom, Literal)


def read_atom(env: Mapping[Var, Any], atom: Any) -> Any:
    """The value of a jaxpr atom: a literal's own value, else the variable's value in ``env``.

    Parameters
    ----------
    env : mapping
        ``Var -> value``.
    atom : Var or Literal
        An equation input or a jaxpr output.

    Raises
    ------
    KeyError
        If ``atom`` is a variable without a value in ``env``.

    Examples
    --------
    >>> import jax
    >>> from etp_compiler import read_atom
    >>> jaxpr = jax.make_jaxpr(lambda x: x * 3.0)(2.0).jaxpr
    >>> x, three = jaxpr.eqns[0].invars
    >>> read_atom({x: 2.0}, x), float(read_atom({}, three))
    (2.0, 3.0)
    """
    return atom.val if isinstance(atom, Literal) else env[atom]


def bind_eqn(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Re-bind one equation on new inputs, as ``jax.core.eval_jaxpr`` does; returns its outputs as a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        result = eqn.primitive.bind(*invals, **params)
    return list(result) if eqn.primitive.multiple_results else [result]


def eval_eqns(
    eqns: Iterable[JaxprEqn],
    env: dict[Var, Any],
    override: Callable[[Var, Any], Any] | None = None,
    *,
    bind: EqnBinder = bind_eqn,
) -> dict[Var, Any]:
    """Evaluate ``eqns`` in order on ``env`` (var -> value), writing their outputs into it.

    Parameters
    ----------
    eqns : iterable of JaxprEqn
    env : dict
        Values of every variable the equations read that they do not produce; updated in place.
    override : callable, optional
        ``override(var, value)`` may replace each produced value (e.g. to add a
        perturbation right where a hidden state is produced).
    bind : callable, optional
        ``bind(eqn, input values) -> output values``; :func:`bind_eqn` by default
        (the compiler's re-trace passes one that inlines nested calls).

    Returns
    -------
    dict
        ``env``.
    """
    for eqn in eqns:
        outs = bind(eqn, [read_atom(env, v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outs, strict=True):
            if is_var(var):
                env[var] = override(var, value) if override is not None else value
    return env


def _inputs_of(jaxpr: OpenJaxpr | Jaxpr, n_consts: int, n_args: int) -> list[Var]:
    """The variables that ``consts`` then ``args`` bind, after checking their number."""
    if isinstance(jaxpr, OpenJaxpr):
        if n_consts != len(jaxpr.constvars) or n_args != len(jaxpr.invars):
            raise TypeError(
                f"{jaxpr.name}: expected {len(jaxpr.constvars)} constant values and {len(jaxpr.invars)} arguments, "
                f"got {n_consts} and {n_args}"
            )
        return [*jaxpr.constvars, *jaxpr.invars]
    if isinstance(jaxpr, ClosedJaxpr) and not isinstance(jaxpr, Jaxpr):
        raise TypeError(
            "eval_jaxpr takes a Jaxpr or an OpenJaxpr; for a ClosedJaxpr `closed` call "
            "eval_jaxpr(closed.jaxpr, closed.consts, *args)."
        )
    if not isinstance(jaxpr, Jaxpr):
        raise TypeError(f"eval_jaxpr takes a Jaxpr or an OpenJaxpr, got {type(jaxpr).__name__}.")
    # jax >= 0.11: constvars are the inputs with values attached, the rest are invars; both eras: consts first
    inputs = [*jaxpr.constvars, *jaxpr.invars]
    if n_consts + n_args != len(inputs):
        name = getattr(getattr(jaxpr, "debug_info", None), "func_name", None) or "jaxpr"
        raise TypeError(
            f"{name}: expected {len(inputs)} input values (constants then arguments), got {n_consts} constants "
            f"and {n_args} arguments"
        )
    return inputs


def bind_inputs(jaxpr: OpenJaxpr | Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> dict[Var, Any]:
    """The environment ``Var -> value`` of the jaxpr's inputs: ``consts`` for its constvars, ``args`` for its invars.

    Raises
    ------
    TypeError
        As :func:`eval_jaxpr`.
    """
    inputs = _inputs_of(jaxpr, len(consts), len(args))
    return dict(zip(inputs, [*consts, *args], strict=True))


def eval_jaxpr_env(
    jaxpr: OpenJaxpr | Jaxpr, consts: Sequence[Any], *args: Any, bind: EqnBinder = bind_eqn
) -> dict[Var, Any]:
    """Evaluate ``jaxpr`` like :func:`eval_jaxpr`; return the value of every variable (``Var -> value``).

    ``bind`` evaluates each equation (see :func:`eval_eqns`).
    """
    env = bind_inputs(jaxpr, consts, args)  # checks the jaxpr's type and the number of values first
    return eval_eqns(jaxpr.eqns, env, bind=bind)


def eval_jaxpr(jaxpr: OpenJaxpr | Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """The outputs of ``jaxpr`` for the constants' values ``consts`` and the arguments ``args``.

    The same contract as ``jax.core.eval_jaxpr`` on every supported JAX
    version: ``consts`` bind the jaxpr's ``constvars`` and ``args`` its
    ``invars``. For an :class:`OpenJaxpr` the two counts are checked apart.

    Parameters
    ----------
    jaxpr : OpenJaxpr or Jaxpr
        A slice of a traced step, or a JAX jaxpr (for a ``ClosedJaxpr`` ``c``
        pass ``c.jaxpr, c.consts``).
    consts : sequence
        Values of the constant inputs.
    *args
        Values of the arguments.

    Returns
    -------
    list
        One value per output (a literal output gives its own value).

    Raises
    ------
    TypeError
        If the number of values does not match the jaxpr's inputs (the message
        names the jaxpr), or ``jaxpr`` is of another type.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from etp_compiler import eval_jaxpr
    >>> closed = jax.make_jaxpr(lambda x, y: (jnp.sin(x) * y, 2.0))(1.0, 3.0)
    >>> [round(float(v), 4) for v in eval_jaxpr(closed.jaxpr, closed.consts, 1.0, 3.0)]
    [2.5244, 2.0]
    """
    env = eval_jaxpr_env(jaxpr, consts, *args)
    return [read_atom(env, v) for v in jaxpr.outvars]
