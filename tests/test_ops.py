"""Every op on every backend, against float64 math written here from the formulas (independent
of fusedaccum.reference) and against the reference backend, over dtypes and sizes; plus
torch.library.opcheck on each op."""
import pytest
import torch

import fusedaccum as fa
from fusedaccum import dispatch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
SIZES = [0, 1, 7, 1023, 1024, 1025, 4097]
LARGE = (1 << 20) + 3
# Triton's interpreter (Triton on CPU tensors) runs each program in numpy, about 100x slower
# than a compiled kernel: a size of a few programs' worth (3 x 2048 + 5 for accumulate, 12 x
# 1024 + 5 for the steps) covers what LARGE does there, without 10 minutes of CI.
LARGE_INTERPRETED = (3 << 12) + 5


def sizes_for(device, backend):
    interpreted = backend == "triton" and device.type == "cpu"
    return SIZES + [LARGE_INTERPRETED if interpreted else LARGE]


def eps(dtype):
    return torch.finfo(dtype).eps


def assert_within(out, exact, scale, dtype, k=8.0, what=""):
    """|out - exact| <= k * eps(dtype) * scale elementwise: a few roundings at the magnitude of the
    operands, `scale` (float64), in the dtype that limits precision (with the subnormal spacing
    as the floor)."""
    err = (out.double() - exact).abs()
    bound = k * eps(dtype) * (scale + torch.finfo(dtype).tiny)
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst err {err.max():.3g} vs bound {bound[bad].min():.3g}"


# -- accumulate -------------------------------------------------------------------------------


def make_grads(sizes, dtype, device, gen):
    grads = []
    for i, n in enumerate(sizes):
        if i % 3 == 2 and n > 1:  # a non-contiguous gradient: every other element of a 2n buffer
            grads.append(torch.randn(2 * n, generator=gen).to(device=device, dtype=dtype)[::2])
        else:
            grads.append(torch.randn(n, generator=gen).to(device=device, dtype=dtype))
    if len(sizes) > 1 and sizes[1] > 0:  # and a transposed 2-D one
        m = torch.randn(3, sizes[1], generator=gen).to(device=device, dtype=dtype).t()
        grads.append(m)
    return grads


def layout(grads, gap=5):
    offsets, end = [], gap
    for g in grads:
        offsets.append(end)
        end += g.numel() + gap  # gaps that must stay untouched
    return offsets, end


