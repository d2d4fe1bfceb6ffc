"""The frameworks users train with, each driving fa.AdamW in swap-in mode (fa.GradAccumulator(opt),
the framework's own gradient accumulation, clipping and checkpoints) against the same run with
torch.optim.AdamW: HF Trainer (transformers), HF Accelerate and PyTorch Lightning.

Every run trains a tiny randomly initialised Llama (2 layers, hidden 32, vocab 64, tied
embeddings; no download) on synthetic tokens whose labels are padded with -100 in most samples,
on the CPU, for a few optimizer steps. Per framework:

* fp32 parameters: equal to torch.optim (each tensor within 1e-6 of torch, relative to its norm);
* a module used in windows 1 and 3 only: not stepped in window 2 (no weight decay either), and
  its step count (Adam's bias correction) is 2 at window 3, as torch.optim does;
* clipping by the framework (Trainer max_grad_norm, accelerator.clip_grad_norm_, Lightning
  gradient_clip_val) with fp32 parameters: the gradients are visible, so equal to torch;
* bf16 parameters: fa.AdamW(master_weights=True) + GradAccumulator(opt, max_grad_norm=c) against
  torch.optim with the framework's clipping at c, within the band that bf16 itself causes (see
  `bf16_outliers`); without max_grad_norm the gradients are hidden from the framework's clip, and
  fusedaccum says so once;
* checkpoint save + resume through the framework's own mechanism (Trainer save_steps +
  resume_from_checkpoint with its default safetensors; accelerator.save_state/load_state;
  Lightning's ModelCheckpoint + ckpt_path=), fp32 and bf16 with master weights: the same
  parameters as the uninterrupted run.
"""
import contextlib
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

# scripts/install.sh installs the three (so CI runs every test here); a machine without a
# package index (the GPU check) may lack them, and then skips this file, saying so.
pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import fusedaccum as fa  # noqa: E402

VOCAB, HIDDEN, SEQ = 64, 32, 16
BATCH, GA = 2, 2  # micro-batch size and gradient accumulation steps (micro-batches per window)
CLIP = 0.5  # below every window's gradient norm here (about 1.3 to 1.6): the clip is active
# Adam's update is invariant to a uniform scale of the gradient while eps is negligible, so a
# clip that did nothing would hardly show. With eps near the gradients' size (their rms is about
# 1e-2 here) the update follows the clip coefficient: clipping at CLIP changes it by about 40%.
ADAMW = dict(lr=1e-2, eps=1e-3, weight_decay=0.01)
SIDE_WINDOWS = (1, 3)  # the windows in which `WithSide.side` is used


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine
    # its barrier waits made a run 10 to 70 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerator (also inside HF Trainer) keeps process-wide state; start and end every test
    # without it so that one run's gradient accumulation settings do not leak into the next.
    _reset_accelerate()
    yield
    _reset_accelerate()


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- model, data, optimizers ---------------------------------------------------------------------


def tiny_llama(seed=0, bf16_init=False, dtype=torch.float32):
    """bf16_init: the initial values rounded to bf16, so that fp32 and bf16 runs start equal."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    if bf16_init:
        model.to(torch.bfloat16)
    return model.to(dtype)


class WithSide(torch.nn.Module):
    """A tiny Llama plus a module used only in the windows SIDE_WINDOWS (counted by forward calls
    in training): in the others it gets no gradient, and p.grad stays None after zero_grad."""

    def __init__(self, seed=0):
        super().__init__()
        self.lm = tiny_llama(seed)
        self.side = torch.nn.Linear(HIDDEN, HIDDEN)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, labels=None):
        if self.training:
            self.calls += 1
        x = self.lm.model.embed_tokens(input_ids)
        if self.training and (self.calls - 1) // GA + 1 in SIDE_WINDOWS:
            x = x + self.side(x)
        return self.lm(inputs_embeds=x, attention_mask=attention_mask, labels=labels)


def token_samples(n):
    """Synthetic sequences; most are right-padded (attention_mask 0, labels -100), each by a
    different amount, so the number of predicted tokens differs between micro-batches."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=gen)
        mask = (torch.arange(SEQ) < SEQ - (5 * i) % 11).long()
        samples.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return samples


def windows_of(n_windows):
    return token_samples(n_windows * GA * BATCH)


