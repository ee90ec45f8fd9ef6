"""The comparison rule itself must be able to fail: a kernel output off by a little more than
low-precision rounding is rejected, one off by rounding only is accepted."""
import pytest
import torch

from kernel_numerics import check_rule
from megaflow.kernels.norm import rms_norm


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 4e-3), (torch.float32, 1e-5)])
def test_rule_rejects_small_errors(dtype, rel):
    x, w = torch.randn(8, 64), torch.ones(64)
    ref = rms_norm(x.double(), w.double(), backend="torch")
    same = rms_norm(x.to(dtype), w.to(dtype), backend="torch")
    check_rule("torch as kernel", same, same, ref, dtype)
    with pytest.raises(AssertionError, match="max\\|kernel-ref\\|"):
        check_rule("perturbed", (ref * (1 + rel)).to(dtype), same, ref, dtype)
