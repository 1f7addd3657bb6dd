"""``peftcore merge`` / ``inspect`` on (IA)³ adapters, against peft's ``merge_and_unload``."""

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
GPT2 = dict(n_embd=16, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _random_vectors(model):
    # peft initialises (IA)³ to ones; random vectors make every scaled row/column visible
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) + 0.5)


def _build_transformers(tmp, model_cls, config, ia3_config):
    torch.manual_seed(0)
    base = model_cls(config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):  # GPT-2 starts them at zero, where scaling shows nothing
                p.normal_()
    base.save_pretrained(tmp / "base")
    model = peft.get_peft_model(model_cls.from_pretrained(tmp / "base"), ia3_config)
    _random_vectors(model)
    model.save_pretrained(tmp / "adapter")
    model.merge_and_unload().save_pretrained(tmp / "ref")
    return tmp / "base", tmp / "adapter", tmp / "ref"


def _assert_merge_matches(base, adapter, ref, out):
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 0
    ours, theirs, before = _tensors(out), _tensors(ref), _tensors(base)
    assert ours.keys() == theirs.keys()
    changed = 0
    for key, expected in theirs.items():
        torch.testing.assert_close(ours[key], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()), msg=key)
        changed += not torch.equal(ours[key], before[key])
    return changed


def test_llama_ia3_merge_matches_peft(tmp_path):
    config = transformers.LlamaConfig(**LLAMA)
    ia3 = peft.IA3Config(task_type="CAUSAL_LM")  # peft's defaults: k, v, down_proj (feed-forward)
    base, adapter, ref = _build_transformers(tmp_path, transformers.LlamaForCausalLM, config, ia3)
    assert _assert_merge_matches(base, adapter, ref, tmp_path / "out") == 3 * LLAMA["num_hidden_layers"]


def test_gpt2_conv1d_ia3_merge_scales_weights_and_biases_like_peft(tmp_path):
    config = transformers.GPT2Config(**GPT2)
    ia3 = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"],
                         feedforward_modules=["mlp.c_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base, adapter, ref = _build_transformers(tmp_path, transformers.GPT2LMHeadModel, config, ia3)
    # peft switches on fan_in_fan_out for Conv1D, warns, and saves the switched config
    assert any("fan_in_fan_out" in str(w.message) for w in caught)
    # c_attn, attn.c_proj, c_fc: weight and bias; mlp.c_proj (feed-forward): weight only
    assert _assert_merge_matches(base, adapter, ref, tmp_path / "out") == 7 * GPT2["n_layer"]


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3)
        self.grouped = torch.nn.Conv2d(6, 6, 3, groups=2)
        self.head = torch.nn.Linear(6, 5)


@pytest.mark.parametrize("feedforward", [[], ["grouped"], ["conv", "grouped", "head"]], ids=str)
def test_conv_ia3_merge_matches_peft(tmp_path, feedforward):
    torch.manual_seed(0)
    base = _ConvNet()
    (tmp_path / "base").mkdir()
    save_file({k: v.clone() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    model = peft.get_peft_model(base, peft.IA3Config(target_modules=["conv", "grouped", "head"],
                                                     feedforward_modules=feedforward))
    _random_vectors(model)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "ref").mkdir()
    save_file(model.merge_and_unload().state_dict(), tmp_path / "ref" / "model.safetensors")
    changed = _assert_merge_matches(tmp_path / "base", tmp_path / "adapter", tmp_path / "ref", tmp_path / "out")
    assert changed == 6 - len(feedforward)  # feed-forward layers keep their bias


def test_ia3_safe_merge_refuses_non_finite_vectors(tmp_path):
    torch.manual_seed(0)
    base = _ConvNet()
    save_file({k: v.clone() for k, v in base.state_dict().items()}, tmp_path / "model.safetensors")
    model = peft.get_peft_model(base, peft.IA3Config(target_modules=["head"], feedforward_modules=[]))
    with torch.no_grad():
        model.base_model.model.head.ia3_l["default"][0, 0] = float("inf")
    model.save_pretrained(tmp_path / "adapter")
    code = main(["merge", "--base", str(tmp_path / "model.safetensors"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out"), "--safe", "--quiet"])
    assert code != 0 and not (tmp_path / "out").exists()


def test_ia3_vector_of_another_model_is_refused(tmp_path, capsys):
    config = transformers.LlamaConfig(**LLAMA)
    _, adapter, _ = _build_transformers(tmp_path, transformers.LlamaForCausalLM, config,
                                        peft.IA3Config(task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 24})).save_pretrained(
        tmp_path / "other")
    code = main(["merge", "--base", str(tmp_path / "other"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code != 0 and "down_proj" in capsys.readouterr().err


def test_inspect_reports_ia3_scaling_side(tmp_path, capsys):
    config = transformers.LlamaConfig(**LLAMA)
    _, adapter, _ = _build_transformers(tmp_path, transformers.LlamaForCausalLM, config,
                                        peft.IA3Config(task_type="CAUSAL_LM"))
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "IA3" and info["anomalies"] == []
    scales = {m["module"].rsplit(".", 1)[-1]: (m["scales"], m.get("in_features"), m.get("out_features"))
              for m in info["modules"]}
    assert scales == {"k_proj": ("output", None, 8), "v_proj": ("output", None, 8), "down_proj": ("input", 32, None)}
    assert info["trainable_parameters"] == 2 * (8 + 8 + 32)
    assert main(["inspect", str(adapter)]) == 0
    assert "(input scaling)" in capsys.readouterr().out


def test_verify_explains_that_ia3_has_no_delta(tmp_path, capsys):
    config = transformers.LlamaConfig(**LLAMA)
    _, adapter, _ = _build_transformers(tmp_path, transformers.LlamaForCausalLM, config,
                                        peft.IA3Config(task_type="CAUSAL_LM"))
    assert main(["verify", str(adapter), "--backends", "numpy"]) != 0
    assert "no delta weight" in capsys.readouterr().err
