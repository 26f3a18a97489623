r"""OSTL (Bohnstingl et al. 2022): online spatio-temporal learning on the D-RTRL and ES-D-RTRL traces.

OSTL ("Online Spatio-Temporal Learning in Deep Neural Networks", IEEE TNNLS
2022) factors the gradient of a loss :math:`L^t` of step :math:`t` into a
*spatial* part, the instantaneous learning signal
:math:`g^t = \partial L^t/\partial h^t`, and a *temporal* part, an eligibility
trace :math:`e^t` of the unit's own state:

.. math::

    \frac{\partial L^t}{\partial W} = \sum_s g^t_s\, e^t_s, \qquad
    e^t = \frac{\partial h^t}{\partial h^{t-1}}\, e^{t-1} + \frac{\partial h^t}{\partial W}.

On ETP's compiled step, :math:`\partial h^t/\partial h^{t-1}` restricted to a
unit's own states (the ETP ops' outputs held fixed) is the per-unit Jacobian
:math:`D^t` of the hidden group, and :math:`\partial h^t/\partial W` is the
D-RTRL seed :math:`D^t_f\, x^t`. So:

* :class:`OSTLRecurrent` ("with H", the unit's temporal Jacobian kept) *is*
  D-RTRL: the same rule (:func:`etp_algorithms.extend.d_rtrl`'s functions),
  the same traces and gradients, to the last bit. The term the paper calls
  :math:`H` for a recurrent layer, the path :math:`h^{t-1} \to y^t \to h^t`
  through the recurrent weight matrix, is dropped by D-RTRL's diagonal
  :math:`D^t`, as in the paper's efficient variant: exact for leaky
  integrators driven by an ETP op (equal to BPTT), approximate with recurrent
  weights.
* :class:`OSTLFeedforward` ("without H") keeps only the temporal trace of a
  unit's input and output factors, as ES-D-RTRL does, with decay :math:`a`
  (default :math:`10^{-6}`):

  .. math::

      \epsilon_x^t = a\,\epsilon_x^{t-1} + x^t, \qquad
      \epsilon_{f,s}^t = a \sum_{s'} D^t_{ss'}\,\epsilon_{f,s'}^{t-1} + (1-a)\,D^t_{f,s}, \qquad
      \frac{\partial L^t}{\partial W} \approx \frac{1}{1 - a^{k+1}}
          \sum_s \mathrm{xy\_to\_dw}\big(\epsilon_x^t,\, g^t_s \odot \epsilon^t_{f,s}\big).

  It is :class:`~etp_algorithms.ES_D_RTRL` with that decay, identically
  (the same functions, :func:`etp_algorithms.extend.es_d_rtrl`); with the
  default decay the traces forget within a step and the gradient is the
  spatial (instantaneous) gradient :math:`\mathrm{xy\_to\_dw}(x^t, g^t D^t_f)`
  up to :math:`O(a)`, exact at :math:`T = 1` and for any :math:`T` when the
  hidden states do not depend on their past (:math:`D^t = 0`).

Memory per relation: OSTLRecurrent :math:`O(B\cdot\theta)` (a trace of the
weight's shape per sample, as D-RTRL), OSTLFeedforward :math:`O(B\cdot(I+O))`.
Compute per step: one propagation and one contraction of those traces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etp_compiler import ControlFlowPolicy

from ._d_rtrl import d_rtrl
from ._es_d_rtrl import _decay_from, es_d_rtrl
from ._learner import ETraceAlgorithm
from ._peer_keywords import DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS, PeerKeywords
from ._rule import LearningRule

__all__ = ["OSTLFeedforward", "OSTLRecurrent", "ostl_feedforward", "ostl_recurrent"]

#: OSTLFeedforward's default decay (the peer's): the trace forgets within a step.
DEFAULT_DECAY = 1e-6


def ostl_recurrent() -> LearningRule:
    """OSTL with the unit's temporal Jacobian kept: D-RTRL's rule under the name ``'OSTLRecurrent'``."""
    return dataclasses.replace(d_rtrl(), name="OSTLRecurrent")


def _checked_decay(decay_or_rank: Any) -> float:
    try:
        return _decay_from(decay_or_rank)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("ES_D_RTRL", "OSTLFeedforward", 1)) from None


def ostl_feedforward(decay_or_rank: Any = DEFAULT_DECAY) -> LearningRule:
    r"""OSTL without the recurrent term: ES-D-RTRL's rule with decay :math:`a` (or rank :math:`r`)."""
    return dataclasses.replace(es_d_rtrl(_checked_decay(decay_or_rank)), name="OSTLFeedforward")


