"""fa.Linear, fa.Embedding and fa.fuse_modules (fusedaccum/modules.py).

* Fused model vs the same model unfused (hooks) vs torch.optim + clip_grad_norm_, several
  windows, N = 1 and 4, fp32: the same parameters and norms. The model ties its embedding to
  its LM head, uses one Linear twice per forward, feeds 3-D inputs and has a padding row.
* Without a full-path accumulator the modules are torch's, bit for bit.
* bf16 parameters with master weights: the fused weight gradient is closer to float64 than the
  unfused one, which rounds each micro-batch's gradient to bf16.
* The fused writes keep the accumulator's promises: skip on a non-finite gradient, num_items,
  the loss scale, resume mid-window, acc.zero_grad(), errors for loss.backward().
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedaccum as fa

VOCAB, DIM, HIDDEN = 61, 16, 24
CLIP = 0.5


class TinyLM(nn.Module):
    """Embedding tied to the LM head, one MLP applied twice (a Linear used twice per forward)."""

    def __init__(self, padding_idx=0, tie=True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)  # batch x seq x dim
        for _ in range(2):
            h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def batches(n, seed=0, rows=3, seq=9, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, seq), generator=g).to(device) for _ in range(n)]


def run_torch(model, data, n):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    norms = []
    for k, tokens in enumerate(data):
        (lm_loss(model, tokens) / n).backward()
        if (k + 1) % n == 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
            opt.step()
            opt.zero_grad()
    return norms


def make_acc(model, n, **acc_kw):
    return fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), accumulation_steps=n,
                              max_grad_norm=CLIP, **acc_kw)


def run_fa(model, data, n, acc=None, **acc_kw):
    acc = acc or make_acc(model, n, **acc_kw)
    norms = []
    for tokens in data:
        acc.backward(lm_loss(model, tokens))
        if acc.step():
            norms.append(float(acc.grad_norm))
    return norms


def assert_same_params(got, want, rtol, what):
    for (name, p), q in zip(want.named_parameters(), got.parameters()):
        err = (p.detach().double() - q.detach().double()).abs().max().item()
        assert err <= rtol * max(p.detach().abs().max().item(), 1.0), f"{what}: {name} off by {err:.3g}"


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_equals_unfused_and_torch_optim(device_backend, n, tie):
    device, backend = device_backend
    torch.manual_seed(0)
    base = TinyLM(tie=tie).to(device)
    ref, unfused, fused = copy.deepcopy(base), copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
    data = batches(3 * n, device=device)
    want = run_torch(ref, data, n)
    assert run_fa(unfused, data, n) == pytest.approx(want, rel=1e-6)
    assert run_fa(fused, data, n) == pytest.approx(want, rel=1e-6)
    assert_same_params(unfused, ref, 1e-6, "unfused")
    assert_same_params(fused, ref, 1e-6, "fused")


def test_the_weight_gradient_never_reaches_autograd(device_backend):
    """No AccumulateGrad work and no hook fold for the fused weights: the hooks see no p.grad."""
    device, _ = device_backend
    torch.manual_seed(0)
    model = fa.fuse_modules(TinyLM(tie=False).to(device))
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2), accumulation_steps=2)
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g, seen=seen: seen.append(None if g is None else g.shape))
    acc.backward(lm_loss(model, batches(1, device=device)[0]))
    made = [s for s in seen if s is not None]
    assert made == [], f"autograd produced gradients of shapes {made}"
    assert all(p.grad is None for p in model.parameters())
    assert all(acc._windows[0].touched)


def test_without_a_full_path_accumulator_the_modules_are_torchs():
    torch.manual_seed(0)
    base = TinyLM()
    tokens = batches(1)[0]
    for setup in ("none", "torch.optim", "swap-in", "no_grad"):
        plain, fused = copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
        if setup == "torch.optim":
            torch.optim.AdamW(fused.parameters())
        if setup == "swap-in":
            fa.GradAccumulator(fa.AdamW(fused.parameters()))
        if setup == "no_grad":
            fa.GradAccumulator(fa.AdamW(fused.parameters()), accumulation_steps=2)
            with torch.no_grad():
                assert torch.equal(fused(tokens), plain(tokens))
            continue
        a, b = lm_loss(plain, tokens), lm_loss(fused, tokens)
        assert torch.equal(a, b), setup
        a.backward()
        b.backward()
        for p, q in zip(plain.parameters(), fused.parameters()):
            assert torch.equal(p.grad, q.grad), setup


def test_fuse_modules_keeps_parameters_keys_and_works_after_the_optimizer(device_backend):
    device, _ = device_backend
    torch.manual_seed(0)
    base = TinyLM().to(device)
    early = fa.fuse_modules(copy.deepcopy(base))
    late = copy.deepcopy(base)
    params_before = list(late.parameters())
    acc = make_acc(late, 2)
    assert fa.fuse_modules(late) is late
    assert list(late.parameters()) == params_before
    assert isinstance(late.up, fa.Linear) and isinstance(late.up, nn.Linear) and isinstance(late.emb, fa.Embedding)
    assert list(late.state_dict()) == list(base.state_dict())
    data = batches(4, device=device)
    run_fa(late, data, 2, acc=acc)
    run_fa(early, data, 2)
    assert_same_params(late, early, 0, "fused after the optimizer")


def test_fp32_three_d_input_and_embedding_options(device_backend):
    """padding_idx, scale_grad_by_freq and max_norm as in torch; a 3-D input to a Linear."""
    device, _ = device_backend
    torch.manual_seed(1)
    emb = nn.Embedding(30, 8, padding_idx=3, scale_grad_by_freq=True, max_norm=1.5)
    lin = nn.Linear(8, 5)
    base = nn.Sequential(emb, lin).to(device)
    ref, fused = copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    acc = fa.GradAccumulator(fa.SGD(fused.parameters(), lr=0.1, momentum=0.9), accumulation_steps=3)
    g = torch.Generator().manual_seed(2)
    for k in range(6):
        tokens = torch.randint(0, 10, (2, 4, 5), generator=g).to(device)  # few distinct rows, repeats, the padding row
        target = torch.randn(2, 4, 5, 5, generator=g).to(device)
        (F.mse_loss(ref(tokens), target) / 3).backward()
        acc.backward(F.mse_loss(fused(tokens), target))
        acc.step()
        if (k + 1) % 3 == 0:
            o_ref.step()
            o_ref.zero_grad()
    assert_same_params(fused, ref, 1e-6, "embedding options")
    assert torch.equal(fused[0].weight[3], ref[0].weight[3])


def test_bf16_fused_weight_gradient_is_closer_to_float64():
    """One Linear, bf16 weights and inputs, N = 8: the accumulated weight gradient against float64.
    Unfused, each micro-batch's gradient is a bf16 tensor (a rounding of ~2^-9 relative);
    fused, the GEMM accumulates into the fp32 arena."""
    torch.manual_seed(3)
    n = 8
    base = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 64, generator=g).to(torch.bfloat16) for _ in range(n)]
    ts = [torch.randn(16, 32, generator=g).to(torch.bfloat16) for _ in range(n)]
    exact = sum(t.double().t() @ x.double() for x, t in zip(xs, ts)) / n  # d/dW of sum(t * (x W^T))

    def accumulated(model):
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), master_weights=True), accumulation_steps=n)
        for x, t in zip(xs, ts):
            acc.backward((model(x).float() * t.float()).sum())
        return acc._windows[0].grad_views[0].double()

    err_unfused = (accumulated(copy.deepcopy(base)) - exact).abs().max().item()
    err_fused = (accumulated(fa.fuse_modules(copy.deepcopy(base))) - exact).abs().max().item()
    assert err_fused < 1e-5 * exact.abs().max().item()
    assert err_fused * 100 < err_unfused


def test_bf16_master_weights_fused_equals_unfused_within_bf16():
    torch.manual_seed(5)
    base = TinyLM().to(torch.bfloat16)
    unfused, fused = copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
    data = batches(8)
    for m in (unfused, fused):
        acc = fa.GradAccumulator(fa.AdamW(m.parameters(), lr=1e-3, master_weights=True), accumulation_steps=4,
                                 max_grad_norm=CLIP)
        for tokens in data:
            acc.backward(lm_loss(m, tokens))
            acc.step()
    for p, q in zip(unfused.parameters(), fused.parameters()):
        ulp = 2.0 ** (torch.floor(torch.log2(p.detach().float().abs().max())) - 7)
        assert (p.float() - q.float()).abs().max() <= 2 * ulp


def test_autocast_bf16(device_backend):
    """Under autocast the fused Linear casts as F.linear does; its weight gradient is fp32-accumulated."""
    device, _ = device_backend
    torch.manual_seed(6)
    base = TinyLM().to(device)
    unfused, fused = copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
    tokens = batches(1, device=device)[0]
    grads = []
    for m in (unfused, fused):
        acc = fa.GradAccumulator(fa.AdamW(m.parameters()), accumulation_steps=2)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = m(tokens)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.flatten(0, 1).float(), tokens.flatten())
        acc.backward(loss)
        grads.append([v.clone() for v in acc._windows[0].grad_views])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_non_finite_gradient_in_a_fused_layer_skips_the_window(device_backend):
    device, _ = device_backend
    torch.manual_seed(7)
    model = fa.fuse_modules(TinyLM().to(device))
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2), accumulation_steps=2, max_grad_norm=CLIP)
    before = [p.detach().clone() for p in model.parameters()]
    tokens = batches(2, device=device)
    acc.backward(lm_loss(model, tokens[0]))
    acc.step()
    with torch.no_grad():
        model.down.bias.fill_(float("inf"))  # every layer is fused: only fused writes see the NaNs
    before[model_index(model, model.down.bias)] = model.down.bias.detach().clone()
    acc.backward(lm_loss(model, tokens[1]))
    assert acc.step() and acc.step_skipped
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def model_index(model, param):
    return [i for i, p in enumerate(model.parameters()) if p is param][0]


def test_num_items_and_loss_scale(device_backend):
    """Sum losses with num_items and a dynamic loss scale: fused = unfused."""
    device, _ = device_backend
    torch.manual_seed(8)
    base = TinyLM().to(device)
    results = []
    for m in (copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))):
        acc = fa.GradAccumulator(fa.AdamW(m.parameters(), lr=1e-2), accumulation_steps=3, loss_scale="dynamic",
                                 max_grad_norm=CLIP)
        for tokens in [batches(1, seed=k, rows=2 + k % 3, device=device)[0] for k in range(6)]:  # windows of uneven sizes
            logits = m(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
            acc.backward(loss, num_items=tokens[:, 1:].numel())
            acc.step()
        results.append(m)
    assert_same_params(results[1], results[0], 1e-6, "num_items + loss scale")


def test_resume_mid_window_and_zero_grad(device_backend):
    device, _ = device_backend
    torch.manual_seed(9)
    base = TinyLM().to(device)
    data = batches(8, device=device)
    straight = fa.fuse_modules(copy.deepcopy(base))
    run_fa(straight, data, 4)

    resumed = fa.fuse_modules(copy.deepcopy(base))
    acc = fa.GradAccumulator(fa.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1), accumulation_steps=4,
                             max_grad_norm=CLIP)
    acc.backward(lm_loss(resumed, data[7]))  # a window that is then discarded
    acc.zero_grad()
    for tokens in data[:6]:
        acc.backward(lm_loss(resumed, tokens))
        acc.step()
    saved = copy.deepcopy((resumed.state_dict(), acc.optimizer.state_dict(), acc.state_dict()))
    again = fa.fuse_modules(copy.deepcopy(base))
    again.load_state_dict(saved[0])
    acc2 = fa.GradAccumulator(fa.AdamW(again.parameters(), lr=1e-2, weight_decay=0.1), accumulation_steps=4,
                              max_grad_norm=CLIP)
    acc2.optimizer.load_state_dict(saved[1])
    acc2.load_state_dict(saved[2])
    for tokens in data[6:]:
        acc2.backward(lm_loss(again, tokens))
        acc2.step()
    assert_same_params(again, straight, 0, "resumed mid-window")


def test_loss_backward_on_a_fused_model_is_refused():
    model = fa.fuse_modules(TinyLM())
    fa.GradAccumulator(fa.AdamW(model.parameters()), accumulation_steps=2)
    with pytest.raises(RuntimeError, match="acc.backward"):
        lm_loss(model, batches(1)[0]).backward()


def test_torch_compile_fullgraph_traces_the_torch_modules():
    torch.manual_seed(10)
    base = TinyLM()
    data = batches(4)
    eager = fa.fuse_modules(copy.deepcopy(base))
    run_fa(eager, data, 2)
    compiled_model = fa.fuse_modules(copy.deepcopy(base))
    acc = fa.GradAccumulator(fa.AdamW(compiled_model.parameters(), lr=1e-2, weight_decay=0.1), accumulation_steps=2,
                             max_grad_norm=CLIP)
    step = torch.compile(lambda tokens: lm_loss(compiled_model, tokens), fullgraph=True)
    for tokens in data:
        acc.backward(step(tokens))
        acc.step()
    assert_same_params(compiled_model, eager, 1e-5, "compiled")


# -- p.main_grad: layers written for Megatron-LM / TransformerEngine write into the arena too -------


class _MainGradLinear(torch.autograd.Function):
    """What TransformerEngine's Linear(fuse_wgrad_accumulation=True) does in backward: add dW into
    weight.main_grad (always beta = 1), set weight.grad_added_to_main_grad, and hand autograd a
    placeholder gradient (TE's is torch.empty: garbage, NaN here)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if hasattr(weight, "main_grad"):
            weight.main_grad.view(weight.shape).add_(dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
            weight.grad_added_to_main_grad = True
            return dy @ weight, torch.full_like(weight, float("nan"))
        return dy @ weight, dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


class MainGradNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8) * 0.3)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.tanh(_MainGradLinear.apply(x, self.w)))


