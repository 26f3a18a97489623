"""``braintrace._etrace_compiler``: the compiler stages (re-exported from etp_compiler)."""

from etp_compiler import *  # noqa: F403
from etp_compiler import __all__ as __all__
