"""``peftcore merge`` against peft's ``merge_and_unload()`` + ``save_pretrained`` on a tiny Llama."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402

from peftcore.cli import main  # noqa: E402

pytestmark = pytest.mark.oracle
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARD = "12KB"  # the fp32 tiny Llama is ~28 KB: several shards
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=6, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "rslora_patterns": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "gate_proj", "lm_head", "embed_tokens"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "gate_proj": 6}, alpha_pattern={r"layers\.0\..*q_proj": 3},
    ),
}


def _tiny_llama(dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _build(tmp, variant, dtype, shard):
    """(base folder, adapter folder, peft's merged folder)."""
    base_dir, adapter_dir, ref_dir = tmp / "base", tmp / "adapter", tmp / "ref"
    kwargs = {"max_shard_size": shard} if shard else {}
    _tiny_llama(dtype).save_pretrained(base_dir, **kwargs)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
    lora = peft.LoraConfig(init_lora_weights=False, **VARIANTS[variant])
    peft_model = peft.get_peft_model(model, lora)
    # embedding targets make peft save the whole embedding layer too; merge must apply it and the delta
    save_kwargs = {"save_embedding_layers": True} if "embed_tokens" in lora.target_modules else {}
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
            elif "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(adapter_dir, **save_kwargs)
    layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    (tmp / "peft_layers.json").write_text(json.dumps({
        name: {"r": m.r["default"], "scaling": m.scaling["default"], "parameters": sum(
            p.numel() for n, p in m.named_parameters() if "lora_" in n)} for name, m in layers.items()}))
    peft_model.merge_and_unload().save_pretrained(ref_dir, **kwargs)
    return base_dir, adapter_dir, ref_dir


@pytest.mark.parametrize("shard", [None, SHARD], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_merge_matches_peft(tmp_path, variant, shard):
    base, adapter, ref = _build(tmp_path, variant, torch.float32, shard)
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    ours, theirs = _tensors(out), _tensors(ref)
    assert ours.keys() == theirs.keys()
    changed = 0
    for key, expected in theirs.items():
        actual = ours[key]
        assert actual.dtype == expected.dtype == torch.float32, key
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()), msg=key)
        changed += not torch.equal(actual, _tensors(base)[key]) if key.endswith("proj.weight") else 0
    assert changed > 0
    if shard:
        assert (out / "model.safetensors.index.json").is_file()
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
        assert len(list(out.glob("*.safetensors"))) > 1
        # the input's sharding is kept (peft's save may group the merged model's tensors differently)
        index = (out / "model.safetensors.index.json").read_text()
        assert index == (base / "model.safetensors.index.json").read_text()
        assert json.loads(index)["weight_map"].keys() == theirs.keys()
    else:
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("variant", ["lora", "rslora_patterns", "dora"])
def test_bf16_merge_within_one_ulp_of_peft(tmp_path, variant):
    base, adapter, ref = _build(tmp_path, variant, torch.bfloat16, SHARD)
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    ours, theirs = _tensors(out), _tensors(ref)
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        assert ours[key].dtype == torch.bfloat16, key
        ulps = (ours[key].view(torch.int16).int() - expected.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, f"{key}: {int(ulps.max())} ulps"


def test_merge_into_single_file_path(tmp_path):
    base, adapter, ref = _build(tmp_path, "lora", torch.float32, None)
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base / "model.safetensors"), "--adapter", str(adapter),
                 "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    for key, expected in _tensors(ref).items():
        torch.testing.assert_close(_tensors(out)[key], expected, rtol=1e-6, atol=1e-7)


def test_failing_merge_leaves_no_output(tmp_path, capsys):
    base, adapter, _ = _build(tmp_path, "lora", torch.float32, SHARD)
    other = tmp_path / "other"
    torch.manual_seed(3)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64))
    wide.save_pretrained(other)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", "--base", str(other), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftcore: error:") and "\n" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "adapter", "ref", "other", "peft_layers.json"])


def test_existing_output_needs_overwrite(tmp_path, capsys):
    base, adapter, ref = _build(tmp_path, "lora", torch.float32, None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    assert main([*args, "--overwrite", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "model.layers.0.self_attn.q_proj.weight" in summary["merged_tensors"]
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "adapter", "ref", "out", "peft_layers.json"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inspect_agrees_with_peft_layers(tmp_path, capsys, variant):
    _, adapter, _ = _build(tmp_path, variant, torch.float32, None)
    expected = json.loads((tmp_path / "peft_layers.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    modules = {m["module"]: m for m in info["modules"]}
    assert modules.keys() == expected.keys()
    for name, layer in expected.items():
        assert modules[name]["r"] == layer["r"], name
        assert modules[name]["scaling"] == pytest.approx(layer["scaling"], rel=1e-12), name
        assert modules[name]["parameters"] == layer["parameters"], name
        assert modules[name]["dora"] == (variant == "dora")
    unusual = [a for a in info["anomalies"] if "fits no adapter container" not in a]
    assert unusual == []
    # peft saves the whole embedding layer next to an embedding adapter: reported, not hidden
    saved_embedding = any("embed_tokens.base_layer" in k for k in info["other_keys"])
    assert saved_embedding == ("embed_tokens" in VARIANTS[variant]["target_modules"])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path, use_dora):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=use_dora, init_lora_weights=False,
                           target_modules=["c_attn", "c_proj"])
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "ref")
    out = tmp_path / "out"
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(out), "--quiet"]) == 0
    ours, theirs = _tensors(out), _tensors(tmp_path / "ref")
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        torch.testing.assert_close(ours[key], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()), msg=key)
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(ours[key], _tensors(tmp_path / "base")[key])