class Optimizer:
    """Builds the optimizer for a run over given parameters: torch.optim.AdamW, or fa.AdamW with a
    swap-in GradAccumulator (master weights for bf16 parameters; acc_clip: its max_grad_norm).
    The accumulator is not kept here, as a user's `fa.GradAccumulator(opt)` line keeps none."""

    def __init__(self, kind, acc_clip=None):
        self.kind, self.acc_clip = kind, acc_clip

    def __call__(self, params):
        params = list(params)
        if self.kind == "torch":
            return torch.optim.AdamW(params, **ADAMW)
        opt = fa.AdamW(params, **ADAMW, master_weights=params[0].dtype != torch.float32)
        if self.acc_clip is None:
            fa.GradAccumulator(opt)
        else:
            fa.GradAccumulator(opt, max_grad_norm=self.acc_clip)
        return opt


TORCH, FA = Optimizer("torch"), Optimizer("fa")


# -- comparisons ---------------------------------------------------------------------------------


def named(model):
    return dict(model.named_parameters())


def assert_same_params(want, got, what="fusedaccum vs torch.optim"):
    """fp32 rounding: each tensor within 1e-6 of the reference relative to its norm, and every
    element within 1e-6 (the fused step rounds differently from torch's for-loop AdamW; a few
    steps stay near 1e-7 here, while the defects this guards against are 1e-3 and more)."""
    want, got = named(want), named(got)
    assert list(want) == list(got)
    for name, p in want.items():
        q = got[name]
        assert q.dtype == p.dtype, f"{name}: {q.dtype} vs {p.dtype}"
        rel = ((q.detach().double() - p.detach().double()).norm() / p.detach().double().norm()).item()
        assert rel <= 1e-6, f"{what}: {name} differs by {rel:.3g} of its norm"
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {name}: {m}")


def assert_moved(init, trained):
    """Guards the comparisons against a run that did not train at all."""
    init = named(init)
    for name, p in named(trained).items():
        if "layernorm" in name or name == "model.norm.weight":
            continue  # RMSNorm weights (1.0) barely move in a few steps
        assert (p.detach().float() - init[name].detach().float()).abs().max() > 1e-3, f"{name} did not train"


def bf16_outliers(ref32, torch_bf16, got):
    """The parameters of `got` (bf16) that are further from torch's bf16 run than bf16 explains.

    torch's own bf16 run is away from the exact (fp32) run by d = |ref32 - torch_bf16| per tensor:
    bf16 forward and backward, bf16 gradient accumulation and a bf16 rounding of every update
    (updates below half an ulp are lost: RMSNorm weights at 1.0 hardly move at all). fusedaccum
    keeps the first and removes the other two (fp32 arena, fp32 master), so it lies about as far
    from the fp32 run as torch's bf16 run does, and at most about 2 d from torch's bf16 run; plus
    its own final rounding of the master to bf16, half an ulp per element. Measured with all three
    frameworks: at most 0.41 of that bound; a clip that does nothing exceeds it in 15 of the 20
    tensors, by up to 23 times (`check_bf16` asserts this sensitivity on every run)."""
    ref32, torch_bf16, got = named(ref32), named(torch_bf16), named(got)
    out = []
    for name, t in torch_bf16.items():
        t = t.detach().float()
        d = (ref32[name].detach().float() - t).norm()
        half_ulp = (t.abs().clamp_min(2.0**-126).log2().floor() - 8).exp2()  # bf16 has 8 bits of mantissa
        bound = 2 * d + half_ulp.norm()
        diff = (got[name].detach().float() - t).norm()
        if not diff <= bound:
            out.append(f"{name}: {diff:.3g} > {bound:.3g}")
    return out


