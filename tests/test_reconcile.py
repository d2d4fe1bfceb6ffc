"""FusedOptimizer._reconcile's per-parameter checks: the compiled probe (csrc/reconcile.cpp)
against its Python reference (optim._probe_in_python), change by change.

What each change does to training is tested against torch.optim in test_fidelity.py (with
either probe, through the `probe` fixture); here, that the two probes name the same
parameters, and that the compiled one hands over to Python where it cannot tell."""
import collections

import pytest
import torch

import fusedaccum as fa
from fusedaccum import optim

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = pytest.mark.skipif(optim._native_probe is None, reason="the compiled extension did not load")


def stepped(n=5, dtype=torch.bfloat16, device="cpu", **kw):
    """n parameters with fp32 masters, stepped once except the last (no state published for it)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(k + 1, 3, generator=gen).to(device, dtype)) for k in range(n)]
    opt = fa.AdamW(params, lr=1e-3, master_weights=True, **kw)
    for p in params[:-1]:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    return opt, params


def probes(opt):
    (arena,) = opt.arenas
    versions = arena.versions if arena.has_master else None
    args = (arena.params, arena.data_ptrs, arena.dtype, versions, opt.state, arena.published)
    return optim._native_probe(*args), optim._probe_in_python(*args)


def _no_grad(fn):
    def run(opt, ps):
        with torch.no_grad():
            fn(opt, ps)

    return run


CHANGES = {  # change -> (what it does, what the probe must name: (in place, versions, states))
    "nothing": (lambda opt, ps: None, (True, [], [])),
    "del state[p1]": (lambda opt, ps: opt.state.__delitem__(ps[1]), (True, [], [1])),
    "state[p1] = {}": (lambda opt, ps: opt.state.__setitem__(ps[1], {}), (True, [], [1])),
    "state[p1] = None": (lambda opt, ps: opt.state.__setitem__(ps[1], None), (True, [], [1])),
    "state[p1]['exp_avg'] = t": (lambda opt, ps: opt.state[ps[1]].__setitem__("exp_avg", torch.zeros_like(ps[1])),
                                 (True, [], [1])),
    "state[p2]['step'] = tensor": (lambda opt, ps: opt.state[ps[2]].__setitem__("step", torch.tensor(7.0)),
                                   (True, [], [2])),
    "state[p1]['mine'] = 1 (a key of the user's)": (lambda opt, ps: opt.state[ps[1]].__setitem__("mine", 1),
                                                    (True, [], [])),
    "state[p2] = dict(state[p2]) (same tensors)": (lambda opt, ps: opt.state.__setitem__(ps[2], dict(opt.state[ps[2]])),
                                                   (True, [], [])),
    "state[p4] set by hand (never stepped)": (lambda opt, ps: opt.state.__setitem__(ps[4], {"step": torch.tensor(1.0)}),
                                              (True, [], [4])),
    "state[p4] = {} (never stepped)": (lambda opt, ps: opt.state.__setitem__(ps[4], {}), (True, [], [])),
    "state.clear()": (lambda opt, ps: opt.state.clear(), (True, [], [0, 1, 2, 3])),
    "state = defaultdict(dict)": (lambda opt, ps: setattr(opt, "state", collections.defaultdict(dict)),
                                  (True, [], [0, 1, 2, 3])),
    "p1.add_(1), p3.zero_()": (_no_grad(lambda opt, ps: (ps[1].add_(1), ps[3].zero_())), (True, [1, 3], [])),
    "p0.data = clone": (lambda opt, ps: setattr(ps[0], "data", ps[0].data.clone()), (False, [], [])),
    "p0.data = float": (lambda opt, ps: setattr(ps[0], "data", ps[0].data.float()), (False, [], [])),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", list(CHANGES))
def test_compiled_probe_names_what_python_names(change, device):
    opt, params = stepped(device=device)
    do, want = CHANGES[change]
    do(opt, params)
    compiled, python = probes(opt)
    assert python == want, "the reference itself"
    assert compiled == want


def test_fp32_parameters_have_no_versions_to_check():
    opt, params = stepped(dtype=torch.float32)
    (arena,) = opt.arenas
    assert not arena.has_master
    with torch.no_grad():
        params[0].add_(1)
    compiled, python = probes(opt)
    assert compiled == python == (True, [], [])


def test_many_parameters_one_changed():
    opt, params = stepped(n=3000)
    del opt.state[params[2345]]
    compiled, python = probes(opt)
    assert compiled == python == (True, [], [2345])


class Subclass(torch.Tensor):
    pass


def test_hands_over_to_python_where_it_cannot_tell():
    """A tensor subclass (Python may override data_ptr or _version) or an optimizer.state that is
    not a dict: the compiled probe answers None, _probe asks Python."""
    opt, params = stepped()
    (arena,) = opt.arenas
    args = lambda state: (arena.params, arena.data_ptrs, arena.dtype, arena.versions, state, arena.published)  # noqa: E731
    class Logged(dict):  # a dict whose get() Python would call
        def get(self, key, default=None):
            return super().get(key, default)

    assert optim._native_probe(*args(dict(opt.state))) is not None
    assert optim._native_probe(*args(collections.UserDict(opt.state))) is None
    assert optim._native_probe(*args(Logged(opt.state))) is None
    assert optim._native_probe(tuple(arena.params), *args(opt.state)[1:]) is None
    entry = Logged(opt.state[params[1]])  # the same tensors, in a dict subclass: Python looks
    opt.state[params[1]] = entry
    assert optim._native_probe(*args(opt.state))[2] == [1]
    assert optim._probe_in_python(*args(opt.state))[2] == []
    arena.params[0] = params[0].as_subclass(Subclass)
    try:
        assert optim._native_probe(*args(opt.state)) is None
        assert optim._probe(arena, opt.state) == optim._probe_in_python(*args(opt.state))
    finally:
        arena.params[0] = params[0]


def test_a_step_after_each_change_matches_the_python_probe(monkeypatch):
    """The same changes, then a step with either probe: bit-identical parameters and state."""

    def run(change, use_python):
        with monkeypatch.context() as m:
            if use_python:
                m.setattr(optim, "_native_probe", None)
            opt, params = stepped()
            CHANGES[change][0](opt, params)
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
            return [p.detach().clone() for p in params], opt.state_dict()

    def outcome(change, use_python):
        try:
            return run(change, use_python)
        except (RuntimeError, TypeError) as e:  # a moved parameter; state[p] = None (torch.optim fails too)
            return type(e), str(e)

    for change in CHANGES:
        compiled, python = outcome(change, False), outcome(change, True)
        if isinstance(python[0], type):
            assert compiled == python, change
            continue
        (a, sa), (b, sb) = compiled, python
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=change)
        torch.testing.assert_close(sa["state"], sb["state"], rtol=0, atol=0, msg=change)
