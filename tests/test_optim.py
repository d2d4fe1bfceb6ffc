"""fa.SGD / fa.Adam / fa.AdamW against torch.optim: a hyperparameter grid, two param groups, an
LR scheduler, parameters that skip steps, and state_dicts in both directions."""
import copy

import pytest
import torch

import fusedaccum as fa


def make_params(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (17,), (1,), (0,), (5, 3, 2), (300, 101)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def grads_for(params, step, device):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
        # parameter 1 gets a gradient only on even steps: torch.optim skips it otherwise
        out.append(None if (i == 1 and step % 2) else g)
    return out


def run(opt_cls, params, kwargs, steps, device, groups=False, scheduler=False, edit=None):
    """edit: what param_groups[0] becomes before step 2 (torch.optim reads it at every step)."""
    if groups:
        spec = [{"params": params[:2], "lr": kwargs.get("lr", 1e-3) * 3}, {"params": params[2:]}]
    else:
        spec = params
    opt = opt_cls(spec, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    for s in range(steps):
        if edit is not None and s == 2:
            opt.param_groups[0].update(edit)
        for p, g in zip(params, grads_for(params, s, device)):
            p.grad = g
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return opt


def assert_same_state(torch_opt, fa_opt):
    """Same state keys and values per parameter (fa adds a step count to SGD's state)."""
    sd_t, sd_f = torch_opt.state_dict(), fa_opt.state_dict()
    for k, st in sd_t["state"].items():
        for key, val in st.items():
            torch.testing.assert_close(sd_f["state"][k][key].to(val.device).float(), val.float(), rtol=1e-5, atol=1e-6)
    assert set(sd_t["state"]) == set(sd_f["state"])


GRID = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=1e-2, eps=1e-6, maximize=True)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=1e-2, weight_decay=0.5, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("name,kwargs", GRID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRID)])
@pytest.mark.parametrize("groups,scheduler", [(False, False), (True, True)])
def test_matches_torch_optim(device_backend, name, kwargs, groups, scheduler):
    device, backend = device_backend
    ref = make_params(device)
    ours = make_params(device)
    torch_opt = run(getattr(torch.optim, name), ref, kwargs, 5, device, groups, scheduler)
    fa_opt = run(getattr(fa, name), ours, kwargs, 5, device, groups, scheduler)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch_opt.state_dict()["param_groups"] == [{**g} for g in fa_opt.state_dict()["param_groups"]]
    assert_same_state(torch_opt, fa_opt)


@pytest.mark.parametrize("name,kwargs", GRID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRID)])
def test_large_gradients_are_stepped_where_they_are(device_backend, name, kwargs, monkeypatch):
    """A large contiguous p.grad is read in place by a step launch of its own (no copy into the
    arena); the others, a transposed large one included, are copied first. Mixed in one group,
    with a parameter that skips steps, the result is torch.optim's."""
    from fusedaccum import optim as fa_optim

    device, backend = device_backend
    monkeypatch.setitem(fa_optim.DIRECT_STEP_NUMEL, device.type, 500)  # (33, 17) and (300, 101) qualify
    ref, ours = make_params(device), make_params(device)
    torch_opt = getattr(torch.optim, name)(ref, **kwargs)
    fa_opt = getattr(fa, name)(ours, **kwargs)
    stepped_from = []
    real = type(fa_opt)._step_range
    monkeypatch.setattr(type(fa_opt), "_step_range",
                        lambda self, group, param, copy, grad, *rest: (stepped_from.append(grad.data_ptr()),
                                                                       real(self, group, param, copy, grad, *rest)))
    for s in range(5):
        grads = grads_for(ours, s, device)
        for p, q, g in zip(ref, ours, grads):
            p.grad = q.grad = None if g is None else g.clone()
        ours[5].grad = ours[5].grad.t().contiguous().t()  # (300, 101) with transposed strides: copied
        stepped_from.clear()
        torch_opt.step()
        fa_opt.step()
        assert ours[0].grad.data_ptr() in stepped_from  # read in place
        assert ours[5].grad.data_ptr() not in stepped_from and not fa_opt._arenas[0].direct
        torch_opt.zero_grad()
        fa_opt.zero_grad()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


