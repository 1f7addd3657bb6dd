"""``peftcore merge`` / ``inspect`` on pruned AdaLoRA adapters, against peft's reloaded model."""

from __future__ import annotations

import json
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peftcore.cli import main  # noqa: E402

pytestmark = pytest.mark.oracle
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64)


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _build(tmp, model_cls, config, *, lora_alpha=8, shard=None, **adalora):
    """Base, a pruned AdaLoRA adapter (peft's allocator on synthetic grads) and peft's merge of it, reloaded."""
    torch.manual_seed(0)
    kwargs = {"max_shard_size": shard} if shard else {}
    model_cls(config).save_pretrained(tmp / "base", **kwargs)
    ada = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10, init_lora_weights=False, lora_alpha=lora_alpha,
                             **adalora)
    peft_model = peft.get_peft_model(model_cls.from_pretrained(tmp / "base"), ada)
    peft_model.train()
    torch.manual_seed(1)
    for step in range(1, 6):
        for p in peft_model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        peft_model.base_model.update_and_allocate(step)
    rank_pattern = peft_model.peft_config["default"].rank_pattern
    assert any(not all(mask) for mask in rank_pattern.values())
    peft_model.save_pretrained(tmp / "adapter")
    # the reference is the saved (pruned) adapter as peft loads it: resized layers, ranknum kept at init_r
    with warnings.catch_warnings():
        # peft 0.21.2 checks AdaLoRA's '<module>.lora_E' rank_pattern keys with LoRA's module matching
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        reloaded = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp / "base"), tmp / "adapter")
    layers = {name.removeprefix("base_model.model."): m for name, m in reloaded.named_modules()
              if isinstance(m, peft.tuners.adalora.AdaLoraLayer)}
    (tmp / "peft_layers.json").write_text(json.dumps({
        name: {"r": m.r["default"], "scaling": m.scaling["default"] / (float(m.ranknum["default"]) + 1e-5),
               "parameters": sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)}
        for name, m in layers.items()}))
    reloaded.merge_and_unload().save_pretrained(tmp / "ref", **kwargs)
    return tmp / "base", tmp / "adapter", tmp / "ref"


def _assert_merge_matches(base, adapter, ref, out):
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    ours, theirs, before = _tensors(out), _tensors(ref), _tensors(base)
    assert ours.keys() == theirs.keys()
    changed = 0
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype == torch.float32, key
        torch.testing.assert_close(ours[key], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()), msg=key)
        changed += not torch.equal(ours[key], before[key])
    return changed


@pytest.mark.parametrize("shard", [None, "12KB"], ids=["single", "sharded"])
def test_llama_adalora_merge_matches_peft(tmp_path, shard):
    base, adapter, ref = _build(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA),
                                shard=shard, target_modules=["q_proj", "v_proj"])
    assert _assert_merge_matches(base, adapter, ref, tmp_path / "out") == 4  # q_proj, v_proj of 2 layers


def test_adalora_nonpositive_alpha_uses_kept_rank(tmp_path):
    base, adapter, ref = _build(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA),
                                lora_alpha=0, target_modules=["q_proj", "v_proj"])
    assert _assert_merge_matches(base, adapter, ref, tmp_path / "out") == 4


def test_gpt2_conv1d_adalora_merge_matches_peft(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    base, adapter, ref = _build(tmp_path, transformers.GPT2LMHeadModel, config, fan_in_fan_out=True,
                                target_modules=["c_attn", "c_proj"])
    assert _assert_merge_matches(base, adapter, ref, tmp_path / "out") == 6  # c_attn, attn/mlp c_proj, 2 layers


def test_inspect_reports_adalora_kept_ranks(tmp_path, capsys):
    _, adapter, _ = _build(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA),
                           target_modules=["q_proj", "v_proj"])
    expected = json.loads((tmp_path / "peft_layers.json").read_text())
    saved = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["init_r"], info["target_r"]) == ("ADALORA", 6, 2)
    modules = {m["module"]: m for m in info["modules"]}
    assert modules.keys() == expected.keys()
    for name, layer in expected.items():
        assert modules[name]["r"] == layer["r"] == sum(saved[f"{name}.lora_E"]), name
        assert modules[name]["scaling"] == pytest.approx(layer["scaling"], rel=1e-6), name
        assert modules[name]["parameters"] == layer["parameters"], name
        assert (modules[name]["in_features"], modules[name]["out_features"]) == (16, 16 if "q_proj" in name else 8)
    assert info["anomalies"] == []
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "method        ADALORA" in text and "init_r / target_r / alpha  6 / 2 / 8" in text


def test_adalora_missing_lora_E_is_refused(tmp_path, capsys):
    base, adapter, _ = _build(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA),
                              target_modules=["q_proj", "v_proj"])
    weights = {k: v for k, v in _tensors(adapter).items() if not k.endswith("layers.1.self_attn.q_proj.lora_E")}
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    anomalies = json.loads(capsys.readouterr().out)["anomalies"]
    assert anomalies == ["module 'model.layers.1.self_attn.q_proj' has no lora_E tensor"]
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.q_proj" in err and "lora_E" in err
    assert not out.exists()


def test_verify_checks_every_pruned_adalora_layer(tmp_path, capsys):
    _, adapter, _ = _build(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA),
                           target_modules=["q_proj", "v_proj"])
    peft_layers = json.loads((tmp_path / "peft_layers.json").read_text())
    capsys.readouterr()
    assert main(["verify", str(adapter), "--backends", "numpy,torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and {row["module"] for row in report["layers"]} == set(peft_layers)
    for row in report["layers"]:
        assert row["shape"][0] in (LLAMA["hidden_size"], LLAMA["hidden_size"] // 2)  # q (16) / grouped v (8)
        assert row["shape"][1] == LLAMA["hidden_size"]
        for errors in row["backends"].values():
            assert errors["relative_error"] <= 1e-6
