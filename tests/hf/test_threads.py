"""One model called from many threads at once computes every call as if it ran alone; a per-sample
block holds only in its own thread; a shallow replica (as nn.DataParallel builds) runs its own
adapters while sharing the hooks of the original.

The models are float64, so the adapters run the eager reference (Triton's CPU interpreter is not
meant to be entered from several threads at once; compiled kernels on a GPU are).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

from .models import hidden_states, make_inputs, make_model, randomize

from adapter_fused.hf import add_adapter, per_sample_adapters, set_active_adapters  # noqa: E402
from adapter_fused.hf.model import STATE_NAME, adapter_modules  # noqa: E402
from adapter_fused.hf.sites import MODULE_NAME

THREADS = 8
ROUNDS = 3
CASES = [("bert", "houlsby"), ("bert", "pfeiffer"), ("llama", "houlsby"), ("llama", "pfeiffer")]


def build(arch: str, placement: str, names: tuple[str, ...] = ("a",)) -> nn.Module:
    """A float64 tiny model with randomised adapters ``names``, the first one active."""
    model = make_model(arch).double()
    for i, name in enumerate(names):
        add_adapter(model, name, placement)
        randomize(adapter_modules(model, name).parameters(), seed=10 + i)
    set_active_adapters(model, names[0])
    return model


def job_inputs(count: int = THREADS) -> list[dict[str, torch.Tensor]]:
    """Different inputs per job, with different batch sizes and lengths: (b, t) token ids."""
    return [make_inputs(seed=20 + k, batch=1 + k % 3, length=4 + k % 4) for k in range(count)]


def run_concurrently(jobs: list[Callable[[], torch.Tensor]], rounds: int = ROUNDS) -> list[list[torch.Tensor]]:
    """Run each job ``rounds`` times in its own thread, all threads released together; re-raises
    the first exception of any thread. Returns [job][round] outputs."""
    barrier = threading.Barrier(len(jobs))
    results: list[list[torch.Tensor]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                results[k].append(jobs[k]())
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float64 rounding (the outputs have magnitude ~1)."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_threads_match_sequential(arch: str, placement: str) -> None:
    model = build(arch, placement)
    inputs = job_inputs()
    with torch.no_grad():
        want = [hidden_states(model, x) for x in inputs]
        results = run_concurrently([lambda x=x: hidden_states(model, x) for x in inputs])
    for k, outputs in enumerate(results):
        for got in outputs:
            assert_same(got, want[k])


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_per_sample_blocks_in_threads(arch: str, placement: str) -> None:
    """Half the threads run mixed batches (each its own names), the other half the active adapter."""
    model = build(arch, placement, ("a", "b", "c"))
    inputs = [make_inputs(seed=40 + k, batch=3, length=5) for k in range(THREADS)]
    choices = [["a", None, "c"], ["c", "b", "a"], [None, None, "b"], ["b", "b", None]]

    def mixed(x: dict[str, torch.Tensor], names: list[str | None]) -> torch.Tensor:
        with per_sample_adapters(model, names):
            return hidden_states(model, x)

    jobs: list[Callable[[], torch.Tensor]] = []
    with torch.no_grad():
        want = []
        for k, x in enumerate(inputs):
            if k % 2:
                want.append(hidden_states(model, x))
                jobs.append(lambda x=x: hidden_states(model, x))
            else:
                names = choices[k // 2]
                want.append(mixed(x, names))
                jobs.append(lambda x=x, names=names: mixed(x, names))
        active = hidden_states(model, inputs[0])
        assert not torch.allclose(want[0], active, atol=1e-3)  # the mixed batch differs from the active adapter
        results = run_concurrently(jobs)
    for k, outputs in enumerate(results):
        for got in outputs:
            assert_same(got, want[k])


def test_per_sample_block_stays_in_its_thread() -> None:
    model = build("llama", "pfeiffer", ("a", "b"))
    x = make_inputs(batch=2, length=5)
    with torch.no_grad():
        active = hidden_states(model, x)
        with per_sample_adapters(model, ["b", None]):
            mixed = hidden_states(model, x)
    assert not torch.allclose(active, mixed, atol=1e-3)
    entered, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def holder() -> None:
        with torch.no_grad(), per_sample_adapters(model, ["b", None]):
            entered.set()
            done.wait(timeout=30)
            seen["inside"] = hidden_states(model, x)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(timeout=30)
    try:
        with torch.no_grad():
            seen["outside"] = hidden_states(model, x)  # while the other thread's block is open
    finally:
        done.set()
        thread.join()
    assert_same(seen["outside"], active)
    assert_same(seen["inside"], mixed)


def shallow_replica(network: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` builds, here on the same device: every module copied by
    ``_replicate_for_data_parallel`` (sharing its hooks and plain attributes, the adapter bookkeeping
    among them, with the original), children re-linked to the copies, parameters replaced by clones."""
    modules = list(network.modules())
    replicas = {id(m): m._replicate_for_data_parallel() for m in modules}
    for module in modules:
        replica = replicas[id(module)]
        for key, child in module._modules.items():
            replica._modules[key] = None if child is None else replicas[id(child)]
        for key, parameter in module._parameters.items():
            replica._parameters[key] = None if parameter is None else parameter.detach().clone()
    return replicas[id(network)]


