"""The compiler's exception type."""

from __future__ import annotations

__all__ = ["CompilationError"]


class CompilationError(ValueError):
    """A model whose structure the ETP compiler cannot turn into an ETraceGraph.

    The message names the state or weight path and the construct at fault.
    Subclasses ``ValueError`` so callers that catch bad arguments catch it too.
    """
