r"""etp_primitives.extend: what rule and primitive authors need, in one place (like :mod:`jax.extend`).

Users of the built-in operations need only the top level of
:mod:`etp_primitives` (``matmul``, ``conv``, ...). Whoever writes a new
primitive or a learning rule reads the primitive table through this module:

* **records**: :func:`get_primitive_record` (the one :class:`ETPPrimitiveSpec`
  of any registered primitive) and :func:`get_primitive_spec` (the spec it
  was registered from, ``None`` for class-style registration);
* **registries**: ``ETP_PRIMITIVES``, ``BATCHED_PRIMITIVES``,
  ``GRADIENT_ENABLED_PRIMITIVES`` (read-only set views) and
  ``ETP_RULES_YW_TO_W``, ``ETP_RULES_XY_TO_DW``, ``ETP_RULES_INIT_DRTRL``,
  ``ETP_RULES_INIT_PP``, ``ETP_RULES_DRTRL_SEED``, ``ETP_RULES_DRTRL_GRAD``,
  ``ETP_TRAINABLE_INVARS_FNS``, ``ETP_X_INVAR_INDICES``,
  ``ETP_Y_OUTVAR_INDICES``, ``ETP_PRIMITIVE_SPECS`` (read-only mapping views),
  all live views of the same records;
* **predicates**: :func:`is_etp_primitive`, :func:`is_batched_primitive`,
  :func:`is_gradient_enabled_primitive`;
* **rule helpers**: :func:`require_rules`, :func:`trainable_invars`,
  :func:`drtrl_seed`, :func:`drtrl_grad`, :func:`pairwise_sum`,
  :func:`sum_leading_axes`, :func:`aval_of`, :func:`init_pp_like_output`,
  :func:`derive_xy_to_dw`, :data:`RULE_NAMES`, :data:`RULE_ALIASES`;
* **checks**: :func:`check_rules` evaluates a primitive's rules abstractly on one
  equation's shapes (the compiler runs it on every relation) and raises
  :class:`ETPRuleError` naming the rule that breaks the contract;
* **registration** (also at the top level): :func:`register_primitive`,
  :func:`register_primitive_spec`, :func:`unregister_primitive`,
  :func:`set_batching_rule`, :class:`ETPPrimitive`, :class:`ETPPrimitiveSpec`.

Every name here stays importable from :mod:`etp_primitives` itself, as the
seed documents use it.

**The rule signatures.** ``params`` are the static parameters of the equation (``has_bias``, ...),
passed as keyword arguments; ``weights`` is a dict ``{trainable_key: array}``
and a trace is a dict with one leaf per trainable key.

=============================================================  ==========================================
rule                                                           returns
=============================================================  ==========================================
``yw_to_w(hidden_dim, trace, **params)`` (0.2.8: ``dt_to_t``)  the trace times a :math:`y`-space factor
``xy_to_dw(x, hidden_dim, weights, **params)``                 ``{key: dL/dW_key}``, the VJP at ``hidden_dim``
``init_drtrl(x_var, y_var, weight_vars, num_hidden_state)``    ``{key: zeros}`` with a trailing state axis
``init_pp(x_var, y_var, weight_vars, num_hidden_state)``       zeros ``(*y.shape, num_hidden_state)``
``drtrl_seed(x, hidden_dim, weights, **params)`` (optional)    a one-state trace
``drtrl_grad(x, cotangent, trace, weights, **params)`` (opt.)  ``{key: dL/dW_key}``
``trainable_invars_fn(params)``                                ``{trainable_key: invar_index}``
=============================================================  ==========================================

``x_var``, ``y_var`` and ``weight_vars`` are jaxpr variables (read their
shapes with :func:`aval_of`); ``x`` is ``None`` for input-free primitives
(``x_invar_index=None``).

**The rule contract.** Notation for one ETP operation :math:`y = \mathrm{op}(x, W)` feeding hidden
states :math:`h` of one group with :math:`S` states per position:

* :math:`D^t` — per position, the :math:`S\times S` block of
  :math:`\partial h^t/\partial h^{t-1}` with every ETP output held fixed;
* :math:`D_f^t = \partial h^t / \partial y^t` — per position and state;
* :math:`g^t = \partial L^t / \partial h^t` — the cotangent of a step.

**Shapes.** ``hidden_dim`` and ``cotangent`` always have the shape of ``y``
(one hidden state :math:`s` at a time). A D-RTRL trace is a dict with one
leaf per trainable key; ``init_drtrl`` returns the leaves with a trailing
``num_hidden_state`` axis and every other rule sees one state's slice (the
trailing axis removed). The algorithms map the rules over that axis.

**D-RTRL** (parameter-dimension traces). For each trainable key

.. math::

    \epsilon^t_s = \sum_{s'} \mathrm{yw\_to\_w}(D^t_{s s'}, \epsilon^{t-1}_{s'})
                   + \mathrm{drtrl\_seed}(x^t, D^t_{f,s}, W),
    \qquad
    \frac{\partial L^t}{\partial W} \approx \sum_s \mathrm{drtrl\_grad}(x^t, g^t_s, \epsilon^t_s, W).

``yw_to_w(hidden_dim, trace)`` multiplies a trace by a factor given in
:math:`y`-space, mapped into the trace's layout through the :math:`y \to W`
link; it is linear in both arguments. The common layout stores the trace
*shaped like the weight*, with the leading batch axes of ``x`` for batched
primitives: element :math:`W_k` feeds a single output position :math:`p(k)`,
so the trace holds :math:`\partial h_{p(k)}/\partial W_k` and D-RTRL is exact
whenever :math:`D` is position-wise (a leaky integrator with a per-unit leak).
For that layout the two optional rules default to

.. math::

    \mathrm{drtrl\_seed}(x, d, W) = \text{per-sample } \mathrm{xy\_to\_dw}(x_b, d_b, W),
    \qquad
    \mathrm{drtrl\_grad}(x, g, \epsilon, W) = \sum_b \mathrm{yw\_to\_w}(g, \epsilon)_b .

Operations whose weights feed many positions (convolution kernels, the
:math:`B` factor of LoRA) store a *filtered input* instead and register their
own ``drtrl_seed`` / ``drtrl_grad``; see each built-in's docstring.

**ES-D-RTRL / pp-prop** (input/output-dimension traces):
:math:`\epsilon_x^t = a\,\epsilon_x^{t-1} + x^t`,
:math:`\epsilon_f^t = a D^t \epsilon_f^{t-1} + (1-a) D_f^t` (shape of ``y`` with
a trailing state axis, from ``init_pp``), and the step gradient is
``xy_to_dw(eps_x, sum_s g_s * eps_f_s, W)``: ``xy_to_dw(x, hidden_dim, W)``
is exactly the VJP of the op with respect to every trainable input at
cotangent ``hidden_dim``.

Examples
--------
>>> import jax.numpy as jnp
>>> import etp_primitives as etp
>>> from etp_primitives import extend
>>> extend.is_batched_primitive(etp.etp_mm_p), extend.get_primitive_record(etp.etp_mm_p).name
(True, 'etp_mm')
>>> rules = extend.require_rules(etp.etp_mv_p, "dt_to_t", "xy_to_dw")
>>> rules["dt_to_t"] is extend.ETP_RULES_YW_TO_W[etp.etp_mv_p]
True
>>> x, w, d = jnp.array([1.0, 2.0]), jnp.ones((2, 3)), jnp.array([1.0, 0.0, -1.0])
>>> print(rules["xy_to_dw"](x, d, {"weight": w}, has_bias=False)["weight"].tolist())
[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]]
"""