class OSTLRecurrent(ETraceAlgorithm):
    r"""OSTL with the temporal Jacobian kept ("with H"): the D-RTRL trace under OSTL's name.

    .. math::

        e^t_s = \sum_{s'} D^t_{ss'}\, e^{t-1}_{s'} + D^t_{f,s}\, x^t, \qquad
        \frac{\partial L^t}{\partial W} = \sum_s g^t_s\, e^t_s,

    the spatial learning signal :math:`g^t = \partial L^t/\partial h^t` times the
    temporal trace. The rule is :func:`etp_algorithms.extend.d_rtrl` (renamed), so
    every gradient equals :class:`~etp_algorithms.D_RTRL`'s exactly: equal to BPTT
    for leaky integrators driven by an ETP op, approximate when hidden states reach
    each other through a weight (the recurrent-matrix path is dropped).
    Memory :math:`O(B\cdot\theta)` per relation; compute per step one propagation
    and one contraction of the traces.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
        ``'multi-step'``: windows of steps (:class:`MultiStepData`), exact inside.
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements
        braintrace 0.2.8's engine keywords (:mod:`etp_algorithms._peer_keywords`): ``trace_dtype`` is the
        traces' storage dtype, ``config`` must describe this learner, the others are checked and kept.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import OSTLRecurrent
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = OSTLRecurrent(cell)
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner.rule.name, learner.get_etrace_of(cell.W.weight)[0]["weight"].shape
    ('OSTLRecurrent', (7, 4, 1))
    """

    #: Runs on a step with a lax.scan kept as a loop (one relation per sub-step: reads only x, D_f, D).

    #: A config describing D-RTRL describes this learner too (the same rule).
    same_rule_as = ("D_RTRL",)

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        trace_dtype: Any = None,
        chunked_trace: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        config: Any = None,
        random_feedback_key: Any = None,
        snap_max_jacobian_elements: int = DEFAULT_SNAP_MAX_JACOBIAN_ELEMENTS,
    ) -> None:
        keywords = (fast_solve, trace_dtype, chunked_trace, config, random_feedback_key, snap_max_jacobian_elements)
        peer = PeerKeywords(type(self).__name__, *keywords)
        super().__init__(
            model, ostl_recurrent(), name=name, vjp_method=vjp_method, control_flow=control_flow, peer_keywords=peer
        )


class OSTLFeedforward(ETraceAlgorithm):
    r"""OSTL without the recurrent term ("without H"): ES-D-RTRL's factorised trace with a decay.

    .. math::

        \epsilon_x^t = a\,\epsilon_x^{t-1} + x^t, \quad
        \epsilon_{f,s}^t = a \sum_{s'} D^t_{ss'}\epsilon_{f,s'}^{t-1} + (1-a) D^t_{f,s}, \quad
        \frac{\partial L^t}{\partial W} \approx \frac{\sum_s \mathrm{xy\_to\_dw}(\epsilon_x^t,
            g^t_s \odot \epsilon^t_{f,s})}{1 - a^{k+1}}.

    Identical to :class:`~etp_algorithms.ES_D_RTRL` with the same decay (the same
    rule, renamed). With the default :math:`a = 10^{-6}` the gradient is the spatial
    one, :math:`\mathrm{xy\_to\_dw}(x^t, g^t D^t_f)`, up to :math:`O(a)`: exact at
    :math:`T = 1` or when the hidden states have no memory, an approximation that
    ignores the past otherwise. Memory :math:`O(B\cdot(I + O))` per relation.

    Parameters
    ----------
    model : brainstate.nn.Module
        With states initialised.
    decay_or_rank : float or int
        Decay :math:`a \in (0, 1)` (default ``1e-6``), or a rank :math:`r > 0`
        meaning :math:`a = (r-1)/(r+1)`.
    name : str, optional
    vjp_method : {'single-step', 'multi-step'}
    control_flow : etp_compiler.ControlFlowPolicy, optional
        What the compiler does with ``cond`` / ``scan`` / ``while`` in the model's step (see
        :class:`~etp_algorithms.ETraceAlgorithm`).
    fast_solve : bool
        braintrace 0.2.8's engine switch; checked and kept.
    config : ETraceConfig, optional
        Must describe this learner with this decay.
    random_feedback_key
        braintrace 0.2.8's keyword, checked and kept; it changes nothing for this learner.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, etp_nn
    >>> from etp_algorithms import OSTLFeedforward
    >>> cell = etp_nn.VanillaRNNCell(3, 4)
    >>> _ = brainstate.nn.init_all_states(cell)
    >>> learner = OSTLFeedforward(cell)
    >>> learner.decay
    1e-06
    >>> _ = learner.compile_graph(jnp.zeros(3))
    >>> learner.get_etrace_of(cell.W.weight).x.shape
    (7,)
    """

    #: Runs on a step with a lax.scan kept as a loop (one relation per sub-step: reads only x, D_f, D).

    #: A config describing ES-D-RTRL describes this learner too (the same rule).
    same_rule_as = ("ES_D_RTRL",)

    def __init__(
        self,
        model: Any,
        decay_or_rank: Any = DEFAULT_DECAY,
        name: str | None = None,
        vjp_method: str = "single-step",
        *,
        fast_solve: bool = True,
        control_flow: ControlFlowPolicy | None = None,
        config: Any = None,
        random_feedback_key: Any = None,
    ) -> None:
        decay = _checked_decay(decay_or_rank)
        peer = PeerKeywords(
            type(self).__name__,
            fast_solve,
            config=config,
            random_feedback_key=random_feedback_key,
            own_options={"decay_or_rank": decay},
        )
        super().__init__(
            model,
            ostl_feedforward(decay),
            name=name,
            vjp_method=vjp_method,
            control_flow=control_flow,
            peer_keywords=peer,
        )
        self.decay = decay
