"""The bound launch (``kernels/binding.py``): its version gate, its row-count classes against Triton's own
specialization, what it passes to the compiled kernel, that it keeps no tensor of a call, and the
fallback to Triton's normal launch whenever something it relies on is missing.

The launch path is checked in a subprocess without the interpreter (``binding_check.py``), with
Triton's launch replaced by a compiled-kernel stand-in, as ``benchmarks/host_cost.py`` measures it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import triton

from adapter_fused.kernels import binding, tuning
from adapter_fused.kernels.records import FusedRowsArgs

ROOT = Path(__file__).parents[2]


def test_the_version_gate() -> None:
    assert binding.CHECKED_TRITON_VERSIONS == ("3.6", "3.9")
    for version in ("3.6.0", "3.6.1", "3.9.0", "3.9.0+git1a2b3c4"):
        assert binding.version_checked(version), version
    for version in ("3.5.1", "3.7.0", "3.8.0", "3.10.0", "3.60.0", "4.0.0", "2.3.1", "3"):
        assert not binding.version_checked(version), version


def _triton_specialization(rows: int) -> int:
    """How Triton's JIT specializes an integer argument, in ``rows_class``'s terms."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    kind, attribute = jit.native_specialize_impl(BaseBackend, rows, False, True, True)[:2]
    if kind == "constexpr":
        return 1
    return (16 if attribute == "D" else 0) + (64 if kind == "i64" else 0)


def test_row_classes_follow_the_tuning_buckets_and_tritons_specialization() -> None:
    from triton.runtime import jit

    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip(f"Triton {triton.__version__} has another specialization entry point")
    rows_seen = [*range(1, 300), 4095, 4096, 4097, 32768, 32769, 10**6, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16]
    for rows in rows_seen:
        exponent, specialization = binding.rows_class(rows)
        assert 2**exponent == tuning.rows_bucket(rows), rows
        assert specialization == _triton_specialization(rows), rows


def test_in_the_interpreter_nothing_binds() -> None:
    """The test process interprets: no compiled kernel, so no bound launch (the module calls launch
    through Triton's interpreter, as tests/test_layer.py checks with an interpreted stand-in)."""
    assert tuning.INTERPRET
    assert binding._compiled_kernel(None, None, (), {}) is None


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / "binding_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_bound_launch_passes_every_argument_in_signature_order(facts: dict[str, Any]) -> None:
    bound = facts["bound"]
    assert bound["binding"] == {"normal_launches": 1, "bound_launches": 0, "plans": ["BoundForward"]}
    call = bound["call"]
    assert call["normal_launches"] == 1  # another row count of the class: the bound launch
    assert call["argument_count"][0] == call["argument_count"][1] == len(FusedRowsArgs._fields) + 3
    assert call["x_slots"] == ["idx_ptr", "mid_ptr", "res_ptr", "saved_h_ptr", "src_ptr"]
    assert call["y_slots"] == ["out_ptr"]
    assert call["parameters"] == ["w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr"]
    assert (call["M"], call["scale"], call["grid"]) == (7, 0.5, [1, 1, 1])
    assert call["constants_as_bound"] and call["block_m"] == call["plan_block_m"] == 16
    assert (call["STORE_MID"], call["ADD_RESIDUAL"], call["ACT"]) == (False, True, 2)
    assert bound["residual_call"] == {"res_is_residual": True, "src_is_x": True, "out_is_result": True, "plans": 1}
    assert bound["checked_versions"] == ["3.6", "3.9"]


def test_a_bound_launch_keeps_no_tensor_of_a_call(facts: dict[str, Any]) -> None:
    """The x a kernel was bound with, and the x, residual and y of a bound call, are freed once the
    caller drops them; what the bound launches hold is the module's parameters."""
    assert facts["bound"]["freed"] == [True] * 5
    assert facts["bound"]["held_are_parameters"]


def test_a_bound_launch_passes_launch_hooks_only_when_one_is_added(facts: dict[str, Any]) -> None:
    """Triton's default launch hooks are empty chains: the bound launch passes None for them (the
    launcher then calls nothing and no launch metadata is built); a chain with a hook added is passed."""
    hooks = facts["bound"]["hooks"]
    assert hooks["default_chains"] == ["HookChain", "HookChain"]
    assert hooks["empty"] == [True, True] and hooks["removed"] == [True, True]
    assert hooks["launch_enter_hook"] == [True, False]
    assert hooks["launch_exit_hook"] == [False, True]


@pytest.mark.parametrize("case", ["checked_3.6", "checked_3.9"])
def test_checked_versions_bind(facts: dict[str, Any], case: str) -> None:
    assert facts["fallback"][case] == {"normal_launches": 1, "bound_launches": 1, "plans": ["BoundForward"]}


@pytest.mark.parametrize("case", ["version_3.5", "version_3.10", "no_launch_hooks", "no_driver_functions",
                                  "no_packed_metadata", "no_launch_metadata", "pre_run_hooks", "binding_off"])
def test_anything_missing_falls_back_to_the_normal_launch(facts: dict[str, Any], case: str) -> None:
    assert facts["fallback"][case] == {"normal_launches": 2, "bound_launches": 0, "plans": ["bool"]}
