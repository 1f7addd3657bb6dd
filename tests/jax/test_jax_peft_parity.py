"""peftcore_jax against peft beyond one fp32 adapter: saved base embeddings, two active adapters, a bf16 base
with float32 adapters, and PiSSA/OLoRA base rewrites (same tiny torch Llama, the JAX Llama example)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import peftcore_jax as pj
from examples import jax_llama
from peftcore import LoraConfig
from peftcore.errors import ConfigError, IncompatibleKeysError

pytestmark = pytest.mark.oracle

IDS = np.array([[5, 17, 3, 63, 0, 9, 42], [1, 2, 3, 4, 5, 6, 7]])
EMBED_KEY = "base_model.model.model.embed_tokens.base_layer.weight"
HEAD_KEY = "base_model.model.lm_head.base_layer.weight"


def _base(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


@pytest.fixture(scope="module")
def base():
    model = _base()
    params = jax_llama.params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return params, jax_llama.spec_from_hf_config(model.config)


@pytest.fixture(scope="module")
def run():
    return jax.jit(jax_llama.forward, static_argnames="spec")


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS)).logits.float().numpy()


def _logits(run, params, spec, adapters=None) -> np.ndarray:
    return np.asarray(run(params, jnp.asarray(IDS), spec=spec, adapters=adapters), dtype=np.float64)


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _peft(config: dict, adapter_name: str = "default", dtype=torch.float32):
    torch.manual_seed(1)
    return peft.get_peft_model(_base(dtype), peft.LoraConfig(init_lora_weights=False, **config),
                               adapter_name=adapter_name).eval()


def _save_auto(model, path):
    """``save_pretrained`` with peft's default ``save_embedding_layers="auto"``, which says it saves them."""
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(path)


EMBEDDINGS = dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"])


def test_default_save_with_targeted_embeddings_loads_and_matches_peft(base, run, tmp_path):
    params, spec = base
    model = _peft(EMBEDDINGS)
    _save_auto(model, tmp_path)
    saved = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert {EMBED_KEY, HEAD_KEY} <= set(saved)  # peft copied the (unchanged) base embeddings

    adapters = pj.load_adapter(tmp_path, params)  # equal to the tree's own weights: accepted as they are
    assert _rel_err(_logits(run, params, spec, adapters), _torch_logits(model)) <= 1e-5
    same, again = pj.load_adapter(tmp_path, params, with_base_weights=True)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert set(pj.adapter_state_dict(again)) == set(pj.adapter_state_dict(adapters))


