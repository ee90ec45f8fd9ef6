"""Fused-kernel benchmark: megaflow's Triton kernels beside their peers, on one CUDA GPU.

    attention  TFLOP/s, forward and forward+backward, causal, bf16:
               Triton flash attention | torch SDPA | flash-attn (when installed)
    norms      GB/s, forward and forward+backward, bf16: Triton | F.layer_norm / F.rms_norm
    rope, swiglu, cross entropy: GB/s, forward+backward, Triton | the torch backend

Times are medians of triton.testing.do_bench (warmup and repetitions in milliseconds of GPU time),
all measured in the same run; "ratio" is Triton / best peer. On a machine without a CUDA GPU the
kernels only run in Triton's interpreter, so there is nothing to measure: it says so and exits 0.

    python bench/kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

DTYPE = torch.bfloat16


def bench(fn, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def row(name, shape, unit, figures):
    """figures: {implementation: value or None}; ratio = triton / best other."""
    peers = [v for k, v in figures.items() if k != "triton" and v]
    ratio = f"{figures['triton'] / max(peers):.2f}x" if peers and figures.get("triton") else "-"
    cells = "  ".join(f"{k} {v:8.1f}" if v else f"{k} {'-':>8}" for k, v in figures.items())
    print(f"{name:<22} {shape:<28} {unit:<8} {cells}  ratio {ratio}")


def fwd_bwd(fn, inputs, grad):
    def run():
        fn(*inputs).backward(grad)
    return run


def bench_attention(shapes):
    from megaflow.kernels.attention import attention
    flash = None
    if importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_func

        def flash(q, k, v):
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    for b, h, kvh, s, d in shapes:
        q = torch.randn(b, h, s, d, device="cuda", dtype=DTYPE, requires_grad=True)
        k = torch.randn(b, kvh, s, d, device="cuda", dtype=DTYPE, requires_grad=True)
        v = torch.randn(b, kvh, s, d, device="cuda", dtype=DTYPE, requires_grad=True)
        grad = torch.randn_like(q)
        impls = {"triton": lambda q, k, v: attention(q, k, v, True, backend="triton"),
                 "sdpa": lambda q, k, v: attention(q, k, v, True, backend="torch"),
                 "flash-attn": flash}
        fwd_flops = 4 * b * h * s * s * d / 2  # two matmuls, causal half
        for label, flops, make in (("fwd", fwd_flops, lambda f: (lambda: f(q, k, v))),
                                   ("fwd+bwd", 3.5 * fwd_flops, lambda f: fwd_bwd(f, (q, k, v), grad))):
            figures = {}
            for name, f in impls.items():
                figures[name] = None if f is None else flops / bench(make(f), [q, k, v]) / 1e9
            row(f"attention {label}", f"b{b} h{h} kv{kvh} s{s} d{d}", "TFLOP/s", figures)


def bench_norms(shapes):
    from megaflow.kernels.norm import layer_norm, rms_norm
    for rows, n in shapes:
        x = torch.randn(rows, n, device="cuda", dtype=DTYPE, requires_grad=True)
        w = torch.ones(n, device="cuda", dtype=DTYPE, requires_grad=True)
        b = torch.zeros(n, device="cuda", dtype=DTYPE, requires_grad=True)
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        for kind, fn in (("layer_norm", lambda x, w, b, be: layer_norm(x, w, b, backend=be)),
                         ("rms_norm", lambda x, w, b, be: rms_norm(x, w, backend=be))):
            for label, moved, make in (
                    ("fwd", 2 * nbytes, lambda be: (lambda: fn(x, w, b, be))),               # read x, write y
                    ("fwd+bwd", 5 * nbytes, lambda be: fwd_bwd(lambda x: fn(x, w, b, be), (x,), dy))):
                figures = {be: moved / bench(make(be), [x, w, b]) / 1e6 for be in ("triton", "torch")}
                row(f"{kind} {label}", f"{rows}x{n}", "GB/s", figures)


def bench_elementwise(rows, hidden, heads, head_dim, seq, vocab):
    from megaflow.kernels.cross_entropy import cross_entropy
    from megaflow.kernels.rope import apply_rotary, rotary_cos_sin
    from megaflow.kernels.swiglu import swiglu
    b = max(1, rows // seq)
    x = torch.randn(b, heads, seq, head_dim, device="cuda", dtype=DTYPE, requires_grad=True)
    cos, sin = rotary_cos_sin(seq, head_dim, device="cuda")
    gate, up = (torch.randn(rows, hidden, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(2))
    logits = torch.randn(rows, vocab, device="cuda", dtype=DTYPE, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    cases = [  # name, shape, bytes moved fwd+bwd, inputs, fn(backend)
        ("rope fwd+bwd", f"b{b} h{heads} s{seq} d{head_dim}", 4 * x.numel() * x.element_size(), [x],
         lambda be: fwd_bwd(lambda t: apply_rotary(t, cos, sin, backend=be), (x,), torch.randn_like(x))),
        ("swiglu fwd+bwd", f"2x{rows}x{hidden}", 8 * gate.numel() * gate.element_size(), [gate, up],
         lambda be: fwd_bwd(lambda g, u: swiglu(g, u, backend=be), (gate, up), torch.randn_like(gate))),
        ("cross_entropy fwd+bwd", f"{rows}x{vocab}", 3 * logits.numel() * logits.element_size(), [logits],
         lambda be: fwd_bwd(lambda t: cross_entropy(t, labels, backend=be).mean(), (logits,),
                            torch.ones((), device="cuda"))),
    ]
    for name, shape, moved, leaves, make in cases:
        row(name, shape, "GB/s", {be: moved / bench(make(be), leaves) / 1e6 for be in ("triton", "torch")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape per op")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU on this machine. The Triton kernels run here only in "
              "Triton's interpreter (~1000x slower than torch), so there is nothing to benchmark; "
              "their correctness is tested by tests/kernels. Run this on a GPU machine.")
        return 0
    if importlib.util.find_spec("triton") is None:
        print("bench/kernels.py: triton is not installed (pip install triton)")
        return 0
    name = torch.cuda.get_device_name()
    print(f"# {name}, torch {torch.__version__}, dtype {DTYPE}, medians of triton.testing.do_bench")
    attn = [(4, 32, 8, 2048, 128)] if args.quick else \
        [(8, 16, 16, 1024, 64), (4, 32, 8, 2048, 128), (2, 32, 32, 4096, 64), (1, 32, 8, 8192, 128)]
    norms = [(16384, 4096)] if args.quick else [(16384, 1024), (16384, 4096), (16384, 8192), (4096, 16384)]
    bench_attention(attn)
    bench_norms(norms)
    bench_elementwise(rows=8192, hidden=4096 if args.quick else 11008, heads=32, head_dim=128, seq=2048,
                      vocab=32000 if args.quick else 128256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
