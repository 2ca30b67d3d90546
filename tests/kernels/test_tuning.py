"""Tuning: bounded row buckets, tuned choices kept per device and shape key across processes, a notice
when a kernel tunes, and the launcher reusing a stored choice instead of tuning again."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import triton

from adapter_fused.kernels import launch, tuning
from adapter_fused.kernels.tuning import MAX_ROWS_BUCKET, MIN_ROWS_BUCKET, TuningCache, TuningKey, rows_bucket

CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=3) for m in (16, 32, 64) for w in (4, 8)]
KEY = TuningKey("Some-GPU-sm90", "fused_rows_kernel", ("D=4096", "R=64", "rows_bucket=4096", "bfloat16"))


def test_row_buckets_are_bounded() -> None:
    buckets = {rows_bucket(rows) for rows in range(0, 200_000, 7)}
    assert buckets == {2**k for k in range(4, 16)} and len(buckets) == 12
    assert rows_bucket(1) == MIN_ROWS_BUCKET and rows_bucket(10**7) == MAX_ROWS_BUCKET
    assert rows_bucket(4096) == 4096 and rows_bucket(4097) == 8192


def test_a_second_process_reuses_the_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def run() -> tuple[triton.Config, int]:
        calls.append(1)
        return CONFIGS[3], len(CONFIGS)

    first = TuningCache(tmp_path)
    assert first.lookup(KEY, CONFIGS) is None
    assert first.tune(KEY, CONFIGS, run) is CONFIGS[3]
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "tuning fused_rows_kernel(D=4096, R=64" in notice
    assert "6 configs in" in notice and str(tmp_path) in notice
    assert first.tune(KEY, CONFIGS, run) is CONFIGS[3] and len(calls) == 1  # in memory

    second = TuningCache(tmp_path)  # another process: a fresh cache over the same directory
    assert second.lookup(KEY, CONFIGS) is CONFIGS[3]
    assert second.tune(KEY, CONFIGS, run) is CONFIGS[3] and len(calls) == 1
    assert capsys.readouterr().err == ""
    other_device = TuningKey("Other-GPU-sm80", KEY.kernel, KEY.values)
    assert second.lookup(other_device, CONFIGS) is None
    other_shape = TuningKey(KEY.device, KEY.kernel, ("D=768", "R=48", "rows_bucket=4096", "bfloat16"))
    assert second.lookup(other_shape, CONFIGS) is None


def test_a_stale_or_broken_file_means_tuning_again(tmp_path: Path) -> None:
    cache = TuningCache(tmp_path)
    cache.tune(KEY, CONFIGS, lambda: (CONFIGS[0], 6))
    path = cache.path(KEY.device)
    assert path is not None and KEY.label() in json.loads(path.read_text())
    assert TuningCache(tmp_path).lookup(KEY, CONFIGS[1:]) is None  # the stored config left the space
    path.write_text("{ half written")
    assert TuningCache(tmp_path).lookup(KEY, CONFIGS) is None


def test_without_a_directory_choices_stay_in_memory(tmp_path: Path) -> None:
    cache = TuningCache(None)
    assert cache.tune(KEY, CONFIGS, lambda: (CONFIGS[2], 6)) is CONFIGS[2]
    assert cache.lookup(KEY, CONFIGS) is CONFIGS[2] and cache.path(KEY.device) is None


def test_processes_starting_together_tune_once(tmp_path: Path) -> None:
    """Two processes racing for the same key: the file lock makes the second read the first's choice."""
    script = textwrap.dedent(f"""
        import sys, time, triton
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from adapter_fused.kernels.tuning import TuningCache, TuningKey
        configs = [triton.Config({{"BLOCK_M": m}}, num_warps=4, num_stages=3) for m in (16, 32)]
        key = TuningKey("Some-GPU-sm90", "k", ("D=64",))
        def run():
            time.sleep(1.0)
            print("TUNED", flush=True)
            return configs[1], 2
        print(TuningCache(__import__("pathlib").Path({str(tmp_path)!r})).tune(key, configs, run).kwargs)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(out.count("TUNED") for out in outputs) == 1, outputs
    assert all("'BLOCK_M': 32" in out for out in outputs)


class FakeArgs(NamedTuple):
    """The fake kernel's argument record."""

    x_ptr: Any
    D: int
    R: int
    rows_bucket: int
    ACT: int


class FakeTuned:
    """Stands in for a ``triton.autotune`` object: records tuning runs and direct launches (the
    positional arguments, then the config's keyword arguments)."""

    def __init__(self) -> None:
        self.configs = CONFIGS
        self.arg_names = ["x_ptr", "D", "R", "rows_bucket", "ACT", "BLOCK_M"]
        self.keys = ["D", "R", "rows_bucket"]
        self.best_config = CONFIGS[5]
        self.tuned: list[int] = []
        self.direct: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        fake = self

        class Fn:
            __name__ = "fake_kernel"

            def __getitem__(self, grid: Any) -> Any:
                return lambda *args, **kwargs: fake.direct.append((args, kwargs))

        self.fn = Fn()

    def early_config_prune(self, configs: list[triton.Config], named: dict[str, Any], **kwargs: Any) -> list[Any]:
        return configs[:4] + configs[5:]

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.tuned.append(1)


def test_the_launcher_tunes_once_then_launches_the_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(launch, "TUNING_CACHE", TuningCache(tmp_path))
    monkeypatch.setattr(tuning, "device_label", lambda device: "Some-GPU-sm90")
    x = torch.empty(4, 8, dtype=torch.bfloat16)
    args = FakeArgs(x_ptr=x, D=8, R=4, rows_bucket=16, ACT=1)
    fake = FakeTuned()
    launch._launch(fake, lambda meta: (1,), args, fixed_config=False)
    assert fake.tuned == [1] and fake.direct == []  # the autotuner ran the best config itself
    assert "5 configs in" in capsys.readouterr().err
    launch._launch(fake, lambda meta: (1,), args, fixed_config=False)
    assert fake.tuned == [1] and fake.direct == [(tuple(args), CONFIGS[5].all_kwargs())]  # the choice, no tuning

    monkeypatch.setattr(launch, "TUNING_CACHE", TuningCache(tmp_path))  # a new process
    fresh = FakeTuned()
    launch._launch(fresh, lambda meta: (1,), args, fixed_config=False)
    assert fresh.tuned == [] and fresh.direct == [(tuple(args), CONFIGS[5].all_kwargs())]
    wider = args._replace(rows_bucket=32)
    launch._launch(fresh, lambda meta: (1,), wider, fixed_config=False)  # a new row bucket
    assert fresh.tuned == [1] and len(fresh.direct) == 1
    launch._launch(fresh, lambda meta: (1,), wider, fixed_config=True)  # deterministic mode
    assert fresh.tuned == [1] and fresh.direct[-1] == (tuple(wider), CONFIGS[0].all_kwargs())


def test_first_call_config_lists_are_bounded() -> None:
    """The lists a first launch may try hold at most 12 configs per kernel (checked here on whatever
    lists this process has; the GPU lists are checked by the sm_90 compile test, which prints them)."""
    for name in ("FUSED_CONFIGS", "WEIGHT_GRAD_CONFIGS", "PROJECT_CONFIGS", "EXPAND_CONFIGS"):
        assert 1 <= len(getattr(tuning, name)) <= 12, name


def test_a_choice_stored_by_another_process_while_waiting_is_launched(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The lookup misses, then the tuning lock's holder stores the key: no tuning here, one launch."""
    import torch

    class StoredMeanwhile(TuningCache):
        def lookup(self, key, configs):  # type: ignore[no-untyped-def]
            self.lookups = getattr(self, "lookups", 0) + 1
            return None if self.lookups == 1 else CONFIGS[2]

    monkeypatch.setattr(launch, "TUNING_CACHE", StoredMeanwhile(tmp_path))
    monkeypatch.setattr(tuning, "device_label", lambda device: "Some-GPU-sm90")
    fake = FakeTuned()
    args = FakeArgs(x_ptr=torch.empty(2, 8), D=8, R=4, rows_bucket=64, ACT=1)
    launch._launch(fake, lambda meta: (1,), args, fixed_config=False)
    assert fake.tuned == [] and fake.direct == [(tuple(args), CONFIGS[2].all_kwargs())]