@contextlib.contextmanager
def clip_warnings():
    """Records fusedaccum's warning that the framework's clip cannot see hidden gradients."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = []
        yield found
    found += [w for w in caught if issubclass(w.category, UserWarning) and "max_grad_norm" in str(w.message)]


def check_bf16(run):
    """run(dtype, make_opt) -> the model trained from bf16-rounded initial values, with the
    framework's clip at CLIP in every run.

    fa with GradAccumulator(max_grad_norm=CLIP) is within the bf16 band of torch's bf16 run and
    warns nothing; fa without it warns exactly once and (clipping nothing) is outside the band.
    """
    init = tiny_llama(bf16_init=True)
    ref32 = run(torch.float32, TORCH)
    torch_bf16 = run(torch.bfloat16, TORCH)
    with clip_warnings() as warned:
        clipped = run(torch.bfloat16, Optimizer("fa", acc_clip=CLIP))
    assert not warned, f"GradAccumulator(max_grad_norm=...) was given, yet: {warned[0].message}"
    with clip_warnings() as warned:
        unclipped = run(torch.bfloat16, FA)
    assert len(warned) == 1, (
        f"bf16 parameters keep their gradients in the fp32 arena, hidden from the framework's clip: expected "
        f"one warning naming max_grad_norm, got {len(warned)}"
    )
    for model in (torch_bf16, clipped, unclipped):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_moved(init, torch_bf16)
    assert not bf16_outliers(ref32, torch_bf16, clipped), bf16_outliers(ref32, torch_bf16, clipped)
    # The band is narrow enough to tell a clip from none:
    assert len(bf16_outliers(ref32, torch_bf16, unclipped)) >= 10


# -- HF Trainer ----------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Ends training after the given optimizer step (and its checkpoint): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def trainer_run(model, make_opt, samples, out, *, steps, clip=0.0, save_steps=None, stop_at=None, resume=None):
    opt = make_opt(model.parameters())
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA, max_steps=steps,
        max_grad_norm=clip, use_cpu=True, seed=0, report_to="none", disable_tqdm=True,
        logging_strategy="steps" if clip else "no", logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer = Trainer(model=model, args=args, train_dataset=samples, optimizers=(opt, None), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_fp32_matches_torch(tmp_path):
    samples = windows_of(3)
    init = tiny_llama()
    want = trainer_run(tiny_llama(), TORCH, samples, tmp_path, steps=3).model
    got = trainer_run(tiny_llama(), FA, samples, tmp_path, steps=3).model
    assert_moved(init, want)
    assert_same_params(want, got)


def test_trainer_unused_parameter(tmp_path):
    """Trainer ends a window with model.zero_grad(): `side`, unused in window 2, is not stepped."""
    samples = windows_of(3)
    init = WithSide()
    want = trainer_run(WithSide(), TORCH, samples, tmp_path, steps=3).model
    got = trainer_run(WithSide(), FA, samples, tmp_path, steps=3).model
    assert (want.side.weight - init.side.weight).abs().max() > 1e-3
    assert_same_params(want, got)


def test_trainer_clipping_fp32(tmp_path):
    samples = windows_of(3)
    want = trainer_run(tiny_llama(), TORCH, samples, tmp_path, steps=3, clip=CLIP)
    got = trainer_run(tiny_llama(), FA, samples, tmp_path, steps=3, clip=CLIP)
    norms = [h["grad_norm"] for h in want.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and min(norms) > CLIP, f"the clip must be active in every window: {norms}"
    got_norms = [h["grad_norm"] for h in got.state.log_history if "grad_norm" in h]
    assert got_norms == pytest.approx(norms, rel=1e-5), "the norm the Trainer sees (p.grad) is torch's"
    assert_same_params(want.model, got.model)


def test_trainer_bf16_parameters(tmp_path):
    samples = windows_of(3)

    def run(dtype, make_opt):
        model = tiny_llama(bf16_init=True, dtype=dtype)
        return trainer_run(model, make_opt, samples, tmp_path, steps=3, clip=CLIP).model

    check_bf16(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_trainer_checkpoint_resume(tmp_path, dtype):
    """save_steps=2 writes checkpoint-2 (model.safetensors, optimizer.pt, scheduler.pt, ...) and the
    run stops there; a fresh model (other initial values) and optimizer resumed from it end where
    the uninterrupted run does (the linear LR schedule spans the same 4 steps in all three)."""
    samples = windows_of(4)
    straight = trainer_run(tiny_llama(dtype=dtype), FA, samples, tmp_path / "straight", steps=4).model
    trainer_run(tiny_llama(dtype=dtype), FA, samples, tmp_path / "stopped", steps=4, save_steps=2, stop_at=2)
    checkpoint = tmp_path / "stopped" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    fresh = tiny_llama(seed=1, dtype=dtype)
    resumed = trainer_run(fresh, FA, samples, tmp_path / "resumed", steps=4, resume=str(checkpoint))
    assert_same_params(straight, resumed.model, "resumed vs uninterrupted")


# -- HF Accelerate -------------------------------------------------------------------------------


def accelerate_run(model, make_opt, samples, *, clip=None, skip_batches=0, save=None, load=None):
    """The loop of Accelerate's gradient accumulation guide: accumulate(), backward(),
    clip_grad_norm_ when sync_gradients, optimizer.step() and zero_grad() on every micro-batch.
    Returns (model, the norms clip_grad_norm_ returned)."""
    _reset_accelerate()
    # Under torchrun (test_frameworks_under_torchrun) the model is DDP-wrapped, and WithSide
    # leaves a module out of some windows, as HF Trainer's DDP default allows.
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA, kwargs_handlers=[unused])
    loader = DataLoader(samples, batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, make_opt(model.parameters()), loader)
    if load is not None:
        accelerator.load_state(load)
    if skip_batches:
        loader = accelerator.skip_first_batches(loader, skip_batches)
    model.train()
    norms = []
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if clip is not None and accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad()
    if save is not None:
        accelerator.save_state(save)
    return accelerator.unwrap_model(model), norms


def test_accelerate_fp32_matches_torch():
    samples = windows_of(3)
    init = tiny_llama()
    want, _ = accelerate_run(tiny_llama(), TORCH, samples)
    got, _ = accelerate_run(tiny_llama(), FA, samples)
    assert_moved(init, want)
    assert_same_params(want, got)


def test_accelerate_unused_parameter():
    samples = windows_of(3)
    init = WithSide()
    want, _ = accelerate_run(WithSide(), TORCH, samples)
    got, _ = accelerate_run(WithSide(), FA, samples)
    assert (want.side.weight - init.side.weight).abs().max() > 1e-3
    assert_same_params(want, got)


def test_accelerate_clipping_fp32():
    samples = windows_of(3)
    want, norms = accelerate_run(tiny_llama(), TORCH, samples, clip=CLIP)
    got, got_norms = accelerate_run(tiny_llama(), FA, samples, clip=CLIP)
    assert len(norms) == 3 and min(norms) > CLIP, f"the clip must be active in every window: {norms}"
    assert got_norms == pytest.approx(norms, rel=1e-5), "the norm accelerator.clip_grad_norm_ sees is torch's"
    assert_same_params(want, got)


def test_accelerate_bf16_parameters():
    samples = windows_of(3)

    def run(dtype, make_opt):
        return accelerate_run(tiny_llama(bf16_init=True, dtype=dtype), make_opt, samples, clip=CLIP)[0]

    check_bf16(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_accelerate_save_state_load_state(tmp_path, dtype):
    """accelerator.save_state (model.safetensors, optimizer.bin, ...) after 2 windows;
    load_state into a fresh model (other initial values) and optimizer; the last 2 windows."""
    samples = windows_of(4)
    straight, _ = accelerate_run(tiny_llama(dtype=dtype), FA, samples)
    accelerate_run(tiny_llama(dtype=dtype), FA, samples[: 2 * GA * BATCH], save=tmp_path / "state")
    assert (tmp_path / "state" / "model.safetensors").exists()
    resumed, _ = accelerate_run(
        tiny_llama(seed=1, dtype=dtype), FA, samples, load=tmp_path / "state", skip_batches=2 * GA
    )
    assert_same_params(straight, resumed, "resumed vs uninterrupted")


# -- PyTorch Lightning ---------------------------------------------------------------------------


class LitLM(pl.LightningModule):
    def __init__(self, model, make_opt):
        super().__init__()
        self.model = model
        self.make_opt = make_opt
        self.norms = []

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def on_before_optimizer_step(self, optimizer):  # after the window's last backward, before the clip
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def lightning_run(model, make_opt, samples, root, *, epochs=1, clip=None, bf16=False, checkpoint=None, ckpt_path=None,
                  devices=1):
    lit = LitLM(model, make_opt)
    ddp = {"strategy": "ddp_find_unused_parameters_true"} if devices > 1 else {}  # WithSide leaves a module out
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, **ddp, max_epochs=epochs, accumulate_grad_batches=GA, gradient_clip_val=clip,
        precision="bf16-true" if bf16 else "32-true", logger=False, callbacks=[checkpoint] if checkpoint else [],
        enable_checkpointing=checkpoint is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(root),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(lit, DataLoader(samples, batch_size=BATCH, shuffle=False), ckpt_path=ckpt_path)
    return lit


def test_lightning_fp32_matches_torch(tmp_path):
    samples = windows_of(3)
    init = tiny_llama()
    want = lightning_run(tiny_llama(), TORCH, samples, tmp_path).model
    got = lightning_run(tiny_llama(), FA, samples, tmp_path).model
    assert_moved(init, want)
    assert_same_params(want, got)


def test_lightning_unused_parameter(tmp_path):
    samples = windows_of(3)
    init = WithSide()
    want = lightning_run(WithSide(), TORCH, samples, tmp_path).model
    got = lightning_run(WithSide(), FA, samples, tmp_path).model
    assert (want.side.weight - init.side.weight).abs().max() > 1e-3
    assert_same_params(want, got)


def test_lightning_clipping_fp32(tmp_path):
    samples = windows_of(3)
    want = lightning_run(tiny_llama(), TORCH, samples, tmp_path, clip=CLIP)
    got = lightning_run(tiny_llama(), FA, samples, tmp_path, clip=CLIP)
    assert len(want.norms) == 3 and min(want.norms) > CLIP, f"the clip must be active in every window: {want.norms}"
    assert got.norms == pytest.approx(want.norms, rel=1e-5), "the gradients Lightning clips (p.grad) are torch's"
    assert_same_params(want.model, got.model)


def test_lightning_bf16_parameters(tmp_path):
    """precision="bf16-true": Lightning converts the module to bf16 before configure_optimizers."""
    samples = windows_of(3)

    def run(dtype, make_opt):
        model = tiny_llama(bf16_init=True)
        return lightning_run(model, make_opt, samples, tmp_path, clip=CLIP, bf16=dtype == torch.bfloat16).model

    check_bf16(run)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-master"])
def test_lightning_checkpoint_resume(tmp_path, bf16):
    """ModelCheckpoint at the end of epoch 1 (2 windows); a fresh module (other initial values)
    fitted with ckpt_path= for epoch 2 ends where 2 uninterrupted epochs do."""
    samples = windows_of(2)
    straight = lightning_run(tiny_llama(), FA, samples, tmp_path / "straight", epochs=2, bf16=bf16).model
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)
    lightning_run(tiny_llama(), FA, samples, tmp_path / "stopped", epochs=1, bf16=bf16, checkpoint=checkpoint)
    path = checkpoint.last_model_path or checkpoint.best_model_path
    assert path and os.path.exists(path)
    resumed = lightning_run(tiny_llama(seed=1), FA, samples, tmp_path / "resumed", epochs=2, bf16=bf16, ckpt_path=path)
    assert_same_params(straight, resumed.model, "resumed vs uninterrupted")


# -- fused modules on a Hugging Face model ------------------------------------------------------


def test_trainer_with_fused_modules_matches_torch(tmp_path):
    """fa.fuse_modules on a model that HF Trainer drives (swap-in: loss.backward(), opt.step()):
    the fused layers have no full-path accumulator, so they are torch's and nothing changes."""
    samples = windows_of(3)
    want = trainer_run(tiny_llama(), TORCH, samples, tmp_path, steps=3, clip=CLIP).model
    got = trainer_run(fa.fuse_modules(tiny_llama()), FA, samples, tmp_path, steps=3, clip=CLIP).model
    assert isinstance(got.lm_head, fa.Linear) and isinstance(got.model.embed_tokens, fa.Embedding)
    assert_same_params(want, got)


