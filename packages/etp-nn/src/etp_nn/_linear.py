"""Dense layers whose weights flow through the ETP dense primitives (the embedding is in :mod:`._embedding`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from brainstate.nn import init
from saiunit.sparse import COO, CSC, CSR, SparseMatrix

import etp_primitives as etp

from ._utils import check_last_dim, layer_name

__all__ = ["Linear", "SignedWLinear", "ScaledWSLinear", "SparseLinear", "LoRA"]

#: An initializer (called with the shape), or a ready array / scalar.
Initializer = Callable[..., Any] | jax.Array | np.ndarray[Any, Any] | u.Quantity | float

# Shared default initializers (module-level, so no call sits in an argument default).
KAIMING_NORMAL = init.KaimingNormal()
LECUN_NORMAL = init.LecunNormal()
STANDARD_NORMAL = init.Normal()
ZEROS = init.ZeroInit()


def _features(size: Any) -> int:
    """The number of features (last entry) of a normalised ``in_size``/``out_size`` tuple."""
    return int(tuple(size)[-1])


def _positive_int(layer: brainstate.nn.Module, value: Any, argument: str) -> int:
    """``value`` as a positive ``int``, or a ``ValueError`` naming the layer and argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{layer_name(layer)}: {argument} must be a positive int, got {value!r}.")
    return int(value)


def _init_param(layer: brainstate.nn.Module, value: Any, shape: tuple[int, ...], argument: str) -> Any:
    """A trainable array of exactly ``shape`` from an initializer, array or scalar.

    Scalars and broadcastable arrays are broadcast to ``shape``; anything
    else raises a ``ValueError`` naming the layer, the argument and the shape.
    """
    if value is None:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must be an initializer or an array of shape {shape}, got None."
        )
    try:
        out = init.param(value, shape, allow_none=False)
        out = u.math.asarray(out)
        if not isinstance(out, u.Quantity) and not jnp.issubdtype(out.dtype, jnp.inexact):
            out = out.astype(brainstate.environ.dftype())
        out = u.math.broadcast_to(out, shape)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must give an array of shape {shape}; "
            f"got {type(value).__name__} of shape {tuple(np.shape(value))} ({err})."
        ) from None
    return out


def _input_shape(layer: brainstate.nn.Module, in_size: Any, n_in: int) -> tuple[int, ...]:
    """``in_size`` as a tuple of ints whose last entry is ``n_in``, or a ``ValueError`` naming the layer."""
    shape = (in_size,) if isinstance(in_size, (int, np.integer)) else tuple(in_size)
    if (
        not shape
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in shape)
        or shape[-1] != n_in
    ):
        raise ValueError(
            f"{layer_name(layer)}: in_size must be an int or a tuple of ints ending with in_features={n_in}; "
            f"got {in_size!r}."
        )
    return tuple(int(n) for n in shape)


def _fixed_array(layer: brainstate.nn.Module, value: Any, shape: tuple[int, ...], argument: str) -> Any:
    """A fixed (non-trainable) array broadcastable to ``shape`` (masks, signs), or ``None``."""
    if value is None:
        return None
    try:
        out = init.param(value, shape, allow_none=False)
        out = u.math.asarray(out)
        u.math.broadcast_shapes(tuple(out.shape), shape)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{layer_name(layer)}: {argument} must be broadcastable to shape {shape}; "
            f"got {type(value).__name__} of shape {tuple(np.shape(value))} ({err})."
        ) from None
    return out