def test_main_grad_writers_add_into_the_arena(device_backend):
    """N = 3 over several windows, a clip: the same parameters as torch.optim."""
    device, _ = device_backend
    torch.manual_seed(11)
    base = MainGradNet().to(device)
    ref, got = copy.deepcopy(base), copy.deepcopy(base)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    acc = fa.GradAccumulator(fa.AdamW(got.parameters(), lr=1e-2), accumulation_steps=3, max_grad_norm=CLIP,
                             main_grad=True)
    assert got.w.main_grad.data_ptr() == acc._windows[0].grad_views[0].data_ptr()
    g = torch.Generator().manual_seed(12)
    norms = []
    for k in range(9):
        x, y = torch.randn(2, 5, 8, generator=g).to(device), torch.randn(2, 5, 3, generator=g).to(device)
        (F.mse_loss(ref(x), y) / 3).backward()
        acc.backward(F.mse_loss(got(x), y))
        if acc.step():
            norms.append((float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)), float(acc.grad_norm)))
            o_ref.step()
            o_ref.zero_grad()
        assert got.w.grad is None and got.w.grad_added_to_main_grad is False
    for want, have in norms:
        assert have == pytest.approx(want, rel=1e-6)
    assert_same_params(got, ref, 1e-6, "main_grad")
    acc._detach()
    assert not hasattr(got.w, "main_grad")


