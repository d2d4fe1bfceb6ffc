"""Flat arenas: one set of flat buffers per (param group, device, dtype).

An arena owns the parameters' storage: at construction each parameter's data is copied into
one flat tensor and the parameter becomes a view of it, so the optimizer step is one pass
over a contiguous range instead of one kernel per tensor. Beside the parameters it holds the
gradient accumulation buffer (fp32 by default), the optimizer state, the fp32 master copy
when master weights are kept, and one step count per parameter.
"""
from __future__ import annotations

import torch

ALIGN = 16  # elements; every parameter view starts on a 64-byte boundary for vector loads


class Arena:
    def __init__(self, group_index: int, params: list[torch.Tensor], master_weights: bool):
        self.group_index = group_index
        self.params = params
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.offsets, self.numels = [], []
        end = 0
        for p in params:
            self.offsets.append(end)
            self.numels.append(p.numel())
            end = -(-(end + p.numel()) // ALIGN) * ALIGN
        self.numel = end
        # Padding between views is zero everywhere and never receives a gradient, so stepping
        # over a range that spans it leaves it at zero.
        self.param = torch.zeros(end, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p, view in zip(params, self.views(self.param)):
                view.copy_(p)
                p.data = view
        self.data_ptrs = [p.data_ptr() for p in params]
        self.master = None
        if master_weights and self.dtype != torch.float32:
            self.master = self.param.float()
        self.grad: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        # Parameters with equal step_class have received gradients in the same windows, so
        # their step counts are equal and one launch can serve them (known on the host
        # without reading the device-side counts).
        self.step_class = [0] * len(params)
        self.published = [False] * len(params)  # optimizer.state[p] holds views of this arena

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.float32 if self.master is not None else self.dtype

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + n].view(p.shape) for p, o, n in zip(self.params, self.offsets, self.numels)]

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i] : self.offsets[i] + self.numels[i]].view(self.params[i].shape)

    def ensure_grad(self, dtype: torch.dtype) -> torch.Tensor:
        if self.grad is None or self.grad.dtype != dtype:
            self.grad = torch.zeros(self.numel, dtype=dtype, device=self.device)
        return self.grad

    def ensure_state(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name not in self.state:
                self.state[name] = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)

    def check_params(self) -> None:
        """Raises if a parameter no longer lives in this arena (moved or replaced)."""
        for i, p in enumerate(self.params):
            if p.data_ptr() != self.data_ptrs[i]:
                raise RuntimeError(
                    f"parameter {i} of param group {self.group_index} ({tuple(p.shape)}, {p.device}) no longer "
                    f"lives in its fusedaccum arena on {self.device}: it was moved or replaced after the "
                    f"optimizer was created (model.to(...), .data = ..., load_state_dict(assign=True)). "
                    f"Create the optimizer after the model is on its device and in its final dtype."
                )

    def runs(self, touched: list[bool]) -> list[tuple[int, int]]:
        """Maximal [a, b) ranges of touched parameters that share a step count."""
        out, start = [], None
        for i, t in enumerate(touched + [False]):
            if start is not None and (not t or self.step_class[i] != self.step_class[start]):
                out.append((start, i))
                start = None
            if t and start is None:
                start = i
        return out

    def advance_step_classes(self, touched: list[bool]) -> None:
        """Touched parameters move to a new class, keyed by their old one."""
        if all(touched):
            return  # every count moves together: classes stay as they are
        renumber: dict[int, int] = {}
        top = max(self.step_class) + 1
        for i, t in enumerate(touched):
            if t:
                old = self.step_class[i]
                if old not in renumber:
                    renumber[old] = top
                    top += 1
                self.step_class[i] = renumber[old]

    def range_of(self, a: int, b: int) -> tuple[int, int]:
        return self.offsets[a], self.offsets[b - 1] + self.numels[b - 1]


def build_arenas(param_groups: list[dict], master_weights: bool, start: int = 0) -> list[Arena]:
    arenas = []
    for gi, group in enumerate(param_groups, start):
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.layout != torch.strided:
                raise ValueError(f"fusedaccum optimizers need dense parameters; got a {p.layout} one")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"fusedaccum optimizers support float32, bfloat16 and float16 parameters; got {p.dtype}. "
                    f"Keep this parameter on a torch.optim optimizer."
                )
            by_key.setdefault((p.device, p.dtype), []).append(p)
        arenas += [Arena(gi, ps, master_weights) for ps in by_key.values()]
    return arenas
