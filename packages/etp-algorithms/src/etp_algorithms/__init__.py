"""etp_algorithms: online learning by eligibility trace propagation.

- :class:`ETraceGraphExecutor`: one step with the trace quantities (D, D_f, x).
- :class:`ETraceAlgorithm`: an online learner (a model, a learning rule, the traces as a state).
- :class:`D_RTRL` (``ParamDimVjpAlgorithm``): parameter-dimension traces.
- :class:`ES_D_RTRL` (``IODimVjpAlgorithm``, ``pp_prop``): input/output-dimension traces.
- :mod:`etp_algorithms.extend`: the learning-rule record and what rule authors build on.
- :func:`jit_in_place`: a jitted step that updates the states it writes (traces) in place.
- :func:`compile`: initialise a model's states, build a learner (by class or name) and compile its graph;
  :func:`register_learner` adds a name. :class:`ETraceVmap`: a per-sample learner run over a batch.
- :class:`CompilationReport` (from :mod:`etp_compiler`): what the compiler found (``learner.report``).
"""

# Before anything imports JAX-dependent code: a clear error for an unsupported JAX/brainstate.
from etp_primitives.versions import check_installed as _check_installed

_check_installed("etp-algorithms", ("jax", "brainstate", "numpy"))

from importlib.metadata import version as _distribution_version

from etp_compiler import CompilationReport

from . import extend
from ._checkpoint import CheckpointMismatchError, checkpoint_steps, restore_checkpoint, save_checkpoint
from ._checks import NonFiniteError
from ._compile import compile, register_learner, registered_learners
from ._config import ETraceConfig, learner_from_config
from ._d_rtrl import D_RTRL, ParamDimVjpAlgorithm
from ._dni import DNI, train_synthetic_gradient
from ._driver import SequenceDriverMixin
from ._eprop import EProp
from ._es_d_rtrl import ES_D_RTRL, IODimVjpAlgorithm, pp_prop
from ._executor import ETraceGraphExecutor, StepValues
from ._feedback import FixedRandomFeedback, KappaFilter
from ._grad_expon import GradExpon
from ._inputs import MultiStepData, SingleStepData
from ._jit_in_place import jit_in_place
from ._kf_rtrl import KF_RTRL
from ._learner import EligibilityTrace, ETraceAlgorithm, NoEligibilityTraceWarning
from ._ostl import OSTLFeedforward, OSTLRecurrent
from ._ottt import OTTT
from ._rflo import RFLO
from ._rtrl import RTRL
from ._rule import LearningRule
from ._sharding import BatchSharding, shard, shard_batch, trace_bytes_per_device
from ._snap import SnAp
from ._step import HiddenStateGradientWarning
from ._synthetic_gradient import SyntheticGradient
from ._three_factor import ThreeFactor
from ._uoro import UORO
from ._vmap import ETraceVmap

__version__ = _distribution_version("etp-algorithms")  # one source: the distribution's pyproject
#: ``__version__`` as a tuple of its leading integer parts, e.g. ``(0, 4, 0)`` (braintrace 0.2.8's name).
__version_info__ = tuple(int(part) for part in __version__.split(".")[:3] if part.isdigit())

#: braintrace 0.2.8's names of the learner base class, the executor and the random-projection learner.
ETraceVjpAlgorithm = ETraceAlgorithm
ETraceVjpGraphExecutor = ETraceGraphExecutor
RandomProjectionVjpAlgorithm = UORO

__all__ = [
    "__version__",
    "__version_info__",
    "ETraceGraphExecutor",
    "StepValues",
    "ETraceAlgorithm",
    "ETraceVjpAlgorithm",
    "ETraceVjpGraphExecutor",
    "RandomProjectionVjpAlgorithm",
    "SequenceDriverMixin",
    "LearningRule",
    "extend",
    "EligibilityTrace",
    "ParamDimVjpAlgorithm",
    "D_RTRL",
    "IODimVjpAlgorithm",
    "ES_D_RTRL",
    "pp_prop",
    "SingleStepData",
    "MultiStepData",
    "jit_in_place",
    "compile",
    "register_learner",
    "registered_learners",
    "ETraceVmap",
    "CompilationReport",
    "NoEligibilityTraceWarning",
    "HiddenStateGradientWarning",
    "NonFiniteError",
    "RTRL",
    "SnAp",
    "RFLO",
    "UORO",
    "KF_RTRL",
    "OSTLRecurrent",
    "OSTLFeedforward",
    "ThreeFactor",
    "EProp",
    "OTTT",
    "DNI",
    "SyntheticGradient",
    "train_synthetic_gradient",
    "ETraceConfig",
    "learner_from_config",
    "FixedRandomFeedback",
    "KappaFilter",
    "GradExpon",
    "shard",
    "shard_batch",
    "trace_bytes_per_device",
    "BatchSharding",
    "save_checkpoint",
    "restore_checkpoint",
    "checkpoint_steps",
    "CheckpointMismatchError",
]
