"""``braintrace.nn``: the layer zoo of :mod:`etp_nn`."""

from etp_nn import *  # noqa: F403
