"""(IA)³ adapters move between peft (torch) and peftcore_jax with the same outputs (fp32 rel err <= 1e-5).

A tiny Llama (transformers) and the same weights as a JAX tree (``examples/jax_llama.py``): peft's random
(IA)³ adapters load here and give peft's logits factored and merged; ours load in peft with no missing or
unexpected keys and the same logits; two active adapters multiply as in peft. GPT-2 ``Conv1D`` and ``Conv2d``
layers are checked module by module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peftcore_jax as pj  # noqa: E402
from peftcore.methods.ia3 import IA3Config  # noqa: E402

from tests.oracle.jax_torch_llama import IDS, fp32_jax, llama  # noqa: E402,F401  (fixtures)
from tests.oracle.jax_torch_llama import jax_logits as _jax_logits  # noqa: E402
from tests.oracle.jax_torch_llama import rel_err as _rel_err  # noqa: E402
from tests.oracle.jax_torch_llama import tiny_llama as _base  # noqa: E402
from tests.oracle.jax_torch_llama import torch_logits as _torch_logits  # noqa: E402

pytestmark = pytest.mark.oracle

CASES = {
    "explicit": dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "llama_defaults": dict(),
    "regex": dict(target_modules=r".*layers\.1\.(self_attn\.v_proj|mlp\.gate_proj)",
                  feedforward_modules=r".*mlp\.gate_proj"),
}


def _peft_model(case, seed=1):
    torch.manual_seed(seed)
    return peft.get_peft_model(_base(), peft.IA3Config(init_ia3_weights=False, **CASES[case])).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_logits_factored_and_merged(case, llama, tmp_path):
    params, spec = llama
    model = _peft_model(case)
    model.save_pretrained(tmp_path)
    expected = _torch_logits(model)
    assert _rel_err(_jax_logits(params, spec), expected) > 1e-3  # the adapter changes the output

    adapters = pj.load_adapter(tmp_path, params)
    assert set(pj.adapter_state_dict(adapters)) == set(peft.get_peft_model_state_dict(model))
    assert _rel_err(_jax_logits(params, spec, adapters), expected) <= 1e-5
    merged = pj.merge(params, adapters)
    with torch.no_grad():
        merged_torch = _torch_logits(model.merge_and_unload())
    assert _rel_err(_jax_logits(merged, spec), merged_torch) <= 1e-5
    assert _rel_err(_jax_logits(merged, spec), expected) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft_with_same_keys_and_logits(case, llama, tmp_path):
    params, spec = llama
    config = IA3Config(init_ia3_weights=False, **CASES[case])
    adapters = pj.init_ia3(params, config, jax.random.key(3), model_type="llama")
    pj.save_adapter(tmp_path, adapters)

    expected_keys = set(peft.get_peft_model_state_dict(_peft_model(case)))
    assert set(pj.adapter_state_dict(adapters)) == expected_keys
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    state = peft.get_peft_model_state_dict(loaded)
    assert set(state) == expected_keys
    for key, value in pj.adapter_state_dict(adapters).items():
        np.testing.assert_array_equal(state[key].numpy(), np.asarray(value))
    assert _rel_err(_jax_logits(params, spec, adapters), _torch_logits(loaded)) <= 1e-5

    other = peft.get_peft_model(_base(), peft.IA3Config(**CASES[case]))
    result = other.load_adapter(tmp_path, adapter_name="other")
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "ia3_l.other" in k]


def test_two_active_adapters_multiply_as_in_peft(llama, tmp_path):
    params, spec = llama
    model = _peft_model("explicit")
    model.add_adapter("second", peft.IA3Config(init_ia3_weights=False, **CASES["explicit"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l.second" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path, selected_adapters=["default", "second"])
    model.base_model.set_adapter(["default", "second"])
    expected = _torch_logits(model)
    first = pj.load_adapter(tmp_path, params)
    second = pj.load_adapter(tmp_path, params, adapter_name="second")
    both = pj.ActiveAdapters((first, second))
    assert _rel_err(_jax_logits(params, spec, both), expected) <= 1e-5
    assert _rel_err(_jax_logits(pj.merge(params, both), spec), expected) <= 1e-5
    assert _rel_err(_jax_logits(params, spec, first), expected) > 1e-4


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = transformers.pytorch_utils.Conv1D(6, 5)  # (in=5, out=6), weight stored (5, 6)
        self.c_proj = transformers.pytorch_utils.Conv1D(5, 6)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv_ff = torch.nn.Conv2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.c_proj(self.c_fc(x))


@pytest.mark.parametrize("feedforward", [False, True])
def test_conv1d_and_conv2d_layers_match_peft(feedforward, tmp_path):
    torch.manual_seed(5)
    ff = ["c_fc", "conv_ff"] if feedforward else ["c_proj"]
    config = dict(target_modules=["c_fc", "c_proj", "conv", "conv_ff"], feedforward_modules=ff, fan_in_fan_out=True)
    model = peft.get_peft_model(_Layers(), peft.IA3Config(init_ia3_weights=False, **config)).eval()
    model.save_pretrained(tmp_path)
    inner = model.base_model.model
    tree = {name: {leaf: jnp.asarray(value.detach().numpy())
                   for leaf, value in module.get_base_layer().named_parameters()}
            for name, module in inner.named_children()}
    adapters = pj.load_adapter(tmp_path, tree)
    assert adapters["c_fc"].fan_in_fan_out and adapters["conv"].kind == "conv"
    x = torch.randn(2, 5)
    image = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want_mlp = inner(x).numpy()
        want_conv = inner.conv_ff(inner.conv(image)).numpy()

    def run(tree, ads):
        def conv1d(h, name):  # GPT-2 Conv1D keeps (in, out) weights
            return pj.linear(h, tree[name]["weight"], tree[name]["bias"], ads.get(name), fan_in_fan_out=True)

        mlp = conv1d(conv1d(jnp.asarray(x.numpy()), "c_fc"), "c_proj")
        y = pj.convolve(jnp.asarray(image.numpy()), tree["conv"], ads.get("conv"), padding=1)
        return mlp, pj.convolve(y, tree["conv_ff"], ads.get("conv_ff"), stride=2)

    for got, want in zip(run(tree, adapters), (want_mlp, want_conv)):
        assert _rel_err(got, want) <= 1e-5
    merged = pj.merge(tree, adapters)
    for got, want in zip(run(merged, {}), (want_mlp, want_conv)):
        assert _rel_err(got, want) <= 1e-5
