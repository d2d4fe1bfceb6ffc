"""master_weights="remainder": bf16 parameters plus int16 remainders are the fp32 master, bit
for bit, at 4 bytes per parameter of weights instead of 6 (csrc/elementwise.h says how).

Against master_weights=True, which keeps the fp32 master itself: the same gradients give the
same masters bit for bit, and each bf16 parameter is its master rounded to nearest, except at
exact ties, which round away from zero (the remainder's sign bit records the rounding)."""
import copy

import pytest
import torch

import fusedaccum as fa
from fusedaccum.reference import merge_remainder, split_remainder

BF16 = torch.bfloat16


def test_every_float_survives_split_and_merge():
    """10^7 random fp32 bit patterns: every non-NaN reconstructs exactly; the bf16 half is the
    value rounded to nearest except at ties; NaNs stay NaN in both halves."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), 1 << 31, (10_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001,
                             0x3F808000, 0x3F818000, 0x7F7F8000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF],
                            dtype=torch.int64)
    bits = torch.cat([bits, torch.where(specials >= 1 << 31, specials - (1 << 32), specials).to(torch.int32)])
    x = bits.view(torch.float32)
    hi, rem = split_remainder(x)
    back = merge_remainder(hi, rem)
    nan = x.isnan()
    assert torch.equal(back.view(torch.int32)[~nan], bits[~nan])
    assert back[nan].isnan().all() and hi[nan].isnan().all()
    tie = (bits.to(torch.int64) & 0xFFFF) == 0x8000
    rne = x.to(BF16)
    same = hi.view(torch.int16) == rne.view(torch.int16)
    assert same[~nan & ~tie].all(), "off ties the bf16 half is the value rounded to nearest"
    away = hi.float().abs() >= x.abs()
    assert away[tie & ~nan].all(), "ties round away from zero"


def make_model(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    return model.to(device=device, dtype=BF16)


OPTIMIZERS = {
    "AdamW": lambda ps, mw: fa.AdamW(ps, lr=1e-2, weight_decay=0.1, master_weights=mw),
    "Adam-amsgrad": lambda ps, mw: fa.Adam(ps, lr=1e-2, amsgrad=True, master_weights=mw),
    "SGD": lambda ps, mw: fa.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, master_weights=mw),
    "Lion": lambda ps, mw: fa.Lion(ps, lr=1e-3, weight_decay=0.1, master_weights=mw),
}


def masters(opt):
    """{parameter index: fp32 master} from the state_dict (remainders are saved as master_param)."""
    return {i: s["master_param"] for i, s in opt.state_dict()["state"].items()}


def assert_same_masters(a, b):
    ma, mb = masters(a), masters(b)
    assert ma.keys() == mb.keys()
    for i in ma:
        assert torch.equal(ma[i].view(torch.int32), mb[i].view(torch.int32)), f"master of parameter {i} differs"


def assert_params_are_split_masters(model, opt):
    for p, (i, m) in zip(model.parameters(), sorted(masters(opt).items())):
        assert torch.equal(p.view(torch.int16), split_remainder(m)[0].view(torch.int16))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_same_gradients_give_the_same_masters_as_an_fp32_master(device_backend, name):
    device, _ = device_backend
    models = {mw: make_model(device) for mw in (True, "remainder")}
    opts = {mw: OPTIMIZERS[name](m.parameters(), mw) for mw, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        grads = [torch.randn(p.shape, generator=gen) for p in models[True].parameters()]
        if step == 20:  # one parameter without a gradient this step: it must not move
            grads[1] = None
        for mw, model in models.items():
            for p, g in zip(model.parameters(), grads):
                p.grad = None if g is None else g.to(device, BF16)
            opts[mw].step()
    assert_same_masters(opts[True], opts["remainder"])
    assert_params_are_split_masters(models["remainder"], opts["remainder"])
    ties = 0
    for a, b in zip(models[True].parameters(), models["remainder"].parameters()):
        differ = a.view(torch.int16) != b.view(torch.int16)
        ties += int(differ.sum())
        assert ((a.float() - b.float()).abs()[differ] <= a.float().abs()[differ] * 2.0**-7).all(), "one bf16 ulp at most"
    assert ties <= 3, f"{ties} parameters differ from master_weights=True's: only ties may"


def test_accumulator_windows_match_an_fp32_master(device_backend):
    """Full path with clipping and an overflowing window skipped: masters bit for bit."""
    device, _ = device_backend
    runs = {}
    for mw in (True, "remainder"):
        model = make_model(device, seed=3)
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-2, master_weights=mw), accumulation_steps=3,
                                 max_grad_norm=0.5)
        gen = torch.Generator().manual_seed(4)
        for window in range(5):
            for _ in range(3):
                x = torch.randn(6, 9, generator=gen).to(device, BF16)
                loss = model(x).float().square().mean()
                acc.backward(loss * float("inf") if window == 2 else loss)
                acc.step()
        runs[mw] = (model, acc.optimizer)
    assert_same_masters(runs[True][1], runs["remainder"][1])
    assert_params_are_split_masters(*runs["remainder"])


def test_checkpoints_move_between_remainder_and_fp32_master(device_backend):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(5)

    def train(model, opt, steps):
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(device, BF16)
            opt.step()

    src_model = make_model(device)
    src = fa.AdamW(src_model.parameters(), lr=1e-2, master_weights="remainder")
    train(src_model, src, 3)
    saved = copy.deepcopy(src.state_dict())
    assert all("master_remainder" not in s and s["master_param"].dtype == torch.float32 for s in saved["state"].values())
    # into an fp32-master optimizer, and back
    dst_model = copy.deepcopy(src_model)
    dst = fa.AdamW(dst_model.parameters(), lr=1e-2, master_weights=True)
    dst.load_state_dict(saved)
    back_model = make_model(device, seed=9)
    back = fa.AdamW(back_model.parameters(), lr=1e-2, master_weights="remainder")
    back_model.load_state_dict(src_model.state_dict())
    back.load_state_dict(saved)
    for opt, model in ((dst, dst_model), (back, back_model)):
        state = gen.get_state()
        train(model, opt, 2)
        gen.set_state(state)
    train(src_model, src, 2)
    assert_same_masters(src, dst)
    assert_same_masters(src, back)
    for a, b in zip(src_model.parameters(), back_model.parameters()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # torch.optim takes it too (it ignores master_param)
    ref = torch.optim.AdamW(copy.deepcopy(src_model).parameters(), lr=1e-2)
    ref.load_state_dict(src.state_dict())


def test_deepcopy_and_live_state(device_backend):
    device, _ = device_backend
    model = make_model(device)
    opt = fa.SGD(model.parameters(), lr=0.1, momentum=0.9, master_weights="remainder")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.37)
    opt.step()
    p0 = next(model.parameters())
    assert opt.state[p0]["master_remainder"].dtype == torch.int16
    model2, opt2 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model2, opt2)):
        for p in m.parameters():
            p.grad = torch.full_like(p, -0.11)
        o.step()
    assert_same_masters(opt, opt2)
    # a parameter changed in place starts its master over from the bf16 value
    with torch.no_grad():
        p0.add_(1.0)
    opt.step()  # gradients still set
    assert masters(opt)[0].dtype == torch.float32


def test_refusals():
    with pytest.raises(ValueError, match="needs bfloat16 parameters"):
        fa.AdamW(torch.nn.Linear(2, 2).half().parameters(), master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights='fp32'"):
        fa.AdamW(torch.nn.Linear(2, 2).parameters(), master_weights="fp32")
    # fp32 parameters need no master: "remainder" changes nothing there, as True does not
    opt = fa.AdamW(torch.nn.Linear(2, 2).parameters(), master_weights="remainder")
    assert all(a.remainder is None and a.master is None for a in opt.arenas)
