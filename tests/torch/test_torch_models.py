"""PeftModel on tiny Llama / GPT-2 against real peft 0.21.2: keys, checkpoints both ways, merge, adapters, errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peft
import transformers
from safetensors.torch import load_file, save_file

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, IncompatibleKeysError, NoMatchingModuleError, ShapeMismatchError

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) % 64
EMBED_WARNING = "Setting `save_embedding_layers` to `True`"


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).eval()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).eval()
    return {"llama": llama, "gpt2": gpt2}


CONFIGS = {
    "plain": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "rslora-patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                       rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})),
    "dora": ("llama", dict(target_modules=["q_proj", "k_proj", "gate_proj"], use_dora=True)),
    "modules-to-save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "v_proj"])),
    "layers-to-transform": ("llama", dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[1])),
    "all-linear-exclude": ("llama", dict(target_modules="all-linear", exclude_modules=["model.layers.0.mlp.up_proj"])),
    "bias-lora-only": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
}


def _kwargs(name: str) -> tuple[str, dict]:
    arch, extra = CONFIGS[name]
    return arch, dict(r=4, lora_alpha=8, init_lora_weights=False, **extra)


def _ours(bases, name: str, **kwargs) -> peftcore_torch.PeftModel:
    arch, config = _kwargs(name)
    torch.manual_seed(1)
    return peftcore_torch.get_peft_model(copy.deepcopy(bases[arch]), peftcore.LoraConfig(**config), **kwargs).eval()


def _theirs(bases, name: str, **kwargs) -> peft.PeftModel:
    arch, config = _kwargs(name)
    torch.manual_seed(2)
    return peft.get_peft_model(copy.deepcopy(bases[arch]), peft.LoraConfig(**config), **kwargs).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor, rtol: float = RTOL) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=rtol * max(float(desired.abs().max()), 1e-6))


def _save(model, path, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMBED_WARNING)
        model.save_pretrained(path, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_memory_keys_and_trainable_params_equal_peft(bases, name):
    ours, theirs = _ours(bases, name), _theirs(bases, name)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert all(("lora_" in n) or ("modules_to_save" in n) or n.endswith("bias") for n in trainable)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_checkpoint_loads_here_with_same_logits(bases, name, tmp_path):
    theirs = _theirs(bases, name)
    _save(theirs, tmp_path)
    arch, _ = _kwargs(name)
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    # is_trainable=False freezes the adapter (peft keeps "lora_only" base biases trainable, and so do we)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in reference.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    _assert_close(_logits(ours), _logits(theirs))
    assert not torch.allclose(_logits(ours), _logits(bases[arch]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMBED_WARNING)
        ours_state = peftcore_torch.get_peft_model_state_dict(ours)
        their_state = peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        _assert_close(ours_state[key], value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_checkpoint_loads_in_peft_with_same_logits(bases, name, tmp_path):
    ours = _ours(bases, name)
    _save(ours, tmp_path)
    arch, _ = _kwargs(name)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), config)
    result = peft.set_peft_model_state_dict(theirs, peft.utils.load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    _assert_close(_logits(theirs.eval()), _logits(ours))
    # and through peft's own front door, which warns on any missing adapter key (warnings are errors here)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    _assert_close(_logits(loaded), _logits(ours))


@pytest.mark.parametrize("name", ["plain", "dora", "gpt2", "gpt2-dora", "embedding", "modules-to-save"])
def test_merge_and_unload_equals_peft(bases, name, tmp_path):
    theirs = _theirs(bases, name)
    _save(theirs, tmp_path)
    arch, _ = _kwargs(name)
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    expected = _logits(theirs)
    ours.merge_adapter()
    _assert_close(_logits(ours), expected)
    ours.unmerge_adapter()
    _assert_close(_logits(ours), expected)
    merged_ours = ours.merge_and_unload(safe_merge=True)
    merged_theirs = theirs.merge_and_unload(safe_merge=True)
    assert type(merged_ours) is type(merged_theirs)
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key, value in theirs_sd.items():
        _assert_close(ours_sd[key], value)
    _assert_close(_logits(merged_ours), expected)


def test_unload_returns_base_model_unchanged(bases):
    ours = _ours(bases, "plain")
    restored = ours.unload()
    assert not any(isinstance(m, peftcore_torch.LoraLayer) for m in restored.modules())
    _assert_close(_logits(restored), _logits(bases["llama"]))


def test_disable_adapter_gives_base_logits_and_restores(bases):
    ours = _ours(bases, "dora")
    adapted = _logits(ours)
    with ours.disable_adapter():
        _assert_close(_logits(ours), _logits(bases["llama"]))
    _assert_close(_logits(ours), adapted)
    ours.merge_adapter()
    with ours.disable_adapter():  # a merged model is unmerged on the first disabled forward, as in peft
        _assert_close(_logits(ours), _logits(bases["llama"]))


def test_two_adapters_save_in_subfolder_and_switch_like_peft(bases, tmp_path):
    ours = _ours(bases, "plain")
    _, other = _kwargs("dora")
    torch.manual_seed(5)
    ours.add_adapter("other", peftcore.LoraConfig(**other))
    assert ours.active_adapter == "default"
    first = _logits(ours)
    ours.set_adapter("other")
    second = _logits(ours)
    assert not torch.allclose(first, second)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in ours.named_parameters() if ".other." in n)
    _save(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    _assert_close(_logits(theirs), first)
    theirs.set_adapter("other")
    _assert_close(_logits(theirs), second)
    assert sorted(theirs.state_dict()) == sorted(ours.state_dict())

    ours.set_adapter("default")
    _assert_close(_logits(ours), first)
    ours.delete_adapter("other")
    assert list(ours.peft_config) == ["default"]
    assert not any(".other." in k for k in ours.state_dict())

    only = tmp_path / "only"
    _save(theirs, only, selected_adapters=["other"])
    reloaded = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), only / "other")
    _assert_close(_logits(reloaded), second)


def test_load_adapter_adds_inactive_adapter(bases, tmp_path):
    theirs = _theirs(bases, "dora")
    _save(theirs, tmp_path)
    ours = _ours(bases, "plain")
    before = _logits(ours)
    report = ours.load_adapter(tmp_path, adapter_name="dora")
    assert report.complete
    _assert_close(_logits(ours), before)
    ours.set_adapter("dora")
    _assert_close(_logits(ours), _logits(theirs))


def test_deleting_a_merged_adapter_is_refused(bases):
    ours = _ours(bases, "plain")
    ours.merge_adapter()
    with pytest.raises(peftcore.errors.MergeError, match="unmerge"):
        ours.delete_adapter("default")


@pytest.fixture
def saved(bases, tmp_path):
    _save(_theirs(bases, "plain"), tmp_path)
    return tmp_path


def _edit_weights(path, edit) -> None:
    state = load_file(path / "adapter_model.safetensors")
    edit(state)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_missing_key_is_named(bases, saved):
    _edit_weights(saved, lambda s: s.pop(KEY))
    with pytest.raises(IncompatibleKeysError, match=r"missing keys \['base_model\.model\.model\.layers\.0\.self_attn"
                                                    r"\.q_proj\.lora_A\.default\.weight'\]"):
        peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), saved)


def test_unexpected_key_is_named(bases, saved):
    _edit_weights(saved, lambda s: s.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                                             torch.zeros(4, 16)}))
    with pytest.raises(IncompatibleKeysError, match=r"unexpected keys \[.*mlp\.up_proj\.lora_A\.default\.weight"):
        peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), saved)


def test_shape_mismatch_names_key_and_both_shapes(bases, saved):
    _edit_weights(saved, lambda s: s.update({KEY: torch.zeros(3, 16)}))
    with pytest.raises(ShapeMismatchError, match=r"q_proj\.lora_A\.default\.weight: checkpoint shape \(3, 16\), "
                                                 r"model shape \(4, 16\)"):
        peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), saved)


def test_wrong_peft_type_is_a_config_error(bases, saved):
    config_file = saved / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["peft_type"] = "LOHA"
    config_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="LOHA"):
        peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), saved)


def test_lenient_load_reports_exactly_what_did_not_load(bases, saved):
    _edit_weights(saved, lambda s: s.pop(KEY))
    with pytest.warns(UserWarning, match="loaded partially"):
        ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), saved, strict=False)
    state = load_file(saved / "adapter_model.safetensors")
    state[KEY] = torch.zeros(3, 16)
    state["base_model.model.extra.lora_A.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="loaded partially"):
        report = peftcore_torch.set_peft_model_state_dict(ours, state, strict=False)
    assert report.missing_keys == []
    assert report.unexpected_keys == ["base_model.model.extra.lora_A.default.weight"]
    assert report.mismatched_keys == [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", (3, 16), (4, 16))]
    assert not report.complete


def test_bf16_base_keeps_fp32_adapters_like_peft(bases, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(bases["llama"]).to(torch.bfloat16),
                                 peft.LoraConfig(**_kwargs("dora")[1])).eval()
    _save(theirs, tmp_path)
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]).to(torch.bfloat16), tmp_path)
    adapter_dtypes = {p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    assert adapter_dtypes == {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    ours_logits, their_logits = _logits(ours), _logits(theirs)
    assert ours_logits.dtype == their_logits.dtype == torch.bfloat16
    _assert_close(ours_logits, their_logits, rtol=1e-2)


def test_no_matching_module_lists_candidates(bases):
    with pytest.raises(NoMatchingModuleError, match=r"Candidate module names.*'q_proj'"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), peftcore.LoraConfig(target_modules=["qproj"]))


def test_gpt2_conv1d_forces_fan_in_fan_out_with_peft_warning(bases):
    config = peftcore.LoraConfig(target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        ours = peftcore_torch.get_peft_model(copy.deepcopy(bases["gpt2"]), config)
    assert ours.peft_config["default"].fan_in_fan_out is True


def test_default_init_is_identity_and_seeded_by_torch(bases):
    config = dict(target_modules=["q_proj", "v_proj"])
    torch.manual_seed(7)
    a = peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), peftcore.LoraConfig(**config))
    torch.manual_seed(7)
    b = peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), peftcore.LoraConfig(**config))
    _assert_close(_logits(a), _logits(bases["llama"]))
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


def test_unsupported_target_names_module_and_type(bases):
    config = peftcore.LoraConfig(target_modules=["input_layernorm"])
    with pytest.raises(peftcore.errors.UnsupportedLayerError, match=r"'model\.layers\.0\.input_layernorm'.*RMSNorm"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), config)


def test_functional_inject_and_state_dict_round_trip(bases):
    arch, config = _kwargs("dora")
    model = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**config), copy.deepcopy(bases[arch]))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(bases[arch]))
    assert sorted(model.state_dict()) == sorted(theirs.state_dict())
    state = peftcore_torch.get_peft_model_state_dict(model)
    assert sorted(state) == sorted(peft.get_peft_model_state_dict(theirs))
    zeroed = copy.deepcopy(model)
    report = peftcore_torch.set_peft_model_state_dict(zeroed, {k: torch.zeros_like(v) for k, v in state.items()})
    assert report.complete
    assert all(float(v.abs().max()) == 0 for k, v in zeroed.state_dict().items() if "lora_" in k)
    peft.set_peft_model_state_dict(theirs, state)
    _assert_close(_logits(model.eval()), _logits(theirs.eval()))
