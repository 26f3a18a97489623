""":class:`ETPPrimitiveSpec`: one record that fully describes an ETP primitive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._compat import Primitive
from ._primitive import ETPPrimitive, register_primitive
from ._registry import ETP_PRIMITIVE_SPECS, Rule

__all__ = ["ETPPrimitiveSpec", "register_primitive_spec", "get_primitive_spec"]


@dataclass(frozen=True)
class ETPPrimitiveSpec:
    """Everything the ETP stack needs to know about one primitive.

    Passing a spec to :func:`register_primitive_spec` registers the primitive
    (JAX rules derived from ``impl``), installs all its ETP rules and records
    the spec in :data:`ETP_PRIMITIVE_SPECS`, where the compiler finds it with
    :func:`get_primitive_spec`. Built-in primitives are registered this way.

    Attributes
    ----------
    name : str
        Primitive name.
    impl : callable
        ``impl(*invars, **params) -> Array``, plain JAX.
    yw_to_w, xy_to_dw, init_drtrl, init_pp : callable
        The four ETP rules (signatures in :mod:`etp_primitives._trace`).
    trainable_invars_fn : callable
        ``params -> {trainable_key: invar_index}``.
    x_invar_index : int or None
        Position of the input ``x`` in the invars, ``None`` for input-free ops.
    y_outvar_index : int
        Position of ``y`` in the outvars.
    batched : bool
        ``x`` carries leading batch axes.
    gradient_enabled : bool
        Identity-like; the compiler walks through it on ``y -> h``.
    drtrl_seed, drtrl_grad : callable or None
        Optional D-RTRL rules for trace layouts that are not shaped like the
        weights (see :func:`etp_primitives.drtrl_seed`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> spec = etp.ETPPrimitiveSpec(
    ...     name='etp_doc_spec_mm', impl=lambda x, w: x @ w,
    ...     yw_to_w=lambda hd, tr: {'weight': tr['weight'] * hd[..., None, :]},
    ...     xy_to_dw=lambda x, hd, ws: {'weight': x.T @ hd},
    ...     init_drtrl=lambda x, y, ws, n: {'weight': jnp.zeros((x.aval.shape[0], *ws['weight'].aval.shape, n))},
    ...     init_pp=etp.init_pp_like_output,
    ...     trainable_invars_fn=lambda params: {'weight': 1}, x_invar_index=0, batched=True)
    >>> prim = etp.register_primitive_spec(spec)
    >>> etp.get_primitive_spec(prim) is spec
    True
    """

    name: str
    impl: Callable[..., Any]
    yw_to_w: Rule
    xy_to_dw: Rule
    init_drtrl: Rule
    init_pp: Rule
    trainable_invars_fn: Callable[[dict[str, Any]], dict[str, int]]
    x_invar_index: int | None
    y_outvar_index: int = 0
    batched: bool = False
    gradient_enabled: bool = False
    drtrl_seed: Rule | None = None
    drtrl_grad: Rule | None = None

    def resolve_trainable_invars(self, params: dict[str, Any]) -> dict[str, int]:
        """``{trainable_key: invar_index}`` for an equation with these static ``params``."""
        return dict(self.trainable_invars_fn(dict(params)))

    @property
    def weight_invar_index(self) -> int:
        """Invar position of the primary trainable input (``'weight'``, else the first key)."""
        layout = self.resolve_trainable_invars({})
        if "weight" in layout:
            return layout["weight"]
        return next(iter(layout.values()))


def register_primitive_spec(spec: ETPPrimitiveSpec) -> ETPPrimitive:
    """Register the primitive described by ``spec`` with all of its rules.

    Raises
    ------
    TypeError
        If ``spec`` is not an :class:`ETPPrimitiveSpec` or a rule is not callable.
    ValueError
        If a primitive of the same name is already registered.
    """
    if not isinstance(spec, ETPPrimitiveSpec):
        raise TypeError(f"register_primitive_spec expects an ETPPrimitiveSpec, got {type(spec).__name__}.")
    # Check every rule before registering anything, so a bad spec leaves no half-registered primitive.
    for field in ("impl", "yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "trainable_invars_fn"):
        if not callable(getattr(spec, field)):
            raise TypeError(
                f"ETPPrimitiveSpec {spec.name!r}: {field} must be callable, got {type(getattr(spec, field)).__name__}."
            )
    for field in ("drtrl_seed", "drtrl_grad"):
        if getattr(spec, field) is not None and not callable(getattr(spec, field)):
            raise TypeError(f"ETPPrimitiveSpec {spec.name!r}: {field} must be callable or None.")
    primitive = register_primitive(
        spec.name,
        spec.impl,
        batched=spec.batched,
        gradient_enabled=spec.gradient_enabled,
        trainable_invars_fn=spec.trainable_invars_fn,
        x_invar_index=spec.x_invar_index,
        y_outvar_index=spec.y_outvar_index,
    )
    primitive.register_etp_rules(
        yw_to_w=spec.yw_to_w,
        xy_to_dw=spec.xy_to_dw,
        init_drtrl=spec.init_drtrl,
        init_pp=spec.init_pp,
        drtrl_seed=spec.drtrl_seed,
        drtrl_grad=spec.drtrl_grad,
    )
    ETP_PRIMITIVE_SPECS[primitive] = spec
    return primitive


def get_primitive_spec(primitive: Primitive) -> ETPPrimitiveSpec | None:
    """The spec ``primitive`` was registered from, or ``None`` (class-style registration)."""
    return ETP_PRIMITIVE_SPECS.get(primitive)