@pytest.mark.parametrize("arena_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
def test_accumulate(device_backend, arena_dtype, grad_dtype, first):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(1)
    grads = make_grads(sizes_for(device, backend), grad_dtype, device, gen)
    offsets, end = layout(grads)
    arena = torch.randn(end, generator=gen).to(device=device, dtype=arena_dtype)
    before = arena.clone()
    sumsq = torch.full((), 0.5, device=device)
    found_inf = torch.zeros((), device=device)
    scale = 0.25

    torch.ops.fusedaccum.accumulate(arena, grads, offsets, scale, first, sumsq, found_inf)

    written = torch.zeros(end, dtype=torch.bool)
    expected_sumsq = 0.5
    for g, off in zip(grads, offsets):
        sl = slice(off, off + g.numel())
        written[sl] = True
        prev = torch.zeros(g.numel(), dtype=torch.float64) if first else before[sl].double().cpu()
        step = scale * g.reshape(-1).double().cpu()
        assert_within(arena[sl].cpu(), prev + step, prev.abs() + step.abs(), arena_dtype, k=2, what="arena")
        expected_sumsq += arena[sl].double().square().sum().item()
    assert torch.equal(arena.cpu()[~written], before.cpu()[~written]), "gaps between gradients were written"
    assert sumsq.item() == pytest.approx(expected_sumsq, rel=1e-5)
    assert found_inf.item() == 0

    # Against the reference backend on the same inputs: identical up to one rounding.
    fa.set_backend("torch")
    ref = before.clone()
    ref_sumsq = torch.full((), 0.5, device=device)
    torch.ops.fusedaccum.accumulate(ref, grads, offsets, scale, first, ref_sumsq, None)
    torch.testing.assert_close(arena, ref, rtol=eps(arena_dtype), atol=eps(arena_dtype))
    torch.testing.assert_close(sumsq, ref_sumsq, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_accumulate_flags_non_finite(device_backend, bad):
    device, _ = device_backend
    arena = torch.zeros(2048, device=device)
    g = torch.ones(1500, device=device)
    g[1234] = bad
    sumsq, found_inf = torch.zeros((), device=device), torch.zeros((), device=device)
    torch.ops.fusedaccum.accumulate(arena, [g, torch.ones(10, device=device)], [0, 1600], 1.0, True, sumsq, found_inf)
    assert found_inf.item() == 1
    assert not torch.isfinite(sumsq).item()
    # The flag only ever rises: a later finite fold keeps it set.
    torch.ops.fusedaccum.accumulate(arena, [torch.ones(10, device=device)], [1600], 1.0, False, None, found_inf)
    assert found_inf.item() == 1


def test_accumulate_is_deterministic(device_backend):
    device, backend = device_backend
    n = 300_001
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen).to(device), torch.randn(n // 3, generator=gen).to(device)]
    results = []
    for _ in range(2):
        arena, sumsq = torch.zeros(2 * n, device=device), torch.zeros((), device=device)
        torch.ops.fusedaccum.accumulate(arena, grads, [0, n], 0.5, True, sumsq, None)
        results.append((arena, sumsq))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_accumulate_many_gradients_of_mixed_dtypes(device_backend):
    """2,100 gradients of three dtypes in one call: more than one CUDA launch per dtype (1,000
    gradients each), the sum of squares chained across all of them."""
    device, backend = device_backend
    count = 2100 if backend != "triton" or device.type == "cuda" else 300  # the interpreter is slow
    gen = torch.Generator().manual_seed(5)
    sizes = [int(n) for n in torch.randint(0, 40, (count,), generator=gen)]
    grads = [torch.randn(n, generator=gen).to(device=device, dtype=DTYPES[i % 3]) for i, n in enumerate(sizes)]
    grads[7] = torch.randn(2 * sizes[7] + 2, generator=gen).to(device)[::2]  # non-contiguous among them
    offsets, end = layout(grads, gap=3)
    arena = torch.randn(end, generator=gen).to(device)
    before = arena.clone()
    sumsq, found_inf = torch.zeros((), device=device), torch.zeros((), device=device)
    torch.ops.fusedaccum.accumulate(arena, grads, offsets, 0.5, False, sumsq, found_inf)
    exact = before.double().cpu()
    for g, off in zip(grads, offsets):
        exact[off:off + g.numel()] += 0.5 * g.reshape(-1).double().cpu()
    written = torch.zeros(end, dtype=torch.bool)
    for g, off in zip(grads, offsets):
        written[off:off + g.numel()] = True
    assert_within(arena.cpu(), exact, exact.abs() + 1, F32, k=2, what="arena")
    expected = arena.double().cpu()[written].square().sum().item()
    assert sumsq.item() == pytest.approx(expected, rel=1e-6)
    assert found_inf.item() == 0


@pytest.mark.skipif(not dispatch.extension_loaded(), reason="needs the compiled extension")
def test_the_compiled_entry_follows_the_backend_choice(monkeypatch):
    """fusedaccum::accumulate's CPU kernel is compiled: it runs the extension's kernel by
    default and hands the call to Python whenever set_backend() or FUSEDACCUM_BACKEND says so."""
    from fusedaccum.ops import accumulate as accumulate_op

    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedaccum::accumulate", "CPU")
    ran = []
    reference = accumulate_op.KERNELS["torch"]
    monkeypatch.setitem(accumulate_op.KERNELS, "torch", lambda *args: (ran.append("torch"), reference(*args)))

    def call():
        arena = torch.zeros(4)
        torch.ops.fusedaccum.accumulate(arena, [torch.ones(4)], [0], 2.0, True, None, None)
        assert arena.tolist() == [2.0] * 4

    call()
    assert ran == []
    fa.set_backend("torch")
    call()
    assert ran == ["torch"]
    fa.set_backend(None)
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "torch")
    call()
    assert ran == ["torch", "torch"]
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "cpp")  # the compiled kernel, chosen in C++
    call()
    assert ran == ["torch", "torch"]
    fa.set_backend("torch")  # set_backend() comes before the environment, as in dispatch.forced()
    call()
    assert ran == ["torch", "torch", "torch"]
    fa.set_backend(None)
    monkeypatch.delenv("FUSEDACCUM_BACKEND")
    call()
    assert ran == ["torch", "torch", "torch"]


