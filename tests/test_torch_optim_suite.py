"""PyTorch's own optimizer tests, with fusedaccum's optimizers in place of torch's.

A port of the parts of pytorch/pytorch test/test_optim.py (TestOptimRenewed) that concern
SGD, Adam and AdamW, driven by torch's OptimizerInfo database
(torch.testing._internal.common_optimizers.optim_db): the same optimizer configurations,
error inputs and LR schedulers torch tests itself with. Where torch checks a property of one
optimizer ("the loss went down", "a reloaded state_dict steps"), these tests run fa and
torch.optim's for-loop implementation (foreach=False, torch's ground truth) side by side and
require the same parameters and the same optimizer.state, so that "plausible" is not enough.

What fa does differently by design is asserted as what fa does:
- complex and float64 parameters: ValueError at construction (arenas hold fp32, bf16, fp16);
- sparse parameters: ValueError at construction; sparse gradients: ValueError at step;
- differentiable=True: ValueError at construction;
- foreach= and fused= are accepted and ignored (the step is always fa's fused one), so the
  combinations torch refuses because of them (a tensor lr or tensor betas with foreach=True,
  foreach=True with fused=True) are accepted and step as torch's for-loop does;
- capturable=True is accepted on CPU too (torch refuses it there), with torch's arithmetic;
- a parameter listed twice in a group: ValueError naming it (torch warns and steps it twice).
"""
import copy
import io
import pickle
import sys
import types
import unittest
import warnings
from collections import defaultdict

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fusedaccum as fa

def _load_optimizer_db():
    """torch's OptimizerInfo database. Its module imports torch's test harness, which wants
    `expecttest` only to subclass its TestCase (unused here), and freezes torch.backends flags
    on import: a stand-in for the first, the flag restored for the second."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal import common_optimizers

    if not frozen:
        vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True
    return common_optimizers


common_optimizers = _load_optimizer_db()
NAMES = ("SGD", "Adam", "AdamW")
INFO = {info.optim_cls.__name__: info for info in common_optimizers.optim_db if info.optim_cls.__name__ in NAMES}

# fa against torch's for-loop step. One step differs by at most an ulp or so (torch rounds after
# each of its ops, fa's kernels once per fused expression); over several steps of a loss whose
# gradient cancels (the test models'), a 1-ulp parameter difference shows up ~10x larger in the
# next gradient. This repository's tests/test_optim.py uses the same tolerance.
FP32 = dict(rtol=1e-5, atol=1e-6)
EXACT = dict(rtol=0, atol=0)  # fa against fa, same arithmetic


def half_tol(dtype):
    """|fa - torch| <= 2 eps (1 + |torch|), eps of bf16/fp16: torch's for-loop rounds to the
    parameter dtype after each op (moments, decay, update), fa once per element and step; where
    an op cancels (momentum against a new gradient) that rounding is relative to its operands."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


def fresh_inputs(name, dtype=torch.float32):
    """desc -> constructor kwargs of every OptimizerInput torch tests `name` with: the CPU ones and
    the CUDA-only ones (capturable, tensor betas). Built anew on each call: a tensor lr is mutable."""
    out = {}
    for device in ("cpu", "cuda"):
        for optim_input in INFO[name].optim_inputs_func(device=device, dtype=dtype):
            out.setdefault(optim_input.desc, optim_input.kwargs)
    return out


def switch_inputs(name, skip=("differentiable",)):
    """torch's _get_optim_inputs_including_global_cliquey_kwargs: every input, and each again with
    one of foreach / fused / differentiable set. Asked for CUDA, where torch has all three (and
    the CUDA-only inputs); the kwargs are device-free."""
    return common_optimizers._get_optim_inputs_including_global_cliquey_kwargs("cuda", torch.float32, INFO[name], skip=skip)


def _case_id(name, desc):
    return f"{name}-{desc}".replace(", ", "+").replace(" ", "_")


CASES = [pytest.param(n, d, id=_case_id(n, d)) for n in NAMES for d in fresh_inputs(n)]


def torch_kwargs(kwargs, device="cpu"):
    """The same configuration for torch's for-loop implementation."""
    kwargs = copy.deepcopy(kwargs)
    kwargs.pop("fused", None)
    kwargs["foreach"] = False
    if kwargs.get("capturable") and torch.device(device).type == "cpu":
        kwargs["capturable"] = False  # torch refuses capturable on CPU; the arithmetic is the same
    return kwargs


def pair(name, torch_params, fa_params, kwargs, device="cpu"):
    """(torch optimizer, fa optimizer) over the two parameter sets, same configuration."""
    opt_t = getattr(torch.optim, name)(torch_params, **torch_kwargs(kwargs, device))
    opt_f = getattr(fa, name)(fa_params, **copy.deepcopy(kwargs))
    return opt_t, opt_f


# -- comparison -------------------------------------------------------------------------------


def assert_same_value(ours, ref, where, tol):
    if torch.is_tensor(ref):
        assert torch.is_tensor(ours), f"{where}: {type(ours).__name__}, torch has a tensor"
        assert ours.shape == ref.shape, f"{where}: shape {tuple(ours.shape)}, torch {tuple(ref.shape)}"
        torch.testing.assert_close(ours.detach().to(ref.device, ref.dtype), ref.detach(), **tol,
                                   msg=lambda m: f"{where}: {m}")
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), \
            f"{where}: keys {sorted(map(str, ours))}, torch {sorted(map(str, ref))}"
        for k in ref:
            assert_same_value(ours[k], ref[k], f"{where}[{k!r}]", tol)
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(ref), f"{where}: {ours!r}, torch {ref!r}"
        for k, (a, b) in enumerate(zip(ours, ref)):
            assert_same_value(a, b, f"{where}[{k}]", tol)
    else:
        assert ours == ref, f"{where}: {ours!r}, torch {ref!r}"


def assert_state_matches(opt_f, opt_t, params_f, params_t, tol, where=""):
    """Same parameters and the same optimizer.state entry per parameter (keys, values, dtypes)."""
    for k, (pf, pt) in enumerate(zip(params_f, params_t)):
        assert_same_value(pf, pt, f"{where}param {k}", tol)
        sf, st = opt_f.state.get(pf, {}), opt_t.state.get(pt, {})
        assert set(sf) == set(st), f"{where}param {k}: state keys {sorted(sf)}, torch {sorted(st)}"
        for key, ref in st.items():
            ours = sf[key]
            if torch.is_tensor(ref) and key != "step":
                assert ours.dtype == ref.dtype, f"{where}param {k} state[{key!r}]: {ours.dtype}, torch {ref.dtype}"
            assert_same_value(ours, ref, f"{where}param {k} state[{key!r}]", tol)


