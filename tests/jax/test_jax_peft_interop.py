"""Adapters move between peft (torch Llama) and peftcore_jax (the JAX Llama example) with the same logits.

peft saves random non-zero adapters (``init_lora_weights=False``; DoRA magnitudes perturbed off their
initial norms) for plain LoRA, DoRA, rsLoRA, rank/alpha patterns, lora_bias, layers_to_transform and an
embedding; peftcore_jax loads them and reproduces peft's logits factored and merged (fp32, rel err <= 1e-5).
Adapters made and saved here load in peft with no missing or unexpected keys, the same keys peft writes,
and the same logits.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import peftcore_jax as pj
from examples import jax_llama
from peftcore import LoraConfig

pytestmark = pytest.mark.oracle

IDS = np.array([[5, 17, 3, 63, 0, 9, 42], [1, 2, 3, 4, 5, 6, 7]])

CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                 use_dora=True),
    "rslora": dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear",
                     rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"v_proj": 3}),
    "lora_bias": dict(r=3, lora_alpha=5, target_modules=["o_proj", "up_proj"], lora_bias=True),
    "layers": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "embedding": dict(r=3, lora_alpha=4, target_modules=["embed_tokens", "lm_head"]),
}


# lora_bias merges into base biases: that case runs on a Llama with biases
BIASED = {"lora_bias"}


def _base(case: str = ""):
    torch.manual_seed(0)
    with_bias = case in BIASED
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      attention_bias=with_bias, mlp_bias=with_bias)
    return transformers.LlamaForCausalLM(config).eval()


def _params(case: str):
    model = _base(case)
    params = jax_llama.params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return params, jax_llama.spec_from_hf_config(model.config)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS)).logits.numpy()


def _jax_logits(params, spec, adapters=None) -> np.ndarray:
    run = jax.jit(jax_llama.forward, static_argnames="spec")
    return np.asarray(run(params, jnp.asarray(IDS), spec=spec, adapters=adapters))


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _peft_model(case):
    torch.manual_seed(1)
    model = peft.get_peft_model(_base(case), peft.LoraConfig(init_lora_weights=False, **CASES[case])).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # move DoRA off g = 1, where it would equal plain LoRA
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    return model


@contextlib.contextmanager
def _peft_io(case: str):
    """peft 0.21 flags 1-d ``lora_B.bias`` tensors as un-gathered ZeRO-3 shards (a false alarm): ignore only that."""
    with warnings.catch_warnings():
        if case in BIASED:
            warnings.filterwarnings("ignore", message=".*invalid shape", category=peft.utils.warning.PeftWarning)
        yield


def _peft_state(model, case):
    with _peft_io(case):
        return peft.get_peft_model_state_dict(model, save_embedding_layers=False)


def _save_peft(model, path, case):
    with _peft_io(case):
        model.save_pretrained(path, save_embedding_layers=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_logits_factored_and_merged(case, tmp_path):
    params, spec = _params(case)
    model = _peft_model(case)
    _save_peft(model, tmp_path, case)
    expected = _torch_logits(model)
    assert _rel_err(_jax_logits(params, spec), expected) > 1e-3  # the adapter changes the output

    adapters = pj.load_adapter(tmp_path, params)
    peft_keys = set(_peft_state(model, case))
    assert set(pj.adapter_state_dict(adapters)) == peft_keys
    assert _rel_err(_jax_logits(params, spec, adapters), expected) <= 1e-5
    merged = pj.merge(params, adapters)
    assert _rel_err(_jax_logits(merged, spec), expected) <= 1e-5
    with torch.no_grad():
        merged_torch = _torch_logits(model.merge_and_unload())
    assert _rel_err(_jax_logits(merged, spec), merged_torch) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft_with_same_keys_and_logits(case, tmp_path):
    params, spec = _params(case)
    config = LoraConfig(init_lora_weights=False, **CASES[case])
    params, adapters = pj.init_lora(params, config, jax.random.key(3))
    # perturb every leaf so B, biases and DoRA magnitudes are generic
    rng = np.random.default_rng(4)
    adapters = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) * (1.0 + 0.5 * rng.uniform(size=x.shape)), x.dtype), adapters)
    pj.save_adapter(tmp_path, adapters)

    reference = _peft_model(case)  # peft's own keys for the same model and config
    expected_keys = set(_peft_state(reference, case))
    assert set(pj.adapter_state_dict(adapters)) == expected_keys

    with _peft_io(case):
        loaded = peft.PeftModel.from_pretrained(_base(case), tmp_path).eval()
    state = _peft_state(loaded, case)
    assert set(state) == expected_keys
    for key, value in pj.adapter_state_dict(adapters).items():
        np.testing.assert_array_equal(state[key].numpy(), np.asarray(value))
    assert _rel_err(_jax_logits(params, spec, adapters), _torch_logits(loaded)) <= 1e-5


def test_load_result_has_no_missing_or_unexpected_adapter_keys(tmp_path):
    params, _ = _params("dora")
    _, adapters = pj.init_lora(params, LoraConfig(init_lora_weights=False, **CASES["dora"]), jax.random.key(0))
    pj.save_adapter(tmp_path, adapters, adapter_name="other")
    model = peft.get_peft_model(_base(), peft.LoraConfig(**CASES["dora"]))
    result = model.load_adapter(tmp_path / "other", adapter_name="other")
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k and ".other" in k]