@pytest.mark.skipif(not dispatch.runs_on("triton", "cpu"), reason="needs the Triton interpreter")
def test_triton_table_written_by_kernels_equals_the_words():
    """The table that CUDA graph capture gets (written by kernels whose arguments are its words)
    holds exactly the words, for every kind of value a table has: addresses, offsets, counts."""
    from fusedaccum.triton_kernels.accumulate import WORDS_PER_WRITE, table_on_device

    words = [0, 1, 15, 16, 2**31 - 1, 2**31, 2**40, 0x7F12_3456_7890, 2**62, 12345] * 5 + [7]
    assert len(words) % WORDS_PER_WRITE != 0, "covers a partly filled last write"
    for capturing in (False, True):
        table = table_on_device(words, torch.device("cpu"), capturing)
        assert table.tolist() == words, f"capturing={capturing}"


# -- adam_step ---------------------------------------------------------------------------------


def adam_float64(p, g, m, v, vmax, step, factor, lr, beta1, beta2, eps_, wd, decoupled, maximize):
    """Adam/AdamW as torch.optim documents it, in float64."""
    g = g * factor
    if maximize:
        g = -g
    if wd != 0:
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if vmax is not None:
        vmax = torch.maximum(vmax, v)
    denom = (vmax if vmax is not None else v).sqrt() / (1 - beta2**step) ** 0.5 + eps_
    update = lr / (1 - beta1**step) * m / denom
    return p - update, m, v, vmax, update


ADAM_CASES = [
    # param dtype, grad dtype, copy dtype, amsgrad, decoupled, maximize, weight decay
    (F32, F32, None, False, True, False, 0.01),
    (F32, F32, None, True, False, False, 0.1),
    (F32, F32, None, False, False, True, 0.0),
    (F32, BF16, None, False, True, False, 0.01),
    (F32, F32, BF16, False, True, False, 0.01),
    (F32, F32, F16, True, True, True, 0.01),
    (BF16, BF16, None, False, True, False, 0.01),
    (BF16, F32, None, True, False, False, 0.01),
    (F16, F16, None, False, False, False, 0.0),
    (F16, F32, None, False, True, True, 0.01),
]


def step_inputs(n, p_dtype, g_dtype, device, gen, n_state):
    p = torch.randn(n, generator=gen).to(device=device, dtype=p_dtype)
    g = torch.randn(n, generator=gen).to(device=device, dtype=g_dtype)
    states = [torch.rand(n, generator=gen).to(device=device, dtype=p_dtype) for _ in range(n_state)]
    return p, g, states


@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("step_count", [1.0, 7.0])
def test_adam_step(device_backend, case, step_count):
    device, backend = device_backend
    p_dtype, g_dtype, c_dtype, amsgrad, decoupled, maximize, wd = case
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps_=1e-8, wd=wd, decoupled=decoupled, maximize=maximize)
    gen = torch.Generator().manual_seed(2)
    for n in sizes_for(device, backend)[1::2]:
        p, g, (m, v, vmax) = step_inputs(n, p_dtype, g_dtype, device, gen, 3)
        m = m - 0.5  # first moments of either sign
        vmax = v + vmax if amsgrad else None
        copy = torch.empty(n, device=device, dtype=c_dtype) if c_dtype is not None else None
        inputs = [t.double().cpu() if t is not None else None for t in (p, g, m, v, vmax)]
        step = torch.full((), step_count, device=device)
        factor = torch.full((), 0.5, device=device)
        torch.ops.fusedaccum.adam_step(
            p, g, m, v, vmax, copy, step, factor, None, hyper["lr"], hyper["beta1"], hyper["beta2"],
            hyper["eps_"], wd, decoupled, maximize,
        )
        p0, g0, m0, v0, vmax0 = inputs
        p1, m1, v1, vmax1, upd = adam_float64(p0, g0, m0, v0, vmax0, step_count, 0.5, **hyper)
        assert_within(p.cpu(), p1, p0.abs() + upd.abs(), p_dtype, what="param")
        assert_within(m.cpu(), m1, m0.abs() + g0.abs(), p_dtype, what="exp_avg")
        assert_within(v.cpu(), v1, v0.abs() + g0.square(), p_dtype, what="exp_avg_sq")
        if amsgrad:
            assert_within(vmax.cpu(), vmax1, vmax1.abs(), p_dtype, what="max_exp_avg_sq")
        if copy is not None:
            assert torch.equal(copy, p.to(c_dtype)), "param_copy is the rounded master"


