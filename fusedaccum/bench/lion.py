"""The standard side of the bench's Lion rows: torch has no Lion, so this is Lion as a PyTorch
user writes it, with torch._foreach ops (one kernel per op over every tensor), from the paper's
algorithm (Chen et al. 2023), in the order of operations fa.Lion's kernels use."""
from __future__ import annotations

import torch


class ForeachLion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, **ignored):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            update = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_mul_(exp_avgs, beta2)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