def assert_nets_match(opt_f, opt_t, nets, where=""):
    """nets = [torch's net, fa's net]."""
    assert_state_matches(opt_f, opt_t, list(nets[1].parameters()), list(nets[0].parameters()), FP32, where)


def assert_state_dicts_match(opt_f, opt_t, where="state_dict"):
    assert_same_value(strip_names_and_flags(opt_f.state_dict()), strip_names_and_flags(opt_t.state_dict()), where, FP32)


def strip_names_and_flags(state_dict):
    """A state_dict without param_names and the foreach/fused switches (fa ignores them)."""
    sd = copy.deepcopy(state_dict)
    for group in sd["param_groups"]:
        for key in ("param_names", "foreach", "fused"):
            group.pop(key, None)
    return sd


# -- the model: torch's test model plus the parameter shapes fused steps get wrong ------------


class Net(torch.nn.Module):
    """Linear(2, 3) - Sigmoid - Linear(3, 1) - Sigmoid (torch's _compare_between model), plus a
    0-d, a zero-size and a non-contiguous parameter that all take part in the loss."""

    def __init__(self, device="cpu", dtype=torch.float32, seed=1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        self.w1, self.b1 = Parameter(rand(3, 2)), Parameter(rand(3))
        self.w2, self.b2 = Parameter(rand(1, 3)), Parameter(rand(1))
        self.scalar = Parameter(rand(()))
        self.empty = Parameter(rand(0, 4))
        self.strided = Parameter(rand(4, 3, 2)[..., 0])
        self.x = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], device=device, dtype=dtype)

    def loss(self):
        y = torch.sigmoid(torch.sigmoid(self.x @ self.w1.T + self.b1) @ self.w2.T + self.b2)
        return y.sum() * self.scalar + self.strided.sin().sum() * y.mean() + self.empty.sum()


def train_side_by_side(name, kwargs, device, dtype=torch.float32, accumulator=False, steps=5):
    """torch's _compare_between loop: a step with no gradient at all (a no-op), a layer frozen
    for one step (its gradients None: not stepped), compared after every step. In fp32 the
    gradients come from the model's loss; in bf16/fp16 they are drawn afresh each step (from a
    loss, the for-loop's extra roundings would be amplified through the next gradients)."""
    net_t, net_f = Net(device, dtype), Net(device, dtype)
    assert not net_t.strided.is_contiguous()
    opt_t, opt_f = pair(name, net_t.parameters(), net_f.parameters(), kwargs, device)
    acc = fa.GradAccumulator(opt_f) if accumulator else None
    tol = FP32 if dtype == torch.float32 else half_tol(dtype)
    for i in range(steps):
        for net, opt in ((net_t, opt_t), (net_f, opt_f)):
            opt.zero_grad()
            net.w2.requires_grad_(i != 3)
            net.b2.requires_grad_(i != 3)
            if i != 2 and dtype == torch.float32:
                net.loss().backward()
            elif i != 2:
                gen = torch.Generator().manual_seed(i)
                for p in net.parameters():
                    if p.requires_grad:
                        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            opt.step()
        assert_state_matches(opt_f, opt_t, list(net_f.parameters()), list(net_t.parameters()), tol, f"step {i}: ")
    del acc


# -- correctness against the for-loop implementation ------------------------------------------


def test_optimizer_db_is_there():
    """A torch upgrade that renames the database must fail here, not test nothing."""
    assert set(INFO) == set(NAMES)
    for name in NAMES:
        assert len(fresh_inputs(name)) >= 5


@pytest.mark.parametrize("accumulator", [False, True], ids=["plain", "swap_in"])
@pytest.mark.parametrize("name,desc", CASES)
def test_matches_forloop(device_backend, name, desc, accumulator):
    """Every OptimizerInfo input (CUDA-only ones included), 0-d / zero-size / non-contiguous
    parameters, gradients None for a step: fa's parameters and state equal torch's for-loop step.
    `swap_in`: the same with fa.GradAccumulator(opt) attached (fp32: p.grad stays torch's)."""
    device, _ = device_backend
    train_side_by_side(name, fresh_inputs(name)[desc], device, accumulator=accumulator)


HALF_CASES = [  # the CPU inputs: the CUDA-only ones differ in arguments, not in half-precision arithmetic
    pytest.param(n, i.desc, dt, id=f"{_case_id(n, i.desc)}-{str(dt)[6:]}")
    for dt in (torch.bfloat16, torch.float16)
    for n in NAMES
    for i in INFO[n].optim_inputs_func(device="cpu", dtype=dt)
]


@pytest.mark.filterwarnings("ignore:.*float16 parameters without master weights:UserWarning")
@pytest.mark.parametrize("name,desc,dtype", HALF_CASES)
def test_half_precision_matches_forloop(device_backend, name, desc, dtype):
    """torch's test_fused_matches_forloop for bf16/fp16 parameters (no master weights): fa's
    state stays in the parameter dtype, as torch's; results within two ulps of the for-loop's."""
    device, _ = device_backend
    train_side_by_side(name, fresh_inputs(name, dtype)[desc], device, dtype=dtype)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_float16_adam_without_master_weights_warns(name):
    """fa's own addition: torch.optim says nothing when Adam keeps fp16 moments (they overflow)."""
    with pytest.warns(UserWarning, match="master_weights=True"):
        getattr(fa, name)([Parameter(torch.randn(3, dtype=torch.float16))])