def test_adam_step_skips_on_found_inf(device_backend):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(4)
    p, g, (m, v, vmax) = step_inputs(1025, F32, F32, device, gen, 3)
    copy = torch.zeros(1025, device=device, dtype=BF16)
    before = [t.clone() for t in (p, m, v, vmax, copy)]
    one = torch.ones((), device=device)
    torch.ops.fusedaccum.adam_step(p, g, m, v, vmax, copy, one, one, one, 0.1, 0.9, 0.99, 1e-8, 0.1, True, False)
    for a, b in zip((p, m, v, vmax, copy), before):
        assert torch.equal(a, b)


# -- sgd_step ----------------------------------------------------------------------------------


def sgd_float64(p, g, buf, first, factor, lr, momentum, dampening, wd, nesterov, maximize):
    g = g * factor
    if maximize:
        g = -g
    if wd != 0:
        g = g + wd * p
    if momentum != 0:
        buf = g.clone() if first else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf, lr * g.abs()


SGD_CASES = [
    # param dtype, grad dtype, copy dtype, momentum, dampening, nesterov, maximize, weight decay
    (F32, F32, None, 0.0, 0.0, False, False, 0.0),
    (F32, F32, None, 0.9, 0.0, False, False, 0.01),
    (F32, F32, None, 0.9, 0.1, False, True, 0.0),
    (F32, F32, None, 0.9, 0.0, True, False, 0.01),
    (F32, BF16, BF16, 0.9, 0.0, True, False, 0.01),
    (F32, F32, F16, 0.0, 0.0, False, True, 0.01),
    (BF16, BF16, None, 0.9, 0.0, False, False, 0.01),
    (F16, F32, None, 0.5, 0.5, False, False, 0.0),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("step_count", [1.0, 3.0])
def test_sgd_step(device_backend, case, step_count):
    device, backend = device_backend
    p_dtype, g_dtype, c_dtype, momentum, dampening, nesterov, maximize, wd = case
    gen = torch.Generator().manual_seed(5)
    for n in sizes_for(device, backend)[::2]:
        p, g, (buf,) = step_inputs(n, p_dtype, g_dtype, device, gen, 1)
        buf = buf if momentum != 0 else None
        copy = torch.empty(n, device=device, dtype=c_dtype) if c_dtype is not None else None
        p0, g0 = p.double().cpu(), g.double().cpu()
        buf0 = buf.double().cpu() if buf is not None else None
        step, factor = torch.full((), step_count, device=device), torch.full((), 2.0, device=device)
        torch.ops.fusedaccum.sgd_step(p, g, buf, copy, step, factor, None, 0.1, momentum, dampening, wd, nesterov, maximize)
        p1, buf1, upd = sgd_float64(p0, g0, buf0, step_count <= 1, 2.0, 0.1, momentum, dampening, wd, nesterov, maximize)
        assert_within(p.cpu(), p1, p0.abs() + upd, p_dtype, what="param")
        if buf is not None:
            assert_within(buf.cpu(), buf1, buf1.abs() + buf0.abs() + 2 * g0.abs(), p_dtype, what="momentum_buffer")
        if copy is not None:
            assert torch.equal(copy, p.to(c_dtype))


def test_sgd_step_skips_on_found_inf(device_backend):
    device, _ = device_backend
    p, buf = torch.randn(777, device=device), torch.randn(777, device=device)
    before = (p.clone(), buf.clone())
    one = torch.ones((), device=device)
    torch.ops.fusedaccum.sgd_step(p, torch.randn(777, device=device), buf, None, one, one, one, 0.1, 0.9, 0.0, 0.1, False, False)
    assert torch.equal(p, before[0]) and torch.equal(buf, before[1])


# -- lion_step --------------------------------------------------------------------------------


def lion_float64(p, g, m, factor, lr, beta1, beta2, wd, maximize):
    """Lion from the paper (Chen et al. 2023, Algorithm 2), in float64."""
    g = g * factor
    if maximize:
        g = -g
    c = beta1 * m + (1 - beta1) * g
    return p * (1 - lr * wd) - lr * torch.sign(c), beta2 * m + (1 - beta2) * g, c


LION_CASES = [
    # param dtype, grad dtype, copy dtype, maximize, weight decay
    (F32, F32, None, False, 0.0),
    (F32, F32, None, True, 0.1),
    (F32, BF16, BF16, False, 0.1),
    (F32, F32, F16, False, 0.0),
    (BF16, BF16, None, False, 0.1),
    (F16, F32, None, True, 0.0),
]


@pytest.mark.parametrize("case", LION_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_lion_step(device_backend, case):
    device, backend = device_backend
    p_dtype, g_dtype, c_dtype, maximize, wd = case
    lr, beta1, beta2 = 0.01, 0.9, 0.99
    gen = torch.Generator().manual_seed(7)
    for n in sizes_for(device, backend)[1::2]:
        p, g, (m,) = step_inputs(n, p_dtype, g_dtype, device, gen, 1)
        m = m - 0.5  # moments of either sign
        if n > 2:
            g[0], m[0] = 0.0, 0.0  # c = 0 exactly: sign(0) = 0, the parameter only decays
        copy = torch.empty(n, device=device, dtype=c_dtype) if c_dtype is not None else None
        p0, g0, m0 = p.double().cpu(), g.double().cpu(), m.double().cpu()
        factor = torch.full((), 0.5, device=device)
        torch.ops.fusedaccum.lion_step(p, g, m, copy, factor, None, lr, beta1, beta2, wd, maximize)
        p1, m1, c = lion_float64(p0, g0, m0, 0.5, lr, beta1, beta2, wd, maximize)
        # sign(c) is exact unless c is within rounding of 0, where fp32 may round it either way:
        # there the parameter may differ by 2 lr, which such elements are allowed and no others.
        near_zero = c.abs() <= 4 * eps(torch.float32) * (m0.abs() + g0.abs() * 0.5)
        ok = p.cpu().double()
        ok = torch.where(near_zero, p1, ok)
        assert_within(ok, p1, p0.abs() + lr, p_dtype, what="param")
        assert_within(m.cpu(), m1, m0.abs() + 0.5 * g0.abs(), p_dtype, what="exp_avg")
        if n > 2:
            assert p.cpu()[0].double() == pytest.approx(p0[0].item() * (1 - lr * wd), rel=2 * eps(p_dtype)), "sign(0) = 0"
        if copy is not None:
            assert torch.equal(copy, p.to(c_dtype))


def test_lion_step_skips_on_found_inf(device_backend):
    device, _ = device_backend
    p, m = torch.randn(777, device=device), torch.randn(777, device=device)
    before = (p.clone(), m.clone())
    one = torch.ones((), device=device)
    torch.ops.fusedaccum.lion_step(p, torch.randn(777, device=device), m, None, one, one, 1e-2, 0.9, 0.99, 0.1, False)
    assert torch.equal(p, before[0]) and torch.equal(m, before[1])


# -- schemas and opcheck -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["accumulate", "adam_step", "sgd_step", "lion_step", "linear_weight_grad",
                                  "embedding_weight_grad"])
