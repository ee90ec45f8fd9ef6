"""Shared numerics for the kernel tests (run on CPU through the Triton interpreter, see ../conftest.py).

The rule, from flash-attention's tests: a kernel in low precision may be at most twice as far from
the high-precision reference as plain torch in the same low precision, plus a small atol (relative
to the reference's magnitude):  max|kernel - ref| <= 2 * max|torch_same_dtype - ref| + atol * scale.
The reference is fp32 for fp16 inputs and fp64 for fp32 inputs (so fp32 kernels are held to fp32
accuracy, not to agreement with one fp32 ordering of the sums).
"""
import torch

# Relative to max(|ref|, 1). fp16 ulp at 1.0 is ~1e-3: atol is half an ulp of the largest value.
ATOL = {torch.float32: 1e-6, torch.float16: 5e-4}


def ref_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def check_rule(name, kernel, torch_same_dtype, ref, dtype):
    """Assert the rule for one tensor; returns (kernel error, torch error) for reporting."""
    ref = ref.double()
    err = (kernel.double() - ref).abs().max().item()
    base = (torch_same_dtype.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    bound = 2 * base + ATOL[dtype] * scale
    assert err <= bound, (f"{name} ({dtype}): max|kernel-ref| = {err:.3g} > 2*max|torch-ref| "
                          f"({2 * base:.3g}) + atol*scale ({ATOL[dtype] * scale:.3g})")
    return err, base


def check_all(names, kernels, torchs, refs, dtype):
    for name, k, t, r in zip(names, kernels, torchs, refs):
        assert k.shape == r.shape, f"{name}: shape {tuple(k.shape)} != reference {tuple(r.shape)}"
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != torch backend's {t.dtype}"
        check_rule(name, k, t, r, dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_grad(fn, inputs, grad_out):
    """Output and gradients of fn(*inputs) for the upstream gradient grad_out (cast to the output)."""
    inputs = [leaf(t) if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    wrt = [t for t in inputs if t is not None and t.is_floating_point()]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out.detach(), list(grads)
