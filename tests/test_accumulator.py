"""GradAccumulator on every backend: the seed loop three ways, visible p.grad in swap-in mode,
exact item-count normalization, clipping, skip-on-inf, loss scaling and resume mid-window."""
import copy

import pytest
import torch

import fusedaccum as fa

N = 4


def seed_model(device, small=False):
    torch.manual_seed(0)
    vocab, dim = (100, 16) if small else (1000, 128)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)).to(device)


def seed_data(device, vocab, steps=20, pad=False):
    gen = torch.Generator().manual_seed(1)
    data = []
    for s in range(steps):
        x = torch.randint(0, vocab, (8, 20), generator=gen)
        y = torch.randint(0, vocab, (8, 20), generator=gen)
        if pad:  # a different number of ignored (padding) targets in every micro-batch
            y[:, 20 - (3 * s) % 17 :] = -100
        data.append((x.to(device), y.to(device)))
    return data


def loss_fn(model, x, y, vocab, reduction="mean"):
    return torch.nn.functional.cross_entropy(model(x).view(-1, vocab), y.view(-1), reduction=reduction)


def standard_loop(model, opt, data, vocab, clip=None):
    opt.zero_grad()
    norms = []
    for step, (x, y) in enumerate(data):
        (loss_fn(model, x, y, vocab) / N).backward()
        if (step + 1) % N == 0:
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            opt.step()
            opt.zero_grad()
    return norms


def full_path(model, acc, data, vocab, items=False):
    norms = []
    for x, y in data:
        if items:
            acc.backward(loss_fn(model, x, y, vocab, reduction="sum"), num_items=int((y != -100).sum()))
        else:
            acc.backward(loss_fn(model, x, y, vocab))
        if acc.step():
            norms.append(acc.grad_norm.clone())
    return norms


def assert_same_params(a, b, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=atol)


def test_seed_loop_three_ways(device_backend):
    """The seed: Embedding(1000,128) + Linear(128,1000), Adam 1e-3, batch 8x20, N=4, 20 steps."""
    device, backend = device_backend
    vocab = 1000
    data = seed_data(device, vocab)

    ref = seed_model(device)
    standard_loop(ref, torch.optim.Adam(ref.parameters(), lr=1e-3), data, vocab)

    swap = seed_model(device)
    opt = fa.Adam(swap.parameters(), lr=1e-3)
    fa.GradAccumulator(opt)
    standard_loop(swap, opt, data, vocab)
    assert_same_params(ref, swap)

    full = seed_model(device)
    acc = fa.GradAccumulator(fa.Adam(full.parameters(), lr=1e-3), accumulation_steps=N)
    full_path(full, acc, data, vocab)
    assert_same_params(ref, full)


def test_swap_in_grad_is_visible_and_clippable(device_backend):
    """Same-dtype swap-in leaves p.grad to autograd: user code reads and clips torch's own gradients."""
    device, _ = device_backend
    data = seed_data(device, 100, steps=N)
    ref = seed_model(device, small=True)
    ref_norms = standard_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9), data, 100, clip=0.5)

    model = seed_model(device, small=True)
    opt = fa.SGD(model.parameters(), lr=0.5, momentum=0.9)
    acc = fa.GradAccumulator(opt)
    opt.zero_grad()
    for x, y in data:
        (loss_fn(model, x, y, 100) / N).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() != opt.arenas[0].grad.data_ptr()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    torch.testing.assert_close(norm, ref_norms[0], rtol=1e-5, atol=0)
    opt.step()
    opt.zero_grad()
    assert acc.sync_gradients
    assert_same_params(ref, model)


def test_full_path_num_items_is_the_exact_large_batch_mean(device_backend):
    device, _ = device_backend
    data = seed_data(device, 100, steps=N, pad=True)
    ref = seed_model(device, small=True)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    loss_fn(ref, x, y, 100).backward()  # the large batch: mean over every non-ignored target
    opt.step()

    model = seed_model(device, small=True)
    acc = fa.GradAccumulator(fa.SGD(model.parameters(), lr=1.0), accumulation_steps=N)
    for x, y in data:
        acc.backward(loss_fn(model, x, y, 100, reduction="sum"), num_items=(y != -100).sum())
        closed = acc.step()
    assert closed
    assert_same_params(ref, model)

    naive = seed_model(device, small=True)  # the per-micro-batch mean / N that padding breaks
    standard_loop(naive, torch.optim.SGD(naive.parameters(), lr=1.0), data, 100)
    assert max((p - q).abs().max().item() for p, q in zip(ref.parameters(), naive.parameters())) > 1e-5


def test_full_path_clips_like_clip_grad_norm(device_backend):
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N)
    ref = seed_model(device, small=True)
    ref_norms = standard_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data, 100, clip=0.1)

    model = seed_model(device, small=True)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2), accumulation_steps=N, max_grad_norm=0.1)
    norms = full_path(model, acc, data, 100)
    for got, want in zip(norms, ref_norms):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert ref_norms[0] > 0.1, "the test must actually clip"
    assert_same_params(ref, model, atol=2e-6)