def perturb_(model: nn.Module, adapters: nn.Module) -> None:
    """Scale the adapter parameters by 3 and shift every parameter of the model (layer norms
    included) by a fixed small amount, in place."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.mul_(3)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_replica_runs_its_own_adapters(arch: str, placement: str) -> None:
    """The replica's own adapters and layer norms (Pfeiffer reads LN(h + x) at the site) are used."""
    model = build(arch, placement)
    replica = shallow_replica(model)
    assert replica._forward_pre_hooks is model._forward_pre_hooks  # hooks are shared, as in DataParallel
    perturb_(replica, replica._modules[MODULE_NAME])
    twin = copy.deepcopy(model)  # what the replica should compute
    perturb_(twin, adapter_modules(twin, "a"))
    inputs = job_inputs(4)
    with torch.no_grad():
        want_model = [hidden_states(model, x) for x in inputs]
        want_replica = [hidden_states(twin, x) for x in inputs]
        assert not torch.allclose(want_model[0], want_replica[0], atol=1e-3)
        results = run_concurrently([lambda x=x, m=m: hidden_states(m, x) for m in (model, replica) for x in inputs])
    for j, outputs in enumerate(results):
        want = (want_model if j < len(inputs) else want_replica)[j % len(inputs)]
        for got in outputs:
            assert_same(got, want)


def test_replica_refuses_a_per_sample_block() -> None:
    model = build("bert", "houlsby", ("a", "b"))
    replica = shallow_replica(model)
    x = make_inputs(batch=2, length=4)
    with torch.no_grad(), per_sample_adapters(model, ["a", "b"]):
        failure: list[BaseException] = []

        def worker() -> None:
            try:
                hidden_states(replica, x)
            except RuntimeError as exc:
                failure.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert failure and "DataParallel replicas" in str(failure[0])
    with torch.no_grad():
        hidden_states(replica, x)  # outside the block the replica runs


def test_failed_call_leaves_no_state_behind() -> None:
    model = build("bert", "pfeiffer", ("a", "b"))
    x = make_inputs(batch=3, length=4)
    with torch.no_grad():
        want = hidden_states(model, x)
        with pytest.raises(ValueError, match="2 adapter names were given"):
            with per_sample_adapters(model, ["a", "b"]):  # a batch of 3: the first site raises
                hidden_states(model, x)
        call = model.__dict__[STATE_NAME].call
        assert call.bound == [] and call.residuals == {} and call.batch is None
        assert_same(hidden_states(model, x), want)
