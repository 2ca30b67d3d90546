"""Test setup: without a GPU the kernels run in Triton's interpreter, which must be switched on
before the kernels are imported; fixtures for the device, float64 truth and launch counting."""

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip without CUDA; ``slow`` tests are deselected unless ``-m`` names them."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if "slow" not in (config.getoption("markexpr", "") or ""):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def deterministic():  # type: ignore[no-untyped-def]
    """torch.use_deterministic_algorithms(True) for one test."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


class LaunchCounter:
    """Records the name of every Triton kernel launched (compiled or interpreted)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.depth = 0  # > 0 while a launch runs (the interpreter's own host copies happen then)

    def __len__(self) -> int:
        return len(self.names)

    def clear(self) -> None:
        self.names.clear()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> LaunchCounter:
    """Counts kernel launches by wrapping Triton's own launch entry points."""
    counter = LaunchCounter()
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            if not kwargs.get("warmup", False):
                counter.names.append(getattr(self, "__name__", None) or self.fn.__name__)
            counter.depth += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.depth -= 1

        monkeypatch.setattr(cls, "run", run)
    return counter


class RecordAtenOps(TorchDispatchMode):
    """Records the aten ops that run outside kernel launches; ``compute_ops`` drops those that only
    allocate or re-view memory, leaving any eager math that ran beside the kernels.

    The library's own operators (namespace ``adapter_fused``) are not recorded themselves: their
    Python bodies run under this mode, so every aten op they issue around the launches is."""

    NON_COMPUTE = {"empty", "empty_strided", "view", "_unsafe_view", "reshape", "as_strided", "slice", "detach",
                   "alias", "t", "transpose", "expand", "zeros", "zero_", "ones_like", "empty_like", "new_empty",
                   "new_empty_strided", "lift_fresh"}

    def __init__(self, launches: LaunchCounter) -> None:
        super().__init__()
        self.launches = launches
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "adapter_fused":
            from adapter_fused.library import IMPLEMENTATIONS

            with self:
                return IMPLEMENTATIONS[func._schema.name.split("::")[1]](*args, **(kwargs or {}))
        if self.launches.depth == 0:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def compute_ops(self) -> list[str]:
        return [n for n in self.names if n not in self.NON_COMPUTE]


__all__ = ["DEVICE", "LaunchCounter", "RecordAtenOps", "triton"]