@pytest.mark.parametrize("loss_scale", [None, 1024.0, "dynamic"])
def test_non_finite_window_is_skipped(device_backend, loss_scale):
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N)
    model = seed_model(device, small=True)
    opt = fa.Adam(model.parameters(), lr=1e-2)
    acc = fa.GradAccumulator(opt, accumulation_steps=N, loss_scale=loss_scale)
    full_path(model, acc, data[:N], 100)  # one good window so that there is state to protect
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    scale = acc.loss_scale
    for k, (x, y) in enumerate(data[N:]):
        loss = loss_fn(model, x, y, 100)
        acc.backward(loss * float("nan") if k == 1 else loss)
        closed = acc.step()
    assert closed and acc.step_skipped
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for k, st in state["state"].items():
        for key, val in st.items():
            assert torch.equal(after["state"][k][key], val)
    if loss_scale == "dynamic":
        assert acc.loss_scale == scale / 2
    # The next window starts clean and updates again.
    full_path(model, acc, data[:N], 100)
    assert not acc.step_skipped
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_power_of_two_loss_scale_equals_unscaled(device_backend):
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N)
    runs = []
    for loss_scale in (None, 2.0**12, "dynamic"):
        model = seed_model(device, small=True)
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2), accumulation_steps=N, loss_scale=loss_scale)
        full_path(model, acc, data, 100)
        runs.append(model)
    for other in runs[1:]:
        assert_same_params(runs[0], other, atol=0)


@pytest.mark.parametrize("k", [1, N - 1])
@pytest.mark.parametrize("items", [False, True])
def test_resume_mid_window_is_bit_identical(device_backend, k, items):
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N, pad=items)
    straight = seed_model(device, small=True)
    acc = fa.GradAccumulator(fa.AdamW(straight.parameters(), lr=1e-2), accumulation_steps=N, loss_scale="dynamic")
    full_path(straight, acc, data, 100, items)

    model = seed_model(device, small=True)
    opt = fa.AdamW(model.parameters(), lr=1e-2)
    acc = fa.GradAccumulator(opt, accumulation_steps=N, loss_scale="dynamic")
    full_path(model, acc, data[: N + k], 100, items)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()})

    resumed = seed_model(device, small=True)
    resumed.load_state_dict(saved["model"])
    opt2 = fa.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    acc2 = fa.GradAccumulator(opt2, accumulation_steps=N, loss_scale="dynamic")
    acc2.load_state_dict(saved["acc"])
    full_path(resumed, acc2, data[N + k :], 100, items)
    assert_same_params(straight, resumed, atol=0)