@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_fused_flags_change_nothing(name):
    """Every input with each of torch's implementation switches (foreach, fused) on and off:
    fa accepts them and steps as torch's for-loop implementation."""
    inputs = switch_inputs(name)
    assert any(i.kwargs.get("foreach") for i in inputs) and any(i.kwargs.get("fused") for i in inputs)
    for optim_input in inputs:
        train_side_by_side(name, optim_input.kwargs, "cpu", steps=3)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_closure_and_lr_schedulers_go_the_right_way(name, contiguous):
    """torch's test_forloop_goes_right_direction (with_lrsched): weight.mv(x) + bias, stepped
    through a closure, with the OptimizerInfo's LR schedulers (one combination per input, in
    turn): fa equals torch after every step, and the loss moves the way torch requires."""
    schedulers = INFO[name].scheduler_inputs
    for k, (desc, kwargs) in enumerate(fresh_inputs(name).items()):
        gen = torch.Generator().manual_seed(k)
        if contiguous:
            w0, b0 = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
        else:
            w0, b0 = torch.randn(10, 5, 2, generator=gen), torch.randn(10, 2, generator=gen)
        x = torch.randn(5, generator=gen)
        sides = []
        for lib in ("torch", "fa"):
            weight, bias = (Parameter(w0.clone()), Parameter(b0.clone())) if contiguous else (
                Parameter(w0.clone()[..., 0]), Parameter(b0.clone()[..., 0]))
            assert weight.is_contiguous() == contiguous
            sides.append((weight, bias))
        opts = pair(name, sides[0], sides[1], kwargs)
        scheds = [[make(opt) for make in schedulers[k % len(schedulers)]] for opt in opts]

        def closure(opt, weight, bias):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure(opts[1], *sides[1]).item()
        for step in range(10):
            losses = [opt.step(lambda: closure(opt, *side)) for opt, side in zip(opts, sides)]
            torch.testing.assert_close(losses[1], losses[0], **FP32)
            for side_scheds, loss in zip(scheds, losses):
                for sched in side_scheds:
                    sched.step(loss.detach()) if isinstance(sched, ReduceLROnPlateau) else sched.step()
            for pf, pt in zip(sides[1], sides[0]):
                torch.testing.assert_close(pf.detach(), pt.detach(), **FP32, msg=lambda m: f"{desc} step {step}: {m}")
        final = closure(opts[1], *sides[1]).item()
        if kwargs.get("maximize", False):
            assert final > initial, desc
        else:
            assert final < initial, desc


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_lr(name):
    """torch's test_param_groups_lr: a group's own lr wins over the constructor's (1e-28 for the
    other group, whose parameter must not move); fa equals torch."""
    for desc, kwargs in fresh_inputs(name).items():
        if "lr" not in kwargs or (not torch.is_tensor(kwargs["lr"]) and kwargs["lr"] == 0):
            kwargs["lr"] = 1e-3
        sides = []
        for _ in range(2):
            gen = torch.Generator().manual_seed(0)
            sides.append([Parameter(torch.randn(10, 5, generator=gen)), Parameter(torch.randn(10, generator=gen)),
                          Parameter(torch.randn(2, generator=gen))])
        x = torch.randn(5, generator=torch.Generator().manual_seed(1))
        irrelevant = sides[1][2].detach().clone()
        opt_t = getattr(torch.optim, name)([dict(params=sides[0][:2], **torch_kwargs(kwargs)), dict(params=sides[0][2:])],
                                           lr=1e-28, foreach=False)
        opt_f = getattr(fa, name)([dict(params=sides[1][:2], **copy.deepcopy(kwargs)), dict(params=sides[1][2:])], lr=1e-28)
        for _ in range(5):
            for (w, b, irr), opt in zip(sides, (opt_t, opt_f)):
                opt.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                irr.grad = torch.full_like(irr, 0.5)
                opt.step()
        assert_state_matches(opt_f, opt_t, sides[1], sides[0], FP32, f"{desc}: ")
        torch.testing.assert_close(sides[1][2].detach(), irrelevant, **FP32, msg=lambda m: f"{desc}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_weight_decay(name):
    """torch's test_param_groups_weight_decay: weight decay on the weight's group, none on the
    bias's: fa equals torch."""
    for desc, kwargs in fresh_inputs(name).items():
        gen = torch.Generator().manual_seed(0)
        w0, b0, x = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen), torch.randn(5, generator=gen)
        sides = [[Parameter(w0.clone()), Parameter(b0.clone())] for _ in range(2)]
        tk, fk = torch_kwargs(kwargs), copy.deepcopy(kwargs)
        opt_t = getattr(torch.optim, name)([dict(tk, params=[sides[0][0]]), dict(tk, params=[sides[0][1]], weight_decay=0.0)])
        opt_f = getattr(fa, name)([dict(fk, params=[sides[1][0]]), dict(fk, params=[sides[1][1]], weight_decay=0.0)])
        for _ in range(5):
            for (w, b), opt in zip(sides, (opt_t, opt_f)):
                opt.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                opt.step()
        assert_state_matches(opt_f, opt_t, sides[1], sides[0], FP32, f"{desc}: ")


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name):
    """torch's test_tensor_lr: lr=torch.tensor(1e-3) steps as lr=1e-3, with every input and each
    implementation switch (torch refuses a tensor lr with foreach=True; fa ignores foreach)."""
    inputs = switch_inputs(name)
    for optim_input in inputs:
        kwargs = dict(optim_input.kwargs, lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        w0, b0, x = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen), torch.randn(5, generator=gen)
        sides = [[Parameter(w0.clone()), Parameter(b0.clone())] for _ in range(2)]
        opt_t = getattr(torch.optim, name)(sides[0], **torch_kwargs(kwargs))
        opt_f = getattr(fa, name)(sides[1], **dict(copy.deepcopy(kwargs), lr=torch.tensor(1e-3)))
        for _ in range(5):
            for (w, b), opt in zip(sides, (opt_t, opt_f)):
                opt.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                opt.step()
        assert_state_matches(opt_f, opt_t, sides[1], sides[0], FP32, f"{optim_input.desc}: ")


# -- what fa refuses by design ----------------------------------------------------------------


def _complex_params():
    # torch's test_complex mixes complex and real parameters in one optimizer
    return [Parameter(torch.randn(10, 5, dtype=torch.complex64)), Parameter(torch.randn(10, 5))]


