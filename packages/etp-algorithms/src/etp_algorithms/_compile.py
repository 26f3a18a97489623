"""``compile``: initialise a model's states, build a learner and compile its graph in one call.

The learners are found by name in a registry (case-insensitive): ``'d_rtrl'``
(:class:`D_RTRL`), ``'es_d_rtrl'``, ``'esd_rtrl'`` and ``'pp_prop'``
(:class:`ES_D_RTRL`); :func:`register_learner` adds others. An
:class:`~etp_algorithms.ETraceConfig` names a learner by its rule
(:func:`~etp_algorithms.learner_from_config`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, cast

import brainstate
import jax
import jax.numpy as jnp

from etp_compiler import CompilationError

from ._config import ETraceConfig, config_options
from ._d_rtrl import D_RTRL
from ._dni import DNI
from ._eprop import EProp
from ._es_d_rtrl import ES_D_RTRL
from ._kf_rtrl import KF_RTRL
from ._learner import OPT_IN, ETraceAlgorithm, NoEligibilityTraceWarning
from ._ostl import OSTLFeedforward, OSTLRecurrent
from ._ottt import OTTT
from ._rflo import RFLO
from ._rtrl import RTRL
from ._snap import SnAp
from ._three_factor import ThreeFactor
from ._uoro import UORO
from ._vmap import ETraceVmap

__all__ = ["compile", "register_learner", "registered_learners"]

_LEARNERS: dict[str, type[ETraceAlgorithm]] = {}

#: The ETP ops (and the etp_nn layers built on them) through which a weight gets an eligibility trace.


def _key(name: str) -> str:
    return name.strip().lower()


def register_learner(name: str, cls: type[ETraceAlgorithm], *, overwrite: bool = False) -> None:
    """Make ``cls`` available to :func:`compile` as ``algorithm=name`` (case-insensitive).

    Parameters
    ----------
    name : str
    cls : type
        A subclass of :class:`ETraceAlgorithm`, built as ``cls(model, **options)``.
    overwrite : bool
        Replace a learner already registered under ``name`` (otherwise an error).

    Raises
    ------
    TypeError
        If ``cls`` is not an ETraceAlgorithm subclass or ``name`` not a non-empty string.
    ValueError
        If ``name`` is taken by another class and ``overwrite`` is false.

    Examples
    --------
    >>> from etp_algorithms import D_RTRL, register_learner, registered_learners
    >>> class MyRTRL(D_RTRL):
    ...     pass
    >>> register_learner("my_rtrl", MyRTRL)
    >>> registered_learners()["my_rtrl"] is MyRTRL
    True
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_learner: the name must be a non-empty string, got {name!r}.")
    if not (isinstance(cls, type) and issubclass(cls, ETraceAlgorithm)):
        raise TypeError(f"register_learner: {cls!r} is not a subclass of ETraceAlgorithm.")
    key = _key(name)
    if key in _LEARNERS and _LEARNERS[key] is not cls and not overwrite:
        raise ValueError(
            f"register_learner: {name!r} is already the name of {_LEARNERS[key].__name__}; "
            "pass overwrite=True to replace it."
        )
    _LEARNERS[key] = cls


def registered_learners() -> dict[str, type[ETraceAlgorithm]]:
    """``name -> learner class`` of every name :func:`compile` accepts (a copy)."""
    return dict(sorted(_LEARNERS.items()))


for _name, _cls in (
    ("d_rtrl", D_RTRL),
    ("es_d_rtrl", ES_D_RTRL),
    ("esd_rtrl", ES_D_RTRL),
    ("pp_prop", ES_D_RTRL),
    ("rtrl", RTRL),
    ("snap", SnAp),
    ("rflo", RFLO),
    ("uoro", UORO),
    ("kf_rtrl", KF_RTRL),
    ("ostl_recurrent", OSTLRecurrent),
    ("ostl_feedforward", OSTLFeedforward),
    ("three_factor", ThreeFactor),
    ("eprop", EProp),
    ("ottt", OTTT),
    ("dni", DNI),
):
    register_learner(_name, _cls)


def _resolve(algorithm: Any, options: dict[str, Any]) -> tuple[type[ETraceAlgorithm], dict[str, Any]]:
    """The learner class and its constructor options (a config's own options added to ``options``)."""
    if isinstance(algorithm, ETraceConfig):
        return config_options(algorithm, options, "compile")
    return _resolve_class(algorithm), options


