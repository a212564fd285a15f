"""Property-based: over shapes, ranks, dtypes and every variant, either the adapter obeys merge
equivalence and the save/load round trip, or construction fails with the one-sentence rank error."""

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowrank as lr

# float32: outputs of a few-term sums of O(1) values agree to ~1e-6; float64 to ~1e-13.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.filterwarnings("ignore::lowrank.RankWarning")  # tests/test_overcomplete.py tests it
@settings(max_examples=80, deadline=None)
@given(
    variant=st.sampled_from(lr.variants()),
    out_f=st.integers(1, 9),
    in_f=st.integers(1, 9),
    rank=st.integers(-1, 11),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adapter_laws_or_one_clear_error(variant, out_f, in_f, rank, dtype, bias, seed):
    torch.manual_seed(seed)
    pristine = nn.Sequential(nn.Linear(in_f, out_f, bias=bias).to(dtype))
    model = copy.deepcopy(pristine)
    # the largest rank the variant's maths admits (min(out, in) for SVD-initialised factors, in for
    # random_alignment's orthonormal A), None for any (with a RankWarning where it is wasted); a
    # variant without a rank ignores it
    cls = lr.variant_class(variant)
    hi = cls.max_rank(out_f, in_f) or rank
    if cls.takes_rank and not 1 <= rank <= hi:
        with pytest.raises(ValueError, match=rf"rank={rank} is invalid for a {out_f}x{in_f} layer"):
            lr.inject(model, variant, targets=["0"], rank=rank, seed=seed)
        assert isinstance(model[0], nn.Linear)  # the model is untouched
        return
    lr.inject(model, variant, targets=["0"], rank=rank, seed=seed)
    ad = model[0]
    with torch.no_grad():
        for p in ad.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(5, in_f, dtype=dtype)
    with torch.no_grad():
        y = model(x)
        ref = F.linear(x, ad.merged_weight(), ad.base.bias)
        torch.testing.assert_close(y, ref, rtol=0, atol=ATOL[dtype] * max(1.0, float(ref.abs().max())))
        w = ad.base.weight.clone()
        ad.merge()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=ATOL[dtype] * max(1.0, float(ref.abs().max())))
        ad.unmerge()
        assert torch.equal(ad.base.weight, w)
    with tempfile.TemporaryDirectory() as tmp:
        lr.save_adapters(model, f"{tmp}/ad")
        fresh = lr.load_adapters(copy.deepcopy(pristine), f"{tmp}/ad").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
