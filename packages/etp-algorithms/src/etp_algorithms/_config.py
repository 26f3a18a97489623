r"""``ETraceConfig``: an online learning rule as a point of six axes, and the learner that implements it.

An online learner keeps, for each weight, an eligibility trace :math:`\epsilon^t` and contracts
it with a learning signal :math:`g^t`; the rules differ along six axes (braintrace 0.2.8's
vocabulary, plus ``trace_factorization='kronecker'`` and ``recurrence_scope='full'``, ETP's, for
KF-RTRL and RTRL): see :class:`ETraceConfig` and the docs page *ETraceConfig*. A config is
canonicalised, then validated (a ``ValueError`` names the axis and the allowed values).
:func:`learner_from_config` builds the learner of a config, found by name in the registry
(:func:`~etp_algorithms.registered_learners`) through :data:`LEARNER_TABLE`; a valid config that no
registered learner implements raises :class:`etp_compiler.NotSupportedError` naming the axis, the
value and the nearest supported config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etp_compiler import NotSupportedError

from ._learner import ETraceAlgorithm
from ._rule_helpers import as_scalar

__all__ = [
    "AXES",
    "LEARNER_TABLE",
    "ETraceConfig",
    "LearnerRow",
    "config_options",
    "learner_from_config",
    "resolve_config",
]

#: ``axis -> its values``, in the order :meth:`ETraceConfig.describe` explains them.
AXES: dict[str, tuple[str, ...]] = {
    "trace_factorization": ("per_param", "io_factorized", "random_projection", "kronecker"),
    "temporal_recursion": ("jacobian", "scalar_leak", "none"),
    "recurrence_scope": ("diagonal", "coupled", "sparse_n", "full"),
    "learning_signal": ("symmetric", "random_feedback", "modulatory", "bootstrapped"),
    "trace_filter": ("none", "kappa"),
    "update_schedule": ("per_step", "window", "sequence_end"),
}
_ESTIMATORS = ("random_projection", "kronecker")  # unbiased estimates of the full influence


def _bad(axis: str, problem: str) -> ValueError:
    return ValueError(f"ETraceConfig: {axis} {problem}")


def _category(axis: str, value: Any) -> str:
    allowed = AXES[axis]
    if not isinstance(value, str) or value not in allowed:
        raise _bad(axis, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return value


def _fraction(axis: str, value: Any) -> float:
    """A float in [0, 1); ints are refused (a decay is never a rank)."""
    try:
        number = as_scalar(value, f"ETraceConfig: {axis}")
    except TypeError as error:
        raise ValueError(f"{error} Expected a float in [0, 1).") from None
    if isinstance(number, int):
        rank = f" (a rank r stands for the decay (r-1)/(r+1), here {(number - 1) / (number + 1)!r})"
        raise _bad(
            axis, f"must be a float in [0, 1), never an int or a rank{rank if number > 0 else ''}; got {value!r}."
        )
    if not 0.0 <= number < 1.0:
        raise _bad(axis, f"must be a float in [0, 1); got {number!r}.")
    return number


def _count(axis: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(axis, f"must be an int >= 1; got {value!r}.")
    return value


def _side(axis: str, recursion: str, decay: float | None) -> tuple[str, float]:
    """One trace's (recursion, decay), canonical: a zero leak is ``'none'``, ``'none'`` has decay 0."""
    if recursion == "none":
        if decay not in (None, 0.0):
            raise _bad(axis, f"'none' keeps no past, so it takes no decay; got decay {decay!r} (leave it None or 0.0).")
        return "none", 0.0
    if decay is None:
        raise _bad(axis, f"{recursion!r} needs a decay: set decay= (a float in [0, 1)).")
    return ("none", 0.0) if decay == 0.0 else (recursion, decay)