REFUSALS = {
    # case: (build the optimizer's params and kwargs, error raised at "construction" or "step", regex)
    "complex64": (lambda: ([Parameter(torch.randn(4, dtype=torch.complex64))], {}), "construction", "complex64"),
    "complex_mixed_with_real": (lambda: (_complex_params(), {}), "construction", "complex64"),
    "complex_in_added_group": (None, "construction", "complex64"),
    "float64": (lambda: ([Parameter(torch.randn(4, dtype=torch.float64))], {}), "construction", "float64"),
    "sparse_parameter": (lambda: ([Parameter(torch.randn(3, 3).to_sparse())], {}), "construction", "sparse"),
    "sparse_gradient": (lambda: ([Parameter(torch.randn(2))], {}), "step", "sparse"),
    "differentiable": (lambda: ([Parameter(torch.randn(4))], {"differentiable": True}), "construction", "differentiable"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("name", NAMES)
def test_refused_by_design(name, case):
    """complex (torch's test_complex / test_complex_2d), float64 (test_foreach_matches_forloop's
    dtype), sparse (test_rosenbrock_sparse's uncoalesced gradients) and differentiable=True: a
    ValueError that names the problem, at construction or at the first step, and nothing moved."""
    make, when, pattern = REFUSALS[case]
    cls = getattr(fa, name)
    if case == "complex_in_added_group":
        keep = Parameter(torch.randn(3))
        opt = cls([keep], lr=0.1)
        with pytest.raises(ValueError, match=pattern):
            opt.add_param_group({"params": [Parameter(torch.randn(2, dtype=torch.complex64))]})
        assert len(opt.param_groups) == 1
        return
    params, kwargs = make()
    if when == "construction":
        with pytest.raises(ValueError, match=pattern):
            cls(params, lr=0.1, **kwargs)
        return
    opt = cls(params, lr=0.1, **kwargs)
    before = params[0].detach().clone()
    # torch's rosenbrock_sparse gradient: uncoalesced, both entries on one index
    params[0].grad = torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.tensor([0.25, 0.75]), (2,), check_invariants=True)
    with pytest.raises(ValueError, match=pattern):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("name", NAMES)
def test_every_differentiable_input_is_refused(name):
    inputs = switch_inputs(name, skip=())
    differentiable = [i for i in inputs if i.kwargs.get("differentiable")]
    assert differentiable
    for optim_input in differentiable:
        with pytest.raises(ValueError, match="differentiable"):
            getattr(fa, name)([Parameter(torch.randn(3))], **optim_input.kwargs)


# Error inputs torch raises that fa takes on purpose: it ignores foreach/fused.
ACCEPTED_BY_FA = {
    "lr as Tensor doesn't work with foreach & not capturable",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
}


def _steps_like_torch(name, kwargs, where):
    ps_t = [Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(k))) for k in range(2)]
    ps_f = [Parameter(p.detach().clone()) for p in ps_t]
    opt_t, opt_f = pair(name, ps_t, ps_f, kwargs)
    for step in range(2):
        for ps, opt in ((ps_t, opt_t), (ps_f, opt_f)):
            for k, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.5 + k + step)
            opt.step()
    assert_state_matches(opt_f, opt_t, ps_f, ps_t, FP32, where)


