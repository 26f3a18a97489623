"""The primitive table: one record (an :class:`ETPPrimitiveSpec`) per registered ETP primitive.

The public registries of the seed documents (``ETP_PRIMITIVES``,
``ETP_RULES_YW_TO_W``, ...) are read-only *views* of this one table: each
reads one field of every record, so all of them agree at every moment, a
registration shows up in every view at once and
:func:`~etp_primitives.unregister_primitive` removes one entry from all of
them. Writing to a view raises :class:`TypeError`; primitives and rules are
registered with :func:`~etp_primitives.register_primitive`,
:func:`~etp_primitives.register_primitive_spec` and the ``register_*``
methods of :class:`~etp_primitives.ETPPrimitive`.

Every view is keyed by the primitive object itself: the compiler finds ETP
operations in a jaxpr by type identity (``eqn.primitive in ETP_PRIMITIVES``),
never by matching names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from typing import Any, Generic, NamedTuple, NoReturn, TypeVar, cast

from ._compat import Primitive
from ._spec import ETPPrimitiveSpec, Rule, TrainableInvarsFn

__all__ = [
    "ETP_PRIMITIVES",
    "BATCHED_PRIMITIVES",
    "GRADIENT_ENABLED_PRIMITIVES",
    "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_RULES_DRTRL_SEED",
    "ETP_RULES_DRTRL_GRAD",
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "ETP_PRIMITIVE_SPECS",
    "RegistryMapping",
    "RegistrySet",
    "is_etp_primitive",
    "is_batched_primitive",
    "is_gradient_enabled_primitive",
    "get_primitive_record",
]

V = TypeVar("V")


class _Entry(NamedTuple):
    record: ETPPrimitiveSpec
    #: Registered through ``register_primitive_spec`` (``get_primitive_spec`` returns the record).
    from_spec: bool


#: The one table: primitive -> its record.
_TABLE: dict[Primitive, _Entry] = {}


def _entry(primitive: object) -> _Entry | None:
    try:
        return _TABLE.get(cast(Primitive, primitive))
    except TypeError:  # unhashable: not a primitive
        return None


def get_primitive_record(primitive: object) -> ETPPrimitiveSpec | None:
    """The record of ``primitive`` (an :class:`ETPPrimitiveSpec`), however it was registered; ``None`` if unregistered.

    Unlike :func:`~etp_primitives.get_primitive_spec`, this also answers for
    class-style primitives, whose record :func:`~etp_primitives.register_primitive`
    built (rules not registered yet are ``None`` in it).
    """
    entry = _entry(primitive)
    return None if entry is None else entry.record


def _install(primitive: Primitive, record: ETPPrimitiveSpec, *, from_spec: bool) -> None:
    _TABLE[primitive] = _Entry(record, from_spec)


def _replace_record(primitive: Primitive, record: ETPPrimitiveSpec) -> None:
    _TABLE[primitive] = _TABLE[primitive]._replace(record=record)


def _remove(primitive: Primitive) -> None:
    del _TABLE[primitive]


def _find_by_name(name: str) -> Primitive | None:
    return next((p for p in _TABLE if p.name == name), None)


def _read_only(view: str) -> NoReturn:
    raise TypeError(
        f"etp_primitives.{view} is a read-only view of the primitive table. Register primitives and rules with "
        "etp_primitives.register_primitive / register_primitive_spec (and ETPPrimitive.register_etp_rules); "
        "remove one with etp_primitives.unregister_primitive."
    )


class _Absent:
    """Marks a record field that a mapping view does not hold (a rule that is not registered)."""


_ABSENT = _Absent()


class RegistryMapping(Mapping[Primitive, V], Generic[V]):
    """A live, read-only ``Mapping`` view: primitive -> one field of its record.

    Reads reflect every registration and unregistration at once; writes
    (``view[p] = ...``, ``del``, ``pop``, ``update``, ...) raise :class:`TypeError`.
    """

    def __init__(self, name: str, read: Callable[[_Entry], V | _Absent], doc: str) -> None:
        self._name = name
        self._read = read
        self.__doc__ = doc

    def __getitem__(self, primitive: Primitive) -> V:
        entry = _entry(primitive)
        value = _ABSENT if entry is None else self._read(entry)
        if isinstance(value, _Absent):
            raise KeyError(primitive)
        return value

    def __contains__(self, primitive: object) -> bool:
        entry = _entry(primitive)
        return entry is not None and not isinstance(self._read(entry), _Absent)

    def __iter__(self) -> Iterator[Primitive]:
        return iter([p for p, entry in list(_TABLE.items()) if not isinstance(self._read(entry), _Absent)])

    def __len__(self) -> int:
        return sum(1 for entry in list(_TABLE.values()) if not isinstance(self._read(entry), _Absent))

    def copy(self) -> dict[Primitive, V]:
        """A plain ``dict`` snapshot."""
        return dict(self)

    def __repr__(self) -> str:
        return f"<read-only view etp_primitives.{self._name} of {len(self)} primitives: {sorted(p.name for p in self)}>"

    def __setitem__(self, primitive: Primitive, value: Any) -> NoReturn:
        _read_only(self._name)

    def __delitem__(self, primitive: Primitive) -> NoReturn:
        _read_only(self._name)

    def __ior__(self, other: Any) -> NoReturn:
        _read_only(self._name)

    def pop(self, *args: Any) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def popitem(self) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def clear(self) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def setdefault(self, *args: Any) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)


class RegistrySet(Set[Primitive]):
    """A live, read-only ``Set`` view: the primitives whose record has a property.

    Set operations (``&``, ``|``, ``<=``, ...) return plain ``frozenset`` values;
    mutation (``add``, ``discard``, ``|=``, ...) raises :class:`TypeError`.
    """

    def __init__(self, name: str, select: Callable[[_Entry], bool], doc: str) -> None:
        self._name = name
        self._select = select
        self.__doc__ = doc

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> frozenset[Any]:
        return frozenset(it)

    def __contains__(self, primitive: object) -> bool:
        entry = _entry(primitive)
        return entry is not None and self._select(entry)

    def __iter__(self) -> Iterator[Primitive]:
        return iter([p for p, entry in list(_TABLE.items()) if self._select(entry)])

    def __len__(self) -> int:
        return sum(1 for entry in list(_TABLE.values()) if self._select(entry))

    def copy(self) -> set[Primitive]:
        """A plain ``set`` snapshot."""
        return set(self)

    def __repr__(self) -> str:
        return f"<read-only view etp_primitives.{self._name}: {sorted(p.name for p in self)}>"

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _read_only(self._name)

    def __iand__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _read_only(self._name)

    def __isub__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _read_only(self._name)

    def __ixor__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _read_only(self._name)

    def add(self, primitive: Primitive) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def discard(self, primitive: Primitive) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def remove(self, primitive: Primitive) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def pop(self) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def clear(self) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)

    def update(self, *others: Any) -> NoReturn:
        """Not supported: a view is read-only."""
        _read_only(self._name)


def _rule(field: str) -> Callable[[_Entry], Rule | _Absent]:
    def read(entry: _Entry) -> Rule | _Absent:
        rule: Rule | None = getattr(entry.record, field)
        return _ABSENT if rule is None else rule

    return read


def _specs(entry: _Entry) -> ETPPrimitiveSpec | _Absent:
    return entry.record if entry.from_spec else _ABSENT


def _trainable_fn(entry: _Entry) -> TrainableInvarsFn:
    return entry.record.trainable_invars_fn


def _x_index(entry: _Entry) -> int | None:
    return entry.record.x_invar_index


def _y_index(entry: _Entry) -> int:
    return entry.record.y_outvar_index


#: Every registered ETP primitive. A live, read-only view of the primitive records.
ETP_PRIMITIVES = RegistrySet("ETP_PRIMITIVES", lambda entry: True, "Every registered ETP primitive.")
#: Primitives whose ``x`` carries leading batch axes (``etp_mm``, ``etp_conv``, ...). A live, read-only view of the primitive records.
BATCHED_PRIMITIVES = RegistrySet(
    "BATCHED_PRIMITIVES",
    lambda entry: entry.record.batched,
    "Primitives whose ``x`` carries leading batch axes (``etp_mm``, ``etp_conv``, ...).",
)
#: Identity-like primitives the compiler walks through on ``y -> h`` (``etp_elemwise``). A live, read-only view of the primitive records.
GRADIENT_ENABLED_PRIMITIVES = RegistrySet(
    "GRADIENT_ENABLED_PRIMITIVES",
    lambda entry: entry.record.gradient_enabled,
    "Identity-like primitives the compiler walks through on ``y -> h`` (``etp_elemwise``).",
)

#: ``yw_to_w(hidden_dim, trace, **params) -> trace`` (braintrace 0.2.8: ``dt_to_t``): D-RTRL propagation factor. A live, read-only view of the primitive records.
ETP_RULES_YW_TO_W: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_YW_TO_W",
    _rule("yw_to_w"),
    "``yw_to_w(hidden_dim, trace, **params) -> trace`` (braintrace 0.2.8: ``dt_to_t``): D-RTRL propagation factor.",
)
#: ``xy_to_dw(x, hidden_dim, weights, **params) -> dW``: VJP w.r.t. the trainable inputs. A live, read-only view of the primitive records.
ETP_RULES_XY_TO_DW: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_XY_TO_DW",
    _rule("xy_to_dw"),
    "``xy_to_dw(x, hidden_dim, weights, **params) -> dW``: VJP w.r.t. the trainable inputs.",
)
#: ``init_drtrl(x_var, y_var, weight_vars, num_hidden_state) -> {key: zeros}``. A live, read-only view of the primitive records.
ETP_RULES_INIT_DRTRL: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_INIT_DRTRL",
    _rule("init_drtrl"),
    "``init_drtrl(x_var, y_var, weight_vars, num_hidden_state) -> {key: zeros}``.",
)
#: ``init_pp(x_var, y_var, weight_vars, num_hidden_state) -> zeros``. A live, read-only view of the primitive records.
ETP_RULES_INIT_PP: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_INIT_PP",
    _rule("init_pp"),
    "``init_pp(x_var, y_var, weight_vars, num_hidden_state) -> zeros``.",
)
#: Optional ``drtrl_seed(x, hidden_dim, weights, **params) -> trace`` (see :mod:`etp_primitives.extend`). A live, read-only view of the primitive records.
ETP_RULES_DRTRL_SEED: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_DRTRL_SEED",
    _rule("drtrl_seed"),
    "Optional ``drtrl_seed(x, hidden_dim, weights, **params) -> trace`` (see :mod:`etp_primitives.extend`).",
)
#: Optional ``drtrl_grad(x, cotangent, trace, weights, **params) -> dW``. A live, read-only view of the primitive records.
ETP_RULES_DRTRL_GRAD: RegistryMapping[Rule] = RegistryMapping(
    "ETP_RULES_DRTRL_GRAD",
    _rule("drtrl_grad"),
    "Optional ``drtrl_grad(x, cotangent, trace, weights, **params) -> dW``.",
)
#: ``params -> {trainable_key: invar_index}`` per primitive. A live, read-only view of the primitive records.
ETP_TRAINABLE_INVARS_FNS: RegistryMapping[TrainableInvarsFn] = RegistryMapping(
    "ETP_TRAINABLE_INVARS_FNS", _trainable_fn, "``params -> {trainable_key: invar_index}`` per primitive."
)
#: Position of the non-trainable input ``x`` in ``eqn.invars`` (``None``: no input). A live, read-only view of the primitive records.
ETP_X_INVAR_INDICES: RegistryMapping[int | None] = RegistryMapping(
    "ETP_X_INVAR_INDICES", _x_index, "Position of the non-trainable input ``x`` in ``eqn.invars`` (``None``: no input)."
)
#: Position of ``y`` in ``eqn.outvars``. A live, read-only view of the primitive records.
ETP_Y_OUTVAR_INDICES: RegistryMapping[int] = RegistryMapping(
    "ETP_Y_OUTVAR_INDICES", _y_index, "Position of ``y`` in ``eqn.outvars``."
)
#: The spec each primitive was registered from, when it came through a spec. A live, read-only view of the primitive records.
ETP_PRIMITIVE_SPECS: RegistryMapping[ETPPrimitiveSpec] = RegistryMapping(
    "ETP_PRIMITIVE_SPECS", _specs, "The spec each primitive was registered from, when it came through a spec."
)


def is_etp_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` is a registered ETP primitive."""
    return _entry(primitive) is not None


def is_batched_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` was registered with ``batched=True``."""
    entry = _entry(primitive)
    return entry is not None and entry.record.batched


def is_gradient_enabled_primitive(primitive: object) -> bool:
    """Return whether ``primitive`` was registered with ``gradient_enabled=True``."""
    entry = _entry(primitive)
    return entry is not None and entry.record.gradient_enabled
