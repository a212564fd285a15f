"""Half-precision bases: merging computes W₀ + ΔW in float32 and casts once; cycles never drift."""

import pytest
import torch
from torch import nn

import lowrank as lr

# One rounding of the merged weight to the dtype plus the half-precision matmul itself:
# a few units of the dtype's epsilon relative to the output scale.
TOL = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11}


def perturbed(name: str, dtype: torch.dtype) -> lr.Adapter:
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(dtype)
    ad = lr.make(name, base, rank=4)
    with torch.no_grad():
        for p in ad.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return ad.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", lr.variants())
def test_merge_in_half_precision(name, dtype):
    ad = perturbed(name, dtype)
    x = torch.randn(8, 24).to(dtype)
    w0 = ad.base.weight.detach().clone()
    with torch.no_grad():
        y = ad(x).float()
        # the merged weight is W₀ + ΔW accumulated in float32 and rounded once: within one
        # or two units in the last place (a residual base, as pissa's, is itself rounded)
        exact = ad.w0.float() + ad.delta_weight().float()
        merged = ad.merged_weight()
        assert merged.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(merged.float(), exact, rtol=2 * eps, atol=eps * float(exact.abs().max()))
        ad.merge()
        ym = ad(x).float()
        for _ in range(20):
            ad.unmerge()
            ad.merge()
        ad.unmerge()
    scale = y.abs().max().clamp_min(1.0)
    assert float((ym - y).abs().max()) <= TOL[dtype] * float(scale), name
    assert torch.equal(ad.base.weight, w0)  # 20 cycles, no drift: W₀ restored bit for bit