EDITS = [  # (optimizer, its arguments, what param_groups[0] becomes after 2 of 5 steps)
    ("SGD", dict(lr=0.1), dict(momentum=0.9)),
    ("SGD", dict(lr=0.1), dict(momentum=0.9, dampening=0.5, nesterov=False)),
    ("SGD", dict(lr=0.1, momentum=0.9), dict(momentum=0.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), dict(nesterov=True, dampening=0.0, maximize=True)),
    ("Adam", dict(lr=1e-2), dict(betas=(0.5, 0.9), weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=1e-2), dict(eps=1e-3, weight_decay=0.0)),
]


@pytest.mark.parametrize("name,kwargs,edit", EDITS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(EDITS)])
def test_hyperparameters_edited_between_steps(device_backend, name, kwargs, edit):
    """torch.optim reads param_groups at every step; momentum turned on for an SGD that stepped
    without it starts each buffer as a copy of the gradient (the first step of momentum) and
    shows it in the state."""
    device, backend = device_backend
    ref, ours = make_params(device), make_params(device)
    torch_opt = run(getattr(torch.optim, name), ref, kwargs, 5, device, edit=edit)
    fa_opt = run(getattr(fa, name), ours, kwargs, 5, device, edit=edit)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert_same_state(torch_opt, fa_opt)


def test_defaults_match_torch():
    for name in ("SGD", "Adam", "AdamW"):
        p = [torch.nn.Parameter(torch.zeros(3))]
        assert getattr(fa, name)(p).defaults == getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(3))]).defaults
        assert isinstance(getattr(fa, name)([torch.nn.Parameter(torch.zeros(3))]), getattr(torch.optim, name))


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=1e-2, amsgrad=True)), ("AdamW", dict(lr=1e-2)),
                                         ("SGD", dict(lr=0.1, momentum=0.9))])
@pytest.mark.parametrize("direction", ["torch_to_fa", "fa_to_torch"])
def test_state_dict_round_trip(device_backend, name, kwargs, direction):
    """Train 3 steps with one, load its state_dict into the other, train 3 more: equal to 6 steps."""
    device, backend = device_backend
    first, second = (torch.optim, fa) if direction == "torch_to_fa" else (fa, torch.optim)
    straight = make_params(device)
    opt = getattr(torch.optim, name)(straight, **kwargs)
    for s in range(6):
        for p, g in zip(straight, grads_for(straight, s, device)):
            p.grad = g
        opt.step()

    a = make_params(device)
    opt_a = getattr(first, name)(a, **kwargs)
    for s in range(3):
        for p, g in zip(a, grads_for(a, s, device)):
            p.grad = g
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = getattr(second, name)(b, **kwargs)
    opt_b.load_state_dict(saved)
    for s in range(3, 6):
        for p, g in zip(b, grads_for(b, s, device)):
            p.grad = g
        opt_b.step()
    for x, y in zip(straight, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_parameters_live_in_the_arena():
    params = make_params("cpu")
    opt = fa.AdamW(params)
    (arena,) = opt.arenas
    for p, o in zip(params, arena.offsets):
        assert p.numel() == 0 or p.data_ptr() == arena.param.data_ptr() + o * 4
        assert o % 16 == 0


def test_master_weights_track_fp32_where_bf16_stalls():
    """Tiny updates vanish when added to bf16 weights directly; the fp32 master keeps them."""
    w32 = torch.nn.Parameter(torch.ones(64))
    w16 = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    wm = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opts = [fa.SGD([w32], lr=1e-4), fa.SGD([w16], lr=1e-4), fa.SGD([wm], lr=1e-4, master_weights=True)]
    for _ in range(100):
        for w, o in zip((w32, w16, wm), opts):
            w.grad = torch.ones_like(w)
            o.step()
    assert torch.equal(w16, torch.ones_like(w16)), "plain bf16 stalls: 1 - 1e-4 rounds back to 1"
    torch.testing.assert_close(opts[2].state[wm]["master_param"], w32.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(wm, w32.detach().bfloat16())
