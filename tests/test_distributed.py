"""Data-parallel training of FusedAdapter layers on 2 CPU ranks (gloo): DistributedDataParallel and
FSDP2 (fully_shard) give, at every step, the gradients of one process on the whole batch.

Two processes are spawned once for the module; they rendezvous through a file, train under each
wrapper in turn and write their gradients and parameters to disk, and each test compares them with
a single-process run here. The kernels
run in Triton's interpreter in the ranks too (TRITON_INTERPRET is inherited from the environment).
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adapter_fused import FusedAdapter
from tests.tolerances import relative_error

WORLD = 2
STEPS = 2
D, BATCH, SEQ = 32, 8, 5
LR = 0.5
# The ranks sum half the rows each and average across ranks; one process sums all rows at once:
# the same numbers up to fp32 reassociation.
TOL = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def make_model() -> nn.Sequential:
    """The same initial model in every process: two adapters around a non-linearity, d = 32."""
    torch.manual_seed(31)
    model = nn.Sequential(FusedAdapter(D, 16, "gelu", 0.5), nn.Tanh(), FusedAdapter(D, 8, "silu", 2.0, init="houlsby"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    return model


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS full batches of (inputs (BATCH, SEQ, D), targets (BATCH, SEQ, D))."""
    gen = torch.Generator().manual_seed(32)
    return [(torch.randn(BATCH, SEQ, D, generator=gen), torch.randn(BATCH, SEQ, D, generator=gen))
            for _ in range(STEPS)]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
          full_grads: bool = False) -> list[dict[str, torch.Tensor]]:
    """SGD steps on mean squared error; returns each step's gradients (and, last, the parameters).
    ``full_grads`` gathers sharded (DTensor) gradients and parameters into whole tensors."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if full_grads else t).detach().clone()

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    record = []
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        record.append({name: whole(p.grad) for name, p in model.named_parameters()})  # type: ignore[arg-type]
        optimizer.step()
    record.append({name: whole(p) for name, p in model.named_parameters()})
    return record


def worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: train on its half of every batch under DDP, then (from the same initial model) under
    FSDP2; save both records and whether the kernels ran."""
    from adapter_fused.ops import kernels_available

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        share = BATCH // WORLD
        batches = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
                   for x, y in make_batches()]
        records: dict[str, object] = {"kernels": kernels_available(torch.device("cpu"))}

        from torch.nn.parallel import DistributedDataParallel

        record = train(DistributedDataParallel(make_model()), batches)
        records["ddp"] = [{name.removeprefix("module."): t for name, t in step.items()} for step in record]

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        model = make_model()
        for layer in model:
            if isinstance(layer, FusedAdapter):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        records["fsdp2"] = train(model, batches, full_grads=True)
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both modes, trained in one spawn of WORLD processes (process start-up dominates the time)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_gradients_equal_one_process(mode: str, rank_records: list[dict]) -> None:
    single = train(make_model(), make_batches())
    names = [name for name, _ in make_model().named_parameters()]
    assert len(names) == 8
    from adapter_fused.ops import kernels_available

    for rank, records in enumerate(rank_records):
        assert records["kernels"] == kernels_available(torch.device("cpu")), "the ranks took another path"
        record = records[mode]
        assert len(record) == len(single) == STEPS + 1
        for step, (got, want) in enumerate(zip(record, single)):
            assert sorted(got) == sorted(want) == sorted(names)
            what = "parameters after training" if step == STEPS else f"gradients at step {step}"
            for name in names:
                assert got[name].shape == want[name].shape, (rank, step, name)
                err = relative_error(got[name], want[name])
                assert err <= TOL, f"{mode} rank {rank}, {what}, {name}: relative error {err:.3e}"
    # Training moved the parameters (the comparison above is not between two untouched models).
    first = make_model()
    moved = [relative_error(single[-1][n], p.detach()) for n, p in first.named_parameters()]
    assert min(moved) > 1e-3