@pytest.mark.parametrize("name", NAMES)
def test_error_inputs(name):
    """torch's test_errors over the OptimizerInfo error inputs: fa raises torch's error, with
    deliberate exceptions. A parameter listed twice in a group, which torch only warns about, is
    a ValueError naming it; the combinations torch refuses because of foreach/fused (which fa
    ignores) are accepted and step as torch's for-loop implementation."""
    cls = getattr(fa, name)
    error_inputs = INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert len(error_inputs) >= 6
    for error_input in error_inputs:
        optim_input = error_input.optimizer_error_input
        desc, params, kwargs = optim_input.desc, optim_input.params, optim_input.kwargs
        assert error_input.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR, desc
        if desc in ACCEPTED_BY_FA:
            _steps_like_torch(name, kwargs, f"{desc}: ")
        elif desc == "a param group cannot have duplicate parameters":
            assert error_input.error_type is UserWarning
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's own warning may come first
                with pytest.raises(ValueError, match="more than once|twice|duplicate"):
                    cls(params, **kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                cls(params, **kwargs)
    # torch's CUDA-only error inputs: fused with foreach (accepted), fused with differentiable (refused)
    _steps_like_torch(name, {"foreach": True, "fused": True}, "foreach and fused: ")
    with pytest.raises(ValueError, match="differentiable"):
        cls([Parameter(torch.randn(3))], fused=True, differentiable=True)


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_parameter_error_names_it(name):
    """The ValueError for a parameter listed twice names it (named parameters: by its name)."""
    p = Parameter(torch.randn(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"decoder\.weight|encoder\.weight"):
            getattr(fa, name)([("encoder.weight", p), ("decoder.weight", p)])


# -- state_dict -------------------------------------------------------------------------------


def _wb(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, generator=gen), torch.randn(2, generator=gen), torch.randn(3, generator=gen)


def _fwd_bwd(opt, w, b, x):
    opt.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


@pytest.mark.parametrize("named1", [False, True], ids=["plain1", "named1"])
@pytest.mark.parametrize("named0", [False, True], ids=["plain0", "named0"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_deterministic(name, named0, named1):
    """torch's test_state_dict_deterministic: an optimizer loaded from another's state_dict steps
    in lockstep with it; their state_dicts are equal (param names aside); the state_dict passed to
    load_state_dict is not modified; repeated param groups have identical representations."""
    for desc, kwargs in fresh_inputs(name).items():
        w0, b0, x = _wb()
        weight, bias = Parameter(w0.clone()), Parameter(b0.clone())
        opt = getattr(fa, name)(_named([weight, bias], named0), **copy.deepcopy(kwargs))
        for _ in range(5):
            _fwd_bwd(opt, weight, bias, x)
            opt.step()
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        opt_c = getattr(fa, name)(_named([weight_c, bias_c], named1), **copy.deepcopy(kwargs))
        saved = copy.deepcopy(opt.state_dict())
        given = copy.deepcopy(saved)
        opt_c.load_state_dict(given)
        assert_same_value(given, saved, f"{desc}: state_dict after load_state_dict", EXACT)
        for _ in range(5):
            _fwd_bwd(opt, weight, bias, x)
            _fwd_bwd(opt_c, weight_c, bias_c, x)
            opt.step()
            opt_c.step()
            torch.testing.assert_close(weight_c, weight, **EXACT)
            torch.testing.assert_close(bias_c, bias, **EXACT)

        def no_names(sd):
            sd = copy.deepcopy(sd)
            for g in sd["param_groups"]:
                g.pop("param_names", None)
            return sd

        assert_same_value(no_names(opt_c.state_dict()), no_names(opt.state_dict()), f"{desc}: state_dict", EXACT)
        opt_c.param_groups.extend(opt_c.param_groups)
        assert_same_value(no_names(opt_c.state_dict())["param_groups"][-1], no_names(opt.state_dict())["param_groups"][-1],
                          f"{desc}: repeated group", EXACT)


@pytest.mark.parametrize("direction", ["fa_to_torch", "torch_to_fa"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, direction):
    """A state_dict saved by one library loads into the other (every input, some parameters with
    fewer steps than others): the two then step in lockstep with equal state_dicts."""
    src_lib, dst_lib = (torch.optim, fa) if direction == "torch_to_fa" else (fa, torch.optim)

    def build(lib, params, kwargs):
        return getattr(lib, name)(params, **(torch_kwargs(kwargs) if lib is torch.optim else copy.deepcopy(kwargs)))

    for desc, kwargs in fresh_inputs(name).items():
        if dst_lib is torch.optim and kwargs.get("capturable"):
            continue  # saved with capturable=True (fa takes it on CPU), which torch refuses on CPU
        net_src, net_dst = Net(), Net()
        src = build(src_lib, net_src.parameters(), kwargs)
        _train(net_src, src, 3, skip_w2_at=(1,))
        with torch.no_grad():
            for p_src, p_dst in zip(net_src.parameters(), net_dst.parameters()):
                p_dst.copy_(p_src)
        dst = build(dst_lib, net_dst.parameters(), kwargs)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        for net, opt in ((net_src, src), (net_dst, dst)):
            _train(net, opt, 3)
        ours, ref = ((dst, net_dst), (src, net_src)) if dst_lib is fa else ((src, net_src), (dst, net_dst))
        (opt_f, net_f), (opt_t, net_t) = ours, ref
        assert_state_matches(opt_f, opt_t, list(net_f.parameters()), list(net_t.parameters()), FP32, f"{desc}: ")
        assert_same_value(strip_names_and_flags(dst.state_dict()), strip_names_and_flags(src.state_dict()),
                          f"{desc}: state_dict", FP32)


ROUTES = ["fa->fa", "fa->torch", "torch->fa"]
NAMED = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", NAMES)
def test_load_from_to_named_state_dict(name, route):
    """torch's test_can_load_from_to_named_state_dict (Conv2d + BatchNorm2d; the second optimizer
    is built over the same model), across libraries, against torch->torch: the second optimizer
    steps as torch's, and keeps the parameter names when either side had them. Inputs take the
    four (named, unnamed) combinations in turn."""
    first, second = [fa if lib == "fa" else torch.optim for lib in route.split("->")]
    for k, (desc, kwargs) in enumerate(fresh_inputs(name).items()):
        if first is fa and second is torch.optim and kwargs.get("capturable"):
            continue  # saved with capturable=True (fa takes it on CPU), which torch refuses on CPU
        named0, named1 = NAMED[k % len(NAMED)]
        worlds = []
        for libs in ((torch.optim, torch.optim), (first, second)):
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).eval()
            x = torch.rand(1, 4, 6, 6)
            # torch's loss, model(x).sum() in training mode, has an exactly zero gradient for the
            # convolution (batch statistics remove its mean and scale): Adam then steps on rounding
            # noise, and two implementations diverge. With running statistics (eval) and a weighted
            # sum the gradients are well posed.
            target = torch.rand(1, 2, 3, 3)
            opts = []
            for lib, named in zip(libs, (named0, named1)):
                params = model.named_parameters() if named else model.parameters()
                kw = torch_kwargs(kwargs) if lib is torch.optim else copy.deepcopy(kwargs)
                opts.append(getattr(lib, name)(params, **kw))
                if len(opts) == 1:
                    for _ in range(3):
                        opts[0].zero_grad()
                        (model(x) * target).sum().backward()
                        opts[0].step()
                    saved = copy.deepcopy(opts[0].state_dict())
            opt2 = opts[1]
            opt2.load_state_dict(saved)
            opt2.zero_grad()
            (model(x) * target).sum().backward()
            opt2.step()
            if named0 or named1:
                assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
            worlds.append((model, opt2))
        (model_t, opt_t), (model_x, opt_x) = worlds
        assert_state_matches(opt_x, opt_t, list(model_x.parameters()), list(model_t.parameters()), FP32,
                             f"{desc} (named {named0}, {named1}): ")


@pytest.mark.parametrize("name", NAMES)
def test_load_older_and_nontensor_step_state_dicts(name):
    """torch's test_can_load_older_state_dict (flags added after the first release removed) and
    test_load_nontensor_step (step saved as a Python number): fa loads both and steps as torch."""
    info = INFO[name]
    for variant in ("older", "nontensor_step"):
        for desc, kwargs in fresh_inputs(name).items():
            nets = [Net(), Net()]
            opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), kwargs)
            for (net, opt) in zip(nets, (opt_t, opt_f)):
                for _ in range(2):
                    opt.zero_grad()
                    net.loss().backward()
                    opt.step()
                sd = copy.deepcopy(opt.state_dict())
                if variant == "older":
                    for group in sd["param_groups"]:
                        for flag in info.not_og_supported_flags:
                            group.pop(flag, None)
                else:
                    for entry in sd["state"].values():
                        if torch.is_tensor(entry.get("step")):
                            entry["step"] = entry["step"].item()
                opt.load_state_dict(sd)
                for _ in range(2):
                    opt.zero_grad()
                    net.loss().backward()
                    opt.step()
            assert_nets_match(opt_f, opt_t, nets, f"{variant} {desc}: ")


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_save_load_with_weights_only(name, named):
    """torch's test_save_load_equality_with_weights_only; the loaded dict also resumes in a new fa
    optimizer exactly as the original goes on."""
    for desc, kwargs in fresh_inputs(name).items():
        w0, b0, x = _wb()
        weight, bias = Parameter(w0.clone()), Parameter(b0.clone())
        opt = getattr(fa, name)(_named([weight, bias], named), **copy.deepcopy(kwargs))
        for _ in range(3):
            opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
        sd = opt.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        assert_same_value(torch.load(buf), sd, f"{desc}: torch.load", EXACT)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert_same_value(loaded, sd, f"{desc}: torch.load(weights_only=True)", EXACT)
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        opt_c = getattr(fa, name)(_named([weight_c, bias_c], named), **copy.deepcopy(kwargs))
        opt_c.load_state_dict(loaded)
        for _ in range(2):
            opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
            opt_c.step(lambda: _fwd_bwd(opt_c, weight_c, bias_c, x))
        torch.testing.assert_close(weight_c, weight, **EXACT)
        torch.testing.assert_close(bias_c, bias, **EXACT)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("source", ["fa", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_from_cpu_params_to_cuda_params(name, source):
    """torch's test_state_dict_with_cuda_params: a state_dict saved over CPU parameters loads into
    an fa optimizer over CUDA ones without changing the dict it is given, and the two then step
    alike."""
    for desc, kwargs in fresh_inputs(name).items():
        params_cpu = [Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(k))) for k in range(2)]
        opt_cpu = getattr(fa, name)(params_cpu, **copy.deepcopy(kwargs)) if source == "fa" else \
            getattr(torch.optim, name)(params_cpu, **torch_kwargs(kwargs))
        grads = [[torch.randn(2, 3, generator=torch.Generator().manual_seed(10 * s + k)) for k in range(2)]
                 for s in range(6)]
        for s in range(3):
            for p, g in zip(params_cpu, grads[s]):
                p.grad = g.clone()
            opt_cpu.step()
        params_cuda = [Parameter(p.detach().to("cuda")) for p in params_cpu]
        opt_cuda = getattr(fa, name)(params_cuda, **copy.deepcopy(kwargs))
        saved = copy.deepcopy(opt_cpu.state_dict())
        given = copy.deepcopy(saved)
        opt_cuda.load_state_dict(given)
        assert_same_value(given, saved, f"{desc}: state_dict after load_state_dict", EXACT)
        for s in range(3, 6):
            for p_cpu, p_cuda, g in zip(params_cpu, params_cuda, grads[s]):
                p_cpu.grad, p_cuda.grad = g.clone(), g.to("cuda")
            opt_cpu.step()
            opt_cuda.step()
        assert_state_matches(opt_cuda, opt_cpu, params_cuda, params_cpu, FP32, f"{desc}: ")


STATEFUL = {"SGD": {"momentum": 0.9, "weight_decay": 0.1}, "Adam": {"amsgrad": True, "weight_decay": 0.1},
            "AdamW": {"amsgrad": True, "weight_decay": 0.1}}


def _train(net, opt, steps, skip_w2_at=()):
    for i in range(steps):
        opt.zero_grad()
        net.w2.requires_grad_(i not in skip_w2_at)
        net.b2.requires_grad_(i not in skip_w2_at)
        net.loss().backward()
        opt.step()
    net.w2.requires_grad_(True)
    net.b2.requires_grad_(True)


@pytest.mark.parametrize("name", NAMES)
def test_roll_back_to_an_older_state_dict(name):
    """Loading a state_dict saved before some parameters had any state (and before others took
    more steps) takes the optimizer back there: torch restarts those parameters from nothing."""
    nets = [Net(), Net()]
    opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), STATEFUL[name])
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 1, skip_w2_at=(0,))  # w2 / b2 have no state yet
        old = copy.deepcopy(opt.state_dict())
        _train(net, opt, 3)
        opt.load_state_dict(old)
        _train(net, opt, 2)
    assert_nets_match(opt_f, opt_t, nets)
    assert_state_dicts_match(opt_f, opt_t)


