"""``targets="all-linear"`` resolves to exactly PEFT's set (issue 12, item 7), compared with
``PeftModel.targeted_module_names`` on random-init transformers models.

PEFT leaves out the output embedding layer (``get_output_embeddings()``, e.g. ``lm_head``) and
anything in ``modules_to_save``; with ``task_type="SEQ_CLS"`` it also leaves out (and saves) the
classifier head, which lowrank, having no task types, gets from ``modules_to_save=["classifier"]``.
PEFT's all-linear also takes transformers' ``Conv1D`` (GPT-2); lowrank adapts ``nn.Linear`` only,
so the comparison is on the nn.Linear part of PEFT's set.
"""

import copy

import pytest
import transformers
from peft import LoraConfig, get_peft_model
from tinymodels import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lowrank as lr

# (model, PEFT's extra LoraConfig options, lowrank's modules_to_save, nn.Linear targets expected)
CASES = {
    "BertModel": (lambda: tiny_bert(transformers.BertModel), {}, [], 13),  # pooler.dense included
    "BertForSequenceClassification": (
        lambda: tiny_bert(transformers.BertForSequenceClassification),
        {},
        [],
        14,
    ),  # classifier too
    "BertForSequenceClassification+modules_to_save": (
        lambda: tiny_bert(transformers.BertForSequenceClassification),
        {"modules_to_save": ["classifier"]},
        ["classifier"],
        13,
    ),
    "BertForSequenceClassification+SEQ_CLS": (
        lambda: tiny_bert(transformers.BertForSequenceClassification),
        {"task_type": "SEQ_CLS"},
        ["classifier"],
        13,
    ),
    "LlamaForCausalLM": (tiny_llama, {}, [], 14),  # 7 per layer, lm_head left out
}


def peft_linear_targets(model, **options):
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules="all-linear", r=2, **options))
    names = set(theirs.targeted_module_names)
    kinds = {n: type(model.get_submodule(n)) for n in names}
    return {n for n in names if kinds[n] is nn.Linear}, names


@pytest.mark.parametrize("case", CASES)
def test_all_linear_is_peft_set(case):
    build, peft_options, modules_to_save, count = CASES[case]
    model = build()
    theirs, _ = peft_linear_targets(model, **peft_options)
    ours = lr.find_targets(model, "all-linear", modules_to_save=modules_to_save)
    print(f"\n{case}: lowrank {len(ours)}, PEFT {len(theirs)} nn.Linear targets")
    assert len(ours) == len(set(ours)) == count
    assert set(ours) == theirs
    injected = lr.inject(model, "lora", targets="all-linear", modules_to_save=modules_to_save, rank=2)
    assert set(lr.adapters(injected)) == theirs
    for name in modules_to_save:  # trains whole, holds no adapter
        assert type(injected.get_submodule(name)) is nn.Linear
        assert injected.get_submodule(name).weight.requires_grad


def test_all_linear_on_gpt2_finds_no_linear_but_the_output_layer():
    model = tiny_gpt2()
    theirs_linear, theirs = peft_linear_targets(model)
    print(f"\nGPT-2: PEFT {len(theirs)} targets (Conv1D), {len(theirs_linear)} nn.Linear")
    assert len(theirs) == 8 and not theirs_linear  # c_attn, c_proj, c_fc, c_proj per block
    with pytest.raises(
        ValueError,
        match=r"^'all-linear' selects no module: its nn.Linear modules "
        r"are the model's output layer \(lm_head\), which it "
        r"leaves out; name the targets explicitly$",
    ):
        lr.inject(model, "lora", targets="all-linear", rank=2)


def test_tied_output_layer_is_left_out_under_every_name():
    model = tiny_llama()
    model.extra_head = model.lm_head  # a second name for the output layer
    assert lr.find_targets(model, "all-linear") == [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.lm_head
    ]
