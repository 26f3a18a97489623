r"""The door for learning-rule authors (like ``jax.extend``): the rule record and what rules build on.

A learning rule is a :class:`LearningRule` value: a frozen record of pure
functions over a trace pytree (the contract is in the record's module,
:mod:`etp_algorithms._rule`, and on the docs page *Writing a learning rule*).
:class:`etp_algorithms.ETraceAlgorithm` runs any rule::

    learner = ETraceAlgorithm(model, my_rule)

Built-in rules: :func:`d_rtrl` (:class:`~etp_algorithms.D_RTRL`) and
:func:`es_d_rtrl` (:class:`~etp_algorithms.ES_D_RTRL`). Their trace records
(:class:`D_RTRLTrace`, :class:`ES_D_RTRLTraces`) are examples of the
convention: frozen dataclasses registered as pytrees, with the relation and
group indices as static fields.

Examples
--------
>>> from etp_algorithms.extend import LearningRule, es_d_rtrl
>>> rule = es_d_rtrl(0.9)
>>> rule.name, rule.supports_windows
('ES_D_RTRL', True)
"""

from ._d_rtrl import D_RTRLTrace, d_rtrl
from ._es_d_rtrl import ES_D_RTRLTrace, ES_D_RTRLTraces, es_d_rtrl
from ._executor import KeyedValues, StepValues, execute_step
from ._hidden_only import hidden_only_keys, reach
from ._ottt import OTTTTrace, leak_of, ottt, relation_cotangents
from ._rule import HiddenCotangents, LearningRule, RelationGradients, RuleContext, WeightGradients
from ._rule_helpers import (
    as_scalar,
    contract_states,
    coupling,
    extra_axes,
    host_zeros,
    instantaneous_gradient,
    map_extra,
    relation_weights,
    rule_shapes,
    stack_states,
    sum_over_samples,
    weight_shaped_batched,
)
from ._step import ModulatedCotangents, build_step, build_window
from ._three_factor import modulator_values, three_factor
from ._transition import TrainableKey, hidden_transition, trainable_inputs

__all__ = [
    # the rule record and what its functions receive
    "LearningRule",
    "RuleContext",
    "StepValues",
    "KeyedValues",
    "RelationGradients",
    "WeightGradients",
    "HiddenCotangents",
    # building and running a step
    "build_step",
    "build_window",
    "execute_step",
    "ModulatedCotangents",
    # the built-in three-factor rule and its modulator
    "three_factor",
    "modulator_values",
    # OTTT's rule, its trace record, the leak it derives and the relation-output cotangents it uses
    "ottt",
    "OTTTTrace",
    "leak_of",
    "relation_cotangents",
    # the full transition, for rules carrying a total influence dh/dtheta
    "hidden_transition",
    "trainable_inputs",
    "TrainableKey",
    # the built-in rules and their trace records
    "d_rtrl",
    "D_RTRLTrace",
    "es_d_rtrl",
    "ES_D_RTRLTrace",
    "ES_D_RTRLTraces",
    # helpers
    "as_scalar",
    "instantaneous_gradient",
    "relation_weights",
    "stack_states",
    "contract_states",
    "coupling",
    "extra_axes",
    "map_extra",
    "host_zeros",
    "rule_shapes",
    "sum_over_samples",
    "weight_shaped_batched",
    "hidden_only_keys",
    "reach",
]