def test_extension_schema_matches_python(name):
    if not dispatch.extension_loaded():
        pytest.skip("compiled extension not built")
    ours = str(getattr(torch.ops.fusedaccum, name).default._schema).split("::", 1)[1]
    ext = str(getattr(torch.ops.fusedaccum_C, name).default._schema).split("::", 1)[1]
    assert ours == ext


def opcheck_args(device):
    g = [torch.randn(5, device=device), torch.randn(3, 4, device=device, dtype=BF16).t()]
    one = torch.ones((), device=device)
    n = 37
    p, grad, m, v, buf = (torch.randn(n, device=device) for _ in range(5))
    return {
        "accumulate": (torch.zeros(20, device=device), g, [0, 7], 0.5, False, torch.zeros((), device=device),
                       torch.zeros((), device=device)),
        "adam_step": (p.clone(), grad, m, v.abs(), v.abs() + 1, torch.empty(n, device=device, dtype=BF16), one * 2,
                      one, torch.zeros((), device=device), 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False),
        "sgd_step": (p.clone(), grad, buf, None, one, one, None, 0.1, 0.9, 0.0, 0.0, True, False),
        "lion_step": (p.clone(), grad, m.clone(), torch.empty(n, device=device, dtype=BF16), one,
                      torch.zeros((), device=device), 1e-4, 0.9, 0.99, 0.1, False),
    }