def test_fused_llama_full_path_matches_torch():
    """A tiny Llama (embedding tied to the LM head, rotary attention, padded batches) with
    fa.fuse_modules and the full path, num_items = the window's tokens (the exact mean over every
    token of the window) and a clip, against torch.optim with the same mean written by hand."""
    samples = windows_of(3)
    batches = [torch.utils.data.default_collate(samples[i : i + BATCH]) for i in range(0, len(samples), BATCH)]
    ref, got = tiny_llama(), fa.fuse_modules(tiny_llama())
    assert got.lm_head.weight is got.model.embed_tokens.weight
    opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    acc = fa.GradAccumulator(fa.AdamW(got.parameters(), **ADAMW), accumulation_steps=GA, max_grad_norm=CLIP)

    def loss_sum(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        tokens = int((b["labels"][:, 1:] != -100).sum())  # HF shifts the labels: the mean is over these
        return out.loss * tokens, tokens

    norms = []
    for w in range(0, len(batches), GA):
        window = batches[w : w + GA]
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        for b in window:
            loss, _ = loss_sum(ref, b)
            (loss / total).backward()
            loss, n = loss_sum(got, b)
            acc.backward(loss, num_items=n)
            acc.step()
        norms.append((float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)), float(acc.grad_norm)))
        opt.step()
        opt.zero_grad()
    for want, have in norms:
        assert have == pytest.approx(want, rel=1e-5)
    assert_same_params(ref, got, "fused Llama vs torch.optim")


