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
