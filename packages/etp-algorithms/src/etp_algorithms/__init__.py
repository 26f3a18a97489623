"""etp_algorithms: online learning by eligibility trace propagation.

- :class:`ETraceGraphExecutor`: one step with the trace quantities (D, D_f, x).
- :class:`ETraceAlgorithm`: the learner frame (custom_vjp gradients, traces as states).
- :class:`ParamDimVjpAlgorithm` / :data:`D_RTRL`: parameter-dimension traces.
- :class:`IODimVjpAlgorithm` / :data:`ES_D_RTRL` / :data:`pp_prop`: input/output-dimension traces.
"""

from ._base import EligibilityTrace, ETraceAlgorithm
from ._d_rtrl import D_RTRL, ParamDimVjpAlgorithm
from ._es_d_rtrl import ES_D_RTRL, IODimVjpAlgorithm, pp_prop
from ._executor import ETraceGraphExecutor, StepValues
from ._inputs import MultiStepData, SingleStepData

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ETraceGraphExecutor",
    "StepValues",
    "ETraceAlgorithm",
    "EligibilityTrace",
    "ParamDimVjpAlgorithm",
    "D_RTRL",
    "IODimVjpAlgorithm",
    "ES_D_RTRL",
    "pp_prop",
    "SingleStepData",
    "MultiStepData",
]
