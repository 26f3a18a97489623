"""etp_nn: layers on brainstate whose weights flow through ETP primitives."""

__version__ = "0.1.0"

__all__ = ["__version__"]
