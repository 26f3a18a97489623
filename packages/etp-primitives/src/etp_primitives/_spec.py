""":class:`ETPPrimitiveSpec`: the one record that describes an ETP primitive.

Every registered primitive has exactly one record in the primitive table
(:mod:`etp_primitives._registry`); :func:`etp_primitives.register_primitive_spec`
stores the spec it is given, :func:`etp_primitives.register_primitive` builds one
without rules and the ``register_*`` methods replace it with a copy holding the
new rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ETPPrimitiveSpec",
    "Rule",
    "TrainableInvarsFn",
    "RULE_ALIASES",
    "default_trainable_invars",
    "resolve_rule_alias",
]

Rule = Callable[..., Any]
TrainableInvarsFn = Callable[[dict[str, Any]], dict[str, int]]

#: Rule names of other eras and the record field they name: braintrace 0.2.8 calls the
#: D-RTRL propagation rule ``dt_to_t``; the seed documents (and the record) call it ``yw_to_w``.
RULE_ALIASES: dict[str, str] = {"dt_to_t": "yw_to_w"}


def default_trainable_invars(params: dict[str, Any]) -> dict[str, int]:
    """The single-weight layout ``{'weight': 1}`` used when none is declared."""
    del params
    return {"weight": 1}


def resolve_rule_alias(where: str, yw_to_w: Rule | None, dt_to_t: Rule | None) -> Rule | None:
    """The propagation rule given as ``yw_to_w`` (seeds) or ``dt_to_t`` (braintrace 0.2.8).

    Raises
    ------
    TypeError
        If both are given and are different objects; the message names ``where``.
    """
    if yw_to_w is not None and dt_to_t is not None and yw_to_w is not dt_to_t:
        raise TypeError(
            f"{where}: got both yw_to_w= and dt_to_t=, two different functions; they are one rule "
            "(the D-RTRL propagation rule; dt_to_t is its braintrace 0.2.8 name), pass it once."
        )
    return yw_to_w if yw_to_w is not None else dt_to_t


@dataclass(frozen=True, init=False)
class ETPPrimitiveSpec:
    """Everything the ETP stack needs to know about one primitive.

    Passing a spec to :func:`~etp_primitives.register_primitive_spec` registers
    the primitive (JAX rules derived from ``impl``) and stores the spec as the
    primitive's record, where the compiler finds it with
    :func:`~etp_primitives.get_primitive_spec`. Built-in primitives are
    registered this way. The class-style path
    (:func:`~etp_primitives.register_primitive` and the ``register_*`` methods)
    builds the same record; the read-only registries
    (:data:`~etp_primitives.ETP_RULES_YW_TO_W`, ...) are views of these records.

    Attributes
    ----------
    name : str
        Primitive name.
    impl : callable
        ``impl(*invars, **params) -> Array``, plain JAX.
    yw_to_w, xy_to_dw, init_drtrl, init_pp : callable
        The four required ETP rules (signatures in :mod:`etp_primitives.extend`);
        :func:`~etp_primitives.register_primitive_spec` rejects a spec without
        them. ``yw_to_w`` may be given as ``dt_to_t`` (its braintrace 0.2.8 name);
        :attr:`dt_to_t` reads the same rule.
    trainable_invars_fn : callable
        ``params -> {trainable_key: invar_index}``; default
        :func:`default_trainable_invars` (``{'weight': 1}``).
    x_invar_index : int or None
        Position of the input ``x`` in the invars (default 0), ``None`` for
        input-free ops.
    y_outvar_index : int
        Position of ``y`` in the outvars.
    batched : bool
        ``x`` carries leading batch axes.
    gradient_enabled : bool
        Identity-like; the compiler walks through it on ``y -> h``.
    drtrl_seed, drtrl_grad : callable or None
        Optional D-RTRL rules for trace layouts that are not shaped like the
        weights (see :func:`etp_primitives.extend.drtrl_seed`).

    Raises
    ------
    TypeError
        If ``yw_to_w`` and ``dt_to_t`` are both given and differ.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import etp_primitives as etp
    >>> spec = etp.ETPPrimitiveSpec(
    ...     name='etp_doc_spec_mm', impl=lambda x, w: x @ w,
    ...     dt_to_t=lambda hd, tr: {'weight': tr['weight'] * hd[..., None, :]},
    ...     xy_to_dw=lambda x, hd, ws: {'weight': x.T @ hd},
    ...     init_drtrl=lambda x, y, ws, n: {'weight': jnp.zeros((x.aval.shape[0], *ws['weight'].aval.shape, n))},
    ...     init_pp=etp.init_pp_like_output,
    ...     trainable_invars_fn=lambda params: {'weight': 1}, x_invar_index=0, batched=True)
    >>> spec.yw_to_w is spec.dt_to_t
    True
    >>> prim = etp.register_primitive_spec(spec)
    >>> etp.get_primitive_spec(prim) is spec
    True
    >>> etp.unregister_primitive(prim)
    """

    name: str
    impl: Callable[..., Any]
    yw_to_w: Rule | None
    xy_to_dw: Rule | None
    init_drtrl: Rule | None
    init_pp: Rule | None
    trainable_invars_fn: TrainableInvarsFn
    x_invar_index: int | None
    y_outvar_index: int
    batched: bool
    gradient_enabled: bool
    drtrl_seed: Rule | None
    drtrl_grad: Rule | None

    def __init__(
        self,
        name: str,
        impl: Callable[..., Any],
        yw_to_w: Rule | None = None,
        xy_to_dw: Rule | None = None,
        init_drtrl: Rule | None = None,
        init_pp: Rule | None = None,
        trainable_invars_fn: TrainableInvarsFn | None = None,
        x_invar_index: int | None = 0,
        y_outvar_index: int = 0,
        batched: bool = False,
        gradient_enabled: bool = False,
        drtrl_seed: Rule | None = None,
        drtrl_grad: Rule | None = None,
        *,
        dt_to_t: Rule | None = None,
    ) -> None:
        values = {
            "name": name,
            "impl": impl,
            "yw_to_w": resolve_rule_alias(f"ETPPrimitiveSpec {name!r}", yw_to_w, dt_to_t),
            "xy_to_dw": xy_to_dw,
            "init_drtrl": init_drtrl,
            "init_pp": init_pp,
            "trainable_invars_fn": default_trainable_invars if trainable_invars_fn is None else trainable_invars_fn,
            "x_invar_index": x_invar_index,
            "y_outvar_index": y_outvar_index,
            "batched": batched,
            "gradient_enabled": gradient_enabled,
            "drtrl_seed": drtrl_seed,
            "drtrl_grad": drtrl_grad,
        }
        for field, value in values.items():
            object.__setattr__(self, field, value)

    @property
    def dt_to_t(self) -> Rule | None:
        """The D-RTRL propagation rule under its braintrace 0.2.8 name (the same object as ``yw_to_w``)."""
        return self.yw_to_w

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
