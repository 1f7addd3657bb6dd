"""peft-trained prompt adapters (prompt tuning, prefix tuning with and without projection, P-tuning MLP and
LSTM) on a tiny Llama with grouped-query attention run in the pure-JAX Llama with the logits of peft on torch
(fp32, rel err <= 1e-5), from peft's saved files and from the live (training-mode) encoder; adapters made and
saved in JAX load in peft with the same logits."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from examples import jax_llama  # noqa: E402
from peftcore import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig  # noqa: E402
from peftcore.methods import prompt_learning as pl  # noqa: E402
from peftcore_jax import prompt_learning as jpl  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5

METHODS = {
    "prompt": (peft.PromptTuningConfig, PromptTuningConfig, {}),
    "prefix": (peft.PrefixTuningConfig, PrefixTuningConfig, {}),
    "prefix-proj": (peft.PrefixTuningConfig, PrefixTuningConfig, dict(prefix_projection=True, encoder_hidden_size=8)),
    "mlp": (peft.PromptEncoderConfig, PromptEncoderConfig, dict(encoder_hidden_size=6)),
    "lstm": (peft.PromptEncoderConfig, PromptEncoderConfig, dict(encoder_reparameterization_type="LSTM",
                                                                encoder_hidden_size=4)),
}


@pytest.fixture(scope="module", autouse=True)
def fp32_jax():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    spec = jax_llama.spec_from_hf_config(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, spec, jax_llama.params_from_state_dict(state, tie_word_embeddings=spec.tie_word_embeddings)


def rel_err(actual, desired):
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    return float(np.max(np.abs(actual - desired)) / np.max(np.abs(desired)))


def inputs():
    ids = np.array([[5, 17, 3, 40, 0, 9], [1, 2, 3, 4, 5, 6]])
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def peft_logits(peft_model, ids, mask):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x renames past_key_values
        return peft_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def jax_logits(params, spec, adapter, ids, mask):
    run = jax.jit(jax_llama.forward_with_prompt, static_argnames="spec")
    return np.asarray(run(params, jnp.asarray(ids), adapter, spec=spec, attention_mask=jnp.asarray(mask)))


def make_peft(model, method, seed):
    peft_cls, _, kwargs = METHODS[method]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft_cls(task_type="CAUSAL_LM", num_virtual_tokens=3, **kwargs))
    with torch.no_grad():  # a "trained" encoder: move every parameter off its initialisation
        for param in peft_model.prompt_encoder["default"].parameters():
            param.add_(0.1 * torch.randn_like(param))
    return peft_model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_saved_adapter_runs_in_jax(llama, method, tmp_path):
    model, spec, params = llama
    peft_model = make_peft(model, method, seed=1)
    ids, mask = inputs()
    expected = peft_logits(peft_model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)
    adapter = jpl.load_prompt_adapter(tmp_path)
    assert adapter.config.inference_mode and set(adapter.params) == {"embedding.weight"}
    assert rel_err(jax_logits(params, spec, adapter, ids, mask), expected) <= RTOL
    # the live, training-mode encoder (LSTM/MLP/projection run in JAX) gives the same logits
    config = pl.prepare_config(METHODS[method][1].from_dict(
        {**json.loads((tmp_path / "adapter_config.json").read_text()), "inference_mode": False}), model.config)
    live = {k: jnp.asarray(v.detach().numpy()) for k, v in peft_model.prompt_encoder["default"].named_parameters()}
    trained = jpl.PromptAdapter.from_config(config, live)
    assert rel_err(jax_logits(params, spec, trained, ids, mask), expected) <= RTOL
    assert rel_err(jpl.prompt_embeddings(trained), jpl.prompt_embeddings(adapter)) <= RTOL


@pytest.mark.parametrize("method", sorted(METHODS))
def test_jax_saved_adapter_loads_in_peft(llama, method, tmp_path):
    model, spec, params = llama
    ours = METHODS[method][1](task_type="CAUSAL_LM", num_virtual_tokens=2, **METHODS[method][2])
    adapter = jpl.init_prompt_adapter(ours, model.config, jax.random.key(3))
    ids, mask = inputs()
    expected = jax_logits(params, spec, adapter, ids, mask)
    jpl.save_prompt_adapter(tmp_path, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(model, tmp_path).eval()
    assert set(dict(loaded.prompt_encoder["default"].named_parameters())) == {"embedding.weight"}
    assert rel_err(expected, peft_logits(loaded, ids, mask)) <= RTOL