from __future__ import annotations

from ._primitive import (
    ETPPrimitive,
    default_trainable_invars,
    get_primitive_spec,
    register_primitive,
    register_primitive_spec,
    set_batching_rule,
    unregister_primitive,
)
from ._registry import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
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
    RegistryMapping,
    RegistrySet,
    get_primitive_record,
    is_batched_primitive,
    is_etp_primitive,
    is_gradient_enabled_primitive,
)
from ._rule_check import ETPRuleError, check_rules
from ._spec import RULE_ALIASES, ETPPrimitiveSpec
from ._trace import (
    OPTIONAL_RULE_NAMES,
    RULE_NAMES,
    aval_of,
    derive_xy_to_dw,
    drtrl_grad,
    drtrl_seed,
    init_pp_like_output,
    pairwise_sum,
    require_rules,
    sum_leading_axes,
    trainable_invars,
)

__all__ = [
    # records
    "ETPPrimitiveSpec",
    "get_primitive_record",
    "get_primitive_spec",
    # registries (read-only views of the records)
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
    # predicates
    "is_etp_primitive",
    "is_batched_primitive",
    "is_gradient_enabled_primitive",
    # rule helpers
    "RULE_NAMES",
    "OPTIONAL_RULE_NAMES",
    "RULE_ALIASES",
    "require_rules",
    "trainable_invars",
    "drtrl_seed",
    "drtrl_grad",
    "sum_leading_axes",
    "pairwise_sum",
    "aval_of",
    "init_pp_like_output",
    "derive_xy_to_dw",
    # checking a primitive's rules on an equation's shapes
    "check_rules",
    "ETPRuleError",
    # registration
    "ETPPrimitive",
    "register_primitive",
    "register_primitive_spec",
    "unregister_primitive",
    "set_batching_rule",
    "default_trainable_invars",
]
