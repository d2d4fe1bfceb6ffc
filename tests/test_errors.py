"""Every misuse raises an error that says what to do."""
import gc
import os
import subprocess
import sys

import pytest
import torch

import fusedaccum as fa
from fusedaccum import dispatch
from spawn import free_port


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def backward(m, scale=1.0):
    (m(torch.ones(2, 4)).sum() * scale).backward()


def test_parameter_in_two_optimizers_the_newest_wins():
    m = model()
    first = fa.AdamW(m.parameters())
    first_acc = fa.GradAccumulator(first)
    second = fa.SGD(m.parameters(), lr=0.1)  # a re-run notebook cell: torch allows it
    backward(m)
    second.step()
    with pytest.raises(RuntimeError, match="superseded"):
        first.step()
    with pytest.raises(RuntimeError, match="replaced"):
        first_acc.zero_grad()


def test_parameter_freed_optimizer_can_be_rebuilt():
    m = model()
    fa.GradAccumulator(fa.AdamW(m.parameters()))
    gc.collect()
    fa.AdamW(m.parameters())  # the first optimizer and its accumulator are gone: no conflict


def test_a_second_accumulator_replaces_the_first():
    m = model().to(torch.bfloat16)
    opt = fa.Adam(m.parameters())
    old = fa.GradAccumulator(opt)
    new = fa.GradAccumulator(opt)
    assert opt._accumulator is new and not any(any(w.hooked) for w in old._windows), "the replaced accumulator's hooks are off the parameters"
    with pytest.raises(RuntimeError, match="replaced"):
        old.zero_grad()


def test_accumulator_needs_a_fusedaccum_optimizer():
    with pytest.raises(TypeError, match="needs a fusedaccum optimizer"):
        fa.GradAccumulator(torch.optim.Adam(model().parameters()))


@pytest.mark.parametrize("with_accumulator", [False, True])
def test_sparse_gradients(with_accumulator):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fa.SGD(emb.parameters(), lr=0.1)
    if with_accumulator:
        fa.GradAccumulator(opt)
    with pytest.raises(ValueError, match="dense gradients only"):
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()


def test_tensor_subclass_parameters_are_refused():
    """A wrapper subclass (here torch's TwoTensor) computes through its own dispatch: the arena's
    plain views would not be the parameter. Refused before anything moves."""
    from torch.testing._internal.two_tensor import TwoTensor

    plain = torch.nn.Parameter(torch.ones(3))
    wrapped = torch.nn.Parameter(TwoTensor(torch.zeros(3), torch.zeros(3)))
    where = plain.data_ptr()
    with pytest.raises(ValueError, match=r"plain tensors.*TwoTensor.*torch\.optim"):
        fa.AdamW([plain, wrapped])
    assert plain.data_ptr() == where, "a refused group moved a parameter"


def one_rank(script: str) -> subprocess.CompletedProcess:
    """Runs `script` as a process of its own, one gloo rank (PORT in its environment), without GPUs."""
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, "PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)


FSDP2 = """
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import fusedaccum as fa
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
fully_shard(m)
try:
    fa.AdamW(m.parameters())
except ValueError as e:
    print("REFUSED:", e)
dist.destroy_process_group()
"""


def test_fsdp2_parameters_are_refused():
    """FSDP2's fully_shard turns the parameters into DTensors (one rank on gloo, in a process of its
    own, without GPUs: fully_shard would otherwise move the model to one)."""
    run = one_rank(FSDP2)
    assert "REFUSED:" in run.stdout, run.stdout + run.stderr
    assert "DTensor" in run.stdout and "process_group=" in run.stdout


ZERO = """
import os, torch, torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
import fusedaccum as fa
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
def run(cls, bucket_view):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=cls, parameters_as_bucket_view=bucket_view, lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        m(torch.ones(2, 4) * (i + 1)).pow(2).sum().backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.parameters()])
print("DIFF:", (run(fa.AdamW, False) - run(torch.optim.AdamW, False)).abs().max().item())
try:
    run(fa.AdamW, True)
except RuntimeError as e:
    print("REFUSED:", e)
dist.destroy_process_group()
"""


def test_zero_redundancy_optimizer_bucket_views_are_refused():
    """torch's ZeroRedundancyOptimizer(optimizer_class=fa.AdamW) trains like torch.optim; with
    parameters_as_bucket_view=True it makes each parameter a view into its bucket after building
    the optimizer and broadcasts the buckets: taken back into the arena, the parameters would
    leave the buckets and the ranks drift apart (measured on 2 ranks: 0.03 after 3 steps), so it
    is an error that names the option."""
    run = one_rank(ZERO)
    diff = [line for line in run.stdout.splitlines() if line.startswith("DIFF:")]
    assert diff and float(diff[0].split()[1]) <= 1e-6, run.stdout + run.stderr
    assert "REFUSED:" in run.stdout and "parameters_as_bucket_view=False" in run.stdout, run.stdout + run.stderr


