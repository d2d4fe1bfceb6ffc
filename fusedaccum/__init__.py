"""fusedaccum: cheap, exact gradient accumulation for PyTorch.

    opt = fa.AdamW(model.parameters(), lr=1e-3)
    acc = fa.GradAccumulator(opt, accumulation_steps=4, max_grad_norm=1.0)
    for x, y in loader:
        acc.backward(criterion(model(x), y))
        if acc.step():
            scheduler.step()
"""
from fusedaccum import ops  # noqa: F401  (registers the fusedaccum:: ops)
from fusedaccum.accumulator import GradAccumulator
from fusedaccum.dispatch import backends, set_backend
from fusedaccum.modules import Embedding, Linear, fuse_modules
from fusedaccum.optim import SGD, Adam, AdamW, Lion

__version__ = "0.1.0"
__all__ = [
    "SGD", "Adam", "AdamW", "Lion", "GradAccumulator", "backends", "set_backend", "Linear", "Embedding", "fuse_modules",
]
