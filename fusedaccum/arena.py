"""Flat arenas: one set of flat buffers per (param group, device, dtype).

An arena holds the parameters' memory: at construction each parameter's data is copied into
one flat tensor, so the optimizer step is one pass over a contiguous range instead of one
kernel per tensor. Each parameter keeps a storage of its own that aliases its slice of that
memory (see `alias`), so torch.save, safetensors and Accelerate see every parameter as itself,
not as one tied tensor. Beside the parameters the arena holds the gradient accumulation
buffer (fp32 by default), the optimizer state, the fp32 master copy when master weights are
kept (or, with master_weights="remainder", the int16 low halves that make the bf16 parameters
the fp32 master), and one step count per parameter.

The arena is a cache of what torch shows the user (p.data, optimizer.state[p]); the
optimizer's `_reconcile` is the one place that brings it back in line before each step.
"""
from __future__ import annotations

import bisect

import torch
import torch.utils.dlpack

from fusedaccum.reference import merge_remainder, split_remainder

ALIGN = 16  # elements; every parameter view starts on a 64-byte boundary for vector loads


def alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor over the same memory as `view` with a storage of its own, sized to the view.

    The new storage's deleter keeps the flat buffer alive. Serializers that look at storages
    (torch.save, safetensors, Accelerate's tied-weight detection) then treat it as an
    independent tensor.
    """
    if view.numel() == 0:
        return torch.empty(view.shape, dtype=view.dtype, device=view.device)
    return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(view))


def master_mode(value) -> bool | str:
    """master_weights as given: False, True (an fp32 master) or "remainder" (int16 remainders)."""
    if value is None or value is False or value is True or value == "remainder":
        return value or False
    raise ValueError(
        f"master_weights={value!r}: pass False, True (an fp32 master copy beside each bf16/fp16 parameter, "
        f"4 B per parameter) or \"remainder\" (bf16 parameters only: a 2-byte remainder that makes the bf16 "
        f"parameter the exact fp32 master)"
    )


class Arena:
    def __init__(self, group_index: int, params: list[torch.Tensor], master_weights: bool | str):
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
                p.data = alias(view)
        self.data_ptrs = [p.data_ptr() for p in params]
        self.shapes = [p.shape for p in params]
        # Master weights: an fp32 copy of the parameters, or (master_weights="remainder", bf16)
        # the low 16 bits of the fp32 master, which the bf16 parameter completes bit for bit
        # (csrc/elementwise.h merge_remainder). Zero remainders: the master is the parameter.
        self.master = None
        self.remainder = None
        if master_weights == "remainder" and self.dtype == torch.bfloat16:
            self.remainder = torch.zeros(end, dtype=torch.int16, device=self.device)
        elif master_weights and self.dtype != torch.float32:
            self.master = self.param.float()
        # The parameters' version counters when the master last agreed with them: an in-place
        # change from outside (load_state_dict, clamp_, copy_) bumps it, and the master is
        # re-seeded from the parameter. The step writes through self.param, not through p.
        self.versions = [p._version for p in params]
        self.grad: torch.Tensor | None = None
        # Parameters whose next step reads p.grad in place instead of a copy in `grad` (large
        # visible gradients: optim._gather_grads), index -> the flat gradient; cleared by the step.
        self.direct: dict[int, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        # Parameters with equal step_class have received gradients in the same windows, so
        # their step counts are equal and one launch can serve them (known on the host
        # without reading the device-side counts).
        self.step_class = [0] * len(params)
        # What optimizer.state[p] held when this arena last agreed with it: {key: tensor},
        # the tensors aliasing this arena's state; None while the parameter has no state.
        self.published: list[dict | None] = [None] * len(params)
        # The ranges of the arena whose optimizer state this process keeps: all of it, or with
        # ZeRO-1 (fusedaccum/distributed.py) its shard. The shard buffers (state, master,
        # remainder) hold those ranges back to back: (lo, hi, where it starts in them).
        self.owned: list[tuple[int, int, int]] = [(0, end, 0)]
        self.sharding = None  # the DataParallel that sharded this arena, if one did

    @property
    def sharded(self) -> bool:
        return self.sharding is not None

    @property
    def shard_numel(self) -> int:
        return sum(hi - lo for lo, hi, _ in self.owned)

    def shard(self, ranges: list[tuple[int, int]], sharding) -> None:
        """Keeps the optimizer state, master and remainder of `ranges` only (ZeRO-1): the rest
        belongs to other processes. The parameters and the gradient stay whole."""
        ranges = sorted((lo, hi) for lo, hi in ranges if hi > lo)
        owned, c = [], 0
        for lo, hi in ranges:
            owned.append((lo, hi, c))
            c += hi - lo

        def keep(buf):
            return torch.cat([buf[lo:hi] for lo, hi in ranges]) if ranges else buf[:0].clone()

        self.state = {name: keep(buf) for name, buf in self.state.items()}
        if self.master is not None:
            self.master = keep(self.master)
        if self.remainder is not None:
            self.remainder = keep(self.remainder)
        self.owned, self.sharding = owned, sharding

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """The parts [x, y) of arena range [lo, hi) this process keeps state for, each with where
        it starts in the shard buffers."""
        if not self.sharded:
            return [(lo, hi, lo)]
        out = []
        k = max(bisect.bisect_right(self.owned, (lo, float("inf"), 0)) - 1, 0)
        for a, b, c in self.owned[k:]:
            if a >= hi:
                break
            x, y = max(a, lo), min(b, hi)
            if x < y:
                out.append((x, y, c + x - a))
        return out

    def shard_parts(self, buf: torch.Tensor, i: int) -> list[tuple[torch.Tensor, slice]]:
        """Parameter i's part of shard buffer `buf`: (slice of buf, the same elements of the flat parameter)."""
        o = self.offsets[i]
        return [(buf[c : c + y - x], slice(x - o, y - o)) for x, y, c in self.pieces(o, o + self.numels[i])]

    def write_shard(self, buf: torch.Tensor, i: int, value: torch.Tensor | None) -> None:
        """Shard buffer `buf` takes parameter i's value (whole-parameter shaped; None: zero) where it keeps it."""
        flat = None if value is None else value.detach().reshape(-1)
        for dst, part in self.shard_parts(buf, i):
            if flat is None:
                dst.zero_()
            else:
                dst.copy_(flat[part])

    def step_slices(self, x: int, y: int, c: int, grad: torch.Tensor | None = None):
        """The step ops' tensors for arena range [x, y) (kept from c in the shard buffers):
        (param, param_copy, grad, {state name: slice}). param/param_copy are the fp32 master and
        the parameter it is copied to, the bf16 parameter and its int16 remainder, or the
        parameter alone. `grad`: where the gradient is read instead of the arena's `grad` (a flat
        tensor laid out as the arena, e.g. a bf16 reduction's buffer)."""
        s = slice(c, c + y - x)
        g = (self.grad if grad is None else grad)[x:y]
        state = {name: buf[s] for name, buf in self.state.items()}
        if self.master is not None:
            return self.master[s], self.param[x:y], g, state
        if self.remainder is not None:
            return self.param[x:y], self.remainder[s], g, state
        return self.param[x:y], None, g, state

    @property
    def has_master(self) -> bool:
        return self.master is not None or self.remainder is not None

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.float32 if self.has_master else self.dtype

    def master_of(self, i: int) -> torch.Tensor | None:
        """Parameter i's fp32 master as a tensor: a view of the master, or, with remainders, a
        new tensor made from the parameter and its remainder; None without master weights.
        Not sharded (a sharded arena's state_dict gathers the masters)."""
        assert not self.sharded
        if self.master is not None:
            return self.view(self.master, i)
        if self.remainder is not None:
            return merge_remainder(self.view(self.param, i), self.view(self.remainder, i))
        return None

    def set_master(self, i: int, master: torch.Tensor) -> None:
        """Parameter i's fp32 master becomes `master`; with remainders the bf16 parameter is
        rewritten as its high half (the master rounded to nearest, ties aside)."""
        if self.master is not None:
            self.write_shard(self.master, i, master)
        elif self.remainder is not None:
            hi, rem = split_remainder(master.to(self.device, torch.float32).reshape(self.params[i].shape))
            self.view(self.param, i).copy_(hi)
            self.write_shard(self.remainder, i, rem)
        self.versions[i] = self.params[i]._version

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + n].view(p.shape) for p, o, n in zip(self.params, self.offsets, self.numels)]

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i] : self.offsets[i] + self.numels[i]].view(self.params[i].shape)

    def ensure_grad(self, dtype: torch.dtype) -> torch.Tensor:
        if self.grad is None or self.grad.dtype != dtype:
            self.grad = torch.zeros(self.numel, dtype=dtype, device=self.device)
        return self.grad

    def ensure_state(self, names: tuple[str, ...]) -> bool:
        """Allocates the state buffers not made yet; returns whether it made one."""
        made = False
        for name in names:
            if name not in self.state:
                self.state[name] = torch.zeros(self.shard_numel, dtype=self.state_dtype, device=self.device)
                made = True
        return made

    def take_back(self, i: int) -> bool:
        """Parameter i lives in this arena again; False where it cannot.

        Its data may have been replaced by a tensor of the same dtype, device and shape:
        Accelerate's prepare_model does `model.to("cpu:0")` in a multi-process CPU run, which
        copies every CPU tensor; `p.data = ...` does it by hand. torch.optim keeps such a
        parameter (it holds the Parameter, not its memory), so the arena does too: the new
        values are copied into its slice and the parameter aliases that slice again (the same
        address as before, so every recorded data_ptr holds). Values that differ from the
        arena's are an edit from outside and re-seed the master, as an in-place change does; a
        copy keeps it. Another dtype, device or shape cannot be taken back (param_error), nor
        memory shared with other processes (share_memory()), another parameter's slice, or a view
        into another component's buffer (ZeroRedundancyOptimizer's parameters_as_bucket_view)."""
        p = self.params[i]
        if p.data_ptr() == self.data_ptrs[i] and p.dtype == self.dtype:
            return True
        if self._refusal(i) is not None:
            return False
        view = self.view(self.param, i)
        with torch.no_grad():
            edited = self.has_master and not torch.equal(p.data, view)
            view.copy_(p.data)
            p.data = alias(view)
        if edited:
            self.reseed_master(i)
        else:
            self.versions[i] = p._version
        return True

    def _refusal(self, i: int) -> str | None:
        """Why parameter i's new data cannot be taken back, or None where it can."""
        p = self.params[i]
        if p.dtype != self.dtype or p.device != self.device or p.shape != self.shapes[i]:
            return "converted"
        if _shared_between_processes(p):
            return "shared"  # model.share_memory(): taken back, it would silently stop being shared
        start = self.param.data_ptr()
        if start <= p.data_ptr() < start + self.param.numel() * self.param.element_size():
            return "tied"  # another parameter's slice (p.data = q.data): a copy would untie them
        if _is_view(p.data):
            return "view"  # another component's buffer, which relies on the parameter aliasing it
        return None

    def take_back_params(self) -> None:
        """take_back for every parameter; raises for one that cannot be taken back."""
        for i in range(len(self.params)):
            if not self.take_back(i):
                raise RuntimeError(self.param_error(i))

    def param_error(self, i: int) -> str:
        p, why = self.params[i], self._refusal(i)
        if why == "tied":
            return (
                f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}) was given another "
                f"parameter's memory after its fusedaccum optimizer was built (p.data = q.data): two parameters of "
                f"one optimizer cannot share memory. Tie them by assigning the Parameter itself (module.weight = "
                f"other.weight, as transformers ties embeddings), then build the optimizer."
            )
        if why == "view":
            return (
                f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}) became a view into "
                f"another buffer after its fusedaccum optimizer was built, and a fusedaccum arena holds its "
                f"parameters' memory itself. ZeroRedundancyOptimizer(parameters_as_bucket_view=True) and FSDP's "
                f"flat parameters rely on the parameter living in their buffer: use parameters_as_bucket_view="
                f"False, or a torch.optim optimizer. To set values (torch.nn.utils.vector_to_parameters does it "
                f"with views), write them in place instead: with torch.no_grad(): p.copy_(values)."
            )
        return (
            f"parameter {i} of param group {self.group_index} was converted, moved or shared after its fusedaccum "
            f"optimizer was built: it is now {p.dtype} on {p.device} with shape {tuple(p.shape)}, its optimizer holds "
            f"it as {self.dtype} on {self.device} with shape {tuple(self.shapes[i])} (model.to(dtype/device), "
            f"model.half(), model.cuda(), .data = ...; or model.share_memory(), which the arenas do not support). "
            f"Build the optimizer after the model is on its device and in its final dtype (as torch's and Hugging "
            f"Face's docs ask), or build a new optimizer now (it takes over these parameters)."
        )

    def reset_state(self, i: int) -> None:
        """Parameter i starts over as if never stepped: zero state, step 0, master = parameter."""
        for buf in self.state.values():
            self.write_shard(buf, i, None)
        self.steps[i] = 0
        self.reseed_master(i)
        self.published[i] = None

    def reseed_master(self, i: int) -> None:
        if self.master is not None:
            self.write_shard(self.master, i, self.params[i])
        if self.remainder is not None:
            self.write_shard(self.remainder, i, None)  # the master is the bf16 value itself
        self.versions[i] = self.params[i]._version

    def renumber_step_classes(self) -> None:
        """Step classes from the device-side counts (a host read: only after state was changed by hand)."""
        counts = self.steps.tolist()
        classes = {c: k for k, c in enumerate(sorted(set(counts)))}
        self.step_class = [classes[c] for c in counts]

    def runs(self, touched: list[bool]) -> list[tuple[int, int]]:
        """Maximal [a, b) ranges of touched parameters that share a step count."""
        classes = self.step_class
        if touched and all(touched) and classes.count(classes[0]) == len(classes):
            return [(0, len(touched))]  # the usual step: every parameter, one count (no loop in Python)
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

    def split_direct(self, a: int, b: int) -> list[tuple[int, int, torch.Tensor | None]]:
        """Parameters [a, b) as ranges to step, each with the gradient read in place for it: a
        parameter in `direct` alone with its p.grad, the ones between together with None (their
        gradient is the arena's `grad`)."""
        if not self.direct:
            return [(a, b, None)]
        out, start = [], a
        for i in range(a, b):
            if i in self.direct:
                if start < i:
                    out.append((start, i, None))
                out.append((i, i + 1, self.direct[i]))
                start = i + 1
        if start < b:
            out.append((start, b, None))
        return out

    def step_grads(self, touched: list[bool]) -> list[torch.Tensor]:
        """The gradients the next step reads, as flat tensors: slices of `grad`, and the p.grad
        read in place (`direct`)."""
        out = []
        for a, b in self.runs(touched):
            for x, y, direct in self.split_direct(a, b):
                if direct is not None:
                    out.append(direct)
                else:
                    out += [self.grad[u:v] for u, v, _ in self.pieces(*self.range_of(x, y))]
        return out


