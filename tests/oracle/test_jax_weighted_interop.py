"""``peftcore_jax.add_weighted_adapter`` against peft's on the same two adapters (tiny Llama, fp32 rel err <= 1e-5).

Two random adapters are made and saved by peft; peft combines them on the torch model, we combine the same files
loaded into the JAX tree. The combined adapters give the same logits, and ours, saved, loads in peft with no
missing or unexpected keys and the same logits (so the new config matches peft's too).
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftcore_jax as pj  # noqa: E402
from peftcore.errors import ConfigError  # noqa: E402

from tests.oracle.jax_torch_llama import fp32_jax, llama  # noqa: E402,F401  (fixtures)
from tests.oracle.jax_torch_llama import jax_logits as _jax_logits  # noqa: E402
from tests.oracle.jax_torch_llama import rel_err as _rel_err  # noqa: E402
from tests.oracle.jax_torch_llama import tiny_llama as _base  # noqa: E402
from tests.oracle.jax_torch_llama import torch_logits as _torch_logits  # noqa: E402

pytestmark = pytest.mark.oracle

WEIGHTS = [0.7, -0.4]
LORA = {"first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True)}
IA3 = {"first": dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
       "second": dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])}


def _peft_pair(tmp_path, method: str):
    configs = LORA if method == "lora" else IA3
    make = (lambda kw: peft.LoraConfig(init_lora_weights=False, **kw)) if method == "lora" else \
        (lambda kw: peft.IA3Config(init_ia3_weights=False, **kw))
    torch.manual_seed(1)
    model = peft.get_peft_model(_base(), make(configs["first"]), adapter_name="first")
    model.add_adapter("second", make(configs["second"]))
    model.save_pretrained(tmp_path / "pair")
    return model.eval()


def _check(tmp_path, llama, model, ours, *, peft_kwargs):
    params, spec = llama
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "combo", **peft_kwargs)
    model.set_adapter("combo")
    expected = _torch_logits(model)
    assert _rel_err(_jax_logits(params, spec), expected) > 1e-3  # the combination changes the output
    assert _rel_err(_jax_logits(params, spec, ours), expected) <= 1e-5
    pj.save_adapter(tmp_path / "ours", ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours" / "combo"
                                                if (tmp_path / "ours" / "combo").is_dir() else tmp_path / "ours")
    assert _rel_err(_torch_logits(loaded.eval()), expected) <= 1e-5


@pytest.mark.parametrize("combination", ["cat", "linear", "svd", "svd-rank-3"])
def test_lora_combination_matches_peft(tmp_path, llama, combination):
    params, _ = llama
    model = _peft_pair(tmp_path, "lora")
    pair = [pj.load_adapter(tmp_path / "pair", params, adapter_name=name) for name in ("first", "second")]
    combination_type, _, rank = combination.partition("-rank-")
    options = dict(combination_type=combination_type, svd_rank=int(rank) if rank else None)
    ours = pj.add_weighted_adapter(pair, WEIGHTS, adapter_name="combo", **options)
    assert set(ours.params) == set(pair[0].params) | set(pair[1].params)
    _check(tmp_path, llama, model, ours, peft_kwargs=options)


def test_ia3_combination_matches_peft(tmp_path, llama):
    params, _ = llama
    model = _peft_pair(tmp_path, "ia3")
    pair = [pj.load_adapter(tmp_path / "pair", params, adapter_name=name) for name in ("first", "second")]
    ours = pj.add_weighted_adapter(pair, WEIGHTS, adapter_name="combo")
    _check(tmp_path, llama, model, ours, peft_kwargs={})


def test_mismatched_inputs_are_refused(tmp_path, llama):
    params, _ = llama
    _peft_pair(tmp_path, "lora")
    a = pj.load_adapter(tmp_path / "pair", params, adapter_name="first")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        pj.add_weighted_adapter([a], [1.0, 2.0], adapter_name="x")
    ia3 = pj.init_ia3(params, peftcore_ia3_config())
    with pytest.raises(ConfigError, match="peft_type"):
        pj.add_weighted_adapter([a, ia3], [1.0, 1.0], adapter_name="x")
    b = pj.load_adapter(tmp_path / "pair", params, adapter_name="second")
    with pytest.raises(ConfigError, match="combination_type"):
        pj.add_weighted_adapter([a, b], [1.0, 1.0], adapter_name="x", combination_type="mean")


def peftcore_ia3_config():
    from peftcore import IA3Config

    return IA3Config(target_modules=["k_proj"], feedforward_modules=[])