def _resolve_class(algorithm: Any) -> type[ETraceAlgorithm]:
    if isinstance(algorithm, str):
        try:
            return _LEARNERS[_key(algorithm)]
        except KeyError:
            raise ValueError(
                f"compile: unknown algorithm name {algorithm!r}; valid names: {', '.join(sorted(_LEARNERS))} "
                "(case-insensitive), or pass a learner class (a subclass of ETraceAlgorithm)."
            ) from None
    if isinstance(algorithm, type) and issubclass(algorithm, ETraceAlgorithm):
        return algorithm
    raise TypeError(
        "compile: algorithm must be a learner class (a subclass of ETraceAlgorithm), an ETraceConfig or one of "
        f"the names {', '.join(sorted(_LEARNERS))}; got {algorithm!r}."
    )


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
    else:
        with brainstate.random.seed_context(seed):
            yield


def _all_states(model: brainstate.nn.Module) -> Mapping[Any, brainstate.State[Any]]:
    return cast(Mapping[Any, brainstate.State[Any]], model.states())


def _state_values(model: brainstate.nn.Module) -> dict[Any, tuple[brainstate.State[Any], Any]]:
    return {path: (state, state.value) for path, state in _all_states(model).items()}


def _restore(model: brainstate.nn.Module, saved: dict[Any, tuple[brainstate.State[Any], Any]]) -> None:
    """Put back the state values ``compile`` found (the states a failed call re-initialised)."""
    for state, value in saved.values():
        state.value = value
    for path, state in _all_states(model).items():
        if path in saved:
            state.value = saved[path][1]


def _start_lanes(model: brainstate.nn.Module, lanes: dict[Any, Any]) -> None:
    """Give each lane the initial value the batched model's ``init_all_states`` gave it (when the shapes agree)."""
    for path, state in _all_states(model).items():
        if path in lanes and _layout(lanes[path]) == _layout(state.value):
            state.value = lanes[path]


def _layout(value: Any) -> tuple[Any, list[tuple[int, ...]]]:
    """The tree structure (a saiunit Quantity's unit included) and the leaf shapes of a state's value."""
    leaves, structure = jax.tree.flatten(value)
    return structure, [tuple(jnp.shape(leaf)) for leaf in leaves]


def _check_vmap_inputs(example_inputs: tuple[Any, ...], batch_size: int) -> None:
    for leaf in jax.tree.leaves(example_inputs):
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != batch_size:
            raise ValueError(
                f"compile(..., vmap=True): the example inputs carry the batch axis (axis 0, of size "
                f"batch_size={batch_size}); got an input of shape {shape}."
            )


