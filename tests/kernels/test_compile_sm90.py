"""The kernels compile for a Hopper GPU (sm_90) on a machine without one.

Triton's NVIDIA backend and ptxas ship with the triton wheel, so every kernel can be lowered to a
cubin here: this catches code that the interpreter accepts but the compiler does not. It runs in a
subprocess because the test process itself has Triton's interpreter switched on.
"""

import os
import subprocess
import sys

import pytest

ACTIVATIONS = range(8)


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    wide_ints = {"group_stride", "off_wd", "off_bu", "off_bd", "total"}  # i64 like a large tensor's
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, pointer_types["default"])
        elif name in ("scale", "out_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") or name in wide_ints else "i32"
    return signature


def compile_all() -> list[str]:
    """Compile each kernel in its main variants for sm_90; return a line per compiled variant."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from adapter_fused.kernels.fused import fused_rows_kernel
    from adapter_fused.kernels.weight_grad import reduce_groups_kernel, weight_grad_kernel
    from adapter_fused.kernels.wide import expand_kernel, project_kernel

    target = GPUTarget("cuda", 90, 32)
    done = []

    def build(kernel, pointer_types: dict[str, str], constexprs: dict[str, object], **options: int) -> None:  # type: ignore[no-untyped-def]
        source = ASTSource(
            fn=kernel,
            signature=_signature(kernel, pointer_types, constexprs),
            constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        )
        compiled = triton_compile(source, target=target, options=options)
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
        done.append(f"{kernel.__name__} {pointer_types['default']} {constexprs}")

    fp32_mid = {"saved_h_ptr": "*fp32", "mid_ptr": "*fp32", "h_ptr": "*fp32", "gh_ptr": "*fp32", "idx_ptr": "*i64"}
    act = iter(list(ACTIVATIONS) * 3)
    for dtype, precision in (("*bf16", "ieee"), ("*fp16", "ieee"), ("*fp32", "ieee"), ("*fp32", "tf32")):
        for backward in (False, True):
            build(fused_rows_kernel, {"default": dtype, **fp32_mid},
                  dict(ACT=next(act), BACKWARD=backward, HAS_B1=not backward, HAS_B2=not backward, STORE_MID=True,
                       STORE_OUT=True, ADD_RESIDUAL=not backward, GROUPED=backward, DOT_F32=False, PRECISION=precision, R_PAD=256 if backward else 32,
                       BLOCK_M=64 if backward else 128, BLOCK_K=64, BLOCK_N=64), num_warps=8, num_stages=2)
        build(weight_grad_kernel, {"default": dtype, **fp32_mid, "out_ptr": "*fp32"},
              dict(ACT=next(act), NEED_DWU=True, NEED_DBU=True, NEED_DWD=True, NEED_DBD=True,
                   GROUPED=precision == "tf32", DOT_F32=False,
                   PRECISION=precision, R_PAD=64, BLOCK_M=64, BLOCK_N=64, BLOCK_R=64), num_warps=4, num_stages=3)
    build(project_kernel, {"default": "*bf16", **fp32_mid},
          dict(ACT=next(act), BACKWARD=True, HAS_B1=False, GROUPED=True, DOT_F32=False, PRECISION="ieee",
               BLOCK_M=128, BLOCK_R=128, BLOCK_K=64), num_warps=8, num_stages=3)
    build(expand_kernel, {"default": "*bf16", **fp32_mid},
          dict(ACT=next(act), APPLY_ACT=True, HAS_B2=True, ADD_RESIDUAL=True, GROUPED=False, DOT_F32=False, PRECISION="ieee",
               BLOCK_M=128, BLOCK_N=128, BLOCK_R=64), num_warps=8, num_stages=3)
    build(reduce_groups_kernel, {"default": "*fp32", "out_ptr": "*bf16"}, dict(BLOCK=1024), num_warps=4)
    return done


def test_every_kernel_compiles_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    assert len(lines) == 15, proc.stdout
    kernels = {line.split()[1] for line in lines}
    assert kernels == {"fused_rows_kernel", "weight_grad_kernel", "project_kernel", "expand_kernel",
                       "reduce_groups_kernel"}


if __name__ == "__main__":
    for line in compile_all():
        print("compiled", line, flush=True)


def test_first_call_configs_do_not_spill_on_sm90() -> None:
    """Every config a first launch may try (forward and backward, at r = 64, 128, 256 and the
    two-kernel path) compiles for sm_90, with a real launch's specialization, without spilling
    registers and within a block's shared memory; and no kernel tries more than 12. The table is
    printed (``-s`` shows it; ``python tests/kernels/sm90.py`` prints it alone)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels import sm90

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90.py")
    halves = [[str(i) for i in range(len(sm90.SHAPES)) if i % 2 == part] for part in (0, 1)]
    procs = [subprocess.Popen([sys.executable, script, *half], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for half in halves]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
        outputs.append(out)
    table = [line.split() for out in outputs for line in out.splitlines() if line[:1] == " " or line[:1].isdigit()]
    rows = [row for row in table if row and row[0].isdigit()]
    print("\n".join(out for out in outputs))
    spilling = [" ".join(row) for row in rows if int(row[-3]) > 0]
    assert not spilling, "configs that spill registers on sm_90:\n" + "\n".join(spilling)
    too_big = [" ".join(row) for row in rows if int(row[-2]) > sm90.SHARED_MEMORY_LIMIT]
    assert not too_big, "configs needing more shared memory than a block has:\n" + "\n".join(too_big)
    counts = [line for out in outputs for line in out.splitlines() if line.startswith("configs tried")]
    assert len(counts) >= 10, outputs
    for line in counts:
        assert 1 <= int(line.rsplit(":", 1)[1]) <= 12, line