def test_a_parameter_made_a_view_into_a_buffer_is_refused():
    """torch.nn.utils.vector_to_parameters sets .data to views of one vector: refused like a bucket
    view (which of the two it is cannot be told apart), with the in-place way to set values."""
    m = model()
    opt = fa.SGD(m.parameters(), lr=0.1)
    vec = torch.nn.utils.parameters_to_vector(m.parameters())
    torch.nn.utils.vector_to_parameters(vec * 2, m.parameters())
    backward(m)
    with pytest.raises(RuntimeError, match=r"view into another buffer(.|\n)*p\.copy_\(values\)"):
        opt.step()


def test_step_without_backward():
    m = model()
    acc = fa.GradAccumulator(fa.Adam(m.parameters()), accumulation_steps=2)
    with pytest.raises(RuntimeError, match="no acc.backward"):
        acc.step()
    acc.backward(m(torch.ones(1, 4)).sum())
    assert not acc.step()
    acc.backward(m(torch.ones(1, 4)).sum())
    assert acc.step()
    with pytest.raises(RuntimeError, match="no acc.backward"):
        acc.step()


def test_backward_past_the_window():
    m = model()
    acc = fa.GradAccumulator(fa.Adam(m.parameters()), accumulation_steps=2)
    acc.backward(m(torch.ones(1, 4)).sum())
    acc.backward(m(torch.ones(1, 4)).sum())
    with pytest.raises(RuntimeError, match="past the end of the window"):
        acc.backward(m(torch.ones(1, 4)).sum())


def test_num_items_in_some_calls_only():
    m = model()
    acc = fa.GradAccumulator(fa.Adam(m.parameters()), accumulation_steps=3)
    acc.backward(m(torch.ones(1, 4)).sum(), num_items=4)
    with pytest.raises(ValueError, match="num_items was passed to some"):
        acc.backward(m(torch.ones(1, 4)).sum())


def test_plain_backward_in_full_path():
    m = model()
    acc = fa.GradAccumulator(fa.Adam(m.parameters()), accumulation_steps=2)
    with pytest.raises(RuntimeError, match="call acc.backward"):
        backward(m)
    del acc  # kept alive until here: a dropped accumulator (and its hooks) may be collected at any time


def test_optimizer_step_and_zero_grad_in_full_path():
    m = model()
    opt = fa.Adam(m.parameters())
    acc = fa.GradAccumulator(opt, accumulation_steps=1)
    acc.backward(m(torch.ones(1, 4)).sum())
    with pytest.raises(RuntimeError, match="call acc.step"):
        opt.step()
    with pytest.raises(RuntimeError, match="acc.step\\(\\) starts the next window"):
        opt.zero_grad()


def test_full_path_calls_in_swap_in_mode():
    m = model()
    acc = fa.GradAccumulator(fa.Adam(m.parameters()))
    with pytest.raises(RuntimeError, match="accumulation_steps=N"):
        acc.backward(m(torch.ones(1, 4)).sum())
    with pytest.raises(RuntimeError, match="call optimizer.step"):
        acc.step()
    with pytest.raises(ValueError, match="belongs to the full path"):
        fa.GradAccumulator(fa.Adam(model().parameters()), loss_scale=1024.0)


@pytest.mark.parametrize("bad", [dict(accumulation_steps=0), dict(accumulation_steps=2.5),
                                 dict(accumulation_steps=2, loss_scale="auto"),
                                 dict(accumulation_steps=2, max_grad_norm=-1.0)])
def test_bad_accumulator_arguments(bad):
    with pytest.raises(ValueError):
        fa.GradAccumulator(fa.Adam(model().parameters()), **bad)


@pytest.mark.parametrize("new", [lambda w: w.bfloat16(), lambda w: w[:1].clone(), lambda w: w.clone().share_memory_()],
                         ids=["dtype", "shape", "shared"])
def test_parameter_converted_after_the_optimizer_was_built(new):
    """A copy is taken back (test_fidelity); another dtype or shape cannot be, and memory shared
    with other processes (model.share_memory()) would silently stop being shared."""
    m = model()
    opt = fa.SGD(m.parameters(), lr=0.1)
    m.weight.data = new(m.weight.data)
    m.weight.grad = torch.ones_like(m.weight)
    m.bias.grad = torch.ones_like(m.bias)
    with pytest.raises(RuntimeError, match="converted, moved or shared after its fusedaccum optimizer was built"):
        opt.step()


def test_a_parameter_given_another_ones_memory_is_refused():
    """p.data = q.data ties two parameters of one arena: taken back as a copy it would be untied
    (torch.optim steps the shared memory for both)."""
    m = torch.nn.Linear(4, 4, bias=False)
    other = torch.nn.Linear(4, 4, bias=False)
    opt = fa.SGD([*m.parameters(), *other.parameters()], lr=0.1)
    other.weight.data = m.weight.data
    other.weight.grad = torch.ones_like(other.weight)
    with pytest.raises(RuntimeError, match="another parameter's memory"):
        opt.step()


