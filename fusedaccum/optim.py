"""fa.SGD, fa.Adam, fa.AdamW: torch.optim subclasses whose step is one fused pass per arena.

Same arguments, defaults, param_groups and state_dict format as torch.optim (a state_dict
saved by one loads into the other), plus `master_weights=True` to keep an fp32 master copy of
bf16/fp16 parameters. Without an accumulator attached they behave like torch.optim: step()
reads p.grad (gathered into the arena by the accumulate op). With fa.GradAccumulator attached,
gradients are already in the arena and step() reads them from there.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fusedaccum.arena import Arena, build_arenas

# parameter -> weakref to the fusedaccum optimizer whose arena holds its storage
_OWNER = WeakIdKeyDictionary()


class FusedOptimizer:
    """Mixin over a torch.optim class: arenas, fused step, state_dict interop."""

    _state_names: tuple[str, ...] = ()
    _publish_step = True

    def _init_fused(self, kwargs: dict) -> dict:
        self.master_weights = bool(kwargs.pop("master_weights", False))
        if kwargs.get("differentiable"):
            raise ValueError("fusedaccum optimizers do not support differentiable=True; use torch.optim for that")
        # The step is always fused here; torch's own foreach/fused switches do not apply.
        kwargs["foreach"] = None
        kwargs["fused"] = None
        self._arenas: list[Arena] = []
        self._accumulator = None
        return kwargs

    # -- parameter ownership and arenas ------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            owner = _OWNER.get(p)
            if owner is not None and owner() is not None and owner() is not self:
                raise ValueError(
                    "a parameter is already managed by another fusedaccum optimizer; each parameter can "
                    "belong to one fusedaccum optimizer (its storage lives in that optimizer's arena)"
                )
        arenas = build_arenas([group], self.master_weights, start=len(self.param_groups) - 1)
        for arena in arenas:
            _one(arena.device)  # made now, eagerly: made inside a CUDA graph capture it would hold garbage
        for p in group["params"]:
            _OWNER[p] = weakref.ref(self)
        self._arenas += arenas
        if self._accumulator is not None:
            self._accumulator._attach_arenas(arenas)

    @property
    def arenas(self) -> list[Arena]:
        return self._arenas

    # -- the loop -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._accumulator is not None:
            self._accumulator._optimizer_step()
        else:
            touched = [self._gather_grads(a) for a in self._arenas]
            self._fused_step(touched, factor={}, found_inf={})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._accumulator is not None:
            self._accumulator._restart_window(set_to_none)
        else:
            super().zero_grad(set_to_none)

    def _gather_grads(self, arena: Arena) -> list[bool]:
        """Copies the parameters' .grad into the arena (one accumulate launch per grad dtype)."""
        grads, offsets, touched = [], [], [False] * len(arena.params)
        for i, p in enumerate(arena.params):
            if p.grad is not None:
                grads.append(p.grad)
                offsets.append(arena.offsets[i])
                touched[i] = True
        if grads:
            grad = arena.ensure_grad(arena.grad.dtype if arena.grad is not None else torch.float32)
            torch.ops.fusedaccum.accumulate(grad, grads, offsets, 1.0, True, None, None)
        return touched

    def _fused_step(self, touched: list[list[bool]], factor: dict, found_inf: dict) -> None:
        """One launch per run of parameters that have a gradient and share a step count.

        factor / found_inf map a device to its one-element device tensor (absent: 1 / none).
        """
        for arena, t in zip(self._arenas, touched):
            if not any(t):
                continue
            arena.check_params()
            group = self.param_groups[arena.group_index]
            arena.ensure_state(self._state_names_for(group))
            self._publish_state(arena, t, group)
            f = factor.get(arena.device)
            if f is None:
                f = _one(arena.device)
            inf = found_inf.get(arena.device)
            increment = None if inf is None else 1 - inf
            for a, b in arena.runs(t):
                steps = arena.steps[a:b]
                if increment is None:
                    steps.add_(1)
                else:
                    steps.add_(increment)
                lo, hi = arena.range_of(a, b)
                self._step_range(arena, group, lo, hi, arena.steps[a], f, inf)
            arena.advance_step_classes(t)

    def _state_names_for(self, group: dict) -> tuple[str, ...]:
        return self._state_names

    def _publish_state(self, arena: Arena, touched: list[bool], group: dict) -> None:
        """Makes self.state[p] hold views of the arena for parameters that get their first step,
        with torch.optim's keys (SGD keeps no step count there, as torch.optim.SGD)."""
        names = self._state_names_for(group)
        for i, p in enumerate(arena.params):
            if not touched[i] or arena.published[i]:
                continue
            arena.published[i] = True
            entry = {"step": arena.steps[i]} if self._publish_step else {}
            for name in names:
                entry[name] = arena.view(arena.state[name], i)
            if arena.master is not None:
                entry["master_param"] = arena.view(arena.master, i)
            if entry:
                self.state[p] = entry

    @staticmethod
    def _param_and_copy(arena: Arena, lo: int, hi: int):
        if arena.master is not None:
            return arena.master[lo:hi], arena.param[lo:hi]
        return arena.param[lo:hi], None

    # -- state_dict interop -------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts state to the parameter dtype; keep the saved tensors to copy them
        # into the arenas at full precision (fp32 state of master weights).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        raw = {i: state_dict["state"][i] for i in saved_ids if i in state_dict["state"]}
        super().load_state_dict(state_dict)
        ours = [p for g in self.param_groups for p in g["params"]]
        by_param = {p: raw[i] for p, i in zip(ours, saved_ids) if i in raw}
        self.state.clear()
        for arena in self._arenas:
            arena.published = [False] * len(arena.params)
            group = self.param_groups[arena.group_index]
            names = self._state_names_for(group)
            arena.ensure_state(names)
            loaded = []
            for i, p in enumerate(arena.params):
                entry = by_param.get(p)
                has_state = entry is not None and any(entry.get(n) is not None for n in names + ("step",))
                loaded.append(has_state)
                if not has_state:
                    continue
                with torch.no_grad():
                    for name in names:
                        value = entry.get(name)
                        if value is not None:
                            arena.view(arena.state[name], i).copy_(value)
                    # torch.optim.SGD keeps no step count; a saved momentum buffer means "not first".
                    arena.steps[i] = float(entry.get("step", 1))
                    if arena.master is not None:
                        master = entry.get("master_param")
                        arena.view(arena.master, i).copy_(master if master is not None else p)
            # Step classes from the loaded counts (read once, on the host, at load time).
            counts = arena.steps.tolist()
            classes = {c: k for k, c in enumerate(sorted(set(counts)))}
            arena.step_class = [classes[c] for c in counts]
            self._publish_state(arena, loaded, group)


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    if device not in _ONES:
        _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONES[device]