# -- hooks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_and_post_hooks(name):
    """torch's test_step_pre_hook / test_step_post_hook: each runs once per step until removed.
    Beyond torch's test: a pre-hook that rescales the gradients is seen by the step, a post-hook
    sees the updated parameters; fa equals torch."""
    for desc, kwargs in fresh_inputs(name).items():
        nets = [Net(), Net()]
        opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), kwargs)
        for net, opt in zip(nets, (opt_t, opt_f)):
            calls, seen_after = [], []

            def pre(o, args, kw):
                calls.append("pre")
                for p in net.parameters():
                    if p.grad is not None:
                        p.grad.mul_(3.0)

            def post(o, args, kw):
                calls.append("post")
                seen_after.append(net.w1.detach().clone())

            handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
            for _ in range(2):
                opt.zero_grad()
                net.loss().backward()
                opt.step()
                assert torch.equal(seen_after[-1], net.w1.detach())
            assert calls == ["pre", "post"] * 2
            for h in handles:
                h.remove()
            opt.zero_grad()
            net.loss().backward()
            opt.step()
            assert calls == ["pre", "post"] * 2
        assert_nets_match(opt_f, opt_t, nets, f"{desc}: ")


@pytest.mark.parametrize("name", NAMES)
def test_global_and_local_step_hooks_order(name):
    """torch's test_step_all_hooks: global pre, local pre, local post, global post, for fa's
    optimizer and a torch.optim.SGD side by side; removing the handles silences all of them."""
    data = []
    opt = getattr(fa, name)([Parameter(torch.tensor([1.0, 1.0]))])
    opt2 = torch.optim.SGD([Parameter(torch.tensor([1.0, 1.0]))])
    handles = [
        register_optimizer_step_pre_hook(lambda *a: data.append(0)),
        register_optimizer_step_post_hook(lambda *a: data.append(5)),
        opt.register_step_pre_hook(lambda *a: data.append(1)),
        opt.register_step_post_hook(lambda *a: data.append(2)),
        opt2.register_step_pre_hook(lambda *a: data.append(1)),
        opt2.register_step_post_hook(lambda *a: data.append(2)),
    ]
    try:
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks(name):
    """torch's test_state_dict_pre_hook / _post_hook / _pre_post_hook. The pre-hook leaves a
    non-parameter key in optimizer.state (as torch's does): stepping afterwards still equals torch."""
    nets = [Net(), Net()]
    opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), STATEFUL[name])
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 1)
        h = opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1
        h2 = opt.register_state_dict_post_hook(_state_dict_post_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True
        h.remove()
        sd = opt.state_dict()
        assert sd["ran_state_dict_pre_hook"] is True  # the key stays in optimizer.state, as in torch
        h2.remove()
        _train(net, opt, 2)
        assert opt.state["test"] == 1
    assert_nets_match(opt_f, opt_t, nets)


def _load_pre_hook_in_place(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_returns_copy(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_hooks_like_torch(name):
    """torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook."""
    for desc, kwargs in fresh_inputs(name).items():
        opt = getattr(fa, name)([Parameter(torch.rand(2, 3))], **copy.deepcopy(kwargs))
        sd = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook_in_place)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002, desc
        opt.register_load_state_dict_pre_hook(_load_pre_hook_returns_copy, prepend=True)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002, desc  # prepended: the in-place hook runs last

        opt = getattr(fa, name)([Parameter(torch.rand(2, 3))], **copy.deepcopy(kwargs))
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert not opt.state["ran_load_state_dict_pre_hook2"] and opt.state["ran_load_state_dict_post_hook"] is True

        opt = getattr(fa, name)([Parameter(torch.rand(2, 3))], **copy.deepcopy(kwargs))
        opt.register_load_state_dict_pre_hook(_load_pre_hook_returns_copy)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.param_groups[0]["lr"] == 0.003, desc
        assert opt.state["ran_load_state_dict_pre_hook2"] and opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_hooks_change_the_state(name):
    """Beyond torch's hook tests (which only look at lr): a pre-hook that returns a new dict with
    other moments and step counts, and a post-hook that rewrites optimizer.state[p], must both be
    what the next steps use."""
    state_key = "momentum_buffer" if name == "SGD" else "exp_avg"

    def pre(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for entry in state_dict["state"].values():
            entry[state_key] = entry[state_key] * -2.0
            if "step" in entry:
                entry["step"] = entry["step"] + 10
        return state_dict

    def post(optimizer):
        for group in optimizer.param_groups:
            for p in group["params"][:2]:
                optimizer.state[p][state_key] = torch.full_like(p, 0.25)
            for p in group["params"][2:3]:
                optimizer.state[p][state_key].mul_(0.5)

    nets = [Net(), Net()]
    opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), STATEFUL[name])
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 2)
        sd = copy.deepcopy(opt.state_dict())
        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(sd)
        _train(net, opt, 2)
    assert_nets_match(opt_f, opt_t, nets)


