"""The fused modules' ops (linear_weight_grad, embedding_weight_grad) on every backend, against
float64 math written here from the formulas and against the reference backend, over dtypes,
sizes (0, 1, odd, large) and layouts; plus the schema match and torch.library.opcheck."""
import pytest
import torch

import fusedaccum as fa

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
GAP = 5  # arena elements before and after the slice, which must stay untouched


def interpreted(device, backend):
    return backend == "triton" and device.type == "cpu"


def rand(shape, dtype, device, gen, transposed=False):
    if transposed:  # the same values, stored column-major
        return torch.randn(tuple(reversed(shape)), generator=gen).to(device=device, dtype=dtype).t()
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def arena_around(n, dtype, device, gen):
    return torch.randn(n + 2 * GAP, generator=gen).to(device=device, dtype=dtype)


def check_gaps(arena, before, n):
    assert torch.equal(arena[:GAP].cpu(), before[:GAP].cpu()) and torch.equal(arena[GAP + n :].cpu(), before[GAP + n :].cpu()), \
        "elements outside the slice were written"


def assert_close_to(out, exact, magnitude, dtype, k):
    """|out - exact| <= k * eps * magnitude elementwise, eps of the dtype that limits precision."""
    err = (out.double().cpu() - exact).abs()
    bound = k * torch.finfo(dtype).eps * (magnitude + torch.finfo(dtype).tiny)
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} elements off, worst err {err.max():.3g}"


# -- linear_weight_grad --------------------------------------------------------------------------

LINEAR_SHAPES = [  # rows, out, in
    (0, 3, 5), (1, 1, 1), (7, 5, 3), (33, 17, 65), (128, 64, 96),
]
LINEAR_LARGE = (512, 384, 256)


