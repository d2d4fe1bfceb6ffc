"""fa.Lion against Lion written here from the paper (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms", Algorithm 2) in plain PyTorch, one parameter at a time: steps,
param groups, maximize, weight decay, parameters that skip steps, state_dicts both ways,
master weights, and the accumulator's full path with clipping."""
import copy

import pytest
import torch

import fusedaccum as fa
from test_optim import grads_for, make_params


class PaperLion(torch.optim.Optimizer):
    """The update of Algorithm 2, in fp32, sign(0) = 0: the reference (state: exp_avg)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = m * beta1 + g * (1 - beta1)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(c), alpha=-group["lr"])
                m.mul_(beta2).add_(g, alpha=1 - beta2)


def run(opt_cls, params, kwargs, steps, device, groups=False):
    spec = [{"params": params[:2], "lr": kwargs.get("lr", 1e-4) * 3}, {"params": params[2:]}] if groups else params
    opt = opt_cls(spec, **kwargs)
    for s in range(steps):
        for p, g in zip(params, grads_for(params, s, device)):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return opt


GRID = [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.95, 0.98), maximize=True)]


@pytest.mark.parametrize("kwargs", GRID, ids=[str(i) for i in range(len(GRID))])
@pytest.mark.parametrize("groups", [False, True])
def test_matches_the_paper(device_backend, kwargs, groups):
    device, _ = device_backend
    ref, ours = make_params(device), make_params(device)
    ref_opt = run(PaperLion, ref, kwargs, 6, device, groups)
    fa_opt = run(fa.Lion, ours, kwargs, 6, device, groups)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    sd_r, sd_f = ref_opt.state_dict(), fa_opt.state_dict()
    assert sd_r["param_groups"] == sd_f["param_groups"]
    assert set(sd_r["state"]) == set(sd_f["state"])
    for k, st in sd_r["state"].items():
        assert set(sd_f["state"][k]) == {"exp_avg"}, "exp_avg only, as lion-pytorch and bitsandbytes keep it"
        torch.testing.assert_close(sd_f["state"][k]["exp_avg"], st["exp_avg"], rtol=1e-6, atol=1e-7)


def test_defaults_and_validation():
    opt = fa.Lion([torch.nn.Parameter(torch.zeros(3))])
    assert opt.defaults == dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    assert isinstance(opt, torch.optim.Optimizer)
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            fa.Lion([torch.nn.Parameter(torch.zeros(3))], **bad)


@pytest.mark.parametrize("direction", ["paper_to_fa", "fa_to_paper"])
def test_state_dict_round_trip(device_backend, direction):
    """3 steps with one, its state_dict into the other, 3 more: equal to 6 steps straight."""
    device, _ = device_backend
    first, second = (PaperLion, fa.Lion) if direction == "paper_to_fa" else (fa.Lion, PaperLion)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    straight = make_params(device)
    run(PaperLion, straight, kwargs, 6, device)
    a = make_params(device)
    opt_a = first(a, **kwargs)
    for s in range(3):
        for p, g in zip(a, grads_for(a, s, device)):
            p.grad = g
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = second(b, **kwargs)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for s in range(3, 6):
        for p, g in zip(b, grads_for(b, s, device)):
            p.grad = g
        opt_b.step()
    for x, y in zip(straight, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_master_weights_follow_the_fp32_run(device_backend):
    device, _ = device_backend
    w32 = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(3)).to(device))
    wm = torch.nn.Parameter(w32.detach().bfloat16())
    ref = PaperLion([w32], lr=1e-4, weight_decay=0.1)
    opt = fa.Lion([wm], lr=1e-4, weight_decay=0.1, master_weights=True)
    w32.data.copy_(wm.detach().float())  # both start from the same bf16-representable values
    for s in range(20):
        g = torch.randn(257, generator=torch.Generator().manual_seed(50 + s)).to(device)
        w32.grad, wm.grad = g, g.bfloat16()
        ref.step()
        opt.step()
    # The gradient reaches Lion only through sign(c): bf16 gradients rarely flip a sign, and lr is
    # far below bf16's resolution at |w| ~ 1, so plain bf16 weights would not move; the master does.
    master = opt.state[wm]["master_param"]
    assert (master - w32.detach()).abs().max().item() <= 2 * 1e-4
    assert torch.equal(wm, master.bfloat16())


def test_full_path_with_clipping(device_backend):
    """GradAccumulator(fa.Lion, N=3, max_grad_norm): the mean of the micro-batches, clipped, then Lion."""
    device, _ = device_backend
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    ref_model = copy.deepcopy(model)
    acc = fa.GradAccumulator(fa.Lion(model.parameters(), lr=1e-2, weight_decay=0.1), accumulation_steps=3,
                             max_grad_norm=0.05)
    ref = PaperLion(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    for w in range(4):
        for m in range(3):
            gen = torch.Generator().manual_seed(10 * w + m)
            x, y = torch.randn(5, 8, generator=gen).to(device), torch.randn(5, 4, generator=gen).to(device)
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            acc.step()
            (torch.nn.functional.mse_loss(ref_model(x), y) / 3).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        ref.step()
        ref.zero_grad()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