def _shared_between_processes(t: torch.Tensor) -> bool:
    """CPU memory shared with other processes (share_memory_(); CUDA tensors always say shared)."""
    return t.device.type == "cpu" and t.is_shared()


def _is_view(t: torch.Tensor) -> bool:
    """Whether t is a view into a larger storage (someone's flat buffer) rather than a tensor that
    owns all of its memory, as a copy (tensor.to("cpu:0"), clone()) does."""
    return t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()


def build_arenas(param_groups: list[dict], master_weights: bool | str, start: int = 0) -> list[Arena]:
    """Checks every parameter first, then moves them into arenas (a refused group changes nothing)."""
    arenas = []
    for gi, group in enumerate(param_groups, start):
        by_key: dict[tuple, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for j, p in enumerate(group["params"]):
            name = group["param_names"][j] if "param_names" in group else f"parameter {j}"
            if id(p) in seen:
                raise ValueError(
                    f"param group {gi} lists {name} (shape {tuple(p.shape)}) more than once (tied weights collected "
                    f"from several submodules?). Pass each parameter once: model.parameters() already "
                    f"deduplicates, or use list(dict.fromkeys(params))."
                )
            seen.add(id(p))
            if p.layout != torch.strided:
                raise ValueError(f"fusedaccum optimizers need dense parameters; {name} is {p.layout}")
            if type(p.data) is not torch.Tensor:
                # A wrapper subclass (DTensor, float8, quantized weights) computes through its own
                # dispatch: the arena's flat views of plain memory would not be the parameter.
                raise ValueError(
                    f"fusedaccum optimizers need plain tensors as parameters; {name} is a {type(p.data).__name__} "
                    f"(FSDP2's fully_shard and tensor parallel make DTensors; float8 and quantized weights are tensor "
                    f"subclasses too). Keep such parameters on a torch.optim optimizer; for data parallel, use "
                    f"fa.GradAccumulator(opt, ..., process_group=...) on the model itself instead of sharding it."
                )
            if _shared_between_processes(p):
                # The arena would hold a private copy: the other processes would stop seeing the updates.
                raise ValueError(
                    f"{name} is in memory shared between processes (model.share_memory() for Hogwild training, or a "
                    f"model passed to torch.multiprocessing): a fusedaccum arena would keep a private copy of it, and "
                    f"the other processes would no longer see its updates. Keep shared parameters on a torch.optim "
                    f"optimizer, or build the model inside each process."
                )
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"fusedaccum optimizers support float32, bfloat16 and float16 parameters; {name} is {p.dtype}. "
                    f"Keep this parameter on a torch.optim optimizer."
                )
            if master_weights == "remainder" and p.dtype == torch.float16:
                raise ValueError(
                    f"master_weights='remainder' needs bfloat16 parameters (a bf16 value is the top half of an fp32 "
                    f"one; a float16 is not); {name} is float16. Use master_weights=True for float16 parameters."
                )
            by_key.setdefault((p.device, p.dtype), []).append(p)
        arenas += [Arena(gi, ps, master_weights) for ps in by_key.values()]
    return arenas
