""":class:`ETPPrimitive`, :func:`register_primitive` and :func:`register_primitive_spec`.

An ETP primitive is a JAX primitive that *marks* a weight operation. Its
forward computation is an ordinary JAX function (``impl_fn``); every standard
JAX rule is derived from that function here, so a primitive works under
``jit``, ``grad``, ``vmap``, ``jvp`` and their compositions with no further
code. What a primitive author writes by hand are the ETP rules, the
online-learning specific part (see :mod:`etp_primitives.extend`).

Both registration paths end in one record per primitive (an
:class:`ETPPrimitiveSpec` in the primitive table of :mod:`._registry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax

from ._compat import Primitive, ShapedArray, ad, batching, mlir
from ._registry import _entry, _find_by_name, _install, _remove, _replace_record, _specs, get_primitive_record
from ._spec import ETPPrimitiveSpec, Rule, TrainableInvarsFn, default_trainable_invars, resolve_rule_alias

__all__ = [
    "ETPPrimitive",
    "register_primitive",
    "register_primitive_spec",
    "get_primitive_spec",
    "unregister_primitive",
    "default_trainable_invars",
    "set_batching_rule",
]

BatchingRule = Callable[..., tuple[Any, Any]]


class ETPPrimitive(Primitive):
    """A JAX primitive that marks a weight operation for eligibility-trace propagation.

    Returned by :func:`register_primitive`. It binds, evaluates and
    differentiates like any JAX primitive and adds methods that install its
    ETP rules in its record (an :class:`ETPPrimitiveSpec`, read by every
    registry view). The D-RTRL propagation rule has two names:
    ``yw_to_w`` (the seed documents) and ``dt_to_t`` (braintrace 0.2.8);
    :meth:`register_yw_to_w` and :meth:`register_dt_to_t` install the same rule.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> demo_p = etp.register_primitive('etp_doc_demo_mm', lambda x, w: x @ w, batched=True)
    >>> demo_p.bind(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    >>> demo_p.register_dt_to_t(lambda hd, tr: {'weight': tr['weight'] * hd[..., None, :]})
    >>> etp.ETP_RULES_YW_TO_W[demo_p] is etp.extend.get_primitive_record(demo_p).dt_to_t
    True
    >>> etp.unregister_primitive(demo_p)
    """

    def bind(self, *args: Any, **params: Any) -> Any:
        """Apply the primitive to ``args`` with static ``params`` (as :meth:`jax.extend.core.Primitive.bind`)."""
        return Primitive.bind(self, *args, **params)

    def register_yw_to_w(self, fn: Rule) -> None:
        """Install the D-RTRL propagation rule ``(hidden_dim, trace, **params) -> trace``."""
        self.register_etp_rules(yw_to_w=fn)

    def register_dt_to_t(self, fn: Rule) -> None:
        """Install the D-RTRL propagation rule under its braintrace 0.2.8 name (the same rule as ``yw_to_w``)."""
        self._install_rules({"yw_to_w": ("dt_to_t", fn)})

    def register_xy_to_dw(self, fn: Rule) -> None:
        """Install the weight-VJP rule ``(x, hidden_dim, weights, **params) -> dW``."""
        self.register_etp_rules(xy_to_dw=fn)

    def register_init_drtrl(self, fn: Rule) -> None:
        """Install the D-RTRL trace initialiser ``(x_var, y_var, weight_vars, num_hidden_state)``."""
        self.register_etp_rules(init_drtrl=fn)

    def register_init_pp(self, fn: Rule) -> None:
        """Install the ES-D-RTRL (pp-prop) trace initialiser ``(x_var, y_var, weight_vars, num_hidden_state)``."""
        self.register_etp_rules(init_pp=fn)

    def register_drtrl_seed(self, fn: Rule) -> None:
        """Install a D-RTRL seed rule ``(x, hidden_dim, weights, **params) -> trace``.

        Optional: without it the seed is the per-sample ``xy_to_dw``
        (see :func:`etp_primitives.extend.drtrl_seed`).
        """
        self.register_etp_rules(drtrl_seed=fn)

    def register_drtrl_grad(self, fn: Rule) -> None:
        """Install a D-RTRL contraction rule ``(x, cotangent, trace, weights, **params) -> dW``.

        Optional: without it the gradient is ``yw_to_w(cotangent, trace)``
        summed over the batch axes (see :func:`etp_primitives.extend.drtrl_grad`).
        """
        self.register_etp_rules(drtrl_grad=fn)

    def register_etp_rules(
        self,
        *,
        yw_to_w: Rule | None = None,
        xy_to_dw: Rule | None = None,
        init_drtrl: Rule | None = None,
        init_pp: Rule | None = None,
        drtrl_seed: Rule | None = None,
        drtrl_grad: Rule | None = None,
        dt_to_t: Rule | None = None,
    ) -> None:
        """Install several ETP rules in one call; arguments left ``None`` are skipped.

        ``dt_to_t`` is the braintrace 0.2.8 name of ``yw_to_w``; give either.
        Every rule is checked before any is installed.

        Raises
        ------
        TypeError
            If a rule is not callable, or ``yw_to_w`` and ``dt_to_t`` are two different functions.
        ValueError
            If the primitive is not registered (any more).
        """
        propagation_name = "dt_to_t" if yw_to_w is None and dt_to_t is not None else "yw_to_w"
        propagation = resolve_rule_alias(f"ETP primitive {self.name!r}", yw_to_w, dt_to_t)
        given = {
            "yw_to_w": (propagation_name, propagation),
            "xy_to_dw": ("xy_to_dw", xy_to_dw),
            "init_drtrl": ("init_drtrl", init_drtrl),
            "init_pp": ("init_pp", init_pp),
            "drtrl_seed": ("drtrl_seed", drtrl_seed),
            "drtrl_grad": ("drtrl_grad", drtrl_grad),
        }
        self._install_rules({field: named for field, named in given.items() if named[1] is not None})

    def _install_rules(self, rules: dict[str, tuple[str, Rule | None]]) -> None:
        record = get_primitive_record(self)
        if record is None:
            raise ValueError(
                f"ETP primitive {self.name!r} is not registered (or was unregistered); create it with "
                "etp_primitives.register_primitive(name, impl_fn) or register_primitive_spec(spec), then add its rules."
            )
        for what, fn in rules.values():
            _checked_rule(self, what, fn)
        changes: dict[str, Any] = {field: fn for field, (_, fn) in rules.items()}
        if changes:
            _replace_record(self, dataclasses.replace(record, **changes))


def _checked_rule(primitive: Primitive, what: str, fn: Rule | None) -> Rule:
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


def _check_layout(where: str, record: ETPPrimitiveSpec) -> None:
    """Raise unless ``record``'s name, impl and layout fields can be registered."""
    if _find_by_name(record.name) is not None:
        raise ValueError(
            f"{where}: an ETP primitive named {record.name!r} is already registered; "
            f"choose another name or call etp_primitives.unregister_primitive({record.name!r}) first."
        )
    if not callable(record.impl):
        raise TypeError(f"{where}: impl_fn must be callable, got {type(record.impl).__name__}.")
    if not callable(record.trainable_invars_fn):
        raise TypeError(
            f"{where}: trainable_invars_fn must be callable or None, got {type(record.trainable_invars_fn).__name__}."
        )
    x_index, y_index = record.x_invar_index, record.y_outvar_index
    if x_index is not None and (not isinstance(x_index, int) or x_index < 0):
        raise ValueError(f"{where}: x_invar_index must be None or an int >= 0, got {x_index!r}.")
    if not isinstance(y_index, int) or y_index < 0:
        raise ValueError(f"{where}: y_outvar_index must be an int >= 0, got {y_index!r}.")


def _create(record: ETPPrimitiveSpec, *, from_spec: bool) -> ETPPrimitive:
    """Make the primitive of ``record``, derive its JAX rules and store ``record`` as its one entry."""
    impl_fn = record.impl
    p = ETPPrimitive(record.name)
    Primitive.def_impl(p, _checked_impl(p, impl_fn))
    Primitive.def_abstract_eval(p, _abstract_eval_fn(p, impl_fn))
    mlir.register_lowering(p, mlir.lower_fun(impl_fn, multiple_results=False))
    ad.primitive_jvps[p] = _jvp_rule(p, impl_fn)
    set_batching_rule(p, _default_batching_rule(impl_fn))
    _install(p, record, from_spec=from_spec)
    return p


def register_primitive(
    name: str,
    impl_fn: Callable[..., Any],
    *,
    batched: bool = False,
    gradient_enabled: bool = False,
    trainable_invars_fn: TrainableInvarsFn | None = None,
    x_invar_index: int | None = 0,
    y_outvar_index: int = 0,
) -> ETPPrimitive:
    """Create an :class:`ETPPrimitive` whose JAX rules are derived from ``impl_fn``.

    The primitive's record (an :class:`ETPPrimitiveSpec` without rules) is
    built here; the ``register_*`` methods of the returned primitive add the
    rules to it.

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
    record = ETPPrimitiveSpec(
        name=name,
        impl=impl_fn,
        trainable_invars_fn=trainable_invars_fn,
        x_invar_index=x_invar_index,
        y_outvar_index=y_outvar_index,
        batched=bool(batched),
        gradient_enabled=bool(gradient_enabled),
    )
    _check_layout(f"register_primitive({name!r})", record)
    return _create(record, from_spec=False)


_REQUIRED_FIELDS = ("impl", "yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "trainable_invars_fn")


def register_primitive_spec(spec: ETPPrimitiveSpec) -> ETPPrimitive:
    """Register the primitive described by ``spec`` with all of its rules; ``spec`` becomes its record.

    Raises
    ------
    TypeError
        If ``spec`` is not an :class:`ETPPrimitiveSpec`, or a required rule is
        missing or not callable (nothing is registered then).
    ValueError
        If a primitive of the same name is already registered.
    """
    if not isinstance(spec, ETPPrimitiveSpec):
        raise TypeError(f"register_primitive_spec expects an ETPPrimitiveSpec, got {type(spec).__name__}.")
    # Check every rule before registering anything, so a bad spec leaves no half-registered primitive.
    for field in _REQUIRED_FIELDS:
        if not callable(getattr(spec, field)):
            raise TypeError(
                f"ETPPrimitiveSpec {spec.name!r}: {field} must be callable, got {type(getattr(spec, field)).__name__}."
            )
    for field in ("drtrl_seed", "drtrl_grad"):
        if getattr(spec, field) is not None and not callable(getattr(spec, field)):
            raise TypeError(f"ETPPrimitiveSpec {spec.name!r}: {field} must be callable or None.")
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"register_primitive_spec: name must be a non-empty string, got {spec.name!r}.")
    _check_layout(f"register_primitive_spec({spec.name!r})", spec)
    return _create(spec, from_spec=True)


def get_primitive_spec(primitive: Primitive) -> ETPPrimitiveSpec | None:
    """The spec ``primitive`` was registered from, or ``None`` (class-style registration, or unregistered).

    Its current record, however it was registered, is
    :func:`etp_primitives.extend.get_primitive_record`.
    """
    entry = _entry(primitive)
    if entry is None:
        return None
    spec = _specs(entry)
    return spec if isinstance(spec, ETPPrimitiveSpec) else None


def unregister_primitive(name_or_primitive: str | Primitive) -> None:
    """Remove a primitive's record, so that every registry forgets it (e.g. to redefine it in a notebook).

    Raises
    ------
    ValueError
        If no ETP primitive of that name is registered.
    """
    if isinstance(name_or_primitive, str):
        found = _find_by_name(name_or_primitive)
    else:
        found = name_or_primitive if get_primitive_record(name_or_primitive) is not None else None
    if found is None:
        raise ValueError(f"unregister_primitive: no ETP primitive {name_or_primitive!r} is registered.")
    _remove(found)
