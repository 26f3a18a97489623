""":class:`ETPPrimitive` and :func:`register_primitive`.

An ETP primitive is a JAX primitive that *marks* a weight operation. Its
forward computation is an ordinary JAX function (``impl_fn``); every standard
JAX rule is derived from that function here, so a primitive works under
``jit``, ``grad``, ``vmap``, ``jvp`` and their compositions with no further
code. What a primitive author writes by hand are the ETP rules, the
online-learning specific part (see :mod:`etp_primitives._trace`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax

from ._compat import Primitive, ShapedArray, ad, batching, mlir
from ._registry import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVES,
    ETP_RULES_DRTRL_GRAD,
    ETP_RULES_DRTRL_SEED,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    Rule,
)

__all__ = ["ETPPrimitive", "register_primitive", "unregister_primitive", "default_trainable_invars"]

BatchingRule = Callable[..., tuple[Any, Any]]


def default_trainable_invars(params: dict[str, Any]) -> dict[str, int]:
    """The single-weight layout ``{'weight': 1}`` used when none is declared."""
    del params
    return {"weight": 1}


class ETPPrimitive(Primitive):
    """A JAX primitive that marks a weight operation for eligibility-trace propagation.

    Returned by :func:`register_primitive`. It binds, evaluates and
    differentiates like any JAX primitive and adds methods that install the
    ETP rules into the global registries.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> demo_p = etp.register_primitive('etp_doc_demo_mm', lambda x, w: x @ w, batched=True)
    >>> demo_p.bind(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """

    def bind(self, *args: Any, **params: Any) -> Any:
        """Apply the primitive to ``args`` with static ``params`` (as :meth:`jax.extend.core.Primitive.bind`)."""
        return Primitive.bind(self, *args, **params)

    def register_yw_to_w(self, fn: Rule) -> None:
        """Install the D-RTRL propagation rule ``(hidden_dim, trace, **params) -> trace``."""
        ETP_RULES_YW_TO_W[self] = _checked_rule(self, "yw_to_w", fn)

    def register_xy_to_dw(self, fn: Rule) -> None:
        """Install the weight-VJP rule ``(x, hidden_dim, weights, **params) -> dW``."""
        ETP_RULES_XY_TO_DW[self] = _checked_rule(self, "xy_to_dw", fn)

    def register_init_drtrl(self, fn: Rule) -> None:
        """Install the D-RTRL trace initialiser ``(x_var, y_var, weight_vars, num_hidden_state)``."""
        ETP_RULES_INIT_DRTRL[self] = _checked_rule(self, "init_drtrl", fn)

    def register_init_pp(self, fn: Rule) -> None:
        """Install the ES-D-RTRL (pp-prop) trace initialiser ``(x_var, y_var, weight_vars, num_hidden_state)``."""
        ETP_RULES_INIT_PP[self] = _checked_rule(self, "init_pp", fn)

    def register_drtrl_seed(self, fn: Rule) -> None:
        """Install a D-RTRL seed rule ``(x, hidden_dim, weights, **params) -> trace``.

        Optional: without it the seed is the per-sample ``xy_to_dw``
        (see :func:`etp_primitives.drtrl_seed`).
        """
        ETP_RULES_DRTRL_SEED[self] = _checked_rule(self, "drtrl_seed", fn)

    def register_drtrl_grad(self, fn: Rule) -> None:
        """Install a D-RTRL contraction rule ``(x, cotangent, trace, weights, **params) -> dW``.

        Optional: without it the gradient is ``yw_to_w(cotangent, trace)``
        summed over the batch axes (see :func:`etp_primitives.drtrl_grad`).
        """
        ETP_RULES_DRTRL_GRAD[self] = _checked_rule(self, "drtrl_grad", fn)

    def register_etp_rules(
        self,
        *,
        yw_to_w: Rule | None = None,
        xy_to_dw: Rule | None = None,
        init_drtrl: Rule | None = None,
        init_pp: Rule | None = None,
        drtrl_seed: Rule | None = None,
        drtrl_grad: Rule | None = None,
    ) -> None:
        """Install several ETP rules in one call; arguments left ``None`` are skipped."""
        if yw_to_w is not None:
            self.register_yw_to_w(yw_to_w)
        if xy_to_dw is not None:
            self.register_xy_to_dw(xy_to_dw)
        if init_drtrl is not None:
            self.register_init_drtrl(init_drtrl)
        if init_pp is not None:
            self.register_init_pp(init_pp)
        if drtrl_seed is not None:
            self.register_drtrl_seed(drtrl_seed)
        if drtrl_grad is not None:
            self.register_drtrl_grad(drtrl_grad)


def _checked_rule(primitive: Primitive, what: str, fn: Rule) -> Rule:
    if not callable(fn):
        raise TypeError(f"ETP primitive {primitive.name!r}: the {what} rule must be callable, got {type(fn).__name__}.")
    return fn


def _checked_impl(primitive: Primitive, impl_fn: Callable[..., Any]) -> Callable[..., Any]:
    def impl(*args: Any, **params: Any) -> Any:
        out = impl_fn(*args, **params)
        if not isinstance(out, jax.Array):
            raise TypeError(
                f"ETP primitive {primitive.name!r}: impl_fn must return a single array, got a {type(out).__name__}."
            )
        return out

    return impl


def _abstract_eval_fn(primitive: Primitive, impl_fn: Callable[..., Any]) -> Callable[..., Any]:
    def abstract_eval(*avals: Any, **params: Any) -> Any:
        shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
        out = jax.eval_shape(partial(impl_fn, **params), *shapes)
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise TypeError(
                f"ETP primitive {primitive.name!r}: impl_fn must return a single array, got a {type(out).__name__}."
            )
        return ShapedArray(out.shape, out.dtype)

    return abstract_eval


def _jvp_rule(primitive: Primitive, impl_fn: Callable[..., Any]) -> Callable[..., Any]:
    # The primal stays a bind of the primitive, so the marker survives
    # jvp/grad tracing; the tangent is the plain JAX JVP of impl_fn, which JAX
    # knows how to transpose, so reverse mode needs no rule of ours.
    def jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple[Any, Any]:
        primal_out = primitive.bind(*primals, **params)
        active = [i for i, t in enumerate(tangents) if not isinstance(t, ad.Zero)]

        def impl_of_active(*active_args: Any) -> Any:
            args = list(primals)
            for i, a in zip(active, active_args):
                args[i] = a
            return impl_fn(*args, **params)

        _, tangent_out = jax.jvp(impl_of_active, tuple(primals[i] for i in active), tuple(tangents[i] for i in active))
        return primal_out, tangent_out

    return jvp


def _default_batching_rule(impl_fn: Callable[..., Any]) -> BatchingRule:
    def batch(args: Sequence[Any], dims: Sequence[int | None], **params: Any) -> tuple[Any, int]:
        return jax.vmap(partial(impl_fn, **params), in_axes=tuple(dims))(*args), 0

    return batch


def set_batching_rule(primitive: Primitive, rule: BatchingRule) -> None:
    """Replace the auto-derived batching rule of ``primitive``.

    The derived rule vmaps ``impl_fn``, which is always correct but turns the
    primitive into plain JAX ops under ``vmap``. Built-ins install rules that
    keep the marker (e.g. ``etp_mv`` batched over ``x`` becomes ``etp_mm``).
    """
    batching.primitive_batchers[primitive] = rule


def register_primitive(
    name: str,
    impl_fn: Callable[..., Any],
    *,
    batched: bool = False,
    gradient_enabled: bool = False,
    trainable_invars_fn: Callable[[dict[str, Any]], dict[str, int]] | None = None,
    x_invar_index: int | None = 0,
    y_outvar_index: int = 0,
) -> ETPPrimitive:
    """Create an :class:`ETPPrimitive` whose JAX rules are derived from ``impl_fn``.

    Parameters
    ----------
    name : str
        Unique primitive name, e.g. ``'etp_mm'``.
    impl_fn : callable
        ``impl_fn(*invars, **params) -> Array``: the forward computation in
        plain JAX. Static parameters arrive as keyword arguments and must be
        hashable.
    batched : bool
        Whether the input ``x`` carries leading batch axes (trace layouts then
        carry them too).
    gradient_enabled : bool
        Identity-like primitive that the compiler walks through on ``y -> h``
        instead of treating it as a tail boundary (only ``etp_elemwise``).
    trainable_invars_fn : callable, optional
        ``params -> {trainable_key: invar_index}``. ``None`` records the
        single-weight layout ``{'weight': 1}``.
    x_invar_index : int or None
        Position of the non-trainable input ``x`` in the invars; ``None`` for
        primitives without one.
    y_outvar_index : int
        Position of ``y`` in the outvars.

    Returns
    -------
    ETPPrimitive
        The registered primitive. Derived rules: eager ``impl``,
        ``abstract_eval`` (``jax.eval_shape`` of ``impl_fn``), MLIR lowering
        (``mlir.lower_fun``), JVP (``jax.jvp`` of ``impl_fn``), transpose
        (JAX transposes the linear JVP), batching (``jax.vmap`` of ``impl_fn``).

    Raises
    ------
    ValueError
        If ``name`` is empty or already taken by another ETP primitive, or an
        index is negative.
    TypeError
        If ``impl_fn`` or ``trainable_invars_fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_primitive: name must be a non-empty string, got {name!r}.")
    taken = next((p for p in ETP_PRIMITIVES if p.name == name), None)
    if taken is not None:
        raise ValueError(
            f"register_primitive: an ETP primitive named {name!r} is already registered; "
            f"choose another name or call etp_primitives.unregister_primitive({name!r}) first."
        )
    if not callable(impl_fn):
        raise TypeError(f"register_primitive({name!r}): impl_fn must be callable, got {type(impl_fn).__name__}.")
    if trainable_invars_fn is not None and not callable(trainable_invars_fn):
        raise TypeError(
            f"register_primitive({name!r}): trainable_invars_fn must be callable or None, "
            f"got {type(trainable_invars_fn).__name__}."
        )
    if x_invar_index is not None and (not isinstance(x_invar_index, int) or x_invar_index < 0):
        raise ValueError(
            f"register_primitive({name!r}): x_invar_index must be None or an int >= 0, got {x_invar_index!r}."
        )
    if not isinstance(y_outvar_index, int) or y_outvar_index < 0:
        raise ValueError(f"register_primitive({name!r}): y_outvar_index must be an int >= 0, got {y_outvar_index!r}.")

    p = ETPPrimitive(name)
    Primitive.def_impl(p, _checked_impl(p, impl_fn))
    Primitive.def_abstract_eval(p, _abstract_eval_fn(p, impl_fn))
    mlir.register_lowering(p, mlir.lower_fun(impl_fn, multiple_results=False))
    ad.primitive_jvps[p] = _jvp_rule(p, impl_fn)
    set_batching_rule(p, _default_batching_rule(impl_fn))

    ETP_PRIMITIVES.add(p)
    if batched:
        BATCHED_PRIMITIVES.add(p)
    if gradient_enabled:
        GRADIENT_ENABLED_PRIMITIVES.add(p)
    ETP_TRAINABLE_INVARS_FNS[p] = trainable_invars_fn if trainable_invars_fn is not None else default_trainable_invars
    ETP_X_INVAR_INDICES[p] = x_invar_index
    ETP_Y_OUTVAR_INDICES[p] = y_outvar_index
    return p


def unregister_primitive(name_or_primitive: str | Primitive) -> None:
    """Remove a primitive and its rules from every registry (e.g. to redefine it in a notebook).

    Raises
    ------
    ValueError
        If no ETP primitive of that name is registered.
    """
    from ._registry import ETP_PRIMITIVE_SPECS

    if isinstance(name_or_primitive, str):
        found = next((p for p in ETP_PRIMITIVES if p.name == name_or_primitive), None)
    else:
        found = name_or_primitive if name_or_primitive in ETP_PRIMITIVES else None
    if found is None:
        raise ValueError(f"unregister_primitive: no ETP primitive {name_or_primitive!r} is registered.")
    for registry in (ETP_PRIMITIVES, BATCHED_PRIMITIVES, GRADIENT_ENABLED_PRIMITIVES):
        registry.discard(found)
    for table in (
        ETP_RULES_YW_TO_W,
        ETP_RULES_XY_TO_DW,
        ETP_RULES_INIT_DRTRL,
        ETP_RULES_INIT_PP,
        ETP_RULES_DRTRL_SEED,
        ETP_RULES_DRTRL_GRAD,
        ETP_TRAINABLE_INVARS_FNS,
        ETP_X_INVAR_INDICES,
        ETP_Y_OUTVAR_INDICES,
        ETP_PRIMITIVE_SPECS,
    ):
        table.pop(found, None)
