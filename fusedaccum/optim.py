"""fa.SGD, fa.Adam, fa.AdamW: torch.optim subclasses whose step is one fused pass per arena.

Same arguments, defaults, param_groups and state_dict format as torch.optim (a state_dict
saved by one loads into the other), plus `master_weights=True` to keep an fp32 master copy of
bf16/fp16 parameters. Without an accumulator attached they behave like torch.optim: step()
reads p.grad (a large contiguous one in place, the rest gathered into the arena by the
accumulate op). With fa.GradAccumulator attached,
the gradients it hides (full path; bf16/fp16 swap-in) are already in the arena; the rest are
still read from p.grad. `_reconcile` is where the arena catches up with what torch shows.
"""
from __future__ import annotations

import operator
import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fusedaccum.arena import Arena, alias, build_arenas, master_mode
from fusedaccum.reference import merge_remainder

# parameter -> weakref to the fusedaccum optimizer whose arena holds its memory
_OWNER = WeakIdKeyDictionary()

# A visible p.grad of at least this many elements is stepped where it is, by a launch of its own,
# instead of being copied into the arena first: the copy moves 8 B per element (256K elements:
# 20-40 us on the CPU here; 1M: 3 us on an H100), a launch costs 10-20 us of host time.
DIRECT_STEP_NUMEL = {"cpu": 1 << 18, "cuda": 1 << 20}


