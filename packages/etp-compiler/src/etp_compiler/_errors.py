"""The compiler's exception types."""

from __future__ import annotations

__all__ = ["CompilationError", "NotSupportedError"]


class CompilationError(ValueError):
    """A model whose structure the ETP compiler cannot turn into an ETraceGraph.

    The message names the state or weight path and the construct at fault.
    Subclasses ``ValueError`` so callers that catch bad arguments catch it too.
    """


class NotSupportedError(NotImplementedError):
    """A construct or mode that the compiler or a learner does not support (yet).

    Raised, for example, when a learning rule without a window-start
    contraction is asked to run multi-step windows. The message names the
    learner or rule and what to use instead. Subclasses ``NotImplementedError``;
    the name follows braintrace's ``NotSupportedError``.

    Examples
    --------
    >>> from etp_compiler import NotSupportedError
    >>> try:
    ...     raise NotSupportedError("D_RTRL: the rule 'd-rtrl' cannot run multi-step windows")
    ... except NotImplementedError as error:
    ...     print(type(error).__name__, error)
    NotSupportedError D_RTRL: the rule 'd-rtrl' cannot run multi-step windows
    """