class Linear(brainstate.nn.Module):
    r"""Dense layer :math:`y = x (W \odot M) + b` through :func:`etp_primitives.matmul`.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    w_init : initializer or array
        Weight ``(in, out)``; default Kaiming normal.
    b_init : initializer, array or None
        Bias ``(out,)``; ``None`` for no bias. Default zeros.
    w_mask : array, initializer or None
        Fixed mask ``(in, out)`` multiplied into the weight before the op;
        the compiler traces the masked weight back to :attr:`weight`.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out), 'bias': (out,)}`` (no ``'bias'`` without ``b_init``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.Linear(3, 5)
    >>> layer(jnp.ones((4, 3))).shape
    (4, 5)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        w_init: Initializer = KAIMING_NORMAL,
        b_init: Initializer | None = ZEROS,
        w_mask: Initializer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]  # brainstate hides Module.__init__ from type checkers
        self.in_size = in_size
        self.out_size = out_size
        n_in, n_out = _features(self.in_size), _features(self.out_size)
        self.w_mask = init.param(w_mask, (n_in, n_out))
        params = {"weight": init.param(w_init, (n_in, n_out), allow_none=False)}
        if b_init is not None:
            params["bias"] = init.param(b_init, (n_out,), allow_none=False)
        self.weight = brainstate.ParamState(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, _features(self.in_size))
        params: dict[str, Any] = self.weight.value
        weight = params["weight"]
        if self.w_mask is not None:
            weight = weight * self.w_mask
        return etp.matmul(x, weight, params.get("bias"))


class SignedWLinear(brainstate.nn.Module):
    r"""Dense layer with sign-constrained weights, :math:`y = x\,(|W| \odot S) + b`.

    For excitatory/inhibitory (Dale's law) networks: the trainable
    :math:`W` only sets magnitudes, the fixed sign matrix :math:`S` sets
    which connections excite (:math:`+1`) or inhibit (:math:`-1`). The
    effective weight :math:`|W| \odot S` goes through
    :func:`etp_primitives.matmul`; the compiler traces it back through
    ``abs`` to :attr:`weight`.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    w_init : initializer or array
        Magnitude parameter :math:`W` of shape ``(in, out)``; default Kaiming normal.
    w_sign : array or None
        Fixed signs :math:`S`. ``None``: all ``+1``. A 1-D array of shape
        ``(in,)`` gives one sign per *input* (presynaptic) unit, i.e. it is
        read as ``(in, 1)``; otherwise any array broadcastable to ``(in, out)``.
        Entries are normally :math:`\pm 1` (they are multiplied in as given).
    b_init : initializer, array or None
        Bias ``(out,)``; default ``None`` (no bias).
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out)}``, plus ``'bias': (out,)`` with ``b_init``.
    w_sign : Array or None
        The fixed sign array, shaped to broadcast against ``(in, out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> sign = jnp.array([1.0, 1.0, -1.0])  # the third input unit is inhibitory
    >>> layer = etp_nn.SignedWLinear(3, 4, w_sign=sign)
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        w_init: Initializer = KAIMING_NORMAL,
        w_sign: Any = None,
        b_init: Initializer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        self.in_size = in_size
        self.out_size = out_size
        n_in, n_out = _features(self.in_size), _features(self.out_size)
        if w_sign is not None and not callable(w_sign) and np.ndim(w_sign) == 1 and np.shape(w_sign)[0] == n_in:
            w_sign = u.math.reshape(u.math.asarray(w_sign), (n_in, 1))
        self.w_sign = _fixed_array(self, w_sign, (n_in, n_out), "w_sign")
        params = {"weight": _init_param(self, w_init, (n_in, n_out), "w_init")}
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (n_out,), "b_init")
        self.weight = brainstate.ParamState(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, _features(self.in_size))
        params: dict[str, Any] = self.weight.value
        weight = u.math.abs(params["weight"])
        if self.w_sign is not None:
            weight = weight * self.w_sign
        return etp.matmul(x, weight, params.get("bias"))


