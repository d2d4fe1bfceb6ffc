"""Data-parallel training with gradient accumulation through fusedaccum.

    torchrun --nproc_per_node=2 examples/train_ddp.py            # CPU (gloo)
    torchrun --nproc_per_node=8 examples/train_ddp.py --device cuda   # GPUs (NCCL)
    torchrun --nproc_per_node=2 examples/train_ddp.py --shard    # ZeRO-1: each rank keeps half the state
    torchrun --nproc_per_node=2 examples/train_ddp.py --bf16-wire    # buckets sent as bf16: half the bytes

The model is not wrapped in DistributedDataParallel: the accumulator owns the communication.
Nothing is sent on the first N-1 micro-batches of a window; during the last one the gradient
arena is all-reduced bucket by bucket while the backward runs; acc.step() waits for what is
left, clips the reduced gradient and steps. Every rank ends with the same parameters.
With --shard (ZeRO-1) the buckets are reduce-scattered instead, each rank steps its share of
the parameters with its share of the optimizer state, and the parameters are all-gathered.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fusedaccum as fa

VOCAB = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--shard", action="store_true", help="ZeRO-1: shard the optimizer state across ranks")
    parser.add_argument("--bf16-wire", action="store_true",
                        help="reduce_dtype=torch.bfloat16: send each rank's fp32 window sum as bf16 (half the bytes)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # rank 0's parameters are broadcast anyway when the accumulator is built
    model = nn.Sequential(nn.Embedding(VOCAB, 128), nn.Flatten(), nn.Linear(128 * 16, 256), nn.GELU(), nn.Linear(256, VOCAB))
    model.to(device)
    opt = fa.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    acc = fa.GradAccumulator(opt, accumulation_steps=args.accumulation_steps, max_grad_norm=1.0,
                             process_group=dist.group.WORLD, shard_optimizer_state=args.shard,
                             reduce_dtype=torch.bfloat16 if args.bf16_wire else None)

    data = torch.Generator().manual_seed(1234 + rank)  # each rank reads its own shard of the data
    for window in range(args.windows):
        for _ in range(args.accumulation_steps):
            tokens = torch.randint(0, VOCAB, (8, 16), generator=data).to(device)
            target = tokens[:, 3]  # a task the model can learn: name the fourth token
            loss = F.cross_entropy(model(tokens), target, reduction="sum")
            acc.backward(loss, num_items=tokens.shape[0])  # the window's mean over every rank's items
            if acc.step():
                if rank == 0 and window % 5 == 0:
                    print(f"window {window}: loss {loss.item() / tokens.shape[0]:.4f}, grad norm {acc.grad_norm.item():.4f}")

    # Every rank holds the same parameters: check it, as a user would once.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first = flat.clone()
    dist.broadcast(first, src=0)
    assert torch.equal(flat, first), "the ranks' parameters differ"
    # A checkpoint of a sharded optimizer: state_dict() is a collective that gathers the whole state.
    saved = opt.state_dict()
    if rank == 0:
        kept = sum(t.numel() for a in opt.arenas for t in a.state.values())
        whole = sum(v.numel() for entry in saved["state"].values() for k, v in entry.items() if k != "step")
        print(f"{world} ranks, {args.windows} windows of {args.accumulation_steps} micro-batches: parameters identical on "
              f"every rank; this rank keeps {kept:,} of the {whole:,} optimizer-state elements")
    # torch 2.14's gloo: a worker thread lets go of the last collective's tensors a moment after
    # wait() returns; if the interpreter is already finalizing then, the process aborts
    # ("terminate called without an active exception"; cf. pytorch/pytorch PR 179291). A pause
    # lets it finish: 0 aborts in 36 runs here, against 5 in 24 without.
    time.sleep(0.05)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
