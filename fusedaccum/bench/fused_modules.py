"""Bench section "fused-modules": fa.fuse_modules in a language model's window, and the
embedding backward alone.

1. A small transformer LM with a 32K vocabulary (embedding tied to the LM head), N
   micro-batches + clip + AdamW, timed in alternation:
     torch.optim                the standard loop: (loss / N).backward(), clip, step, zero_grad
     full path                  fa.GradAccumulator: gradients folded by the hooks
     full path + fuse_modules   the same with fa.fuse_modules(model): the Linear and Embedding
                                weight gradients written straight into the arena
   Beside the time, the memory a window needs: the peak of the tensor storages alive during a
   window that it allocated (on CPU tracked op by op through the dispatcher, kernels' internal
   scratch not included; on CUDA torch.cuda.max_memory_allocated), plus the gradient buffers
   that outlive the window (the arena), per parameter.
2. The embedding backward of one micro-batch into an existing gradient, vocab 32K and 128K:
   torch's dense backward (a zeroed vocab x dim gradient, the rows scattered into it, then
   AccumulateGrad's p.grad += it) against fusedaccum::embedding_weight_grad (the touched rows
   read and written in the arena), time and bytes moved.

Also measured: what the boundary's read pass over the fused ranges costs (the norm and the
non-finite flag of gradients that no fold measured), against the window.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedaccum as fa
from fusedaccum.accumulator import _add_squares
from fusedaccum.bench.cases import MAX_GRAD_NORM, Row, Settings, assert_same, backend, under


class TiedLM(nn.Module):
    """A causal transformer LM whose LM head is the embedding (as GPT-2 and Llama-style small models)."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def lm_config(scale: str) -> dict:
    if scale == "tiny":
        return dict(vocab=2048, d=64, layers=1, seq=16)
    return dict(vocab=32768, d=256, layers=2, seq=64)


def lm_batches(scale: str) -> tuple[int, ...]:
    """Sequences per micro-batch. The GEMMs grow with the tokens, the gradient traffic that fusion
    saves does not: small micro-batches (why people accumulate) show what fusion is worth, large
    ones how much of the window the GEMMs leave to it."""
    return (2,) if scale == "tiny" else (4, 1)