GROUP_EDITS = {
    "params.append": lambda opt, other: opt.param_groups[0]["params"].append(other.weight),
    "params = other list": lambda opt, other: opt.param_groups[0].__setitem__("params", list(other.parameters())),
    "params[0] = other": lambda opt, other: opt.param_groups[0]["params"].__setitem__(0, other.weight),
    "param_groups.pop()": lambda opt, other: (opt.add_param_group({"params": list(other.parameters())}),
                                              opt.param_groups.pop()),
}


@pytest.mark.parametrize("full", [False, True], ids=["plain", "full"])
@pytest.mark.parametrize("edit", list(GROUP_EDITS))
def test_param_groups_edited_by_hand_are_refused(edit, full):
    """torch.optim reads group["params"] at every step; the arenas were built from it once, so an
    edit by hand would be ignored: it is an error instead. A new list of the same parameters and
    add_param_group are fine."""
    m, other = model(), model()
    opt = fa.SGD(m.parameters(), lr=0.1)
    acc = fa.GradAccumulator(opt, accumulation_steps=1) if full else None
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])
    GROUP_EDITS[edit](opt, other)
    with pytest.raises(RuntimeError, match="param_groups was edited by hand"):
        if full:
            acc.backward(m(torch.ones(2, 4)).sum())
            acc.step()
        else:
            backward(m)
            opt.step()


def test_parameters_in_shared_memory_are_refused():
    """Hogwild (model.share_memory(), an optimizer per process): a private arena copy would
    silently stop the processes from sharing updates."""
    m = model()
    m.share_memory()
    with pytest.raises(ValueError, match="shared between processes"):
        fa.SGD(m.parameters(), lr=0.1)
    assert m.weight.is_shared(), "a refused optimizer leaves the parameters where they were"


def test_unsupported_parameter_dtype_and_flags():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        fa.Adam(model().double().parameters())
    with pytest.raises(ValueError, match="differentiable"):
        fa.Adam(model().parameters(), differentiable=True)


def test_unknown_and_unrunnable_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown fusedaccum backend"):
        fa.set_backend("metal")
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "metal")
    with pytest.raises(ValueError, match="FUSEDACCUM_BACKEND"):
        torch.ops.fusedaccum.accumulate(torch.zeros(3), [torch.ones(3)], [0], 1.0, True, None, None)
    monkeypatch.delenv("FUSEDACCUM_BACKEND")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on this machine"):
            fa.set_backend("cuda")


def test_forced_backend_on_a_device_it_cannot_serve(monkeypatch):
    # set_backend() refuses a backend this machine lacks, so the choice is made by hand, in
    # Python and in the compiled entry of the public ops that mirrors it (the autouse fixture's
    # set_backend(None) resets both).
    monkeypatch.setattr(dispatch, "_forced", "cuda")
    if dispatch.extension_loaded():
        from fusedaccum import _C

        _C._set_forced_backend("cuda")
    with pytest.raises(RuntimeError, match="forced but cannot run on cpu tensors"):
        torch.ops.fusedaccum.accumulate(torch.zeros(3), [torch.ones(3)], [0], 1.0, True, None, None)


def test_env_forces_backend(monkeypatch):
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "torch")
    assert fa.backends()["forced"] == "torch"
    assert dispatch.backend_for(torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4, dtype=torch.float64), [torch.ones(2)], [0]), "float64"),
        ((torch.zeros(2, 2), [torch.ones(2)], [0]), "flat contiguous"),
        ((torch.zeros(4), [torch.ones(3)], [2]), "does not fit"),
        ((torch.zeros(4), [torch.ones(3)], [0, 1]), "offsets"),
        ((torch.zeros(4), [torch.ones(2, dtype=torch.int32)], [0]), "int32"),
        ((torch.zeros(4), [torch.ones(2).to_sparse()], [0]), "dense gradients only"),
    ],
)
def test_accumulate_argument_errors(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.fusedaccum.accumulate(*args, 1.0, True, None, None)


def test_step_argument_errors():
    p, one = torch.zeros(8), torch.ones(())
    with pytest.raises(ValueError, match="parameter's dtype"):
        torch.ops.fusedaccum.adam_step(p, p, p.half(), p, None, None, one, one, None, 1e-3, 0.9, 0.99, 1e-8, 0.0, True, False)
    with pytest.raises(ValueError, match="7 elements but must have 8"):
        torch.ops.fusedaccum.sgd_step(p, torch.zeros(7), None, None, one, one, None, 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="needs a momentum_buffer"):
        torch.ops.fusedaccum.sgd_step(p, p, None, None, one, one, None, 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="one-element float32"):
        torch.ops.fusedaccum.sgd_step(p, p, None, None, torch.ones(2), one, None, 0.1, 0.0, 0.0, 0.0, False, False)


def test_dropped_accumulator_and_optimizer_are_freed():
    import weakref

    m = model()
    opt = fa.AdamW(m.parameters())
    acc = fa.GradAccumulator(opt, accumulation_steps=2)
    refs = [weakref.ref(opt), weakref.ref(acc), weakref.ref(opt.arenas[0])]
    del opt, acc
    gc.collect()
    assert all(r() is None for r in refs), "hooks on the parameters keep the accumulator alive"
    backward(m)  # the orphaned hooks do nothing
    assert m.weight.grad is not None
