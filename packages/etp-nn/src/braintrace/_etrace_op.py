"""``braintrace._etrace_op``: the primitives, their registries and rule helpers (re-exported from etp_primitives)."""

from etp_primitives import *  # noqa: F403
from etp_primitives import __all__ as __all__
