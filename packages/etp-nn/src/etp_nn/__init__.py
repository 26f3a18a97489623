"""etp_nn: layers on brainstate whose trainable weights flow through ETP primitives.

Every trainable weight of these layers passes through an ETP primitive of
:mod:`etp_primitives`, so it takes part in online learning with no extra
work; recurrent and neuronal state lives in ``brainstate.HiddenState``.

- Dense: :class:`Linear`, :class:`SignedWLinear`, :class:`ScaledWSLinear`,
  :class:`SparseLinear`, :class:`LoRA`, :class:`GroupedLinear`, :class:`Embedding`.
- Convolution: :class:`Conv1d`, :class:`Conv2d`, :class:`Conv3d` (channels-last).
- Recurrent cells: :class:`VanillaRNNCell` (also as :class:`ValinaRNNCell`, its historical spelling),
  :class:`GRUCell`, :class:`LSTMCell`, :class:`MGUCell`, :class:`MinimalRNNCell`,
  :class:`URLSTMCell`, :class:`MiniGRU`, :class:`MiniLSTM`, :class:`LRUCell`.
- Spiking neurons and synapses: :class:`IF`, :class:`LIF`, :class:`ALIF`, :class:`Expon`,
  with surrogate spike functions in :mod:`etp_nn.surrogate`.
- Readouts: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`.
- Normalisation: :class:`BatchNorm0d`, :class:`BatchNorm1d`, :class:`BatchNorm2d`,
  :class:`LayerNorm`, :class:`RMSNorm`.
"""

# Before anything imports JAX-dependent code: a clear error for an unsupported JAX/brainstate.
from etp_primitives.versions import check_installed as _check_installed

_check_installed("etp-nn", ("jax", "brainstate", "saiunit", "numpy"))

from importlib.metadata import version as _distribution_version

from . import surrogate
from ._conv import Conv1d, Conv2d, Conv3d
from ._embedding import Embedding
from ._gated_rnn import GRUCell, LSTMCell, MGUCell, URLSTMCell
from ._grouped import GroupedLinear
from ._linear import Linear, LoRA, ScaledWSLinear, SignedWLinear, SparseLinear
from ._lru import LRUCell
from ._minimal_rnn import MiniGRU, MiniLSTM, MinimalRNNCell
from ._neurons import ALIF, IF, LIF
from ._normalization import BatchNorm0d, BatchNorm1d, BatchNorm2d, LayerNorm, RMSNorm
from ._readout import LeakyRateReadout, LeakySpikeReadout
from ._rnn import ValinaRNNCell, VanillaRNNCell
from ._surrogate import (
    ArctanSurrogate,
    GaussianSurrogate,
    PiecewiseLinearSurrogate,
    SigmoidSurrogate,
    Surrogate,
)
from ._synapses import Expon

__version__ = _distribution_version("etp-nn")  # one source: the distribution's pyproject

__all__ = [
    "__version__",
    "surrogate",
    "Linear",
    "SignedWLinear",
    "ScaledWSLinear",
    "SparseLinear",
    "LoRA",
    "Embedding",
    "GroupedLinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "VanillaRNNCell",
    "ValinaRNNCell",
    "GRUCell",
    "LSTMCell",
    "MGUCell",
    "MinimalRNNCell",
    "URLSTMCell",
    "MiniGRU",
    "MiniLSTM",
    "LRUCell",
    "IF",
    "LIF",
    "ALIF",
    "Expon",
    "LeakyRateReadout",
    "LeakySpikeReadout",
    "BatchNorm0d",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "RMSNorm",
    "Surrogate",
    "SigmoidSurrogate",
    "PiecewiseLinearSurrogate",
    "ArctanSurrogate",
    "GaussianSurrogate",
]
