"""Tiny transformers models built from configs (no downloads), shared by the torch and oracle tests."""

from __future__ import annotations

import transformers


def tiny_llama() -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64))


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64,
                                                                n_positions=32))


def tiny_bert_classifier() -> transformers.BertForSequenceClassification:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64,
        max_position_embeddings=32, num_labels=3))


def adalora_pair(base, kwargs: dict):
    """``(ours, theirs)``: peft's AdaLoRA model on a copy of ``base`` with random triplets (``E`` too, which
    peft starts at zero) and peftcore_torch's holding exactly the same parameters."""
    import copy

    import peft
    import peftcore
    import peftcore_torch
    import torch

    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".lora_E." in name:
                param.normal_()
    ours = peftcore_torch.get_peft_model(copy.deepcopy(base), peftcore.AdaLoraConfig(**kwargs))
    ours.load_state_dict(without_ranknum(theirs.state_dict()))
    return ours, theirs


def without_ranknum(state: dict) -> dict:
    """peft's AdaLoRA state dict less ``ranknum`` (peft keeps it as an unsaved parameter; ours is a number)."""
    return {key: value for key, value in state.items() if ".ranknum." not in key}