def _canonical(c: ETraceConfig) -> dict[str, Any]:
    factorization = _category("trace_factorization", c.trace_factorization)
    scope = _category("recurrence_scope", c.recurrence_scope)
    signal = _category("learning_signal", c.learning_signal)
    trace_filter = _category("trace_filter", c.trace_filter)
    schedule = _category("update_schedule", c.update_schedule)
    pair = isinstance(c.temporal_recursion, (tuple, list))
    if pair:
        if len(c.temporal_recursion) != 2:
            raise _bad(
                "temporal_recursion", f"must be a value or a pair (x-side, f-side); got {c.temporal_recursion!r}."
            )
        sides = tuple(_category("temporal_recursion", r) for r in c.temporal_recursion)
    else:
        sides = (_category("temporal_recursion", c.temporal_recursion),) * 2
    given: Any = c.decay
    decay_pair = isinstance(given, (tuple, list))
    if decay_pair and len(given) != 2:
        raise _bad("decay", f"must be a float or a pair (decay_x, decay_f); got {given!r}.")
    decays = [None if d is None else _fraction("decay", d) for d in (given if decay_pair else (given, given))]

    recursion: str | tuple[str, str]
    decay: float | tuple[float, float] | None
    if factorization == "io_factorized":
        if pair and sides[0] == "jacobian":
            raise _bad(
                "temporal_recursion",
                "x-side 'jacobian' is impossible under io_factorized: the input trace "
                "eps_x <- a_x eps_x + x involves no Jacobian; use ('scalar_leak', ...) or ('none', ...).",
            )
        x_side = "scalar_leak" if sides[0] == "jacobian" else sides[0]  # the shorthand 'jacobian'
        (rx, ax), (rf, af) = _side("decay_x", x_side, decays[0]), _side("decay_f", sides[1], decays[1])
        recursion, decay = (rx, rf), (ax, af)
    else:
        if pair or decay_pair:
            which = "temporal_recursion" if pair else "decay"
            raise _bad(which, f"takes a pair (x-side, f-side) only under io_factorized, not {factorization!r}.")
        rec = sides[0]
        if factorization in _ESTIMATORS:
            if rec != "jacobian" or decays[0] is not None:
                raise _bad(
                    "temporal_recursion",
                    f"under {factorization!r} the estimator carries its own recursion (the full Jacobian): "
                    f"leave temporal_recursion='jacobian' and decay=None; got {rec!r}, decay {decays[0]!r}.",
                )
            if scope not in ("coupled", "full"):
                raise _bad(
                    "recurrence_scope",
                    f"must be 'full' under {factorization!r}, which estimates the full influence matrix "
                    f"(braintrace spells it 'coupled'); got {scope!r}.",
                )
            scope, recursion, decay = "full", rec, None
        elif rec == "jacobian":
            if decays[0] is not None:
                raise _bad(
                    "decay",
                    "has no role with temporal_recursion='jacobian' under per_param (the trace is propagated by "
                    f"D, no discount); got {decays[0]!r}. For a leak use temporal_recursion='scalar_leak'.",
                )
            recursion, decay = rec, None
        else:
            recursion, decay = _side("decay", rec, decays[0])

    kappa = None if c.kappa is None else _fraction("kappa", c.kappa)
    if trace_filter == "kappa":
        if kappa is None:
            raise _bad("trace_filter", "'kappa' needs its coefficient: set kappa= (a float in [0, 1)).")
        if kappa == 0.0:
            trace_filter, kappa = "none", None  # a zero filter is no filter
    elif kappa is not None:
        raise _bad(
            "kappa", f"is the coefficient of trace_filter='kappa'; got kappa={kappa!r} with trace_filter='none'."
        )
    if trace_filter == "kappa" and factorization != "per_param":
        raise _bad(
            "trace_filter",
            f"'kappa' needs trace_factorization='per_param': the filtered trace kappa*e + x (x) f is not a "
            f"factorised (or rank-one) trace, so {factorization!r} cannot store it.",
        )

    sparse_n = None if c.sparse_n is None else _count("sparse_n", c.sparse_n)
    if scope == "sparse_n":
        if sparse_n is None:
            raise _bad("recurrence_scope", "'sparse_n' needs its order: set sparse_n= (an int >= 1).")
        if sparse_n == 1:
            scope, sparse_n = "coupled", None  # SnAp-1 is the coupled scope
    elif sparse_n is not None:
        raise _bad("sparse_n", f"is the order of recurrence_scope='sparse_n'; got sparse_n={sparse_n} with {scope!r}.")
    d_side = recursion[1] if isinstance(recursion, tuple) else recursion
    if scope != "diagonal" and d_side != "jacobian":
        raise _bad(
            "recurrence_scope",
            f"{scope!r} changes what enters the Jacobian D, but the trace does not use D "
            f"(temporal_recursion {recursion!r}); use recurrence_scope='diagonal' or a 'jacobian' recursion.",
        )

    window_size = None if c.window_size is None else _count("window_size", c.window_size)
    if schedule == "window" and window_size is None:
        raise _bad("update_schedule", "'window' needs its length: set window_size= (an int >= 1).")
    if schedule != "window" and window_size is not None:
        raise _bad(
            "window_size",
            f"is the length of update_schedule='window'; got window_size={window_size} with {schedule!r}.",
        )
    return dict(
        trace_factorization=factorization,
        temporal_recursion=recursion,
        recurrence_scope=scope,
        learning_signal=signal,
        trace_filter=trace_filter,
        update_schedule=schedule,
        decay=decay,
        kappa=kappa,
        sparse_n=sparse_n,
        window_size=window_size,
    )


