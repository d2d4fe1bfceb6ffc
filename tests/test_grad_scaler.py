"""torch.amp.GradScaler driving a fusedaccum optimizer, as it drives torch's fused Adam: the
scaler hands over the scale and the non-finite flag (`_step_supports_amp_scaling`) and the
fused step applies both, so parameters, skipped steps and the scale's backoff equal the same
loop with torch.optim (which unscales p.grad in place)."""
import pytest
import torch

import fusedaccum as fa

N = 2


def run(device, make_opt, attach, unscale_and_clip, inf_window, backend_steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(device)
    opt = make_opt(model.parameters())
    if attach:
        fa.GradAccumulator(opt)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    for window in range(backend_steps):
        for _ in range(N):
            x = torch.randn(4, 6, generator=gen).to(device)
            loss = model(x).square().mean() / N
            if window == inf_window:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return model, scaler.get_scale()


@pytest.mark.parametrize("attach", [False, True], ids=["plain", "swap-in"])
@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["step", "unscale+clip"])
@pytest.mark.parametrize("inf_window", [None, 1], ids=["finite", "overflow"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_grad_scaler_matches_torch(device_backend, name, inf_window, unscale_and_clip, attach):
    device, _ = device_backend
    kwargs = dict(lr=1e-2) if name == "Adam" else dict(lr=0.1, momentum=0.9)
    ref, ref_scale = run(device, lambda p: getattr(torch.optim, name)(p, foreach=False, **kwargs), False, unscale_and_clip, inf_window)
    got, scale = run(device, lambda p: getattr(fa, name)(p, **kwargs), attach, unscale_and_clip, inf_window)
    assert scale == ref_scale
    # growth_interval=3 over 4 windows: the scale grows once without an overflow, and not at all
    # after the backoff of window 1.
    assert scale == (2.0**9 if inf_window is not None else 2.0**11)
    for a, b in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_grad_scaler_with_hidden_gradients_is_an_error():
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    opt = fa.AdamW(model.parameters(), master_weights=True)
    fa.GradAccumulator(opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(1, 4, dtype=torch.bfloat16)).float().sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot see the gradients"):
        scaler.step(opt)
