r"""Surrogate spike functions: a Heaviside step forward, a smooth pseudo-derivative backward.

Every function here computes, for a dimensionless input :math:`x` (a
membrane potential already normalised by the caller, e.g.
:math:`(V - V_{th}) / (V_{th} - V_{reset})`),

.. math::

    s = H(x) = \begin{cases} 1 & x > 0 \\ 0 & x \le 0 \end{cases}

and differentiates as if :math:`H` were a smooth step :math:`g`, i.e. the
tangent is :math:`\dot s = g'(x)\,\dot x`. The functions are written with
:func:`jax.custom_jvp`, so ``jax.grad``, ``jax.jvp``, ``jax.jacfwd`` and
``jax.jacrev`` all see :math:`g'`, and ``jit``/``vmap`` work unchanged. The
shape parameters (``alpha``, ``width``, ``sigma``) get no gradient.

For layer arguments (``spk_fun=``) use the frozen classes
(:class:`SigmoidSurrogate`, ...): they are hashable, compare by value and
carry their shape parameter; :meth:`Surrogate.grad` evaluates :math:`g'`.
"""

from ._surrogate import (
    ArctanSurrogate,
    GaussianSurrogate,
    PiecewiseLinearSurrogate,
    SigmoidSurrogate,
    Surrogate,
    arctan,
    gaussian,
    piecewise_linear,
    sigmoid,
)

__all__ = [
    "sigmoid",
    "piecewise_linear",
    "arctan",
    "gaussian",
    "Surrogate",
    "SigmoidSurrogate",
    "PiecewiseLinearSurrogate",
    "ArctanSurrogate",
    "GaussianSurrogate",
]