class ScaledWSLinear(brainstate.nn.Module):
    r"""Dense layer with scaled weight standardisation, :math:`y = x\,(\hat W \odot M) + b`.

    With :math:`W \in \mathbb{R}^{I \times O}` and statistics over the input
    axis (one mean and variance per output unit :math:`o`):

    .. math::

        \mu_o = \frac{1}{I}\sum_i W_{io}, \qquad
        \sigma_o^2 = \frac{1}{I}\sum_i (W_{io} - \mu_o)^2, \qquad
        \hat W_{io} = g_o\, \frac{W_{io} - \mu_o}{\sqrt{I\,\sigma_o^2 + \epsilon}},

    so each column of :math:`\hat W` has zero mean and squared norm
    :math:`\approx g_o^2` (fan-in scaling, as in normaliser-free networks).
    The optional fixed mask :math:`M` is applied *after* standardisation
    (masked entries are exactly zero, the statistics use the full
    :math:`W`). :math:`\hat W \odot M` goes through
    :func:`etp_primitives.matmul`; the compiler traces it back through the
    standardisation to ``weight`` and ``gain``.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Feature sizes; the last entry is the number of features.
    w_init : initializer or array
        :math:`W` of shape ``(in, out)``; default Kaiming normal.
    b_init : initializer, array or None
        Bias ``(out,)``; ``None`` for no bias. Default zeros.
    w_mask : array, initializer or None
        Fixed mask broadcastable to ``(in, out)``.
    ws_gain : bool
        Learn the gain :math:`g` (``(out,)``, initialised to ones). If
        ``False``, :math:`g = 1` and there is no ``'gain'`` entry.
    eps : float
        :math:`\epsilon` inside the square root.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (in, out), 'bias': (out,), 'gain': (out,)}`` (``'bias'``
        only with ``b_init``, ``'gain'`` only with ``ws_gain``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.ScaledWSLinear(3, 5)
    >>> layer(jnp.ones((4, 3))).shape
    (4, 5)
    """

    def __init__(
        self,
        in_size: int | tuple[int, ...],
        out_size: int | tuple[int, ...],
        w_init: Initializer = KAIMING_NORMAL,
        b_init: Initializer | None = ZEROS,
        w_mask: Initializer | None = None,
        ws_gain: bool = True,
        eps: float = 1e-4,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        self.in_size = in_size
        self.out_size = out_size
        n_in, n_out = _features(self.in_size), _features(self.out_size)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"{layer_name(self)}: eps must be a non-negative float, got {eps!r}.")
        self.eps = float(eps)
        self.w_mask = _fixed_array(self, w_mask, (n_in, n_out), "w_mask")
        params = {"weight": _init_param(self, w_init, (n_in, n_out), "w_init")}
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (n_out,), "b_init")
        if ws_gain:
            params["gain"] = jnp.ones((n_out,), dtype=params["weight"].dtype)
        self.weight = brainstate.ParamState(params)

    def standardized_weight(self) -> Any:
        r"""The effective weight :math:`\hat W \odot M` of shape ``(in, out)``."""
        params: dict[str, Any] = self.weight.value
        w = params["weight"]
        fan_in = w.shape[0]
        mean = jnp.mean(w, axis=0, keepdims=True)
        var = jnp.var(w, axis=0, keepdims=True)
        w_hat = (w - mean) / jnp.sqrt(var * fan_in + self.eps)
        if "gain" in params:
            w_hat = w_hat * jnp.reshape(params["gain"], (1, -1))
        if self.w_mask is not None:
            w_hat = w_hat * self.w_mask
        return w_hat

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, _features(self.in_size))
        params: dict[str, Any] = self.weight.value
        return etp.matmul(x, self.standardized_weight(), params.get("bias"))