@pytest.mark.parametrize("name", ["accumulate", "adam_step", "sgd_step", "lion_step"])
def test_opcheck(device_backend, name):
    device, _ = device_backend
    op = getattr(torch.ops.fusedaccum, name).default
    torch.library.opcheck(op, opcheck_args(device)[name])


# -- master_weights="remainder": a bf16 parameter and its int16 remainder are the fp32 master ----

REMAINDER_STEPS = {
    # state names, call(param, grad, states, copy, step, factor, found_inf)
    "adam_step": (3, lambda p, g, s, c, step, f, inf: torch.ops.fusedaccum.adam_step(
        p, g, s[0], s[1], s[2], c, step, f, inf, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False)),
    "sgd_step": (1, lambda p, g, s, c, step, f, inf: torch.ops.fusedaccum.sgd_step(
        p, g, s[0], c, step, f, inf, 0.1, 0.9, 0.1, 0.01, True, False)),
    "lion_step": (1, lambda p, g, s, c, step, f, inf: torch.ops.fusedaccum.lion_step(
        p, g, s[0], c, f, inf, 1e-3, 0.9, 0.99, 0.1, True)),
}


@pytest.mark.parametrize("grad_dtype", [F32, BF16])
@pytest.mark.parametrize("name", list(REMAINDER_STEPS))
def test_step_with_a_remainder_is_the_fp32_master_step(device_backend, name, grad_dtype):
    """The same backend's step on the fp32 master that (bf16 param, int16 remainder) are, then
    split: bit for bit what the step on the pair writes, state included."""
    from fusedaccum.reference import merge_remainder, split_remainder

    device, backend = device_backend
    n_state, call = REMAINDER_STEPS[name]
    gen = torch.Generator().manual_seed(5)
    for n in sizes_for(device, backend)[::2]:
        hi = torch.randn(n, generator=gen).to(device=device, dtype=BF16)
        rem = torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int16).to(device)
        g = torch.randn(n, generator=gen).to(device=device, dtype=grad_dtype)
        states = [torch.rand(n, generator=gen).to(device) for _ in range(n_state)]
        master = merge_remainder(hi, rem)
        want_states = [s.clone() for s in states]
        step, factor = torch.full((), 3.0, device=device), torch.full((), 0.5, device=device)
        call(master, g, want_states, None, step, factor, None)
        call(hi, g, states, rem, step, factor, None)
        want_hi, want_rem = split_remainder(master)
        assert torch.equal(hi.view(torch.int16), want_hi.view(torch.int16)), f"{name} n={n}: bf16 halves differ"
        assert torch.equal(rem, want_rem), f"{name} n={n}: remainders differ"
        for a, b in zip(states, want_states):
            assert torch.equal(a, b), f"{name} n={n}: state differs"
        skip = torch.ones((), device=device)
        before = [t.clone() for t in (hi, rem, *states)]
        call(hi, g, states, rem, step, factor, skip)
        assert all(torch.equal(a, b) for a, b in zip((hi, rem, *states), before)), "found_inf: nothing written"


def test_step_refuses_a_remainder_that_does_not_fit():
    p, one = torch.zeros(8, dtype=BF16), torch.ones(())
    rem = torch.zeros(8, dtype=torch.int16)
    with pytest.raises(ValueError, match="remainder of a bfloat16 parameter"):
        torch.ops.fusedaccum.sgd_step(p.float(), p.float(), None, rem, one, one, None, 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="float32 with a remainder"):
        torch.ops.fusedaccum.lion_step(p, p, torch.zeros(8, dtype=BF16), rem, one, None, 1e-4, 0.9, 0.99, 0.0, False)
    with pytest.raises(ValueError, match="7 elements but must have 8"):
        torch.ops.fusedaccum.sgd_step(p, p, None, rem[:7], one, one, None, 0.1, 0.0, 0.0, 0.0, False, False)


@pytest.mark.parametrize("name", ["adam_step", "sgd_step", "lion_step"])
def test_opcheck_with_a_remainder(device_backend, name):
    device, _ = device_backend
    n = 37
    args = list(opcheck_args(device)[name])
    args[0] = args[0].to(BF16)
    copy_at = {"adam_step": 5, "sgd_step": 3, "lion_step": 3}[name]
    args[copy_at] = torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, device=device)
    torch.library.opcheck(getattr(torch.ops.fusedaccum, name).default, tuple(args))