def compile(
    model: brainstate.nn.Module,
    algorithm: str | ETraceConfig | type[ETraceAlgorithm],
    *example_inputs: Any,
    batch_size: int | None = None,
    seed: int | None = None,
    verbose: int = 0,
    vmap: bool = False,
    **options: Any,
) -> ETraceAlgorithm | ETraceVmap:
    """Initialise ``model``'s states, build the learner and compile its graph: a learner ready to call.

    Parameters
    ----------
    model : brainstate.nn.Module
        One step of the model. Its states are (re)initialised here, with
        ``brainstate.nn.init_all_states(model, batch_size=batch_size)``.
    algorithm : str, ETraceConfig or type
        A learner class (a subclass of :class:`ETraceAlgorithm`), a
        registered name (case-insensitive): ``'d_rtrl'``, ``'es_d_rtrl'`` /
        ``'esd_rtrl'`` / ``'pp_prop'``, and those added by :func:`register_learner`
        (:func:`registered_learners` lists them), or an :class:`ETraceConfig`:
        the learner that implements its rule, with the options its axes set
        (e.g. ``decay_or_rank`` from ``decay``; see :func:`learner_from_config`).
    *example_inputs
        Inputs of one call of the learner (at least one), as it will be called.
    batch_size : int, optional
        The batch size of the states (``None``: unbatched).
    seed : int, optional
        Initialise the states inside ``brainstate.random.seed_context(seed)``
        (the global RNG is restored afterwards).
    verbose : {0, 1, 2, 3}
        ``>= 1``: print the :class:`~etp_compiler.CompilationReport` at that
        level (hidden groups, weights with and without traces; ``2`` adds the
        compiler's warnings, ``3`` every diagnostic) and the trace memory.
    vmap : bool
        Compile a *per-sample* learner and return it wrapped for batches
        (:class:`ETraceVmap`): the graph is compiled for one sample, and the
        hidden states and traces get a batch axis of size ``batch_size``
        (required), each lane starting from the value
        ``init_all_states(model, batch_size=batch_size)`` gives it (as in the
        batched model, with the same ``seed``). As in braintrace,
        ``example_inputs`` then carry the batch axis (axis 0).
    **options
        Passed to the learner's constructor, e.g. ``decay_or_rank`` (required
        by ES_D_RTRL), ``vjp_method``, ``name``.

    Returns
    -------
    ETraceAlgorithm or ETraceVmap
        The compiled learner (``learner.report`` describes its graph); with
        ``vmap=True`` the :class:`ETraceVmap` around it (the learner is its ``.module``).

    Raises
    ------
    ValueError
        An unknown algorithm name (the message lists the valid ones), an
        option that the ETraceConfig sets, no
        example input, ``verbose`` not in 0-3, ``vmap=True`` without
        ``batch_size`` or with inputs whose axis 0 is not ``batch_size``.
    TypeError
        ``algorithm`` neither a learner class, a config nor a string, or options the learner does not take.
    etp_compiler.NotSupportedError
        An ETraceConfig that no registered learner implements (the axis, the
        value and the nearest supported config are named).
    etp_compiler.CompilationError
        If no weight of ``model`` gets an eligibility trace (no ETP primitive
        drives a hidden state): the message names the model and the ops that
        opt a weight in. The model's state values are then put back as they
        were. A learner class built directly accepts such a model (every
        parameter gets its instantaneous gradient).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> import etp_algorithms
    >>> cell = etp_nn.GRUCell(3, 4)
    >>> learner = etp_algorithms.compile(cell, "d_rtrl", jnp.zeros((2, 3)), batch_size=2)
    >>> learner(jnp.ones((2, 3))).shape
    (2, 4)
    >>> batched = etp_algorithms.compile(cell, "es_d_rtrl", jnp.zeros((2, 3)), batch_size=2, vmap=True,
    ...                                  decay_or_rank=0.9)
    >>> batched(jnp.ones((2, 3))).shape, type(batched.module).__name__
    ((2, 4), 'ES_D_RTRL')
    >>> from etp_algorithms._config import ETraceConfig
    >>> config = ETraceConfig(trace_factorization="io_factorized", decay=0.9)
    >>> type(etp_algorithms.compile(cell, config, jnp.zeros((2, 3)), batch_size=2)).__name__
    'ES_D_RTRL'
    """
    cls, options = _resolve(algorithm, options)
    if not isinstance(model, brainstate.nn.Module):
        raise TypeError(f"compile: model must be a brainstate.nn.Module, got {type(model).__name__}.")
    if not example_inputs:
        raise ValueError(
            f"compile: give at least one example input, as the learner will be called, e.g. "
            f"compile(model, {algorithm if isinstance(algorithm, str) else cls.__name__!r}, x0)."
        )
    if isinstance(verbose, bool) or verbose not in (0, 1, 2, 3):
        raise ValueError(f"compile: verbose must be 0, 1, 2 or 3, got {verbose!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"compile: batch_size must be a positive int or None, got {batch_size!r}.")
    if vmap:
        if batch_size is None:
            raise ValueError(
                "compile(..., vmap=True) needs batch_size: the per-sample learner is mapped over a batch of that "
                "size (the example inputs carry it as axis 0)."
            )
        _check_vmap_inputs(example_inputs, batch_size)

    saved = _state_values(model)
    try:
        lanes: dict[Any, Any] = {}
        with _seeded(seed):
            brainstate.nn.init_all_states(model, batch_size=batch_size)
            if vmap:  # the batched initial values, for the lanes; then the per-sample states to compile
                lanes = {p: s.value for p, s in _all_states(model).items() if not isinstance(s, brainstate.ParamState)}
                brainstate.nn.init_all_states(model)
        try:
            learner = cls(model, **options)
        except TypeError as error:
            raise TypeError(
                f"compile: {cls.__name__}(model, **options) failed with options {sorted(options)}: {error}"
            ) from error
        sample = jax.tree.map(lambda a: a[0], example_inputs) if vmap else example_inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoEligibilityTraceWarning)  # compile raises instead
            graph = learner.compile_graph(*sample)
        if learner.learns_nothing_online(graph):
            raise CompilationError(_no_trace_message(model, learner))
    except BaseException:
        _restore(model, saved)
        raise
    result: ETraceAlgorithm | ETraceVmap = learner
    if vmap:
        result = ETraceVmap(learner, axis_size=batch_size)
        _start_lanes(model, lanes)
    if verbose:
        print(f"{learner.report.to_str(verbose)}\nEligibility-trace memory: {learner.trace_bytes()} bytes")
    return result


def _no_trace_message(model: brainstate.nn.Module, learner: ETraceAlgorithm) -> str:
    excluded = learner.report.excluded_weights
    why = (
        "; its parameters: " + ", ".join(f"{'.'.join(map(str, p))} ({r or 'plain JAX ops only'})" for p, r in excluded)
        if excluded
        else "; it reads no parameter"
    )
    return (
        f"compile: no weight of {type(model).__name__} gets an eligibility trace: no ETP primitive drives one of "
        f"its hidden states{why}. A weight opts in through {OPT_IN}. To train such a model with instantaneous "
        f"gradients only, build the learner directly ({learner.__class__.__name__}(model))."
    )