class SparseLinear(brainstate.nn.Module):
    r"""Sparse linear layer :math:`y = x\, \mathrm{sparse}(w) + b` through :func:`etp_primitives.sparse_matmul`.

    Only the stored values :math:`w \in \mathbb{R}^{\mathrm{nse}}` of the
    :math:`I \times O` matrix are trainable; the sparsity pattern is fixed:

    .. math::

        y_{\ldots o} = \sum_{k:\, \mathrm{col}_k = o} x_{\ldots\, \mathrm{row}_k}\, w_k \;(+ b_o).

    Parameters
    ----------
    spar_mat : saiunit.sparse.CSR, CSC or COO
        The ``(in, out)`` matrix; its pattern is kept, its values
        (``spar_mat.data``, in storage order) initialise :attr:`weight`.
        The pattern must be concrete (build the matrix outside ``jit``).
    b_init : initializer, array or None
        Bias ``(out,)``; default ``None`` (no bias).
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (nse,)}``, plus ``'bias': (out,)`` with ``b_init``.
    structure : etp_primitives.SparseStructure
        The static pattern (shape, row and column of each stored value).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import saiunit.sparse as ss
    >>> import etp_nn
    >>> layer = etp_nn.SparseLinear(ss.CSR.fromdense(jnp.eye(3)))
    >>> layer(jnp.ones((2, 3))).shape
    (2, 3)
    """

    def __init__(self, spar_mat: Any, b_init: Initializer | None = None, name: str | None = None) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        if not isinstance(spar_mat, (CSR, CSC, COO)):
            kind = "a SparseMatrix of another format" if isinstance(spar_mat, SparseMatrix) else type(spar_mat).__name__
            raise TypeError(
                f"{layer_name(self)}: spar_mat must be a saiunit.sparse.CSR, CSC or COO matrix of shape (in, out), "
                f"got {kind}" + (f" of shape {tuple(np.shape(spar_mat))}" if hasattr(spar_mat, "shape") else "") + "."
            )
        if len(spar_mat.shape) != 2:
            raise ValueError(f"{layer_name(self)}: spar_mat must be 2-D (in, out), got shape {tuple(spar_mat.shape)}.")
        self.structure = etp.SparseStructure.from_sparse(spar_mat, layer_name(self))
        self.in_size = int(spar_mat.shape[0])
        self.out_size = int(spar_mat.shape[1])
        data = u.math.asarray(spar_mat.data)
        if tuple(data.shape) != (self.structure.nse,):
            raise ValueError(
                f"{layer_name(self)}: spar_mat.data must have shape ({self.structure.nse},) (one value per stored "
                f"element), got {tuple(data.shape)}."
            )
        params = {"weight": data}
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (_features(self.out_size),), "b_init")
        self.weight = brainstate.ParamState(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, _features(self.in_size))
        params: dict[str, Any] = self.weight.value
        return etp.sparse_matmul(x, params["weight"], sparse_mat=self.structure, bias=params.get("bias"))