# -- copies -----------------------------------------------------------------------------------


def _public_attrs(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _copy(obj, how):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_steps_like_torch(name, how):
    """torch's test_deepcopy_copies_all_public_attrs, then more: copy.deepcopy(opt) / a pickle
    round trip of a trained optimizer, alone and together with its model. The copy steps its own
    (copied) parameters as torch's copy does, and the original is untouched by it and goes on
    as torch's original does."""
    for desc, kwargs in fresh_inputs(name).items():
        nets = [Net(), Net()]
        opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), kwargs)
        for net, opt in zip(nets, (opt_t, opt_f)):
            _train(net, opt, 2, skip_w2_at=(0,))
        assert _public_attrs(_copy(opt_f, how)) == _public_attrs(opt_f)
        assert _public_attrs(opt_t) <= _public_attrs(opt_f)

        # the optimizer alone: its copy holds copies of the parameters
        copies = [_copy(opt, how) for opt in (opt_t, opt_f)]
        before = [p.detach().clone() for p in nets[1].parameters()]
        for c in copies:
            params = c.param_groups[0]["params"]
            for k, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (k + 1))
            c.step()
        assert all(torch.equal(p, b) for p, b in zip(nets[1].parameters(), before)), f"{desc}: the copy moved the original"
        assert_state_matches(copies[1], copies[0], copies[1].param_groups[0]["params"], copies[0].param_groups[0]["params"],
                             FP32, f"{desc} copy: ")

        # model and optimizer copied together: the copy trains the copied model
        pairs = [_copy((net, opt), how) for net, opt in zip(nets, (opt_t, opt_f))]
        for net, opt in pairs:
            _train(net, opt, 2)
        assert_state_matches(pairs[1][1], pairs[0][1], list(pairs[1][0].parameters()), list(pairs[0][0].parameters()),
                             FP32, f"{desc} model+optimizer copy: ")

        # the originals go on
        for net, opt in zip(nets, (opt_t, opt_f)):
            _train(net, opt, 2)
        assert_nets_match(opt_f, opt_t, nets, f"{desc} original: ")


# -- parameters and param groups changed during training --------------------------------------


DEGENERATE = {
    "zero_size": lambda gen: [torch.randn(0, generator=gen), torch.randn(3, 0, generator=gen)],
    "0-d": lambda gen: [torch.randn((), generator=gen)],
    "transposed": lambda gen: [torch.randn(5, 3, generator=gen).t()],
    "sliced": lambda gen: [torch.randn(6, 4, generator=gen)[::2, 1:]],
}


@pytest.mark.parametrize("kind", list(DEGENERATE))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_parameters(name, kind):
    """Optimizers over nothing but zero-size parameters, one 0-d parameter, or one non-contiguous
    parameter (transposed, sliced) with non-contiguous gradients."""
    for desc, kwargs in fresh_inputs(name).items():
        ps_t, ps_f = ([Parameter(t) for t in DEGENERATE[kind](torch.Generator().manual_seed(0))] for _ in range(2))
        opt_t, opt_f = pair(name, ps_t, ps_f, kwargs)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for pt, pf in zip(ps_t, ps_f):
                g = torch.randn(pt.shape[::-1], generator=gen).t() if pt.dim() == 2 else torch.randn(pt.shape, generator=gen)
                pt.grad, pf.grad = g.clone(), g.clone()
            opt_t.step()
            opt_f.step()
        assert_state_matches(opt_f, opt_t, ps_f, ps_t, FP32, f"{desc}: ")