def test_saved_base_embeddings_that_differ_are_applied_or_refused(base, run, tmp_path):
    params, spec = base
    model = _peft(EMBEDDINGS)
    with torch.no_grad():  # a trained embedding and head: peft saves and reloads these base weights
        for layer in (model.base_model.model.model.embed_tokens, model.base_model.model.lm_head):
            layer.base_layer.weight.add_(0.5 * torch.randn_like(layer.base_layer.weight))
    _save_auto(model, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    expected = _torch_logits(model)
    assert _rel_err(_torch_logits(reloaded), expected) <= 1e-6  # peft itself puts them back

    with pytest.raises(IncompatibleKeysError, match="with_base_weights=True") as refused:
        pj.load_adapter(tmp_path, params)
    assert EMBED_KEY in str(refused.value) and HEAD_KEY in str(refused.value)
    new_params, adapters = pj.load_adapter(tmp_path, params, with_base_weights=True)
    np.testing.assert_array_equal(new_params["lm_head"]["weight"],
                                  model.base_model.model.lm_head.base_layer.weight.detach().numpy())
    assert new_params["model"]["layers"] is params["model"]["layers"] or all(
        a is b for a, b in zip(jax.tree_util.tree_leaves(new_params["model"]["layers"]),
                               jax.tree_util.tree_leaves(params["model"]["layers"])))
    assert _rel_err(_logits(run, new_params, spec, adapters), expected) <= 1e-5


def test_two_active_adapters_add_like_peft_factored_and_merged(base, run, tmp_path):
    params, spec = base
    model = _peft(dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), adapter_name="first")
    torch.manual_seed(2)
    model.add_adapter("second", peft.LoraConfig(init_lora_weights=False, r=3, lora_alpha=5, use_dora=True,
                                           target_modules=["v_proj", "down_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA off g = 1
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    alone = []
    for active in ("first", "second", ["first", "second"]):
        model.base_model.set_adapter(active)
        alone.append(_torch_logits(model.eval()))
    *alone, expected = alone
    assert min(_rel_err(logits, expected) for logits in alone) > 1e-3  # each adapter matters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # save_embedding_layers="auto" announces itself per adapter
        model.save_pretrained(tmp_path)

    a = pj.load_adapter(tmp_path, params, adapter_name="first")
    b = pj.load_adapter(tmp_path, params, adapter_name="second")
    both = pj.ActiveAdapters((a, b))
    assert len(both.get("model.layers.0.self_attn.v_proj")) == 2 and both.get("lm_head") is None
    assert _rel_err(_logits(run, params, spec, both), expected) <= 1e-5
    assert isinstance(jax_llama._adapter_map([a, b]), pj.ActiveAdapters)

    merged = pj.merge(params, both)
    with torch.no_grad():
        peft_merged = _torch_logits(model.merge_and_unload())
    assert _rel_err(peft_merged, expected) <= 1e-5
    assert _rel_err(_logits(run, merged, spec), peft_merged) <= 1e-5
    restored = pj.unmerge(merged, both, weight_norms=pj.dora_weight_norms(params, both))
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bf16_base_with_float32_adapters_matches_peft_autocast(base, run, tmp_path):
    _, spec = base
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    model = _peft(config, dtype=torch.bfloat16)
    lora_A = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_A.dtype == torch.float32  # peft's autocast_adapter_dtype keeps adapters in float32
    model.save_pretrained(tmp_path)
    state = {k: v.float().numpy() for k, v in _base(torch.bfloat16).state_dict().items()}
    params = jax_llama.params_from_state_dict(state, dtype=jnp.bfloat16)  # exact: bf16 -> f32 -> bf16
    adapters = pj.load_adapter(tmp_path, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(adapters))

    ours = np.asarray(run(params, jnp.asarray(IDS), spec=spec, adapters=adapters))
    assert ours.dtype == jnp.bfloat16
    expected = _torch_logits(model)
    tolerance = 2e-2  # a few bf16 roundings (eps 2**-8) through two layers
    assert _rel_err(ours, expected) <= tolerance
    assert _rel_err(_logits(run, params, spec), expected) > 5 * tolerance  # the adapter's effect is resolved


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_rewrite_the_base_like_peft(init, base, run):
    params, spec = base
    config = dict(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"])
    model = peft.get_peft_model(_base(), peft.LoraConfig(init_lora_weights=init, **config)).eval()
    new_params, adapters = pj.init_lora(params, LoraConfig(init_lora_weights=init, **config), jax.random.key(0))
    leaves = pj.leaf_paths(new_params)
    torch_modules = dict(model.base_model.model.named_modules())
    for path, lora in adapters.params.items():
        layer = torch_modules[path]
        peft_A = layer.lora_A["default"].weight.detach().double().numpy()
        peft_B = layer.lora_B["default"].weight.detach().double().numpy()
        ours = np.asarray(lora.lora_B, np.float64) @ np.asarray(lora.lora_A, np.float64)
        # singular/QR vectors are defined up to sign; B·A and the residual base are not
        np.testing.assert_allclose(ours, peft_B @ peft_A, rtol=1e-5, atol=1e-5 * np.abs(peft_B @ peft_A).max())
        peft_W = layer.base_layer.weight.detach().numpy()
        np.testing.assert_allclose(leaves[f"{path}.weight"], peft_W, rtol=1e-5, atol=1e-5 * np.abs(peft_W).max())
    expected = _torch_logits(model)
    assert _rel_err(_logits(run, new_params, spec, adapters), expected) <= 1e-5
    assert _rel_err(_logits(run, params, spec), expected) <= 1e-5  # at init the model is unchanged


def test_modules_to_save_load_as_base_weights_and_match_peft(base, run, tmp_path):
    params, spec = base
    model = _peft(dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():  # the trained full copy of lm_head that peft saves next to the adapter
        copy = model.base_model.model.lm_head.modules_to_save["default"].weight
        copy.add_(0.5 * torch.randn_like(copy))
    model.save_pretrained(tmp_path)
    expected = _torch_logits(model)
    assert _rel_err(_torch_logits(peft.PeftModel.from_pretrained(_base(), tmp_path).eval()), expected) <= 1e-6

    with pytest.raises(IncompatibleKeysError, match=r"base_model\.model\.lm_head\.weight.*with_base_weights=True"):
        pj.load_adapter(tmp_path, params)
    new_params, adapters = pj.load_adapter(tmp_path, params, with_base_weights=True)
    assert adapters.config.modules_to_save == ["lm_head"]
    np.testing.assert_array_equal(np.asarray(new_params["lm_head"]["weight"]), copy.detach().numpy())
    assert _rel_err(_logits(run, new_params, spec, adapters), expected) <= 1e-5
    # the adapters hold no copy of lm_head: a save would silently drop it, so it is refused
    with pytest.raises(ConfigError, match="modules_to_save"):
        pj.save_adapter(tmp_path / "again", adapters)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_load_as_base_weights_and_match_peft(bias, tmp_path):
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    tree = {name: jnp.asarray(value.detach().numpy()) for name, value in mlp.state_dict().items()}
    tree = {"0": {"weight": tree["0.weight"], "bias": tree["0.bias"]}, "2": {"weight": tree["2.weight"],
                                                                            "bias": tree["2.bias"]}}
    model = peft.get_peft_model(mlp, peft.LoraConfig(r=2, target_modules=["0"], bias=bias, init_lora_weights=False))
    trained = {"all": ["0", "2"], "lora_only": ["0"]}[bias]  # the biases peft trains and saves
    layers = {"0": model.base_model.model[0].base_layer, "2": model.base_model.model[2]}
    with torch.no_grad():
        for name in trained:
            layers[name].bias.add_(torch.randn_like(layers[name].bias))
    model.save_pretrained(tmp_path)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x).numpy()

    new_tree, adapters = pj.load_adapter(tmp_path, tree, with_base_weights=True)
    xj = jnp.asarray(x.numpy())
    hidden = jax.nn.relu(pj.linear(xj, new_tree["0"]["weight"], new_tree["0"]["bias"], adapters["0"]))
    got = pj.linear(hidden, new_tree["2"]["weight"], new_tree["2"]["bias"])
    assert _rel_err(got, expected) <= 1e-5
    for name in ("0", "2"):
        same = np.array_equal(np.asarray(new_tree[name]["bias"]), np.asarray(tree[name]["bias"]))
        assert same == (name not in trained)
    with pytest.raises(ConfigError, match="bias"):
        pj.save_adapter(tmp_path / "again", adapters)