class Adam(FusedOptimizer, torch.optim.Adam):
    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **self._init_fused(kwargs))

    def _state_names_for(self, group):
        return self._state_names + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _decoupled(self, group) -> bool:
        return bool(group.get("decoupled_weight_decay", False))

    def _step_range(self, arena, group, lo, hi, step, factor, found_inf):
        param, copy = self._param_and_copy(arena, lo, hi)
        beta1, beta2 = group["betas"]
        torch.ops.fusedaccum.adam_step(
            param, arena.grad[lo:hi], arena.state["exp_avg"][lo:hi], arena.state["exp_avg_sq"][lo:hi],
            arena.state["max_exp_avg_sq"][lo:hi] if group["amsgrad"] else None, copy, step, factor, found_inf,
            float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            self._decoupled(group), bool(group["maximize"]),
        )


class AdamW(Adam, torch.optim.AdamW):
    # MRO: fa.AdamW, fa.Adam, FusedOptimizer, torch.optim.AdamW, torch.optim.Adam: torch's
    # AdamW defaults (weight_decay=1e-2) with fa.Adam's fused step.
    def _decoupled(self, group) -> bool:
        return True


class SGD(FusedOptimizer, torch.optim.SGD):
    _publish_step = False
    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **self._init_fused(kwargs))

    def _state_names_for(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _step_range(self, arena, group, lo, hi, step, factor, found_inf):
        param, copy = self._param_and_copy(arena, lo, hi)
        buf = arena.state["momentum_buffer"][lo:hi] if group["momentum"] != 0 else None
        torch.ops.fusedaccum.sgd_step(
            param, arena.grad[lo:hi], buf, copy, step, factor, found_inf, float(group["lr"]),
            float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group["maximize"]),
        )
