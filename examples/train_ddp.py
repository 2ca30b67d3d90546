"""Adapter training with data parallelism: a frozen backbone with a FusedAdapter after every block,
only the adapters train. Launch one process per device with torchrun:

    torchrun --nproc_per_node=2 examples/train_ddp.py                  # DistributedDataParallel
    torchrun --nproc_per_node=2 examples/train_ddp.py --fsdp2          # FSDP2 (fully_shard)
    torchrun --nproc_per_node=2 examples/train_ddp.py --compile        # torch.compile(fullgraph=True)

GPUs use NCCL (one GPU per process); without GPUs the ranks run on CPU with gloo, where the fused op
runs the reference unless TRITON_INTERPRET=1 is set (Triton's interpreter: slow, for checking only).
Without torchrun the script trains in a single process. The task is synthetic: learn to map random
inputs through a fixed random "teacher" network, so the loss visibly falls in a few hundred steps.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from adapter_fused import FusedAdapter


class AdaptedBackbone(nn.Module):
    """``depth`` frozen blocks (Linear, GELU, LayerNorm), a trainable FusedAdapter after each:
    (batch, seq, d_model) -> (batch, seq, d_model)."""

    def __init__(self, d_model: int, depth: int, bottleneck: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model)) for _ in range(depth)
        )
        self.blocks.requires_grad_(False)
        self.adapters = nn.ModuleList(FusedAdapter(d_model, bottleneck, "gelu", init="mam") for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, adapter in zip(self.blocks, self.adapters):
            x = adapter(block(x))
        return x


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 instead of DistributedDataParallel")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when run by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def synthetic_data(args: argparse.Namespace) -> TensorDataset:
    """Inputs (samples, seq, d_model) and a frozen random teacher's outputs; the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.samples, args.seq, args.d_model, generator=gen)
    teacher = nn.Sequential(nn.Linear(args.d_model, args.d_model), nn.Tanh())
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        targets = inputs + 0.5 * teacher(inputs)
    return TensorDataset(inputs, targets)


def main() -> None:
    args = parse()
    rank, world, device = setup()
    distributed = world > 1 or dist.is_initialized()

    torch.manual_seed(0)  # the same initial model on every rank
    model = AdaptedBackbone(args.d_model, args.depth, args.bottleneck).to(device)
    if args.compile:
        # Compile the model's own forward: the wrappers' hooks stay outside the traced graph, and
        # the fused op traces without a break.
        model.forward = torch.compile(model.forward, fullgraph=True)  # type: ignore[method-assign]
    if distributed and args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        # One group for the whole model: frozen weights sharded, adapters gathered with them.
        fully_shard(model)
        wrapped: nn.Module = model
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model

    dataset = synthetic_data(args)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if rank == 0:
        count = sum(p.numel() for p in trainable)
        mode = "FSDP2" if distributed and args.fsdp2 else "DDP" if distributed else "single process"
        print(f"{mode} on {world} x {device.type}; {count} trainable adapter parameters", flush=True)

    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)  # (sum of losses, batches)
        start = time.perf_counter()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = (wrapped(inputs) - targets).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        if distributed:
            dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean loss {(total[0] / total[1]).item():.5f} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    if distributed:
        # Release the wrapper and let every rank arrive before tearing the group down, so no rank
        # waits on a peer that already exited.
        del wrapped
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
