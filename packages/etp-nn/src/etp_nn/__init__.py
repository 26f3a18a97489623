"""etp_nn: layers on brainstate whose trainable weights flow through ETP primitives."""

from ._conv import *  # noqa: F403
from ._linear import *  # noqa: F403
from ._neurons import *  # noqa: F403
from ._normalization import *  # noqa: F403
from ._readout import *  # noqa: F403
from ._rnn import *  # noqa: F403
from ._surrogate import *  # noqa: F403

__version__ = "0.1.0"