@pytest.mark.parametrize("arena_dtype", DTYPES)
@pytest.mark.parametrize("input_dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_linear_weight_grad(device_backend, arena_dtype, input_dtype, first, transposed):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(2)
    # Triton's interpreter runs each program in numpy: the small shapes cover every masked edge there.
    shapes = LINEAR_SHAPES[:-1] if interpreted(device, backend) else LINEAR_SHAPES + [LINEAR_LARGE]
    for rows, out_f, in_f in shapes:
        n = out_f * in_f
        dy = rand((rows, out_f), input_dtype, device, gen, transposed)
        x = rand((rows, in_f), input_dtype, device, gen, transposed)
        arena = arena_around(n, arena_dtype, device, gen)
        if first:
            arena[GAP : GAP + n] = float("nan")  # beta = 0: what the slice held is not read
        before = arena.clone()
        scale = 0.25

        torch.ops.fusedaccum.linear_weight_grad(arena, GAP, dy, x, scale, first)

        check_gaps(arena, before, n)
        prod = dy.double().cpu().t() @ x.double().cpu()
        prev = torch.zeros(out_f, in_f, dtype=torch.float64) if first else before[GAP : GAP + n].view(out_f, in_f).double().cpu()
        exact = prev + scale * prod
        # fp32 accumulation over `rows` products, then one rounding to the arena dtype.
        magnitude = prev.abs() + scale * (dy.double().cpu().abs().t() @ x.double().cpu().abs())
        out = arena[GAP : GAP + n].view(out_f, in_f)
        assert_close_to(out, exact, magnitude, arena_dtype, k=2)
        if arena_dtype == F32:
            assert_close_to(out, exact, magnitude, F32, k=4 + rows)


def test_linear_weight_grad_accumulates_in_fp32(device_backend):
    """bf16 inputs, fp32 arena: the sum is not rounded to bf16 (torch's weight gradient would be)."""
    device, _ = device_backend
    gen = torch.Generator().manual_seed(3)
    dy = rand((64, 8), BF16, device, gen)
    x = rand((64, 8), BF16, device, gen)
    arena = torch.zeros(64, device=device)
    torch.ops.fusedaccum.linear_weight_grad(arena, 0, dy, x, 1.0, True)
    exact = dy.double().cpu().t() @ x.double().cpu()
    rounded = (dy.t() @ x).double().cpu()  # bf16 GEMM: rounded to bf16 at the end
    err = (arena.view(8, 8).double().cpu() - exact).abs().max()
    assert err < 1e-4 * exact.abs().max() < (rounded - exact).abs().max()


def test_linear_weight_grad_refuses_bad_input():
    a = torch.zeros(100)
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.fusedaccum.linear_weight_grad(a, 90, torch.randn(4, 3), torch.randn(4, 5), 1.0, True)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.fusedaccum.linear_weight_grad(a, 0, torch.randn(4, 3), torch.randn(5, 5), 1.0, True)
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.fusedaccum.linear_weight_grad(a, 0, torch.randn(4, 3), torch.randn(4, 5, dtype=BF16), 1.0, True)
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fusedaccum.linear_weight_grad(a, 0, torch.randn(2, 4, 3), torch.randn(2, 4, 5), 1.0, True)


# -- embedding_weight_grad -----------------------------------------------------------------------

EMBEDDING_SHAPES = [  # rows (indices), num_weights, dim
    (0, 5, 3), (1, 1, 1), (9, 4, 7), (100, 50, 33), (1000, 300, 64),
]
EMBEDDING_LARGE = (8192, 5000, 128)


def embedding_exact(prev, indices, grad, padding_idx, freq, scale):
    """float64, one index at a time: the dense gradient torch's embedding backward defines."""
    dense = torch.zeros_like(prev)
    counts = torch.bincount(indices, minlength=prev.shape[0]).double()
    for r, u in enumerate(indices.tolist()):
        if u != padding_idx:
            dense[u] += grad[r] / (counts[u] if freq else 1.0)
    return prev + scale * dense


@pytest.mark.parametrize("arena_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("options", ["plain", "padding", "freq", "int32-transposed"])
def test_embedding_weight_grad(device_backend, arena_dtype, grad_dtype, first, options):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(4)
    shapes = EMBEDDING_SHAPES[:-1] if interpreted(device, backend) else EMBEDDING_SHAPES + [EMBEDDING_LARGE]
    for rows, num, dim in shapes:
        n = num * dim
        # Skewed indices: a few rows get most of the hits (as tokens do), some rows none.
        idx = (torch.rand(rows, generator=gen) ** 3 * num).long().clamp_max(num - 1)
        padding_idx = min(2, num - 1) if options == "padding" else -1
        freq = options == "freq"
        grad = rand((rows, dim), grad_dtype, device, gen, transposed=options == "int32-transposed")
        indices = idx.to(device=device, dtype=torch.int32 if options == "int32-transposed" else torch.int64)
        arena = arena_around(n, arena_dtype, device, gen)
        before = arena.clone()
        scale = 0.5

        torch.ops.fusedaccum.embedding_weight_grad(arena, GAP, indices, grad, num, padding_idx, freq, scale, first)

        check_gaps(arena, before, n)
        prev = torch.zeros(num, dim, dtype=torch.float64) if first else before[GAP : GAP + n].view(num, dim).double().cpu()
        exact = embedding_exact(prev, idx, grad.double().cpu(), padding_idx, freq, scale)
        magnitude = embedding_exact(prev.abs(), idx, grad.double().cpu().abs(), padding_idx, freq, scale)
        out = arena[GAP : GAP + n].view(num, dim)
        assert_close_to(out, exact, magnitude, arena_dtype, k=2)
        hits = int(torch.bincount(idx, minlength=num).max()) if rows else 0
        if arena_dtype == F32:
            assert_close_to(out, exact, magnitude, F32, k=4 + hits)
        untouched = torch.ones(num, dtype=torch.bool)
        untouched[idx[idx != padding_idx]] = False
        expect_untouched = torch.zeros_like(out[untouched.to(device)]) if first else before[GAP : GAP + n].view(num, dim)[untouched.to(device)]
        assert torch.equal(out[untouched.to(device)], expect_untouched), "rows without an index were written"


def test_embedding_weight_grad_is_deterministic(device_backend):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 7, (3000,), generator=gen).to(device)  # ~430 hits per row
    grad = rand((3000, 40), F32, device, gen)
    outs = []
    for _ in range(3):
        arena = torch.zeros(7 * 40, device=device)
        torch.ops.fusedaccum.embedding_weight_grad(arena, 0, idx, grad, 7, -1, False, 1.0, True)
        outs.append(arena)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_embedding_weight_grad_refuses_bad_input():
    a = torch.zeros(100)
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.fusedaccum.embedding_weight_grad(a, 0, torch.tensor([1]), torch.randn(1, 30), 10, -1, False, 1.0, True)
    with pytest.raises(ValueError, match="int32 or int64"):
        torch.ops.fusedaccum.embedding_weight_grad(a, 0, torch.tensor([1.0]), torch.randn(1, 3), 10, -1, False, 1.0, True)
    with pytest.raises(ValueError, match="padding_idx"):
        torch.ops.fusedaccum.embedding_weight_grad(a, 0, torch.tensor([1]), torch.randn(1, 3), 10, 10, False, 1.0, True)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.fusedaccum.embedding_weight_grad(a, 0, torch.tensor([1, 2]), torch.randn(1, 3), 10, -1, False, 1.0, True)


# -- schemas and opcheck -------------------------------------------------------------------------

NAMES = ["linear_weight_grad", "embedding_weight_grad"]


# The schema match of the compiled ops with the public ones: tests/test_ops.py, with the others.


def opcheck_args(device):
    return {
        "linear_weight_grad": (torch.zeros(40, device=device), 3, torch.randn(6, 4, device=device),
                               torch.randn(6, 5, device=device), 0.5, False),
        "embedding_weight_grad": (torch.zeros(40, device=device), 2, torch.tensor([1, 3, 1], device=device),
                                  torch.randn(3, 4, device=device), 8, 3, True, 0.5, False),
    }


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(device_backend, name):
    device, _ = device_backend
    torch.library.opcheck(getattr(torch.ops.fusedaccum, name).default, opcheck_args(device)[name])
