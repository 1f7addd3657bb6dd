"""A tiny transformers Llama and the same weights as a JAX tree, for the JAX-vs-peft interop tests.

Shared by the (IA)³ and AdaLoRA interop modules: import the fixtures (``fp32_jax`` is autouse) and helpers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from examples import jax_llama

IDS = np.array([[5, 17, 3, 63, 0, 9, 42], [1, 2, 3, 4, 5, 6, 7]])


@pytest.fixture(scope="module", autouse=True)
def fp32_jax():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    params = jax_llama.params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return params, jax_llama.spec_from_hf_config(model.config)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS)).logits.numpy()


def jax_logits(params, spec, adapters=None) -> np.ndarray:
    return np.asarray(jax.jit(jax_llama.forward, static_argnames="spec")(params, jnp.asarray(IDS), spec=spec,
                                                                         adapters=adapters))


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