def test_parameter_without_gradient_is_left_alone(device_backend):
    """A branch unused in a whole window: torch.optim skips it (no decay, no step count)."""
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N)

    def two_heads():
        torch.manual_seed(0)
        return torch.nn.ModuleList([torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100), torch.nn.Linear(16, 100)]).to(device)

    def forward(m, x, y, window):
        head = m[1] if window == 0 else m[2]
        return torch.nn.functional.cross_entropy(head(m[0](x)).view(-1, 100), y.view(-1))

    ref = two_heads()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for s, (x, y) in enumerate(data):
        (forward(ref, x, y, s // N) / N).backward()
        if (s + 1) % N == 0:
            opt.step()
            opt.zero_grad()

    for mode in ("swap", "full"):
        model = two_heads()
        opt2 = fa.AdamW(model.parameters(), lr=1e-2)
        acc = fa.GradAccumulator(opt2, accumulation_steps=N if mode == "full" else None)
        for s, (x, y) in enumerate(data):
            if mode == "full":
                acc.backward(forward(model, x, y, s // N))
                acc.step()
            else:
                (forward(model, x, y, s // N) / N).backward()
                if (s + 1) % N == 0:
                    opt2.step()
                    opt2.zero_grad()
        assert_same_params(ref, model)
        steps = {k: v["step"].item() for k, v in opt2.state_dict()["state"].items()}
        assert steps == {k: v["step"].item() for k, v in opt.state_dict()["state"].items()}


@pytest.mark.parametrize("mode", ["swap", "full"])
def test_frozen_then_unfrozen_parameter(device_backend, mode):
    """requires_grad=False parameters are left alone as torch.optim does, and join in when unfrozen."""
    device, _ = device_backend
    data = seed_data(device, 100, steps=3 * N)

    def train(model, opt, acc):
        for s, (x, y) in enumerate(data):
            if s == N:
                model[0].weight.requires_grad_(True)  # unfreeze the embedding after one window
            if acc is not None and acc.full:
                acc.backward(loss_fn(model, x, y, 100))
                acc.step()
            else:
                (loss_fn(model, x, y, 100) / N).backward()
                if (s + 1) % N == 0:
                    opt.step()
                    opt.zero_grad()

    ref = seed_model(device, small=True)
    ref[0].weight.requires_grad_(False)
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), None)

    model = seed_model(device, small=True)
    model[0].weight.requires_grad_(False)
    opt = fa.Adam(model.parameters(), lr=1e-2)
    acc = fa.GradAccumulator(opt, accumulation_steps=N if mode == "full" else None)
    train(model, opt, acc)
    assert_same_params(ref, model)


def test_dynamic_loss_scale_grows_after_good_windows(device_backend):
    """GradScaler's rule: growth_interval good windows in a row double the scale; an overflow
    halves it and restarts the count."""
    device, _ = device_backend
    data = seed_data(device, 100, steps=N)
    model = seed_model(device, small=True)
    acc = fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=1, loss_scale="dynamic",
                             growth_interval=3)
    seen = []
    for k, (x, y) in enumerate(data * 2):
        loss = loss_fn(model, x, y, 100)
        acc.backward(loss * float("inf") if k == 4 else loss)
        acc.step()
        seen.append(acc.loss_scale)
    s = 2.0**16
    assert seen == [s, s, 2 * s, 2 * s, s, s, s, 2 * s]


@pytest.mark.parametrize("mode", ["swap", "full"])
@pytest.mark.parametrize("arena", ["fp32+master", "bf16"])
def test_bf16_parameters(device_backend, mode, arena):
    """bf16 parameters follow the fp32 run closely, with an fp32 arena and master weights (p.grad
    cannot show the fp32 arena: None in swap-in mode) or with a bf16 arena (accum_dtype=None:
    p.grad is the arena view)."""
    device, _ = device_backend
    data = seed_data(device, 100, steps=2 * N)
    ref = seed_model(device, small=True)
    standard_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data, 100)

    fp32 = arena == "fp32+master"
    model = seed_model(device, small=True).to(torch.bfloat16)
    opt = fa.AdamW(model.parameters(), lr=1e-2, master_weights=fp32)
    acc = fa.GradAccumulator(opt, accumulation_steps=N if mode == "full" else None,
                             accum_dtype=torch.float32 if fp32 else None)
    assert all(a.grad.dtype == (torch.float32 if fp32 else torch.bfloat16) for a in opt.arenas)
    for s, (x, y) in enumerate(data):
        loss = loss_fn(model, x, y, 100).float()
        if mode == "full":
            acc.backward(loss)
            acc.step()
        else:
            (loss / N).backward()
            if fp32:
                assert all(p.grad is None for p in model.parameters())
            else:
                assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
            if (s + 1) % N == 0:
                opt.step()
                opt.zero_grad()
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q.float(), p, rtol=0, atol=0.05)


def test_full_path_steps_go_through_optimizer_step():
    """acc.step() runs optimizer.step(): its hooks fire and LR schedulers see the step (no
    "lr_scheduler.step() before optimizer.step()" warning)."""
    import warnings

    model = seed_model("cpu", small=True)
    opt = fa.AdamW(model.parameters(), lr=1e-2)
    acc = fa.GradAccumulator(opt, accumulation_steps=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in seed_data("cpu", 100, steps=4):
            acc.backward(loss_fn(model, x, y, 100))
            if acc.step():
                sched.step()
    assert len(calls) == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


@pytest.mark.parametrize("n", [1, 3])
def test_sync_gradients_names_the_current_micro_batch(n):
    """acc.sync_gradients answers for the micro-batch under way: before its forward, and after its
    acc.backward() until its acc.step() (where Accelerate users read accelerator.sync_gradients);
    after acc.step() for the next one. Also when acc.step() is called only at the window's end,
    and after a resume between acc.backward() and acc.step()."""
    model = seed_model("cpu", small=True)
    data = seed_data("cpu", 100, steps=2 * n)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2), accumulation_steps=n)
    seen = []
    for k, (x, y) in enumerate(data):
        last = k % n == n - 1
        assert acc.sync_gradients == last, f"before micro-batch {k}"
        acc.backward(loss_fn(model, x, y, 100))
        assert acc.sync_gradients == last, f"after the backward of micro-batch {k}"
        if k == max(n - 2, 0):  # save between a backward and its step, drop the window, resume
            state = acc.state_dict()
            acc.zero_grad()
            acc.load_state_dict(state)
            assert acc.sync_gradients == last, "after load_state_dict"
        seen.append(acc.step())
        assert seen[-1] == last
    assert acc.sync_gradients == (n == 1)  # the next window's first micro-batch

    acc.zero_grad()
    for k, (x, y) in enumerate(data[:n]):  # acc.step() only once, at the end
        acc.backward(loss_fn(model, x, y, 100))
        assert acc.sync_gradients == (k == n - 1), f"micro-batch {k} without acc.step() in between"
    assert acc.step()