@dataclass(frozen=True)
class ETraceConfig:
    r"""A frozen record of the axes of an online learning rule (braintrace 0.2.8's ``ETraceConfig``).

    Per relation :math:`y = \mathrm{op}(x, W)` and hidden state, the trace recursions are

    .. math::

        \texttt{per\_param}:\ \epsilon^t = R^t\,\epsilon^{t-1} + \mathrm{drtrl\_seed}(x^t, D^t_f), \qquad
        \texttt{io\_factorized}:\ \epsilon_x^t = \alpha_x\,\epsilon_x^{t-1} + x^t,\
        \epsilon_f^t = \alpha_f\,R^t\epsilon_f^{t-1} + (1-\alpha_f)\,D^t_f,

    with :math:`R^t = D^t` (``'jacobian'``), :math:`\lambda I` (``'scalar_leak'``, under
    ``io_factorized`` :math:`I`) or :math:`0` (``'none'``), and the gradient
    :math:`\sum_s g^t_s\,\epsilon^t_s` with the learning signal :math:`g^t`
    (:math:`\partial L^t/\partial h^t` when ``'symmetric'``). See :mod:`etp_algorithms._config`
    for every axis; :meth:`describe` explains a config in words.

    Parameters
    ----------
    trace_factorization : {'per_param', 'io_factorized', 'random_projection', 'kronecker'}
    temporal_recursion : {'jacobian', 'scalar_leak', 'none'} or a pair of them
        A pair ``(x-side, f-side)`` only under ``io_factorized``, where the shorthand
        ``'jacobian'`` means ``('scalar_leak', 'jacobian')`` (ES-D-RTRL's rule).
    recurrence_scope : {'diagonal', 'coupled', 'sparse_n', 'full'}
    learning_signal : {'symmetric', 'random_feedback', 'modulatory', 'bootstrapped'}
    trace_filter : {'none', 'kappa'}
    update_schedule : {'per_step', 'window', 'sequence_end'}
    decay : float in [0, 1), a pair of them under ``io_factorized``, or None
        Needed by ``'scalar_leak'`` and ``io_factorized``; never a rank. ``0`` is ``'none'``.
    kappa : float in [0, 1), optional
        The coefficient of ``trace_filter='kappa'`` (``0`` is ``'none'``).
    sparse_n : int >= 1, optional
        The order of ``recurrence_scope='sparse_n'`` (``1`` is ``'coupled'``).
    window_size : int >= 1, optional
        The length of ``update_schedule='window'``.

    Raises
    ------
    ValueError
        An unknown value of an axis (the message names the axis and its values), a coefficient
        out of range or without its axis value, or a contradictory combination (named).

    Examples
    --------
    >>> from etp_algorithms._config import ETraceConfig
    >>> config = ETraceConfig(trace_factorization="io_factorized", decay=0.9)
    >>> config.temporal_recursion, config.decay_x, config.decay_f, config.is_factorized
    (('scalar_leak', 'jacobian'), 0.9, 0.9, True)
    >>> config.replace(decay=(0.9, 0.0)).recursion_f  # no f-side memory: OTTT's coordinate
    'none'
    """

    trace_factorization: str = "per_param"
    temporal_recursion: str | tuple[str, str] = "jacobian"
    recurrence_scope: str = "diagonal"
    learning_signal: str = "symmetric"
    trace_filter: str = "none"
    update_schedule: str = "per_step"
    decay: float | tuple[float, float] | None = None
    kappa: float | None = None
    sparse_n: int | None = None
    window_size: int | None = None

    def __post_init__(self) -> None:
        for name, value in _canonical(self).items():
            object.__setattr__(self, name, value)

    @property
    def is_factorized(self) -> bool:
        """Whether the trace is stored as input and output factors (``io_factorized``)."""
        return self.trace_factorization == "io_factorized"

    @property
    def recursion_x(self) -> str:
        """The input-side recursion (under ``io_factorized``; otherwise the one recursion)."""
        r = self.temporal_recursion
        return r[0] if isinstance(r, tuple) else r

    @property
    def recursion_f(self) -> str:
        """The output-side recursion, the one that consumes the Jacobian :math:`D`."""
        r = self.temporal_recursion
        return r[1] if isinstance(r, tuple) else r

    @property
    def decay_x(self) -> float | None:
        """:math:`\\alpha_x` under ``io_factorized``; otherwise the one decay (``None`` without one)."""
        d = self.decay
        return d[0] if isinstance(d, tuple) else d

    @property
    def decay_f(self) -> float | None:
        """:math:`\\alpha_f` under ``io_factorized``; otherwise the one decay (``None`` without one)."""
        d = self.decay
        return d[1] if isinstance(d, tuple) else d

    @property
    def include_recurrent_mixing(self) -> bool:
        """Whether hidden-to-hidden coupling beyond the position-wise diagonal enters the trace."""
        return self.recurrence_scope != "diagonal"

    def replace(self, **changes: Any) -> ETraceConfig:
        """A copy with ``changes`` (validated anew), e.g. ``config.replace(decay=0.5)``.

        Raises
        ------
        TypeError
            A keyword that is not a field (the fields are named).
        ValueError
            As the constructor.
        """
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise TypeError(f"ETraceConfig.replace: unknown fields {unknown}; the fields are {fields}.")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The rule in words, one line per axis, and the learner that implements it (or why none does).

        Examples
        --------
        >>> from etp_algorithms._config import ETraceConfig
        >>> print(ETraceConfig().describe().splitlines()[-1])
        learner: D_RTRL ('d_rtrl')
        """
        lines = [f"ETraceConfig({self._arguments()})"]
        lines += [f"  {axis} = {getattr(self, axis)!r}: {text}" for axis, text in _explain(self)]
        try:
            row, cls = _match(self)
            lines.append(f"learner: {cls.__name__} ({row.name!r})")
        except NotSupportedError as error:
            lines.append(f"learner: none ({error})")
        return "\n".join(lines)

    def build(self, model: Any, **options: Any) -> ETraceAlgorithm:
        """The learner of this config on ``model`` (see :func:`learner_from_config`)."""
        return learner_from_config(model, self, **options)

    def _arguments(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return ", ".join(changed)


def _explain(c: ETraceConfig) -> list[tuple[str, str]]:
    factorization = {
        "per_param": "one trace of each weight's shape per sample, O(B*theta) per relation",
        "io_factorized": "input and output factors eps_x (x) eps_f, O(B*(I+O)) per relation",
        "random_projection": "UORO's unbiased rank-one estimate of the full influence matrix",
        "kronecker": "KF-RTRL's unbiased Kronecker estimate of the influence of each dense relation",
    }[c.trace_factorization]
    word = {"jacobian": "propagated by the Jacobian D", "scalar_leak": "a leak", "none": "no memory"}
    if c.is_factorized:
        recursion = f"x-side {word[c.recursion_x]} (a_x={c.decay_x}), f-side {word[c.recursion_f]} (a_f={c.decay_f})"
    elif c.temporal_recursion == "scalar_leak":
        recursion = f"eps <- {c.decay} eps + seed"
    else:
        recursion = word[c.recursion_f]
    scope = {
        "diagonal": "the position-wise Jacobian, the ETP ops' outputs held fixed",
        "coupled": "SnAp-1: each weight's immediate entries, propagated through the ETP ops too",
        "sparse_n": f"SnAp-{c.sparse_n}: the influence entries reached in {c.sparse_n} steps",
        "full": "the whole influence matrix (every hidden state, every step)",
    }[c.recurrence_scope]
    signal = {
        "symmetric": "dL/dh, back-propagated through the readout",
        "random_feedback": "the output error through fixed random matrices",
        "modulatory": "a third factor (a modulator) in place of dL/dh",
        "bootstrapped": "a learned synthetic gradient of the future loss",
    }[c.learning_signal]
    trace_filter = "no filter" if c.trace_filter == "none" else f"e_bar <- {c.kappa} e_bar + e"
    schedule = {
        "per_step": "a gradient at every step",
        "window": f"a gradient every {c.window_size} steps",
        "sequence_end": "a gradient at the end of the sequence",
    }[c.update_schedule]
    return list(zip(AXES, (factorization, recursion, scope, signal, trace_filter, schedule), strict=True))


Test = Callable[[ETraceConfig], bool]


@dataclass(frozen=True)
class LearnerRow:
    """One row of :data:`LEARNER_TABLE`: the configs a registered learner implements.

    Attributes
    ----------
    name : str
        The learner's registered name (:func:`~etp_algorithms.registered_learners`).
    class_name : str
        Its class's name (for messages when it is not registered).
    wants : tuple of (axis, test, text)
        What a config must satisfy, axis by axis (``text``: the wanted value, for messages).
    options : callable
        ``config -> constructor options`` the config sets (e.g. ``decay_or_rank``).
    example : ETraceConfig
        A config of the row (the learner's own coordinate).
    """

    name: str
    class_name: str
    wants: tuple[tuple[str, Test, str], ...]
    options: Callable[[ETraceConfig], dict[str, Any]]
    example: ETraceConfig

    def misses(self, config: ETraceConfig) -> list[tuple[str, str]]:
        """``(axis, wanted)`` of every axis where ``config`` is not this row's."""
        return [(axis, text) for axis, test, text in self.wants if not test(config)]


def _is(axis: str, *values: Any) -> tuple[str, Test, str]:
    return axis, lambda c: getattr(c, axis) in values, "=" + " or ".join(map(repr, values))


def _common(
    factorization: str, recursion: Any, scope: tuple[str, ...], signal: tuple[str, ...], kappa: bool = False
) -> tuple[tuple[str, Test, str], ...]:
    return (
        _is("trace_factorization", factorization),
        _is("temporal_recursion", recursion),
        _is("recurrence_scope", *scope),
        _is("learning_signal", *signal),
        _is("trace_filter", "kappa" if kappa else "none"),
        _is("update_schedule", "per_step"),
    )


_SHARED_DECAY = ("decay", lambda c: c.decay_x == c.decay_f, " shared by both sides (decay_x == decay_f)")


def _NONE(config: ETraceConfig) -> dict[str, Any]:
    return {}


_IO = "io_factorized"

#: The registered learners as configs: a config builds the learner of the row it satisfies.
LEARNER_TABLE: tuple[LearnerRow, ...] = (
    LearnerRow("d_rtrl", "D_RTRL", _common("per_param", "jacobian", ("diagonal",), ("symmetric",)), _NONE, ETraceConfig()),
    LearnerRow(
        "es_d_rtrl", "ES_D_RTRL", (*_common(_IO, ("scalar_leak", "jacobian"), ("diagonal",), ("symmetric",)), _SHARED_DECAY),
        lambda c: {"decay_or_rank": c.decay_f}, ETraceConfig(trace_factorization=_IO, decay=0.9),
    ),
    LearnerRow(
        "snap", "SnAp", _common("per_param", "jacobian", ("coupled", "sparse_n"), ("symmetric",)),
        lambda c: {"n": c.sparse_n or 1}, ETraceConfig(recurrence_scope="sparse_n", sparse_n=2),
    ),
    LearnerRow("rtrl", "RTRL", _common("per_param", "jacobian", ("full",), ("symmetric",)), _NONE, ETraceConfig(recurrence_scope="full")),
    LearnerRow(
        "uoro", "UORO", _common("random_projection", "jacobian", ("full",), ("symmetric",)), _NONE,
        ETraceConfig(trace_factorization="random_projection", recurrence_scope="full"),
    ),
    LearnerRow(
        "kf_rtrl", "KF_RTRL", _common("kronecker", "jacobian", ("full",), ("symmetric",)), _NONE,
        ETraceConfig(trace_factorization="kronecker", recurrence_scope="full"),
    ),
    LearnerRow(
        "rflo", "RFLO", _common("per_param", "jacobian", ("diagonal",), ("random_feedback",)),
        lambda c: {"feedback": "random"}, ETraceConfig(learning_signal="random_feedback"),
    ),
    LearnerRow(
        "eprop", "EProp", _common("per_param", "jacobian", ("diagonal",), ("symmetric", "random_feedback"), kappa=True),
        lambda c: {"feedback": "random" if c.learning_signal == "random_feedback" else "symmetric", "kappa_filter_decay": c.kappa},
        ETraceConfig(trace_filter="kappa", kappa=0.9),
    ),
    LearnerRow(
        "three_factor", "ThreeFactor", _common("per_param", "jacobian", ("diagonal",), ("modulatory",)), _NONE,
        ETraceConfig(learning_signal="modulatory"),
    ),
    LearnerRow(
        "ottt", "OTTT", _common(_IO, ("scalar_leak", "none"), ("diagonal",), ("symmetric",)),
        lambda c: {"decay": c.decay_x}, ETraceConfig(trace_factorization=_IO, decay=(0.9, 0.0)),
    ),
    LearnerRow(
        "dni", "DNI", _common("per_param", "jacobian", ("diagonal",), ("bootstrapped",)), _NONE,
        ETraceConfig(learning_signal="bootstrapped"),
    ),
)  # fmt: skip


def _registry() -> dict[str, type[ETraceAlgorithm]]:
    from ._compile import registered_learners  # the registry lives beside compile (which imports this module)

    return registered_learners()


def _match(config: ETraceConfig) -> tuple[LearnerRow, type[ETraceAlgorithm]]:
    """The row ``config`` satisfies and its registered class, or a NotSupportedError naming the nearest."""
    if not isinstance(config, ETraceConfig):
        raise TypeError(f"expected an ETraceConfig, got {type(config).__name__} ({config!r}).")
    registry = _registry()
    available = [row for row in LEARNER_TABLE if row.name in registry]
    for row in LEARNER_TABLE:
        if not row.misses(config):
            if row.name not in registry:
                raise NotSupportedError(
                    f"ETraceConfig({config._arguments()}) is the rule of the learner {row.name!r} ({row.class_name}), "
                    f"which is not registered here (registered: {', '.join(sorted(registry))}).{_nearest(config, available)}"
                )
            return row, registry[row.name]
    raise NotSupportedError(
        f"ETraceConfig({config._arguments()}): no learner implements {_missed(config, available)}."
        f"{_nearest(config, available)}"
    )


def _nearest_row(config: ETraceConfig, rows: list[LearnerRow]) -> LearnerRow | None:
    def distance(row: LearnerRow) -> tuple[int, bool]:  # fewest axes changed, the factorization kept if possible
        missed = [axis for axis, _ in row.misses(config)]
        return len(missed), "trace_factorization" in missed

    return min(rows, key=distance, default=None)


def _missed(config: ETraceConfig, rows: list[LearnerRow]) -> str:
    nearest = _nearest_row(config, rows)
    if nearest is None:
        return "it (no learner of the table is registered)"
    what = "; ".join(f"{axis}={_value(config, axis)!r}" for axis, _ in nearest.misses(config))
    return f"{what} with the other axes as given"


def _nearest(config: ETraceConfig, rows: list[LearnerRow]) -> str:
    nearest = _nearest_row(config, rows)
    if nearest is None:
        return ""
    instead = "; ".join(f"{axis}{wanted}" for axis, wanted in nearest.misses(config))
    return (
        f" Nearest supported: {instead}, the learner {nearest.name!r} ({nearest.class_name}), e.g. "
        f"ETraceConfig({_nearest_example(config, nearest)._arguments()})."
    )


def _value(config: ETraceConfig, axis: str) -> Any:
    return (config.decay_x, config.decay_f) if axis == "decay" else getattr(config, axis)


def _nearest_example(config: ETraceConfig, row: LearnerRow) -> ETraceConfig:
    """An example of ``row``: ``config`` with one decay on both sides when the row takes it, else the row's own."""
    decay = (config.decay_f or config.decay_x) if config.is_factorized else None
    if decay:
        shared = config.replace(temporal_recursion="jacobian", decay=decay)  # valid: 0 < decay < 1
        if not row.misses(shared):
            return shared
    return row.example


def resolve_config(config: ETraceConfig) -> tuple[type[ETraceAlgorithm], dict[str, Any]]:
    """The registered learner class of ``config`` and the constructor options the config sets.

    Raises
    ------
    TypeError
        ``config`` not an ETraceConfig.
    etp_compiler.NotSupportedError
        No registered learner implements ``config`` (the axis, the value and the nearest
        supported config are named), or the learner that does is not registered.

    Examples
    --------
    >>> from etp_algorithms._config import ETraceConfig, resolve_config
    >>> cls, options = resolve_config(ETraceConfig(trace_factorization="io_factorized", decay=0.5))
    >>> cls.__name__, options
    ('ES_D_RTRL', {'decay_or_rank': 0.5})
    """
    row, cls = _match(config)
    return cls, row.options(config)


def learner_from_config(model: Any, config: ETraceConfig, **options: Any) -> ETraceAlgorithm:
    r"""Build the learner ``config`` describes on ``model``: ``cls(model, **config_options, **options)``.

    The class is found in :data:`LEARNER_TABLE` among the registered learners; the config sets the
    options of its axes (``decay_or_rank`` of ES-D-RTRL, ``n`` of SnAp, ``feedback`` of RFLO,
    ``feedback`` and ``kappa_filter_decay`` of EProp); ``options`` adds the others (``name``,
    ``vjp_method``, ``control_flow``, keys, a modulator, ...). The model's states must be initialised
    (:func:`etp_algorithms.compile` does that and compiles the graph too).

    Parameters
    ----------
    model : brainstate.nn.Module
    config : ETraceConfig
    **options
        Constructor options the config does not set.

    Returns
    -------
    ETraceAlgorithm

    Raises
    ------
    TypeError
        ``config`` not an ETraceConfig.
    ValueError
        An option the config sets (change the config instead).
    etp_compiler.NotSupportedError
        As :func:`resolve_config`.

    Examples
    --------
    >>> import brainstate, etp_nn
    >>> from etp_algorithms._config import ETraceConfig, learner_from_config
    >>> cell = etp_nn.GRUCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = learner_from_config(cell, ETraceConfig(trace_factorization="io_factorized", decay=0.5))
    >>> type(learner).__name__, learner.decay
    ('ES_D_RTRL', 0.5)
    """
    cls, merged = config_options(config, options, "learner_from_config")
    return cls(model, **merged)


def config_options(
    config: ETraceConfig, options: dict[str, Any], label: str
) -> tuple[type[ETraceAlgorithm], dict[str, Any]]:
    """The learner class of ``config`` and its constructor options: the config's and ``options``.

    A ``ValueError`` (prefixed ``label``) when ``options`` repeats an option the config sets.
    """
    cls, own = resolve_config(config)
    clash = sorted(set(own) & set(options))
    if clash:
        raise ValueError(
            f"{label}: the config sets {clash} of {cls.__name__} (from its axes); change the config "
            f"(config.replace(...)) instead of passing {clash} as options."
        )
    return cls, {**own, **options}