class LoRA(brainstate.nn.Module):
    r"""Low-rank adapter :math:`y = \alpha\, x B A + b\; (+\, f(x))` through :func:`etp_primitives.lora_matmul`.

    With :math:`B \in \mathbb{R}^{I \times R}` (``lora_b``),
    :math:`A \in \mathbb{R}^{R \times O}` (``lora_a``) and an optional
    frozen or trainable ``base_module`` :math:`f` whose output is added
    (its own weights go through its own ETP primitives). With the default
    initialisation (:math:`A = 0`) the adapter starts as a no-op.

    Parameters
    ----------
    in_features, lora_rank, out_features : int
        :math:`I`, :math:`R` and :math:`O`.
    alpha : float
        Static scale :math:`\alpha` (a Python number).
    base_module : callable or None
        Module mapping ``(..., I)`` to ``(..., O)``, e.g. a :class:`Linear`.
    B_init : initializer, array or None
        :math:`B` ``(I, R)``; ``None`` (default) for LeCun normal.
    A_init : initializer, array or None
        :math:`A` ``(R, O)``; ``None`` (default) for zeros.
    b_init : initializer, array or None
        Bias ``(O,)``; default ``None`` (no bias).
    name : str, optional
    kernel_init : initializer, array or None
        braintrace 0.2.8's keyword: one initializer for **both** factors, i.e.
        ``B_init=kernel_init, A_init=kernel_init`` (so the adapter does not
        start as a no-op unless it gives zeros). Giving it together with
        ``B_init`` or ``A_init`` raises ``TypeError``.
    param_type : type
        The :class:`brainstate.ParamState` subclass that holds the weights
        (braintrace 0.2.8's keyword). Default :class:`brainstate.ParamState`.
    in_size : int, tuple of int or None
        braintrace 0.2.8's keyword: the full input shape (its last entry
        must be ``in_features``), recorded as :attr:`in_size`, with
        :attr:`out_size` its leading axes followed by ``out_features``.
        Default ``None``: ``in_size = in_features``, ``out_size = out_features``.

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'lora_b': (I, R), 'lora_a': (R, O)}``, plus ``'bias': (O,)`` with ``b_init``.

    Notes
    -----
    braintrace 0.2.8's ``LoRA`` names its factors the other way round
    (``lora_a`` is its ``(I, R)`` input-facing factor) and fixes the scale to
    :math:`1/R`; here the scale is ``alpha`` (default 1): pass
    ``alpha=1 / lora_rank`` for its outputs.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import etp_nn
    >>> layer = etp_nn.LoRA(8, 2, 4, base_module=etp_nn.Linear(8, 4))
    >>> layer(jnp.ones((3, 8))).shape
    (3, 4)

    braintrace 0.2.8's keywords: one initializer for both factors.

    >>> from brainstate.nn import init
    >>> layer = etp_nn.LoRA(8, 2, 4, kernel_init=init.Constant(0.5))
    >>> float(layer(jnp.ones(8))[0])
    4.0
    """

    def __init__(
        self,
        in_features: int,
        lora_rank: int,
        out_features: int,
        *,
        alpha: float = 1.0,
        base_module: Callable[[Any], Any] | None = None,
        B_init: Initializer | None = None,
        A_init: Initializer | None = None,
        b_init: Initializer | None = None,
        name: str | None = None,
        kernel_init: Initializer | None = None,
        param_type: type[brainstate.ParamState] = brainstate.ParamState,
        in_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(name=name)  # type: ignore[call-arg]
        n_in = _positive_int(self, in_features, "in_features")
        rank = _positive_int(self, lora_rank, "lora_rank")
        n_out = _positive_int(self, out_features, "out_features")
        if kernel_init is not None and (B_init is not None or A_init is not None):
            given = " and ".join(f"{k}=" for k, v in (("B_init", B_init), ("A_init", A_init)) if v is not None)
            raise TypeError(
                f"{layer_name(self)}: got both kernel_init= (braintrace 0.2.8's one initializer for both factors) "
                f"and {given}; give kernel_init alone, or B_init/A_init."
            )
        if kernel_init is not None:
            B_init = A_init = kernel_init
        if not (isinstance(param_type, type) and issubclass(param_type, brainstate.ParamState)):
            raise TypeError(
                f"{layer_name(self)}: param_type must be brainstate.ParamState or a subclass of it; got {param_type!r}."
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
            raise TypeError(f"{layer_name(self)}: alpha must be a Python number (it is static), got {alpha!r}.")
        if base_module is not None and not callable(base_module):
            raise TypeError(
                f"{layer_name(self)}: base_module must be callable (a module mapping (..., {n_in}) to (..., {n_out})), "
                f"got {type(base_module).__name__}."
            )
        shape = (n_in,) if in_size is None else _input_shape(self, in_size, n_in)
        self.in_size = shape
        self.out_size = (*shape[:-1], n_out)
        self.in_features, self.lora_rank, self.out_features = n_in, rank, n_out
        self.alpha = float(alpha)
        self.base_module = base_module
        b_arg, a_arg = ("kernel_init", "kernel_init") if kernel_init is not None else ("B_init", "A_init")
        params = {
            "lora_b": _init_param(self, LECUN_NORMAL if B_init is None else B_init, (n_in, rank), b_arg),
            "lora_a": _init_param(self, ZEROS if A_init is None else A_init, (rank, n_out), a_arg),
        }
        if b_init is not None:
            params["bias"] = _init_param(self, b_init, (n_out,), "b_init")
        self.weight = param_type(params)

    def update(self, x: Any) -> Any:
        check_last_dim(self, x, self.in_features)
        params: dict[str, Any] = self.weight.value
        y = etp.lora_matmul(x, params["lora_b"], params["lora_a"], alpha=self.alpha, bias=params.get("bias"))
        if self.base_module is not None:
            y = y + self.base_module(x)
        return y