# -- data parallel: the same frameworks under torchrun (2 ranks on gloo) ---------------------------


def test_frameworks_under_torchrun(tmp_path):
    """HF Trainer, an Accelerate loop and Lightning as users launch them data-parallel on CPU
    (torchrun, 2 processes), each wrapping the model in DDP. Accelerate (and so the Trainer) moves
    it to "cpu:0" first, which copies every parameter after the optimizer was built (test_fidelity's
    test_parameter_data_replaced_by_a_copy). fp32 with the framework's clip and a module unused in
    a window equal torch.optim; bf16 with master weights and the framework's clip is in the bf16
    band (bf16_outliers: under DDP p.grad stays visible, so that clip sees it); every rank ends
    with the same parameters."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--data-parallel", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "every check passed on 2 ranks" in res.stdout, out[-6000:]


def _data_parallel_checks(root: Path) -> None:
    """Runs on every rank under torchrun: each rank compares its runs, then the ranks compare theirs."""
    torch.set_num_threads(1)
    samples = windows_of(3 * 2)  # a distributed sampler gives each of the 2 ranks half
    trained = []

    def kept(model):
        trained.append(model)
        return model

    def trainer(model, make_opt, **kw):
        return kept(trainer_run(model, make_opt, samples, root / "trainer", steps=3, **kw).model)

    def accelerate(model, make_opt, **kw):
        return kept(accelerate_run(model, make_opt, samples, **kw)[0])

    def lightning(model, make_opt, **kw):
        return kept(lightning_run(model, make_opt, samples, root / "lightning", devices=2, **kw).model)

    for run in (trainer, accelerate, lightning):
        _reset_accelerate()
        want, got = run(tiny_llama(), TORCH, clip=CLIP), run(tiny_llama(), FA, clip=CLIP)
        assert_moved(tiny_llama(), want)
        assert_same_params(want, got, f"{run.__name__}, fp32 with clip")
        want, got = run(WithSide(), TORCH), run(WithSide(), FA)
        assert_same_params(want, got, f"{run.__name__}, a module unused in window 2")
        # Under torch.distributed swap-in keeps p.grad visible (DDP reduces it): the framework's clip sees it.
        bf16 = lambda dtype, make_opt: run(tiny_llama(bf16_init=True, dtype=dtype), make_opt, clip=CLIP)  # noqa: E731
        ref32, torch_bf16 = bf16(torch.float32, TORCH), bf16(torch.bfloat16, TORCH)
        with clip_warnings() as warned:
            got = bf16(torch.bfloat16, FA)
        assert not warned, warned[0].message
        assert not bf16_outliers(ref32, torch_bf16, got), bf16_outliers(ref32, torch_bf16, got)
    for k, model in enumerate(trained):
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        both = [torch.empty_like(flat) for _ in range(2)]
        torch.distributed.all_gather(both, flat)
        assert torch.equal(both[0], both[1]), f"run {k}: the ranks' parameters differ"
    if torch.distributed.get_rank() == 0:
        print("every check passed on 2 ranks", flush=True)
    # gloo of torch 2.14 may abort in the interpreter's teardown right after its last collective
    # (examples/train_ddp.py measured it): a pause, then the group goes first.
    time.sleep(0.05)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--data-parallel"]:
        _data_parallel_checks(Path(sys.argv[2]))