class AllocationPeak(TorchDispatchMode):
    """The peak bytes of the storages that ops create during a call and that are still alive.

    A storage an op returns counts from then until it dies (checked after every op); outputs
    that share an input's storage (in-place ops, views, out=) are not new. Kernels' internal
    scratch is not seen (it never leaves the op)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= n
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in inputs and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def window_peak_bytes(window, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        window()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with AllocationPeak() as tracker:
        window()
    return tracker.peak


def lm_job(s: Settings, batch: int) -> list[Row]:
    cfg = dict(lm_config(s.scale), batch=batch)
    dev, n = s.device, s.accumulation_steps
    torch.manual_seed(0)
    base = TiedLM(cfg["vocab"], cfg["d"], cfg["layers"], cfg["seq"]).to(dev)
    params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=gen).to(dev) for _ in range(n)]

    def loss_of(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, cfg["vocab"]), tokens[:, 1:].reshape(-1))

    def standard():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def window():
            for tokens in data:
                (loss_of(model, tokens) / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
        window()
        return window, model, None

    def full_path(b: str, fused: bool):
        with backend(b):
            model = copy.deepcopy(base)
            if fused:
                fa.fuse_modules(model)
            acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-3), accumulation_steps=n,
                                     max_grad_norm=MAX_GRAD_NORM)

            def window():
                for tokens in data:
                    acc.backward(loss_of(model, tokens))
                    acc.step()
            window()
        return window, model, acc

    sides = {"standard": standard()}
    for b in s.backends:
        sides[(b, "full path")] = full_path(b, False)
        sides[(b, "full path + fuse_modules")] = full_path(b, True)
    want = list(sides["standard"][1].parameters())
    for key, (_, model, _) in sides.items():
        if key == "standard":
            continue
        if key[1] == "full path":
            assert_same(list(model.parameters()), want, torch.float32, f"fused-modules LM {key}")
        else:
            # The fused GEMM sums dY^T X in another order than autograd's: Adam's first update,
            # lr * g / (|g| + eps), moves by a visible part of lr only where |g| is near eps. 1% of one
            # update (lr = 1e-3) still catches a missed or doubled step anywhere.
            for i, (g, w) in enumerate(zip(model.parameters(), want)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"fused-modules LM {key}, tensor {i}: {m}")

    calls = {}
    for key, (window, _, acc) in sides.items():
        calls[key] = window if key == "standard" else under(key[0], window)
        calls[key].keep = acc
    faults: dict = {}
    times = s.clock.measure_interleaved(calls, faults)

    memory = {}
    for key, (window, _, acc) in sides.items():
        run = window if key == "standard" else under(key[0], window)
        kept = sum(w.arena.grad.numel() * w.arena.grad.element_size() for w in acc._windows) if acc else 0
        memory[key] = (window_peak_bytes(run, dev) + kept) / params
    fused_keys = [k for k in sides if k != "standard" and k[1].endswith("fuse_modules")]
    read_pass = {}
    for key in fused_keys:
        acc = sides[key][2]
        sumsq, found_inf = (torch.zeros((), device=dev) for _ in range(2))
        views = [w.grad_views[i] for w in acc._windows for i, p in enumerate(w.arena.params) if p.dim() > 1]
        read_pass[key] = s.clock.measure_interleaved({"read": under(key[0], lambda: _add_squares(views, sumsq, found_inf))})["read"]

    case = f"tied LM, vocab {cfg['vocab']}, d={cfg['d']}, {cfg['layers']} blocks, N={n} x {cfg['batch']}x{cfg['seq']} + clip + AdamW"
    rows = [Row("fused-modules", f"lm-{cfg['vocab'] // 1024}k", "fp32", key[0], case, "torch.optim", key[1],
                times["standard"], times[key], params, None,
                standard_faults=faults.get("standard"), fused_faults=faults.get(key)) for key in sides if key != "standard"]
    s.notes.append(
        f"fused-modules LM, {batch}x{cfg['seq']} tokens per micro-batch: memory per window, bytes per parameter (peak of what the window allocates + the arena's "
        "gradient buffer): " + ", ".join(f"{k if k == 'standard' else f'{k[1]} [{k[0]}]'} {v:.1f}" for k, v in memory.items())
    )
    s.notes.append(
        f"fused-modules LM, {batch}x{cfg['seq']} tokens per micro-batch: the boundary read pass over the fused weights' gradients (norm + non-finite flag) costs "
        + ", ".join(f"{read_pass[k] * 1e3:.2f} ms [{k[0]}] ({100 * read_pass[k] / times[k]:.1f}% of the window)"
                    for k in fused_keys)
    )
    return rows


def embedding_job(s: Settings, vocab: int) -> list[Row]:
    """One micro-batch's embedding backward into a gradient that already holds earlier micro-batches."""
    dev = s.device
    dim, tokens = (64, 256) if s.scale == "tiny" else (512, 4096)
    gen = torch.Generator().manual_seed(2)
    # Token ids skewed as text is (a few ids most of the time): Zipf-like.
    ranks = torch.rand(tokens, generator=gen).pow(3).mul(vocab).long().clamp_max(vocab - 1)
    idx = ranks.to(dev)
    grad_out = torch.randn(tokens, dim, generator=gen).to(dev)
    p_grad = torch.randn(vocab, dim, generator=gen).to(dev)
    arena = p_grad.reshape(-1).clone()
    touched = int(torch.unique(ranks).numel())

    def dense():
        g = torch.ops.aten.embedding_dense_backward(grad_out, idx, vocab, -1, False)
        p_grad.add_(g)  # AccumulateGrad, a gradient already there

    def rows_only():
        torch.ops.fusedaccum.embedding_weight_grad(arena, 0, idx, grad_out, vocab, -1, False, 1.0, False)

    calls = {"dense": dense}
    for b in s.backends:
        calls[b] = under(b, rows_only)
    times = s.clock.measure_interleaved(calls)
    table = vocab * dim * 4
    dense_bytes = table * 4 + tokens * dim * 4  # zero + p.grad read, the new gradient read, p.grad write; + dY
    rows_bytes = touched * dim * 4 * 2 + tokens * dim * 4  # touched rows read and written; + dY
    s.notes.append(
        f"embedding backward, vocab {vocab} x {dim}, {tokens} tokens ({touched} distinct): dense + p.grad += moves "
        f"{dense_bytes / 1e6:.0f} MB, rows only {rows_bytes / 1e6:.1f} MB"
    )
    case = f"vocab {vocab} x {dim}, {tokens} tokens ({touched} rows)"
    return [Row("fused-modules", f"embedding-{vocab // 1024}k", "fp32", b, case, "dense backward + p.grad +=",
                "rows only into the arena", times["dense"], times[b], vocab * dim, None) for b in s.backends]
