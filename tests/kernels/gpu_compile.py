"""Compile (without running) every Triton kernel for real NVIDIA targets, no GPU needed.

The interpreter accepts code the GPU compiler rejects (Python ints where tensors are required,
dtype mismatches between loop iterations, ...). triton.compile with a CUDA target runs the whole
pipeline to PTX and a cubin (ptxas ships with triton) on any machine. Pointers and strides are
marked 16-divisible as the JIT specialises them at run time, so the software pipeliner and the
tensor-core paths are the ones a GPU gets. Prints one line per kernel; exit status 1 on failure.

    python tests/kernels/gpu_compile.py [--arch 80 90]
"""
import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' definitions

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import megaflow.kernels.attention_triton as at  # noqa: E402
import megaflow.kernels.cross_entropy_triton as ct  # noqa: E402
import megaflow.kernels.norm_triton as nt  # noqa: E402
import megaflow.kernels.rope_triton as rt  # noqa: E402
import megaflow.kernels.swiglu_triton as st  # noqa: E402

FLOAT_ARGS = {"sm_scale", "dropout_p", "eps", "smooth_over_v", "one_minus_smooth"}


def compile_kernel(kernel, pointer_types, consts, arch, warps, stages=3):
    """pointer_types: {arg name: triton type}; other args are i32 (fp32 for FLOAT_ARGS)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = {n: "constexpr" if n in consts else pointer_types.get(n, "fp32" if n in FLOAT_ARGS else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n.startswith("stride"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def cases():
    """(name, kernel, pointer types, constexprs, warps, stages)."""
    for dt, tldt, d, causal, dropout, groups in (("*fp16", tl.float16, 80, True, False, 2),
                                                 ("*bf16", tl.bfloat16, 64, False, True, 1)):
        ptrs = {n: dt for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs.update(LSE="*fp32", DELTA="*fp32", SEED="*i64")
        base = dict(GROUPS=groups, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal, DROPOUT=dropout,
                    PRECISION="tf32", MMA_TY=tldt)
        tag = f"{dt[1:]} d{d} causal={causal} dropout={dropout}"
        yield f"attention fwd {tag}", at._attn_fwd_kernel, ptrs, dict(base, BLOCK_M=128, BLOCK_N=64), 8, 3
        yield f"attention dkdv {tag}", at._attn_bwd_dkdv_kernel, ptrs, dict(base, BLOCK_M=32, BLOCK_N=128), 4, 2
        yield f"attention dq {tag}", at._attn_bwd_dq_kernel, ptrs, dict(base, BLOCK_M=128, BLOCK_N=32), 4, 3
    yield "attention preprocess", at._attn_bwd_preprocess_kernel, dict(O="*bf16", DO="*bf16", DELTA="*fp32"), \
        dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64), 4, 1
    norm_ptrs = {n: "*bf16" for n in ("X", "RES", "W", "B", "Y", "H", "DY", "DH_IN", "DX")}
    norm_ptrs.update(MEAN="*fp32", RSTD="*fp32", DW_PART="*fp32", DB_PART="*fp32")
    for rms in (False, True):
        yield f"norm fwd rms={rms}", nt._norm_fwd_kernel, norm_ptrs, \
            dict(IS_RMS=rms, HAS_RES=True, HAS_BIAS=not rms, BLOCK_R=4, BLOCK_N=1024), 16, 1
        yield f"norm bwd rms={rms}", nt._norm_bwd_kernel, norm_ptrs, \
            dict(IS_RMS=rms, HAS_DH_IN=True, HAS_BIAS=not rms, BLOCK_R=2, BLOCK_N=1024), 8, 1
    rope_ptrs = dict(X="*bf16", COS="*fp32", SIN="*fp32", OUT="*bf16")
    yield "rope", rt._rope_kernel, rope_ptrs, dict(BACKWARD=False, BLOCK_S=64, BLOCK_H=64), 4, 1
    yield "rope backward", rt._rope_kernel, rope_ptrs, dict(BACKWARD=True, BLOCK_S=64, BLOCK_H=64), 4, 1
    sw_ptrs = {n: "*bf16" for n in ("GATE", "UP", "OUT", "DOUT", "DGATE", "DUP")}
    yield "swiglu fwd", st._swiglu_fwd_kernel, sw_ptrs, dict(BLOCK=1024), 4, 1
    yield "swiglu bwd", st._swiglu_bwd_kernel, sw_ptrs, dict(BLOCK=1024), 4, 1
    ce_ptrs = dict(LOGITS="*bf16", DLOGITS="*bf16", LABELS="*i64", LSE="*fp32", TARGET="*fp32", SUM="*fp32",
                   GRAD="*fp32")
    yield "cross entropy stats", ct._ce_stats_kernel, ce_ptrs, dict(BLOCK_V=4096), 8, 1
    yield "cross entropy grad", ct._ce_grad_kernel, ce_ptrs, dict(BLOCK_V=2048), 8, 1


def main(argv=None):
    p = argparse.ArgumentParser(description="compile the Triton kernels for CUDA targets")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
    args = p.parse_args(argv)
    failed = 0
    for arch in args.arch:
        for name, kernel, ptrs, consts, warps, stages in cases():
            try:
                c = compile_kernel(kernel, ptrs, consts, arch, warps, stages)
                ptx = c.asm["ptx"]
                mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
                print(f"ok   sm{arch} {name}: shared {c.metadata.shared // 1024} KB, "
                      f"cp.async {'yes' if 'cp.async' in ptx else 'no'}, tensor cores {mma}", flush=True)
            except Exception as e:  # report every kernel, then fail
                failed += 1
                print(f"FAIL sm{arch} {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
