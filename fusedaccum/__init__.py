"""fusedaccum: cheap, exact gradient accumulation for PyTorch."""
from fusedaccum import ops  # noqa: F401  (registers the fusedaccum:: ops)
from fusedaccum.backends import backends, set_backend

__version__ = "0.1.0"
__all__ = ["backends", "set_backend"]
