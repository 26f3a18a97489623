"""Check a primitive's ETP rules against the shapes of one equation, before any learner runs them.

A custom primitive whose rule returns the wrong structure (an array where a ``{key: array}``
dict is due, a trace of another shape than ``init_drtrl`` allocates, a gradient not shaped like
its weight) would otherwise fail deep inside a learner's step with a bare JAX shape error, or
broadcast into a wrong number. :func:`check_rules` evaluates every rule abstractly
(``jax.eval_shape``: no FLOPs) on the equation's shapes and names the primitive, the rule, what
it returned and what the contract expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._compat import Primitive
from ._trace import aval_of, drtrl_grad, drtrl_seed, require_rules

__all__ = ["ETPRuleError", "check_rules"]


class ETPRuleError(ValueError):
    """An ETP primitive's rule returned something its contract does not allow (see :func:`check_rules`)."""


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"array{tuple(value.shape)} {jnp.dtype(value.dtype).name}"
    return type(value).__name__


def _expect_dict(name: str, rule: str, got: Any, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """``got`` must be a dict with exactly the keys of ``shapes``, each leaf of that shape."""
    ok = isinstance(got, Mapping) and set(got) == set(shapes)
    ok = ok and all(hasattr(got[k], "shape") and tuple(got[k].shape) == tuple(shapes[k]) for k in shapes)
    if not ok:
        want = "{" + ", ".join(f"{k!r}: array{tuple(s)}" for k, s in shapes.items()) + "}"
        raise ETPRuleError(f"ETP primitive {name!r}: rule {rule!r} returned {_describe(got)}; expected {what}, {want}.")


def _shape_of(name: str, rule: str, fn: Any, *args: Any) -> Any:
    """``jax.eval_shape(fn, *args)``, a rule's own failure reported as an :class:`ETPRuleError` naming it."""
    try:
        return jax.eval_shape(fn, *args)
    except ETPRuleError:
        raise
    except Exception as error:
        shapes = ", ".join(_describe(a) if a is not None else "None" for a in args)
        raise ETPRuleError(
            f"ETP primitive {name!r}: rule {rule!r} failed on the equation's shapes ({shapes}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _abstract(value: Any) -> Any:
    if value is None:
        return None
    aval = aval_of(value)
    return jax.ShapeDtypeStruct(tuple(aval.shape), aval.dtype)


def check_rules(
    primitive: Primitive,
    x: Any,
    y: Any,
    weights: Mapping[str, Any],
    params: Mapping[str, Any],
    num_state: int = 1,
    rules: Sequence[str] = ("init_drtrl", "init_pp", "xy_to_dw", "yw_to_w", "drtrl_seed", "drtrl_grad"),
) -> None:
    """Evaluate ``primitive``'s rules abstractly on one equation's shapes; raise :class:`ETPRuleError` on a mismatch.

    Parameters
    ----------
    primitive : ETPPrimitive
        A registered ETP primitive with its four required rules.
    x, y : jaxpr Var, array or ShapeDtypeStruct
        The equation's input (``None`` for input-free primitives) and output.
    weights : dict
        ``{trainable key: Var, array or ShapeDtypeStruct}``.
    params : dict
        The equation's static parameters.
    num_state : int
        States per position of the hidden group the equation feeds.
    rules : sequence of str
        The rules to check (default: all six).

    Raises
    ------
    ETPRuleError
        A rule returned another structure or shape than its contract allows; the message names the
        primitive, the rule, what it returned and what was expected.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> from etp_primitives.extend import check_rules
    >>> f32 = jnp.float32
    >>> x, w, y = (jax.ShapeDtypeStruct(s, f32) for s in [(2, 3), (3, 4), (2, 4)])
    >>> check_rules(etp.etp_mm_p, x, y, {"weight": w}, {"has_bias": False})  # the built-in rules pass
    """
    name = getattr(primitive, "name", str(primitive))
    wanted = list(rules)
    found = require_rules(primitive, *[r for r in wanted if r in ("init_drtrl", "init_pp", "xy_to_dw", "yw_to_w")])
    x_s, y_s = _abstract(x), _abstract(y)
    w_s = {k: _abstract(v) for k, v in weights.items()}
    w_shapes = {k: tuple(v.shape) for k, v in w_s.items()}
    y_like = jax.ShapeDtypeStruct(tuple(y_s.shape), y_s.dtype)
    kw = dict(params)

    one_state: dict[str, tuple[int, ...]] | None = None
    if "init_drtrl" in found:
        init = _shape_of(name, "init_drtrl", lambda: found["init_drtrl"](x_s, y_s, w_s, num_state))
        if not isinstance(init, Mapping) or set(init) != set(w_s):
            raise ETPRuleError(
                f"ETP primitive {name!r}: rule 'init_drtrl' returned {_describe(init)}; expected a dict with one "
                f"trace per trainable key {sorted(w_s)}, each with a trailing axis of {num_state} state(s)."
            )
        bad = [k for k, v in init.items() if not hasattr(v, "shape") or not v.shape or v.shape[-1] != num_state]
        if bad:
            raise ETPRuleError(
                f"ETP primitive {name!r}: rule 'init_drtrl' returned {_describe(init)}; the trace of "
                f"{bad} has no trailing axis of {num_state} state(s)."
            )
        one_state = {k: tuple(v.shape[:-1]) for k, v in init.items()}
    if "init_pp" in found:
        pp = _shape_of(name, "init_pp", lambda: found["init_pp"](x_s, y_s, w_s, num_state))
        if not hasattr(pp, "shape") or tuple(pp.shape) != (*y_s.shape, num_state):
            raise ETPRuleError(
                f"ETP primitive {name!r}: rule 'init_pp' returned {_describe(pp)}; expected an array of the "
                f"output's shape with a trailing state axis, array{(*y_s.shape, num_state)}."
            )
    if "xy_to_dw" in found:
        if x_s is None:
            got = _shape_of(name, "xy_to_dw", lambda d, w: found["xy_to_dw"](None, d, w, **kw), y_like, w_s)
        else:
            got = _shape_of(name, "xy_to_dw", lambda x_, d, w: found["xy_to_dw"](x_, d, w, **kw), x_s, y_like, w_s)
        _expect_dict(name, "xy_to_dw", got, w_shapes, "one gradient per trainable key, shaped like its weight")
    if one_state is None:
        return
    trace = {k: jax.ShapeDtypeStruct(s, w_s[k].dtype) for k, s in one_state.items()}
    if "yw_to_w" in found:
        got = _shape_of(name, "yw_to_w", lambda d, e: found["yw_to_w"](d, e, **kw), y_like, trace)
        _expect_dict(name, "yw_to_w", got, one_state, "a one-state trace of init_drtrl's layout")
    if "drtrl_seed" in wanted:
        got = _shape_of(name, "drtrl_seed", lambda x_, d, w: drtrl_seed(primitive, x_, d, w, kw), x_s, y_like, w_s)
        _expect_dict(name, "drtrl_seed", got, one_state, "a one-state trace of init_drtrl's layout")
    if "drtrl_grad" in wanted:
        got = _shape_of(
            name, "drtrl_grad", lambda x_, g, e, w: drtrl_grad(primitive, x_, g, e, w, kw), x_s, y_like, trace, w_s
        )
        _expect_dict(name, "drtrl_grad", got, w_shapes, "one gradient per trainable key, shaped like its weight")
