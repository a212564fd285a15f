"""Tiny randomly initialised transformers models the tests adapt, each seeded (the same weights
in every test) without touching the caller's random state, and in eval mode."""

import torch
import transformers

BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "num_labels": 4,
    "vocab_size": 100,
}


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def tiny_bert(cls: type = transformers.BertForSequenceClassification) -> torch.nn.Module:
    """A 2-layer, 64-wide BERT as ``cls`` (4 labels, a 100-word vocabulary)."""
    return _seeded(lambda: cls(transformers.BertConfig(**BERT)))


def tiny_llama() -> torch.nn.Module:
    """A 2-layer, 32-wide Llama causal LM (grouped-query attention off: 2 heads, 2 KV heads)."""
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return _seeded(lambda: transformers.LlamaForCausalLM(config))


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer, 32-wide GPT-2 LM (its projections are transformers' Conv1D, not nn.Linear)."""
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0
    )
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))