def test_a_stale_slice_under_main_grad_is_an_error_until_zero_grad():
    torch.manual_seed(13)
    model = MainGradNet()
    acc = fa.GradAccumulator(fa.AdamW(model.parameters()), accumulation_steps=1, main_grad=True)
    x, y = torch.randn(4, 8), torch.randn(4, 3)
    main_grad = model.w.main_grad
    del model.w.main_grad  # the layer takes the ordinary path for a window: its slice is filled by a fold
    acc.backward(F.mse_loss(model(x), y))
    acc.step()
    model.w.main_grad = main_grad
    with pytest.raises(RuntimeError, match="acc.zero_grad"):
        acc.backward(F.mse_loss(model(x), y))
    acc.zero_grad()
    acc.backward(F.mse_loss(model(x), y))
    assert torch.isfinite(main_grad).all() and acc.step()


def test_main_grad_needs_the_full_path():
    with pytest.raises(ValueError, match="accumulation_steps"):
        fa.GradAccumulator(fa.AdamW(MainGradNet().parameters()), main_grad=True)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(device_backend, reentrant):
    """Blocks under torch.utils.checkpoint: the fused layers run again in the backward (reentrant:
    only there, the first forward being under no_grad) and still write into the arena once each."""
    device, _ = device_backend

    class Checkpointed(TinyLM):
        def forward(self, tokens):
            h = self.emb(tokens)
            for _ in range(2):
                h = h + torch.utils.checkpoint.checkpoint(lambda t: self.down(torch.tanh(self.up(t))), h,
                                                          use_reentrant=reentrant)
            return self.head(h)

    torch.manual_seed(14)
    base = Checkpointed().to(device)
    ref, fused = copy.deepcopy(base), fa.fuse_modules(copy.deepcopy(base))
    data = batches(6, device=device)
    want = run_torch(ref, data, 3)
    assert run_fa(fused, data, 3) == pytest.approx(want, rel=1e-6)
    assert_same_params(fused, ref, 1e-6, "checkpointed")
