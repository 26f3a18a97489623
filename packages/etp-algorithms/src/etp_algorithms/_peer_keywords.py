r"""braintrace 0.2.8's engine keywords, accepted by the learners whose 0.2.8 signature has them.

braintrace 0.2.8 builds most learners on one configurable engine, and their constructors take its
switches (``fast_solve``, ``trace_dtype``, ``chunked_trace``, ``config``, ``random_feedback_key``,
``snap_max_jacobian_elements``). Code written for it passes them; here each learner accepts the ones
its 0.2.8 signature lists, checks them, and does what they mean where this library has the thing:

* ``trace_dtype``: the dtype the floating traces are *stored* in between steps (e.g.
  ``jnp.bfloat16`` halves their memory). Each step computes in the model's dtype from the stored
  traces and casts the new ones for storage, so a step's own gradient is unaffected and the
  rounding enters from the next step on: an approximation of the learner's rule, of the size of
  the storage dtype's precision.
* ``config``: an :class:`~etp_algorithms.ETraceConfig` must describe this learner (with the options
  given): ``D_RTRL(model, config=ETraceConfig())`` is D-RTRL. A config of another learner is refused
  with a ``ValueError`` naming it (build that one with :func:`~etp_algorithms.learner_from_config`).
* ``fast_solve`` (closed-form per-primitive contractions) and ``chunked_trace`` (the closed-form trace
  roll over windows): this library always uses its closed forms where they exist and runs windows
  exactly, so the switches are checked (``bool``) and stored.
* ``random_feedback_key``: 0.2.8 reads it only for a config asking for random feedback, which is
  another learner here (refused as above); checked and stored.
* ``snap_max_jacobian_elements``: 0.2.8's limit on SnAp's block Jacobian. SnAp here computes no such
  block (its limit is ``max_influence_bytes``, the dense influence); a positive ``int``, stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._rule import LearningRule

__all__ = ["DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS", "PeerKeywords", "with_trace_dtype"]

#: braintrace 0.2.8's default ``snap_max_jacobian_elements``.
DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS = 2**24


def _floating_dtype(label: str, dtype: Any) -> np.dtype[Any] | None:
    if dtype is None:
        return None
    resolved: np.dtype[Any] | None
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"{label}: trace_dtype must be a floating dtype (jnp.bfloat16, jnp.float16, jnp.float32, "
            f"jnp.float64) or None, got {dtype!r}."
        )
    return resolved


def with_trace_dtype(rule: LearningRule, dtype: Any) -> LearningRule:
    """``rule`` with its floating traces stored in ``dtype`` (``None``: ``rule`` itself).

    The rule's own functions see the traces in the dtypes its ``init_traces`` makes (the stored ones
    are cast back on the way in), so every rule computes as without ``trace_dtype``; what changes is
    the rounding of the traces kept between steps. The residual the backward pass reads is the
    step's own, so a step's gradient is computed from its new traces before rounding.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from etp_algorithms.extend import d_rtrl
    >>> with_trace_dtype(d_rtrl(), jnp.bfloat16).name
    'D_RTRL'
    """
    resolved = _floating_dtype(f"rule {rule.name!r}", dtype)
    if resolved is None:
        return rule
    computed: list[Any] = [None]  # the dtypes of the rule's own traces, one per leaf, from the last init

    def is_floating(leaf: Any) -> bool:
        kind = getattr(leaf, "dtype", None)
        return kind is not None and not jnp.issubdtype(kind, jax.dtypes.prng_key) and jnp.issubdtype(kind, jnp.floating)

    def stored(tree: Any) -> Any:
        return jax.tree.map(lambda leaf: leaf.astype(resolved) if is_floating(leaf) else leaf, tree)

    def own(tree: Any) -> Any:
        leaves, structure = jax.tree.flatten(tree)
        kinds = computed[0]
        if kinds is None or len(kinds) != len(leaves):
            return tree
        cast = [leaf.astype(kind) if kind is not None else leaf for leaf, kind in zip(leaves, kinds, strict=True)]
        return jax.tree.unflatten(structure, cast)

    def init_traces(ctx: Any) -> Any:
        traces = rule.init_traces(ctx)
        computed[0] = [leaf.dtype if is_floating(leaf) else None for leaf in jax.tree.leaves(traces)]
        return stored(traces)

    def update_traces(ctx: Any, traces: Any, values: Any) -> tuple[Any, Any]:
        new, residual = rule.update_traces(ctx, own(traces), values)
        return stored(new), residual

    changes: dict[str, Any] = {"init_traces": init_traces, "update_traces": update_traces}
    if rule.window_start_gradients is not None:
        window = rule.window_start_gradients
        changes["window_start_gradients"] = lambda ctx, traces, *rest: window(ctx, own(traces), *rest)
    if rule.trace_of is not None:
        trace_of = rule.trace_of
        changes["trace_of"] = lambda ctx, traces, index: trace_of(ctx, own(traces), index)
    return replace(rule, **changes)


@dataclass(frozen=True)
class PeerKeywords:
    """braintrace 0.2.8's engine keywords of one learner, checked (see the module docstring).

    ``own_options``: the learner's options that a ``config`` must agree with (ES-D-RTRL's decay...).
    """

    label: str
    fast_solve: bool = True
    trace_dtype: Any = None
    chunked_trace: bool = True
    config: Any = None
    random_feedback_key: Any = None
    snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS
    own_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("fast_solve", "chunked_trace"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{self.label}: {name} must be a bool, got {getattr(self, name)!r}.")
        object.__setattr__(self, "trace_dtype", _floating_dtype(self.label, self.trace_dtype))
        limit = self.snap_max_jacobian_elements
        if isinstance(limit, (bool, np.bool_)) or not isinstance(limit, (int, np.integer)) or limit <= 0:
            raise ValueError(f"{self.label}: snap_max_jacobian_elements must be a positive int, got {limit!r}.")

    def check_config(self, cls: type[Any]) -> None:
        """Refuse a ``config`` that does not describe ``cls`` with :attr:`own_options` (a ``ValueError`` naming it).

        A config describes ``cls`` when it resolves to ``cls``, a base of it, or a learner named in
        ``cls.same_rule_as`` (OSTLRecurrent runs D-RTRL's rule under its own name).
        """
        if self.config is None:
            return
        from ._config import ETraceConfig, resolve_config  # the config table imports the learners

        if not isinstance(self.config, ETraceConfig):
            raise TypeError(f"{self.label}: config must be an ETraceConfig or None, got {type(self.config).__name__}.")
        described, options = resolve_config(self.config)
        if not (issubclass(cls, described) or described.__name__ in getattr(cls, "same_rule_as", ())):
            raise ValueError(
                f"{self.label}: the config describes {described.__name__}({options}), not {cls.__name__}; build it "
                "with etp_algorithms.learner_from_config(model, config) (or config.build(model))."
            )
        for key, value in options.items():
            if key in self.own_options and self.own_options[key] != value:
                raise ValueError(
                    f"{self.label}: the config sets {key}={value!r} but the constructor got "
                    f"{key}={self.own_options[key]!r}; pass one of them."
                )

    def attributes(self) -> dict[str, Any]:
        """The learner attributes that keep the keywords (braintrace's names)."""
        return {
            "fast_solve": bool(self.fast_solve),
            "trace_dtype": self.trace_dtype,
            "chunked_trace": bool(self.chunked_trace),
            "config": self.config,
            "random_feedback_key": self.random_feedback_key,
            "snap_max_jacobian_elements": int(self.snap_max_jacobian_elements),
        }
