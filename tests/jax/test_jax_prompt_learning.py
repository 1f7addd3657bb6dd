"""peftcore_jax.prompt_learning: the adapter pytree under jit/grad, peft's files, initialisation, and the
example Llama's soft-prompt / key-value-prefix / padding-mask paths (no torch needed)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from examples import jax_llama
from peftcore import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.io import save_adapter
from peftcore_jax import prompt_learning as jpl

MODEL = dict(model_type="llama", num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=32)
SPEC = jax_llama.LlamaSpec(num_attention_heads=4, num_key_value_heads=2, head_dim=4)
CONFIGS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-proj": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
    "mlp": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=5),
    "lstm": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                        encoder_hidden_size=3),
}


@pytest.fixture(scope="module")
def base():
    return jax_llama.init_params(jax.random.key(0), spec=SPEC, vocab_size=32, hidden_size=16, intermediate_size=24,
                                 num_hidden_layers=2)


def ids_and_mask():
    ids = jnp.asarray([[3, 7, 1, 9, 4], [2, 2, 5, 6, 8]])
    return ids, jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_jit_grad_and_file_round_trip(base, name, tmp_path):
    adapter = jpl.init_prompt_adapter(CONFIGS[name](), MODEL, jax.random.key(1))
    ids, mask = ids_and_mask()

    def loss(adapter):
        return jnp.sum(jax_llama.forward_with_prompt(base, ids, adapter, spec=SPEC, attention_mask=mask) ** 2)

    eager = jax_llama.forward_with_prompt(base, ids, adapter, spec=SPEC, attention_mask=mask)
    jitted = jax.jit(jax_llama.forward_with_prompt, static_argnames="spec")(base, ids, adapter, spec=SPEC,
                                                                             attention_mask=mask)
    virtual = 0 if name.startswith("prefix") else 3
    assert eager.shape == (2, 5 + virtual, 32)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-6)
    grads = jax.grad(loss)(adapter)
    assert set(grads.params) == set(adapter.params)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in grads.params.values())  # every encoder leaf is trained

    folder = jpl.save_prompt_adapter(tmp_path, adapter)
    assert set(load_file(str(folder / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["inference_mode"] is True and written["num_layers"] == 2
    loaded = jpl.load_prompt_adapter(tmp_path)
    assert set(loaded.params) == {"embedding.weight"}
    again = jax_llama.forward_with_prompt(base, ids, loaded, spec=SPEC, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(again), np.asarray(eager), rtol=1e-5, atol=1e-6)


def test_padding_is_masked(base):
    """Changing padded tokens leaves the other positions' logits unchanged (virtual tokens stay attended)."""
    for name in ("prompt", "prefix"):
        adapter = jpl.init_prompt_adapter(CONFIGS[name](), MODEL, jax.random.key(2))
        ids, mask = ids_and_mask()
        other = ids.at[1, :2].set(jnp.asarray([30, 31]))
        a = jax_llama.forward_with_prompt(base, ids, adapter, spec=SPEC, attention_mask=mask)
        b = jax_llama.forward_with_prompt(base, other, adapter, spec=SPEC, attention_mask=mask)
        tail = a.shape[1] - 3
        np.testing.assert_allclose(np.asarray(a[:, tail:]), np.asarray(b[:, tail:]), rtol=1e-5, atol=1e-6)
        unmasked = jax_llama.forward_with_prompt(base, other, adapter, spec=SPEC)
        assert not np.allclose(np.asarray(unmasked[1, tail:]), np.asarray(a[1, tail:]), atol=1e-4)


def test_prompt_changes_output_and_broadcasts(base):
    ids, _ = ids_and_mask()
    plain = jax_llama.forward(base, ids, spec=SPEC)
    adapter = jpl.init_prompt_adapter(CONFIGS["prefix"](), MODEL, jax.random.key(4))
    prefix = jpl.get_prompt(adapter, batch_size=1)
    assert prefix[0][0].shape == (1, 2, 3, 4)  # (batch, kv heads, T, head_dim)
    with_prefix = jax_llama.forward(base, ids, spec=SPEC, prefix=prefix)
    full = jax_llama.forward(base, ids, spec=SPEC, prefix=jpl.get_prompt(adapter, batch_size=2))
    np.testing.assert_allclose(np.asarray(with_prefix), np.asarray(full), rtol=1e-6)
    assert not np.allclose(np.asarray(with_prefix), np.asarray(plain), atol=1e-4)
    soft = jpl.get_prompt(jpl.init_prompt_adapter(CONFIGS["prompt"](), MODEL, jax.random.key(5)), batch_size=2)
    with_soft = jax_llama.forward(base, ids, spec=SPEC, soft_prompt=soft[0])
    assert with_soft.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="prefix has 1 layers"):
        jax_llama.forward(base, ids, spec=SPEC, prefix=prefix[:1])


def test_text_and_sample_vocab_init(base):
    table = base["model"]["embed_tokens"]["weight"]
    calls = []

    def tokenizer(text):
        calls.append(text)
        return {"input_ids": [4, 9]}

    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello",
                                tokenizer_name_or_path="any")
    adapter = jpl.init_prompt_adapter(config, MODEL, jax.random.key(0), word_embeddings=table, tokenizer=tokenizer)
    assert calls == ["hello"]
    np.testing.assert_array_equal(np.asarray(adapter.params["embedding.weight"]), np.asarray(table)[[4, 9, 4]])
    sampled = jpl.init_prompt_adapter(PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
                                      MODEL, jax.random.key(0), word_embeddings=table)
    rows = np.asarray(sampled.params["embedding.weight"])
    assert all(any(np.array_equal(r, t) for t in np.asarray(table)) for r in rows)
    with pytest.raises(ConfigError, match="needs the model's word_embeddings"):
        jpl.init_prompt_adapter(config, MODEL, jax.random.key(0))
    with pytest.raises(ConfigError, match="token_ids or a tokenizer"):
        jpl.init_prompt_adapter(config, MODEL, jax.random.key(0), word_embeddings=table)


def test_load_errors(tmp_path):
    adapter = jpl.init_prompt_adapter(CONFIGS["mlp"](), MODEL, jax.random.key(1))
    folder = jpl.save_prompt_adapter(tmp_path / "ok", adapter)
    extra = dict(load_file(str(folder / "adapter_model.safetensors")), **{"base_model.classifier.weight": np.ones(2, np.float32)})
    save_file(extra, str(folder / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleKeysError, match="base_model.classifier.weight"):
        jpl.load_prompt_adapter(folder)
    save_file({"prompt_embeddings": np.ones((2, 16), np.float32)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"prompt_embeddings has shape \(2, 16\)"):
        jpl.load_prompt_adapter(folder)
    lora = save_adapter(tmp_path / "lora", LoraConfig(r=1, target_modules=["q_proj"]), {})
    with pytest.raises(ConfigError, match="not a prompt-learning one"):
        jpl.load_prompt_adapter(lora)
    with pytest.raises(IncompatibleKeysError, match="do not match"):
        jpl.PromptAdapter.from_config(adapter.config, {"embedding.weight": jnp.zeros((3, 16))})
