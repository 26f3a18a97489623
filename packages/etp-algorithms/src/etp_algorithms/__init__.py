"""etp_algorithms: online learning by eligibility trace propagation (D-RTRL, ES-D-RTRL).

Currently provides the graph executor; the learners are being built.
"""

from ._executor import ETraceGraphExecutor, StepValues

__version__ = "0.1.0"

__all__ = ["__version__", "ETraceGraphExecutor", "StepValues"]