class FusedOptimizer:
    """Mixin over a torch.optim class: arenas, fused step, state_dict interop."""

    _state_names: tuple[str, ...] = ()
    _publish_step = True
    # torch.amp.GradScaler hands this optimizer the scale and the non-finite flag (as it does
    # torch's fused Adam) instead of unscaling p.grad in place: both go into the fused step.
    _step_supports_amp_scaling = True

    def _init_fused(self, kwargs: dict) -> dict:
        self.master_weights = master_mode(kwargs.pop("master_weights", False))
        if kwargs.get("differentiable"):
            raise ValueError("fusedaccum optimizers do not support differentiable=True; use torch.optim for that")
        # The step is always fused here; torch's own foreach/fused switches do not apply.
        kwargs["foreach"] = None
        kwargs["fused"] = None
        self._init_arenas()
        return kwargs

    def _init_arenas(self) -> None:
        self._arenas: list[Arena] = []
        # Per param group, the parameters its arenas were built from: torch.optim reads
        # group["params"] at every step, the arenas do not, so an edit by hand is refused (_check_groups).
        self._group_params: list[tuple] = []
        self._accumulator = None
        self._superseded = False
        self._loading: dict | None = None  # the state_dict being loaded, as the pre-hooks left it

    # -- parameter ownership and arenas ------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            arenas = build_arenas(self.param_groups[-1:], self.master_weights, start=len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        self._group_params.append(tuple(self.param_groups[-1]["params"]))
        self._adopt_arenas(arenas)

    def _adopt_arenas(self, arenas: list[Arena]) -> None:
        for arena in arenas:
            _one(arena.device)  # made now, eagerly: made inside a CUDA graph capture it would hold garbage
            if arena.dtype == torch.float16 and arena.master is None and self._state_names:
                warnings.warn(
                    f"{type(self).__name__} over float16 parameters without master weights keeps its moments in "
                    f"float16, where exp_avg_sq underflows and overflows (inf/NaN updates). Pass master_weights=True "
                    f"(fp32 master and moments), or use bfloat16.", stacklevel=4,
                )
            for p in arena.params:
                old = _OWNER.get(p)
                if old is not None and old() is not None and old() is not self:
                    old()._supersede()  # the newest optimizer over a parameter wins (torch allows several)
                _OWNER[p] = weakref.ref(self)
        self._arenas += arenas
        if self._accumulator is not None:
            self._accumulator._attach_arenas(arenas)

    def _supersede(self) -> None:
        self._superseded = True
        if self._accumulator is not None:
            self._accumulator._detach()

    def _check_current(self) -> None:
        if self._superseded:
            raise RuntimeError(
                f"this {type(self).__name__} was superseded: a newer fusedaccum optimizer was built over its "
                f"parameters and now holds them (their memory lives in its arena). Use the newer optimizer, or "
                f"build a new one again."
            )

    @property
    def arenas(self) -> list[Arena]:
        return self._arenas

    # -- the loop -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        self._check_current()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._accumulator is not None:
            self._accumulator._optimizer_step()
        elif self._sharded:
            raise RuntimeError(
                f"this {type(self).__name__}'s state is sharded across ranks (GradAccumulator(..., "
                f"shard_optimizer_state=True)), and its accumulator was replaced or dropped: each rank would step "
                f"only its shard. Step through a GradAccumulator with the same process_group and "
                f"shard_optimizer_state=True, or load opt.state_dict() into a new optimizer."
            )
        else:
            self._fused_step(self._reconcile(), *self._grad_scaler_inputs())
        return loss

    @property
    def _sharded(self) -> bool:
        """ZeRO-1: this process keeps only its share of the state (fusedaccum/distributed.py)."""
        return any(a.sharded for a in self._arenas)

    def _grad_scaler_inputs(self) -> tuple[dict, dict]:
        """(factor, found_inf) per device from torch.amp.GradScaler.step, if it is calling: the
        inverse of the scale the gradients still carry, and 1 where a gradient is not finite."""
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        devices = {a.device for a in self._arenas}
        factor = {} if scale is None else {d: (1.0 / scale.double()).float().to(d) for d in devices}
        skip = {} if not torch.is_tensor(found_inf) else {d: (found_inf > 0).float().to(d) for d in devices}
        return factor, skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._accumulator is not None:
            self._accumulator._restart_window()
        super().zero_grad(set_to_none)

    def _reconcile(self) -> list[list[bool]]:
        """Brings the arenas in line with what torch shows the user, before a step.

        This is the one place where the visible state wins over the arena's copy of it: a
        parameter converted or moved raises; one whose data was replaced by a tensor of the same
        dtype, device and shape is taken back (Arena.take_back); one changed in place re-seeds its fp32
        master; optimizer.state[p] cleared, replaced or edited is adopted into the arena (the
        parameter starts over where it has no state); the gradients are p.grad, or the
        accumulator's window where it hides them. Returns, per arena, which parameters step.
        """
        self._check_groups()
        state, acc = self.state, self._accumulator
        touched = []
        for arena in self._arenas:
            names = self._state_names_for(self.param_groups[arena.group_index])
            in_place, changed_versions, changed_states = _probe(arena, state)
            if not in_place:
                arena.take_back_params()  # data replaced: taken back (or a conversion raises)
                in_place, changed_versions, changed_states = _probe(arena, state)
            for i in changed_versions:
                arena.reseed_master(i)
            adopted = False
            for i in changed_states:
                published, entry = arena.published[i], state.get(arena.params[i])
                if published is None:
                    if not entry:
                        continue  # no state yet, none set by hand
                elif _shows(entry, published):
                    continue  # optimizer.state[p] is what the arena published: nothing to do
                if published is not None and not entry:
                    arena.reset_state(i)  # state cleared by hand: start over, as torch.optim would
                else:
                    self._adopt_state(arena, i, entry, names)
                adopted = True
            if adopted:
                arena.renumber_step_classes()
            touched.append(acc._collect(arena) if acc is not None else self._gather_grads(arena))
        return touched

    def _check_groups(self) -> None:
        groups, built = self.param_groups, self._group_params
        if len(groups) == len(built) and all(
            len(g["params"]) == len(b) and all(map(operator.is_, g["params"], b)) for g, b in zip(groups, built)
        ):
            return
        raise RuntimeError(
            f"{type(self).__name__}.param_groups was edited by hand after the optimizer was built (parameters "
            f"added to, removed from or replaced in a group's 'params', or a group added or removed without "
            f"add_param_group): torch.optim would step the new list, but fusedaccum holds each group's parameters "
            f"in arenas built when the group was added. Add parameters with optimizer.add_param_group({{'params': "
            f"...}}); to drop or replace some, build a new optimizer (it can load this one's state_dict)."
        )

    def _adopt_state(self, arena: Arena, i: int, entry: dict, names: tuple[str, ...]) -> None:
        """Copies a state entry set or loaded by hand into the arena and publishes its views."""
        arena.ensure_state(names)
        published = arena.published[i] or {}
        for name in names:
            value = entry.get(name)
            if value is None or value is not published.get(name):
                arena.write_shard(arena.state[name], i, value)
        if self._publish_step:
            arena.steps[i] = float(entry.get("step", 0))
        else:  # torch.optim.SGD keeps no count; a momentum buffer means "not the first step"
            arena.steps[i] = 0.0 if entry.get("momentum_buffer") is None else 1.0
        master, remainder = entry.get("master_param"), entry.get("master_remainder")
        if arena.remainder is not None and remainder is not None and master is None:
            if remainder is not published.get("master_remainder"):  # a copied optimizer's live state
                arena.write_shard(arena.remainder, i, remainder)
            arena.versions[i] = arena.params[i]._version
        elif not arena.has_master or master is None:
            arena.reseed_master(i)
        elif master is not published.get("master_param"):
            arena.set_master(i, master)
        self._publish(arena, i, names)

    def _publish(self, arena: Arena, i: int, names: tuple[str, ...]) -> None:
        """optimizer.state[p] gets views of the arena, with torch.optim's keys. A sharded arena
        (ZeRO-1) keeps only part of each parameter's state: optimizer.state[p] then shows the
        step alone, and state_dict() gathers the rest from every rank."""
        entry = {"step": arena.steps[i]} if self._publish_step else {}
        p = arena.params[i]
        kept = self.state.get(p, {})
        if arena.sharded:
            kept = {k: v for k, v in kept.items() if k not in (*names, "master_param", "master_remainder")}
        else:
            for name in names:
                entry[name] = arena.view(arena.state[name], i)
            if arena.master is not None:
                entry["master_param"] = arena.view(arena.master, i)
            if arena.remainder is not None:
                entry["master_remainder"] = arena.view(arena.remainder, i)
        arena.published[i] = entry
        if entry or (arena.sharded and p in self.state):  # sharded: loaded whole-parameter state is dropped
            self.state[p] = {**kept, **entry}  # keys a user added stay

    def _unpublish_shards(self) -> None:
        """Just sharded: optimizer.state[p] gives up the whole-parameter views of the old buffers
        where it still shows them (an entry set by hand since is adopted at the next step)."""
        for arena in self._arenas:
            if not arena.sharded:
                continue
            names = self._state_names_for(self.param_groups[arena.group_index])
            for i, (published, p) in enumerate(zip(arena.published, arena.params)):
                entry = self.state.get(p)
                if published is not None and entry and _shows(entry, published):
                    self._publish(arena, i, names)

    def _gather_grads(self, arena: Arena) -> list[bool]:
        """The parameters' .grad for the step: a large contiguous one is read where it is
        (arena.direct), the others are copied into the arena by one accumulate launch. The copy
        would cost 8 B per parameter, which torch's fused step does not pay; a step launch of
        its own costs about what copying DIRECT_STEP_NUMEL elements does."""
        grads = [p.grad for p in arena.params]
        touched = [g is not None for g in grads]
        arena.direct = {}
        if any(touched):
            grad = arena.ensure_grad(arena.grad.dtype if arena.grad is not None else torch.float32)
            smallest = DIRECT_STEP_NUMEL.get(grad.device.type, DIRECT_STEP_NUMEL["cuda"])
            if not arena.sharded:
                arena.direct = {i: g.view(-1) for i, g in enumerate(grads)
                                if g is not None and g.numel() >= smallest and g.dtype == grad.dtype
                                and g.layout == torch.strided and g.device == grad.device and g.is_contiguous()}
            copied = [i for i, g in enumerate(grads) if g is not None and i not in arena.direct]
            if copied:
                torch.ops.fusedaccum.accumulate(grad, [grads[i] for i in copied], [arena.offsets[i] for i in copied],
                                                1.0, True, None, None)
        return touched

    def _fused_step(self, touched: list[list[bool]], factor: dict, found_inf: dict, stepped=None,
                    grads: dict | None = None) -> None:
        """One launch per run of parameters that have a gradient and share a step count.

        factor / found_inf map a device to its one-element device tensor (absent: 1 / none).
        grads maps id(arena) to a flat tensor laid out as that arena from which its gradient is
        read instead of arena.grad (data parallel's bf16 reduction buffer).
        stepped(arena, end), when given, is told after each launch that this process has stepped
        what it steps of `arena` below offset `end`, and once more with arena.numel when it is done
        with an arena that had a gradient (ZeRO-1 starts the parameters' all-gathers).
        """
        for arena, t in zip(self._arenas, touched):
            if not any(t):
                continue
            group = self.param_groups[arena.group_index]
            names = self._state_names_for(group)
            if arena.ensure_state(names) and not self._publish_step:
                # SGD's count only says whether a momentum buffer exists: momentum turned on for a
                # group that stepped without it starts every buffer as a copy of the gradient, as
                # torch.optim does, and shows it in optimizer.state.
                arena.steps.zero_()
                arena.step_class = [0] * len(arena.params)
                arena.published = [None] * len(arena.params)
            if None in arena.published:
                for i in range(len(t)):
                    if t[i] and arena.published[i] is None:  # first step of this parameter
                        self._publish(arena, i, names)
            f = factor.get(arena.device)
            if f is None:
                f = _one(arena.device)
            inf = found_inf.get(arena.device)
            increment = None if inf is None else 1 - inf
            source = (grads or {}).get(id(arena))  # None: arena.grad
            for a, b in arena.runs(t):
                steps = arena.steps[a:b]
                if increment is None:
                    steps.add_(1)
                else:
                    steps.add_(increment)
                for x, y, direct in arena.split_direct(a, b):
                    for piece in arena.pieces(*arena.range_of(x, y)):  # the whole range, or this rank's shard of it
                        param, copy, grad, state = arena.step_slices(*piece, grad=source)
                        grad = grad if direct is None else direct
                        self._step_range(group, param, copy, grad, state, arena.steps[a], f, inf)
                        if stepped is not None:
                            stepped(arena, piece[1])
            arena.direct = {}  # p.grad belongs to torch again
            arena.advance_step_classes(t)
            if stepped is not None:
                stepped(arena, arena.numel)  # done with this arena, on every rank whatever pieces it keeps

    def _state_names_for(self, group: dict) -> tuple[str, ...]:
        return self._state_names

    # -- state_dict, copies, pickling -----------------------------------------------------

    def state_dict(self) -> dict:
        """torch.optim's state_dict; with master_weights="remainder" each `master_remainder` is
        saved as the fp32 `master_param` it makes with the parameter, so checkpoints load into
        master_weights=True (and back) and torch.optim ignores the key."""
        saved = super().state_dict()
        if self._sharded:
            return {**saved, "state": self._gathered_state(saved["state"])}
        if self.master_weights != "remainder":
            return saved
        # torch numbers the parameters in param_group order; every one lives in an arena.
        where = {id(p): (arena, i) for arena in self._arenas for i, p in enumerate(arena.params)}
        params = [p for group in self.param_groups for p in group["params"]]
        state = {}
        for index, entry in saved["state"].items():
            if entry.get("master_remainder") is not None:
                arena, i = where[id(params[index])]
                entry = {k: v for k, v in entry.items() if k != "master_remainder"}
                entry["master_param"] = arena.master_of(i)
            state[index] = entry
        return {**saved, "state": state}

    def _gathered_state(self, state: dict) -> dict:
        """ZeRO-1: every rank's shards of the state (and masters) gathered into whole tensors per
        parameter, in torch.optim's format. A collective: every rank calls state_dict()."""
        index = {id(p): k for k, p in enumerate(p for group in self.param_groups for p in group["params"])}
        state = dict(state)
        for arena in self._arenas:
            if all(entry is None for entry in arena.published):
                continue  # nothing stepped yet (the same on every rank: they step the same parameters)
            names = self._state_names_for(self.param_groups[arena.group_index])
            arena.ensure_state(names)
            whole = {name: arena.sharding.gather(arena, arena.state[name]) for name in names}
            master = None
            if arena.master is not None:
                master = arena.sharding.gather(arena, arena.master)
            elif arena.remainder is not None:
                master = merge_remainder(arena.param, arena.sharding.gather(arena, arena.remainder))
            for i, p in enumerate(arena.params):
                if arena.published[i] is None:
                    continue  # never stepped, nothing set: no state, as in torch.optim
                entry = dict(state.get(index[id(p)], {}))
                for name in names:
                    entry[name] = alias(arena.view(whole[name], i))
                if master is not None:
                    entry["master_param"] = alias(arena.view(master, i))
                state[index[id(p)]] = entry
        return state

    def sharded_state_dict(self) -> dict:
        """ZeRO-1: this rank's share of the state, for a checkpoint file per rank. No collective and
        no whole tensor: the moments, masters and remainders this rank keeps (the live buffers, as
        torch.optim's state_dict hands out its live tensors), the step counts and param_groups.
        It loads only into the same layout (world size, rank, reduce_bucket_numel, parameters):
        load_sharded_state_dict. To change the layout, save state_dict() (whole, every rank)."""
        if not self._sharded:
            raise RuntimeError(
                f"sharded_state_dict() is for an optimizer whose state is sharded across ranks "
                f"(GradAccumulator(..., shard_optimizer_state=True)); this {type(self).__name__} keeps all of it: "
                f"save opt.state_dict()"
            )
        saved = torch.optim.Optimizer.state_dict(self)  # param_groups; the state shows the step (and user keys)
        shards = []
        for arena in self._arenas:
            shards.append({
                "owned": [(lo, hi) for lo, hi, _ in arena.owned], "numel": arena.numel,
                "state": dict(arena.state), "master": arena.master, "remainder": arena.remainder,
                "stepped": [entry is not None for entry in arena.published],
            })
        sharding = self._arenas[0].sharding
        return {**saved, "fusedaccum_shards": shards, "world": sharding.world, "rank": sharding.rank}

    def load_sharded_state_dict(self, state_dict: dict) -> None:
        """Loads what sharded_state_dict() saved on this rank into an optimizer sharded the same way
        (build its GradAccumulator(..., shard_optimizer_state=True) first)."""
        self._check_current()
        shards = state_dict.get("fusedaccum_shards")
        if shards is None:
            raise ValueError("this is not a sharded_state_dict(): load a whole state_dict with load_state_dict()")
        if not self._sharded:
            raise RuntimeError(
                "load_sharded_state_dict() needs this optimizer sharded like the one that saved it: build "
                "GradAccumulator(opt, ..., process_group=pg, shard_optimizer_state=True) first, then load"
            )
        sharding = self._arenas[0].sharding
        layout = [([(lo, hi) for lo, hi, _ in a.owned], a.numel) for a in self._arenas]
        saved_layout = [([tuple(r) for r in s["owned"]], s["numel"]) for s in shards]
        same = (state_dict["world"], state_dict["rank"], saved_layout) == (sharding.world, sharding.rank, layout)
        if not same:
            raise ValueError(
                f"this sharded state_dict was saved by rank {state_dict['rank']} of {state_dict['world']} with another "
                f"layout than this optimizer's (rank {sharding.rank} of {sharding.world}; world size, "
                f"reduce_bucket_numel and the parameters must match). Across layouts, save the whole opt.state_dict() "
                f"(a collective) and load it with load_state_dict()."
            )
        # torch.optim's own load for param_groups, the step counts and any keys a user added.
        self.load_state_dict({k: v for k, v in state_dict.items() if k not in ("fusedaccum_shards", "world", "rank")})
        with torch.no_grad():
            for arena, saved in zip(self._arenas, shards):
                names = self._state_names_for(self.param_groups[arena.group_index])
                if set(saved["state"]) != set(names) and any(saved["stepped"]):
                    raise ValueError(f"the saved state holds {sorted(saved['state'])}; {type(self).__name__} keeps {list(names)}")
                arena.ensure_state(names)
                for name in names:
                    if name in saved["state"]:
                        arena.state[name].copy_(saved["state"][name])
                for mine_buf, theirs in ((arena.master, saved["master"]), (arena.remainder, saved["remainder"])):
                    if (mine_buf is None) != (theirs is None):
                        raise ValueError("master_weights differ between the saved optimizer and this one: pass the same")
                    if mine_buf is not None:
                        mine_buf.copy_(theirs)
                for i, (p, stepped) in enumerate(zip(arena.params, saved["stepped"])):
                    if not stepped:
                        arena.reset_state(i)  # as torch.optim's load leaves it: no state
                        continue
                    arena.versions[i] = p._version  # the masters go with the parameters as they are now
                    entry = self.state.get(p, {})
                    if self._publish_step:
                        arena.steps[i] = float(entry.get("step", 0))
                    else:
                        arena.steps[i] = 1.0
                    self._publish(arena, i, names)
                arena.renumber_step_classes()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict (hooks included); the next step adopts the loaded state."""
        self._check_current()

        def remember(optimizer, final):  # registered last: sees the dict every user pre-hook returned
            self._loading = final

        handle = self.register_load_state_dict_pre_hook(remember)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def __getstate__(self) -> dict:
        if self._sharded:
            # optimizer.state holds the step only: a copy would start the moments over.
            raise RuntimeError(
                f"this {type(self).__name__}'s state is sharded across ranks (shard_optimizer_state=True) and cannot "
                f"be copied or pickled: each rank holds a piece of it. Save opt.state_dict() (a collective: call it on "
                f"every rank; it gathers the whole state) and load it into a new optimizer."
            )
        return {**super().__getstate__(), "master_weights": self.master_weights}

    def __setstate__(self, state: dict) -> None:
        if "_arenas" not in self.__dict__:
            # Unpickled or deep-copied: new arenas over the (copied) parameters; the copied
            # optimizer.state is adopted by the first step like any state set by hand.
            self.master_weights = state.pop("master_weights", False)
            super().__setstate__(state)
            self._init_arenas()
            for gi in range(len(self.param_groups)):
                self._group_params.append(tuple(self.param_groups[gi]["params"]))
                self._adopt_arenas(build_arenas(self.param_groups[gi : gi + 1], self.master_weights, start=gi))
            return
        super().__setstate__(state)  # from load_state_dict, before its post-hooks
        if self._loading is not None:
            self._keep_saved_precision(self._loading)

    def _keep_saved_precision(self, saved: dict) -> None:
        """torch.optim casts loaded state to the parameter dtype (bf16); an arena keeping fp32 state
        (master weights) takes the saved tensors at their own precision instead."""
        saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        for p, i in zip(ours, saved_ids):
            raw, entry = saved["state"].get(i), self.state.get(p)
            if not raw or not entry:
                continue
            for key, value in raw.items():
                if key != "step" and torch.is_tensor(value) and torch.is_tensor(entry.get(key)):
                    if value.dtype != entry[key].dtype:
                        entry[key] = value.to(p.device)


def _probe(arena: Arena, state: dict) -> tuple[bool, list[int], list[int]]:
    """Where _reconcile must look: (whether every parameter still has the storage and dtype the
    arena recorded, the parameters whose version moved (with fp32 masters), the parameters whose
    optimizer.state entry may not be what the arena published). The compiled probe
    (csrc/reconcile.cpp) where it loaded and can tell, else _probe_in_python."""
    args = (arena.params, arena.data_ptrs, arena.dtype, arena.versions if arena.has_master else None, state,
            arena.published)
    found = None if _native_probe is None else _native_probe(*args)
    return found if found is not None else _probe_in_python(*args)


def _probe_in_python(params, data_ptrs, dtype, versions, state, published) -> tuple[bool, list[int], list[int]]:
    """The reference for csrc/reconcile.cpp: whole-list comparisons first, so that the
    per-parameter work is only where something changed."""
    in_place = [p.data_ptr() for p in params] == data_ptrs and {p.dtype for p in params} <= {dtype}
    changed_versions = []
    if versions is not None:
        now = [p._version for p in params]
        if now != versions:
            changed_versions = [i for i, (a, b) in enumerate(zip(now, versions)) if a != b]
    changed_states = [
        i for i, (pub, entry) in enumerate(zip(published, map(state.get, params)))
        if (entry if pub is None else not _shows(entry, pub))
    ]
    return in_place, changed_versions, changed_states


def _load_native_probe():
    from fusedaccum.dispatch import extension_loaded

    if not extension_loaded():
        return None
    from fusedaccum import _C

    return _C.reconcile_probe


_native_probe = _load_native_probe()


def _shows(entry: dict | None, published: dict) -> bool:
    """Whether optimizer.state[p] (`entry`) still holds every tensor the arena published for p."""
    return all(map(operator.is_, map((entry or {}).get, published), published.values()))


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

    def _step_range(self, group, param, copy, grad, state, step, factor, found_inf):
        beta1, beta2 = group["betas"]
        torch.ops.fusedaccum.adam_step(
            param, grad, state["exp_avg"], state["exp_avg_sq"],
            state["max_exp_avg_sq"] if group["amsgrad"] else None, copy, step, factor, found_inf,
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

    def _step_range(self, group, param, copy, grad, state, step, factor, found_inf):
        buf = state["momentum_buffer"] if group["momentum"] != 0 else None
        torch.ops.fusedaccum.sgd_step(
            param, grad, buf, copy, step, factor, found_inf, float(group["lr"]),
            float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group["maximize"]),
        )


class Lion(FusedOptimizer, torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), fused.

    c = beta1 * m + (1 - beta1) * g;  p = p * (1 - lr * weight_decay) - lr * sign(c);
    m = beta2 * m + (1 - beta2) * g.  One state tensor, `exp_avg`, as lion-pytorch and
    bitsandbytes keep it (their state_dicts load here and back). torch has no Lion, so this is
    a torch.optim.Optimizer of its own, with the same param_groups conventions.
    """

    _state_names = ("exp_avg",)
    _publish_step = False  # the update does not depend on a step count

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 *, maximize: bool = False, master_weights: bool | str = False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}; each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.master_weights = master_mode(master_weights)
        self._init_arenas()
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize))

    def _step_range(self, group, param, copy, grad, state, step, factor, found_inf):
        beta1, beta2 = group["betas"]
        torch.ops.fusedaccum.lion_step(
            param, grad, state["exp_avg"], copy, factor, found_inf, float(group["lr"]),
            float(beta1), float(beta2), float(group["weight_decay"]), bool(group["maximize"]),
        )
