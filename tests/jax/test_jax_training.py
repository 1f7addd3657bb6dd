"""A LoRA trained in JAX (jitted step, hand-written SGD on the trainable partition) loads in peft unchanged."""

from __future__ import annotations

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

IDS = np.array([[5, 17, 3, 63, 0, 9, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base():
    model = _base()
    params = jax_llama.params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return params, jax_llama.spec_from_hf_config(model.config)


def _loss(tree, ids, spec):
    logits = jax_llama.forward(tree["base"], ids[:, :-1], spec=spec, adapters=tree["lora"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_jitted_sgd_trains_only_the_adapter_and_peft_loads_it(use_dora, base, tmp_path):
    params, spec = base
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        use_dora=use_dora)
    params, adapters = pj.init_lora(params, config, jax.random.key(0))
    tree = {"base": params, "lora": adapters}
    trainable, frozen = pj.partition(tree)
    assert jax.tree_util.tree_leaves(trainable["base"]) == []
    assert jax.tree_util.tree_leaves(frozen["lora"]) == []
    ids = jnp.asarray(IDS)

    @jax.jit
    def step(trainable, frozen):
        loss, grads = jax.value_and_grad(lambda t: _loss(pj.combine(t, frozen), ids, spec))(trainable)
        return jax.tree_util.tree_map(lambda p, g: p - 2.0 * g, trainable, grads), loss

    losses = []
    for _ in range(25):
        trainable, loss = step(trainable, frozen)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses

    trained = pj.combine(trainable, frozen)
    for before, after in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained["base"])):
        assert after is before
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(adapters),
                                                         jax.tree_util.tree_leaves(trained["lora"]))]
    assert all(changed)

    pj.save_adapter(tmp_path, trained["lora"])
    model = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(IDS)).logits.numpy()
    ours = jax_llama.forward(params, ids, spec=spec, adapters=trained["lora"])
    assert _rel_err(ours, expected) <= 1e-5
    assert _rel_err(jax_llama.forward(pj.merge(params, trained["lora"]), ids, spec=spec), expected) <= 1e-5


def test_grad_of_adapters_is_an_adapters_tree_with_the_same_static_data(base):
    params, spec = base
    _, adapters = pj.init_lora(params, LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(1))
    grads = jax.jit(jax.grad(lambda a: _loss({"base": params, "lora": a}, jnp.asarray(IDS), spec)))(adapters)
    assert isinstance(grads, pj.LoraAdapters)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
    # lora_B starts at zero, so only it gets a gradient at the first step (A's is multiplied by B = 0)
    g = grads["model.layers.0.self_attn.q_proj"]
    assert float(jnp.abs(g.lora_B).max()) > 0 and float(jnp.abs(g.lora_A).max()) == 0
    mask = pj.trainable_mask({"base": params, "lora": adapters})
    assert all(jax.tree_util.tree_leaves(mask["lora"])) and not any(jax.tree_util.tree_leaves(mask["base"]))
