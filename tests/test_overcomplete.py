"""Ranks above min(out, in): legal and warned once where the maths allows them (as in PEFT), one
sentence where it cannot take them (SVD-initialised factors, an orthonormal basis of ℝ^in).

The layer is 4×64, the shape of a 4-class head on a 64-wide encoder, which PEFT's all-linear
adapts at r = 8 (issue 12, item 3).
"""

import copy
import re
import warnings

import pytest
import torch
from adapter_cases import TinyNet, formula
from peft import LoraConfig, get_peft_model
from tinymodels import tiny_bert
from torch import nn

import lowrank as lr

OUT, IN, R = 4, 64, 8
WARNED = ["adalora", "dora", "frobenius", "loha", "lokr", "lora", "rslora"]
SILENT = ["full", "random_alignment", "vera"]  # no rank, or every extra rank adds expressiveness
SVD_INIT = [("pissa", {}), ("milora", {}), ("frobenius", {"init": "closed_form"})]


def head(out_f=OUT, in_f=IN):
    return nn.Linear(in_f, out_f)


def test_every_variant_is_classified():
    assert sorted(WARNED + SILENT + ["pissa", "milora"]) == lr.variants()


@pytest.mark.parametrize("name", WARNED)
def test_overcomplete_rank_is_legal_and_warned_once(name):
    with pytest.warns(lr.RankWarning) as record:
        ad = lr.make(name, head(), rank=R)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        f"rank=8 for a 4x64 layer with variant '{name}' is over-complete: "
        "the update is as expressive at rank 4 as at any larger rank"
    )
    assert record[0].filename == __file__, "the warning should point at the caller's line"
    assert ad.rank == R
    assert ad.num_trainable() == sum(torch.Size(s).numel() for s in formula(name)(OUT, IN, R, True).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", lr.RankWarning)
        lr.make(name, head(), rank=R)  # the same (variant, shape, rank) again: silent
        lr.make(name, head(), rank=OUT)  # not over-complete: silent
    with pytest.warns(lr.RankWarning, match="rank=9 for a 4x64 layer"):
        lr.make(name, head(), rank=R + 1)  # another rank is another warning


@pytest.mark.parametrize("name", SILENT)
def test_variants_whose_extra_rank_is_not_wasted_do_not_warn(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", lr.RankWarning)
        ad = lr.make(name, head(), rank=R)
    assert ad.rank == (min(OUT, IN) if name == "full" else R)


def test_vera_gains_expressiveness_above_min_out_in():
    # ΔW = Λ_b B Λ_d A = Λ_b Σᵢ dᵢ B[:, i] A[i]: the span of the r fixed rank-1 terms grows with r
    # past min(out, in) = 4 (generic random vectors: the span has full dimension r).
    def span(rank):
        ad = lr.make("vera", head(), rank=rank)
        terms = torch.stack([torch.outer(ad.B[:, i], ad.A[i]).flatten() for i in range(rank)])
        return int(torch.linalg.matrix_rank(terms.double()))

    assert span(OUT) == OUT and span(R) == R


def test_random_alignment_takes_ranks_up_to_in():
    ad = lr.make("random_alignment", head(), rank=R)  # 8 > out = 4: B A reaches an 8-dim row space
    torch.testing.assert_close(ad.A @ ad.A.T, torch.eye(R), atol=1e-6, rtol=0)  # float32 QR
    with pytest.raises(
        ValueError,
        match=r"^rank=5 is invalid for a 64x4 layer with variant "
        r"'random_alignment', as A's r rows are orthonormal "
        r"vectors of ℝ\^in, of which there are at most in; "
        r"choose an integer rank between 1 and 4$",
    ):
        lr.make("random_alignment", head(64, 4), rank=5)


@pytest.mark.parametrize(("name", "options"), SVD_INIT)
def test_svd_initialised_factors_refuse_more_than_min_out_in(name, options):
    why = (
        "init='closed_form' starts the factors at r of the closed form's min(out, in) singular triplets"
        if options
        else "its factors start at r of W₀'s min(out, in) singular triplets"
    )
    lin = head()
    with pytest.raises(
        ValueError,
        match=rf"^rank=5 is invalid for a 4x64 layer with variant "
        rf"'{name}', as {re.escape(why)}; choose an integer "
        rf"rank between 1 and 4$",
    ):
        lr.make(name, lin, rank=5, **options)
    assert lin.weight.requires_grad, "a failed make must leave the caller's layer as it was"
    lr.make(name, head(), rank=4, **options)


def test_check_rank_is_a_classmethod_of_the_options():
    lokr = lr.variant_class("lokr")
    assert lokr.useful_rank(12, 16) == 12 and lokr.useful_rank(12, 16, factor=2) == 6
    frob = lr.variant_class("frobenius")
    assert frob.max_rank(4, 64) is None and frob.max_rank(4, 64, init="closed_form") == 4
    with pytest.warns(lr.RankWarning, match="variant 'frobenius' is over-complete"):
        assert frob.check_rank(8, 4, 64) == 8
    with pytest.raises(ValueError, match="between 1 and 4"):
        frob.check_rank(8, 4, 64, init="closed_form")


# ----------------------------------------------------------------------------- against PEFT


def test_all_linear_at_rank_8_adapts_the_4x64_classifier_as_peft_does(tmp_path):
    base = tiny_bert().double()
    config = LoraConfig(target_modules="all-linear", r=R, lora_alpha=16, init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()  # random A and B: ΔW ≠ 0
    assert "classifier" in theirs.targeted_module_names
    with pytest.warns(lr.RankWarning) as record:
        ours = lr.inject(copy.deepcopy(base), "lora", targets="all-linear", rank=R, alpha=16)
    assert [str(w.message).split(" is ")[0] for w in record] == [
        "rank=8 for a 4x64 layer with variant 'lora'"
    ], "only the classifier is over-complete"
    assert sorted(lr.adapters(ours)) == sorted(theirs.targeted_module_names)
    with torch.no_grad():
        for name, ad in lr.adapters(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            ad.A.copy_(layer.lora_A["default"].weight)
            ad.B.copy_(layer.lora_B["default"].weight)
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_theirs, y_ours, y_base = (
            theirs(input_ids=ids).logits,
            ours(input_ids=ids).logits,
            base(input_ids=ids).logits,
        )
        theirs.save_pretrained(tmp_path / "peft")
        loaded = lr.from_peft(copy.deepcopy(base), tmp_path / "peft").eval()
        y_loaded = loaded(input_ids=ids).logits
    # float64 throughout: the two routes (PEFT's and lowrank's forward) differ by a few roundings
    # of ~1e-16 per term over two layers; 1e-10 is far below the O(1e-2) effect of the adapters.
    effect, d_inject, d_loaded = (float((y - y_theirs).abs().max()) for y in (y_base, y_ours, y_loaded))
    print(
        f"\nBERT all-linear r=8 vs PEFT: adapters move the logits by {effect:.2e}; max abs diff "
        f"inject {d_inject:.2e}, from_peft {d_loaded:.2e}"
    )
    assert effect > 1e-3 and d_inject < 1e-10 and d_loaded < 1e-10
    assert lr.adapters(loaded)["classifier"].rank == R


def test_failed_inject_on_a_rank_one_layer_cannot_take_leaves_the_model_as_it_was():
    model = TinyNet()  # q 10x8, v 10x10, out 3x10: pissa at r = 4 fits q and v, not out
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"rank=4 is invalid for a 3x10 layer with variant 'pissa'"):
        lr.inject(model, "pissa", targets=["q", "v", "out"], rank=4)
    assert not lr.adapters(model) and all(type(m) is nn.Linear for m in (model.q, model.v, model.out))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
