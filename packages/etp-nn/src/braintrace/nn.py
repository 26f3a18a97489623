"""``braintrace.nn``: the layer zoo of :mod:`etp_nn` (a re-export)."""

from etp_nn import *  # noqa: F403
from etp_nn import __all__ as __all__
