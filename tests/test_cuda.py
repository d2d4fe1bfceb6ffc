"""GPU-only checks (skipped without CUDA): backend agreement, arenas past 2^31 elements, a whole
window captured in a CUDA graph. Plus torch.compile(fullgraph=True) over the ops, which also
runs on CPU."""
import copy
import warnings

import pytest
import torch

import fusedaccum as fa
from fusedaccum import dispatch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_backends():
    return [b for b in ("cuda", "triton", "torch") if dispatch.runs_on(b, "cuda")]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_agree(dtype):
    """cuda, triton and the C++ CPU kernel give the same accumulate and Adam results (to 1 ulp)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in (1, 1000, 4097, 1 << 20)]
    offsets = [0, 64, 2048, 8192]
    arena0 = torch.randn(8192 + (1 << 20), generator=gen)
    n = arena0.numel()
    p0, m0, v0 = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype), torch.rand(n, generator=gen).to(dtype)
    results = {}
    for device, backend in [("cpu", "cpp")] + [("cuda", b) for b in gpu_backends()]:
        fa.set_backend(backend)
        arena, sumsq = arena0.to(device), torch.zeros((), device=device)
        torch.ops.fusedaccum.accumulate(arena, [g.to(device) for g in grads], offsets, 0.5, False, sumsq, None)
        p, m, v = p0.to(device), m0.to(device), v0.to(device)
        one = torch.full((), 3.0, device=device)
        torch.ops.fusedaccum.adam_step(p, arena, m, v, None, None, one, one / 3, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False)
        results[backend] = [t.cpu() for t in (arena, sumsq, p, m, v)]
    fa.set_backend(None)
    ref = results.pop("cpp")
    for backend, got in results.items():
        for name, a, b in zip(("arena", "sumsq", "param", "exp_avg", "exp_avg_sq"), got, ref):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(a.dtype).eps, atol=1e-6,
                                       msg=lambda m, name=name, backend=backend: f"{backend}, {name}: {m}")


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_arena_past_2_to_the_31(backend):
    n = (1 << 31) + 4099
    need = n * (4 + 2) + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    fa.set_backend(backend)
    arena = torch.full((n,), 1.0, device="cuda")
    g = torch.full((n,), 1.5, device="cuda", dtype=torch.bfloat16)
    g[-7:] = 3.0
    sumsq = torch.zeros((), device="cuda")
    torch.ops.fusedaccum.accumulate(arena, [g[:-1], g[-1:]], [0, n - 1], 2.0, False, sumsq, None)
    assert arena[0].item() == 4.0 and arena[(1 << 31) + 5].item() == 4.0
    assert arena[-7:].tolist() == [7.0] * 7
    expected = (n - 7) * 16.0 + 7 * 49.0
    assert sumsq.item() == pytest.approx(expected, rel=1e-6)
    del g
    grad = arena.to(torch.bfloat16)
    del arena
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    one = torch.ones((), device="cuda")
    torch.ops.fusedaccum.sgd_step(p, grad, None, None, one, one, None, 0.5, 0.0, 0.0, 0.0, False, False)
    assert p[0].item() == -2.0 and p[-1].item() == -3.5 and p[(1 << 31) + 1].item() == -2.0
    fa.set_backend(None)


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_adam_step_past_2_to_the_31(backend):
    n = (1 << 31) + 4099
    need = n * 2 * 4 + (1 << 30)  # bf16 param, grad and two moments
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    fa.set_backend(backend)
    p = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    g[-5:] = -1.0
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    one = torch.ones((), device="cuda")
    torch.ops.fusedaccum.adam_step(p, g, m, v, None, None, one, one, None, 0.5, 0.9, 0.999, 1e-8, 0.0, True, False)
    # First Adam step: the update is lr * sign(g) (to eps) everywhere, past 2^31 included.
    assert p[0].item() == 0.5 and p[(1 << 31) + 7].item() == 0.5 and p[-1].item() == 1.5
    assert m[-1].item() == pytest.approx(-0.1, rel=1e-2) and v[(1 << 31) + 7].item() == pytest.approx(1e-3, rel=1e-2)
    fa.set_backend(None)


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_graph_replay_with_non_contiguous_gradients(backend):
    """A captured fold of transposed and strided gradients reads their new values on every replay."""
    fa.set_backend(backend)
    base = [torch.randn(64, 48, device="cuda").t(), torch.randn(3000, device="cuda")[::3],
            torch.randn(100, device="cuda", dtype=torch.bfloat16)]
    offsets = [0, 64 * 48, 64 * 48 + 1000]
    arena = torch.zeros(64 * 48 + 1100, device="cuda")
    sumsq = torch.zeros((), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up
        torch.ops.fusedaccum.accumulate(arena, base, offsets, 2.0, True, sumsq, None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sumsq.zero_()
        torch.ops.fusedaccum.accumulate(arena, base, offsets, 2.0, True, sumsq, None)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for g in base:
            g.copy_(torch.randn(g.shape, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.cat([2.0 * g.reshape(-1).float() for g in base])
        got = torch.cat([arena[o:o + g.numel()] for g, o in zip(base, offsets)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert sumsq.item() == pytest.approx(want.double().square().sum().item(), rel=1e-6)
    fa.set_backend(None)


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_non_default_stream_with_gradients_freed_after_the_call(backend):
    """Gradients made on a side stream, folded there and dropped at once: the memory they free
    is rewritten right away on that stream, after the fold has read them (stream order)."""
    fa.set_backend(backend)
    side = torch.cuda.Stream()
    arena = torch.zeros(1 << 22, device="cuda")
    sumsq = torch.zeros((), device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the stream busy, so the fold is still queued when the grads go
        grads = [torch.full((1 << 20,), float(k + 1), device="cuda") for k in range(4)]
        torch.ops.fusedaccum.accumulate(arena, grads, [k << 20 for k in range(4)], 1.0, True, sumsq, None)
        del grads
        scribble = [torch.full((1 << 20,), -7.0, device="cuda") for _ in range(4)]  # likely the same blocks
    torch.cuda.synchronize()
    del scribble
    want = torch.cat([torch.full((1 << 20,), float(k + 1), device="cuda") for k in range(4)])
    assert torch.equal(arena, want)
    assert sumsq.item() == pytest.approx(float(sum((k + 1) ** 2 for k in range(4)) * (1 << 20)), rel=1e-6)
    fa.set_backend(None)


def _window_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(1000, 128), torch.nn.Linear(128, 1000)).cuda()


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_training_on_a_side_stream_after_building_on_the_default_one(backend):
    """The accumulator keeps the parameters' AccumulateGrad nodes alive (they carry its hooks),
    so they outlive the forward that made them; each acc.backward() re-records the stream it
    runs on, as the fresh nodes torch makes at every forward would. Otherwise every gradient is
    synced with the stream the accumulator was built on (torch warns: "The AccumulateGrad
    node's stream does not match..."), and a captured window fails there (next test)."""
    fa.set_backend(backend)
    N = 3
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 1000, (N, 8, 20), generator=gen).cuda(),
                torch.randint(0, 1000, (N, 8, 20), generator=gen).cuda()) for _ in range(2)]
    models = []
    for stream in (None, torch.cuda.Stream()):
        model = _window_model()
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=1e-3), accumulation_steps=N, max_grad_norm=1.0)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for xs, ys in batches:
                for k in range(N):
                    acc.backward(torch.nn.functional.cross_entropy(model(xs[k]).view(-1, 1000), ys[k].view(-1)))
                acc.step()
        torch.cuda.synchronize()
        assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)], caught[0].message
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_cuda_graph_captures_a_whole_window(backend):
    """N micro-batches (forward, backward, fold) and the fused step, captured once, replayed."""
    fa.set_backend(backend)
    N = 4
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 1000, (N, 8, 20), generator=gen).cuda(),
                torch.randint(0, 1000, (N, 8, 20), generator=gen).cuda()) for _ in range(5)]

    def window(model, acc, xs, ys):
        for k in range(N):
            logits = model(xs[k]).view(-1, 1000)
            acc.backward(torch.nn.functional.cross_entropy(logits, ys[k].view(-1)))
        acc.step()

    eager = _window_model()
    eager_acc = fa.GradAccumulator(fa.AdamW(eager.parameters(), lr=1e-3), accumulation_steps=N, max_grad_norm=1.0)
    graphed = _window_model()
    acc = fa.GradAccumulator(fa.AdamW(graphed.parameters(), lr=1e-3), accumulation_steps=N, max_grad_norm=1.0)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up windows, as torch.cuda.graph asks
        for xs, ys in batches[:2]:
            static_x.copy_(xs)
            static_y.copy_(ys)
            window(graphed, acc, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for xs, ys in batches[:2]:
        window(eager, eager_acc, xs, ys)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        window(graphed, acc, static_x, static_y)
    # Capturing ran nothing; replays run the windows.
    for xs, ys in batches[2:]:
        static_x.copy_(xs)
        static_y.copy_(ys)
        graph.replay()
        window(eager, eager_acc, xs, ys)
    torch.cuda.synchronize()
    fa.set_backend(None)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_torch_compile_fullgraph(device):
    """A fold and an Adam step compiled with fullgraph=True: the fake kernels and the mutation
    annotations let dynamo and functionalization trace the ops without a graph break."""

    def train_step(arena, grads, p, m, v, step, factor):
        torch.ops.fusedaccum.accumulate(arena, grads, [0, 40], 0.25, False, None, None)
        step.add_(1)
        torch.ops.fusedaccum.adam_step(p, arena, m, v, None, None, step, factor, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False)
        return p.sum()

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(64, generator=gen), [torch.randn(33, generator=gen), torch.randn(4, 6, generator=gen)],
              torch.randn(64, generator=gen), torch.zeros(64), torch.zeros(64), torch.zeros(()), torch.ones(())]

    def to_dev(x):
        return [to_dev(t) for t in x] if isinstance(x, list) else x.to(device)

    eager_in, compiled_in = to_dev(inputs), to_dev(copy.deepcopy(inputs))
    compiled = torch.compile(train_step, fullgraph=True)
    for _ in range(3):
        e = train_step(*eager_in)
        c = compiled(*compiled_in)
    torch.testing.assert_close(c, e)
    for a, b in zip([eager_in[0]] + eager_in[2:], [compiled_in[0]] + compiled_in[2:]):
        torch.testing.assert_close(b, a)