@pytest.mark.parametrize("name", NAMES)
def test_change_lr_and_weight_decay_mid_training(name):
    """param_groups[i]['lr'] and ['weight_decay'] changed between steps (float to float, a tensor
    lr changed in place, a float lr replaced by a tensor): every step uses the current values."""
    for desc, kwargs in fresh_inputs(name).items():
        nets = [Net(), Net()]
        opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), kwargs)
        for net, opt in zip(nets, (opt_t, opt_f)):
            _train(net, opt, 1)
            group = opt.param_groups[0]
            if torch.is_tensor(group["lr"]):
                group["lr"].mul_(3.0)
            else:
                group["lr"] = group["lr"] * 3.0
            _train(net, opt, 1)
            group["weight_decay"] = 0.25
            _train(net, opt, 1)
            group["lr"] = torch.tensor(0.004)
            group["weight_decay"] = 0.0
            _train(net, opt, 1)
        assert_nets_match(opt_f, opt_t, nets, f"{desc}: ")


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group(name):
    """add_param_group during training (own lr and weight decay) equals torch; a refused group
    (a parameter already in the optimizer: torch's ValueError; a float64 one: fa's) leaves the
    optimizer as it was."""
    for desc, kwargs in fresh_inputs(name).items():
        nets = [Net(), Net()]
        extra = [Parameter(torch.linspace(-1, 1, 6).reshape(2, 3)) for _ in range(2)]
        opt_t, opt_f = pair(name, [nets[0].w1, nets[0].b1], [nets[1].w1, nets[1].b1], kwargs)
        for net, opt, e in zip(nets, (opt_t, opt_f), extra):
            _train(net, opt, 2)
            opt.add_param_group({"params": [net.w2, net.b2, net.scalar], "lr": 0.05, "weight_decay": 0.01})
            _train(net, opt, 1)
            with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
                opt.add_param_group({"params": [e, net.w1]})
            assert len(opt.param_groups) == 2
            opt.add_param_group({"params": [e, net.strided]})
            for _ in range(2):
                opt.zero_grad()
                (net.loss() + (e ** 2).sum()).backward()
                opt.step()
        assert_state_matches(opt_f, opt_t, list(nets[1].parameters()) + [extra[1]], list(nets[0].parameters()) + [extra[0]],
                             FP32, f"{desc}: ")
        with pytest.raises(ValueError, match="float64"):
            opt_f.add_param_group({"params": [Parameter(torch.randn(3, dtype=torch.float64))]})
        assert len(opt_f.param_groups) == 3
        for net, opt in zip(nets, (opt_t, opt_f)):
            _train(net, opt, 1)
        assert_nets_match(opt_f, opt_t, nets, f"{desc} after refusal: ")


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_and_with_zero_gradients(name):
    """torch's test_step_is_noop_when_params_have_no_grad and test_step_is_noop_for_zero_grads
    (with every implementation switch), compared to torch rather than to 'unchanged' (AdamW's
    default weight decay does move them); and zero_grad(set_to_none=False), which torch steps."""
    inputs = switch_inputs(name)
    for optim_input in inputs:
        kwargs = optim_input.kwargs
        ps = [[torch.randn(2, 3, generator=torch.Generator().manual_seed(k)) for k in range(2)] for _ in range(2)]
        opt_t, opt_f = pair(name, ps[0], ps[1], kwargs)
        assert opt_f.step(lambda: torch.tensor([1.0])) == torch.tensor([1.0])
        opt_t.step(lambda: torch.tensor([1.0]))
        assert_state_matches(opt_f, opt_t, ps[1], ps[0], EXACT, f"{optim_input.desc} no grad: ")
        assert len(opt_f.state) == 0

        ps = [[Parameter(torch.randn(5, 1, generator=torch.Generator().manual_seed(3)))] for _ in range(2)]
        opt_t, opt_f = pair(name, ps[0], ps[1], kwargs)
        for p in (ps[0][0], ps[1][0]):
            p.grad = torch.zeros_like(p)
        opt_t.step()
        opt_f.step()
        assert_state_matches(opt_f, opt_t, ps[1], ps[0], FP32, f"{optim_input.desc} zero grad: ")

    nets = [Net(), Net()]
    opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), STATEFUL[name])
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 2)
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
        opt.step()
        opt.step()
    assert_nets_match(opt_f, opt_t, nets)


@pytest.mark.parametrize("name", NAMES)
def test_can_be_printed(name):
    """torch's test_optimizer_can_be_printed, over every input and switch."""
    for optim_input in switch_inputs(name):
        text = repr(getattr(fa, name)([Parameter(torch.randn(2, 3))], **optim_input.kwargs))
        assert text.startswith(name + " (") and "lr:" in text


# -- optimizer.state edited by hand -----------------------------------------------------------


def _edit(opt, params, name, edit):
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    w1, b1, w2, b2 = params[:4]
    if edit == "clear":
        opt.state.clear()
    elif edit == "new_defaultdict":
        opt.state = defaultdict(dict)
    elif edit == "del_entry":
        del opt.state[w1]
    elif edit == "replace_tensor":
        opt.state[b1][key] = torch.full_like(b1, 0.5)
    elif edit == "edit_in_place":
        opt.state[w2][key].mul_(-1.5)
    elif edit == "replace_entry":
        opt.state[b2] = {k: v.clone() + 5 if k == "step" else v.clone() * 2 for k, v in opt.state[b2].items()}
    elif edit == "step_or_buffer":
        if name == "SGD":
            opt.state[w1]["momentum_buffer"] = None  # torch's SGD starts the buffer over
        else:
            opt.state[w1]["step"] = torch.tensor(20.0)
    elif edit == "user_key":
        opt.state[w1]["my_note"] = 7
    else:
        raise AssertionError(edit)


STATE_EDITS = ["clear", "new_defaultdict", "del_entry", "replace_tensor", "edit_in_place", "replace_entry",
               "step_or_buffer", "user_key"]


@pytest.mark.parametrize("accumulator", [False, True], ids=["plain", "swap_in"])
@pytest.mark.parametrize("edit", STATE_EDITS)
@pytest.mark.parametrize("name", NAMES)
def test_optimizer_state_edited_by_hand(name, edit, accumulator):
    """optimizer.state is the truth: cleared, replaced by a new defaultdict, an entry deleted or
    replaced, a state tensor replaced or edited in place, a step count or momentum buffer
    replaced, a key of the user's own added; state_dict() shows it at once, and the next steps
    follow it, as torch's."""
    nets = [Net(), Net()]
    opt_t, opt_f = pair(name, nets[0].parameters(), nets[1].parameters(), STATEFUL[name])
    acc = fa.GradAccumulator(opt_f) if accumulator else None
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 2)
        _edit(opt, list(net.parameters()), name, edit)
    assert_state_dicts_match(opt_f, opt_t, "state_dict right after the edit")
    for net, opt in zip(nets, (opt_t, opt_f)):
        _train(net, opt, 2)
    assert_nets_match(opt_f, opt_t, nets)
    assert_state_dicts_match(opt_f, opt_t)
    del acc
