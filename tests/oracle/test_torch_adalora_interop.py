"""AdaLoRA checkpoints between peftcore_torch and real peft 0.21.2 after a pruning schedule, both ways.

Both libraries train the same tiny Llama / GPT-2 adapter through ``total_step - tfinal`` on identical
gradients, then save: the files agree (kept triplets only, ``rank_pattern`` without the adapter name);
peft loads ours with no missing or unexpected keys and the same logits; ours loads peft's at the kept
ranks with the same logits; the pruned adapters merge like peft's.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import peftcore  # noqa: E402
import peftcore_torch  # noqa: E402
from tests.tiny_models import adalora_pair, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 5 % 64
SCHEDULE = dict(init_r=4, target_r=2, tinit=0, tfinal=1, total_step=5, deltaT=1, lora_alpha=8)
# peft warns about the saved rank_pattern keys (they name lora_E, not modules) and about zero-rank layers
UNMATCHED_PATTERN = "The following rank_pattern keys did not match any targeted module"
ZERO_RANK = ".*LoRA tensor\\(s\\) have invalid shape"
CASES = {
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = tiny_llama()
    gpt2 = tiny_gpt2()
    return {"llama": llama.eval(), "gpt2": gpt2.eval()}


@pytest.fixture(scope="module")
def trained(bases) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """``{case: (ours, theirs)}`` trained to the final mask on peft's gradients."""
    return {name: _train(bases, name) for name in CASES}


def _train(bases, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    arch, kwargs = CASES[name]
    ours, theirs = adalora_pair(bases[arch], dict(SCHEDULE, **kwargs))
    ours_params = dict(ours.named_parameters())
    ours_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    their_opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for step in range(SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):
        theirs(input_ids=IDS, labels=IDS).loss.backward()
        for param_name, param in theirs.named_parameters():
            if param.requires_grad:
                ours_params[param_name].grad = param.grad.clone()
        their_opt.step(), ours_opt.step()
        theirs.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        their_opt.zero_grad(), ours_opt.zero_grad()
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == theirs.peft_config["default"].rank_pattern
    assert any(not all(mask) for mask in pattern.values())
    return ours.eval(), theirs.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=RTOL * max(float(desired.abs().max()), 1e-6))


def _save(model, path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ZERO_RANK)
        model.save_pretrained(path)


def _quiet_load(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ZERO_RANK)
        # pytest.warns re-emits other warnings without their module, past the suite's transformers filter
        warnings.filterwarnings("ignore", category=FutureWarning, message="`is_gradient_checkpointing`")
        with pytest.warns(RuntimeWarning, match=UNMATCHED_PATTERN):
            return fn(*args, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_saved_files_agree_with_peft(trained, name, tmp_path):
    ours, theirs = copy.deepcopy(trained[name])
    _save(ours, tmp_path / "ours")
    _save(theirs, tmp_path / "theirs")
    configs = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert all(".default" not in key for key in configs[0]["rank_pattern"])
    ours_state, their_state = (safetensors_torch.load_file(tmp_path / side / "adapter_model.safetensors")
                               for side in ("ours", "theirs"))
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        assert ours_state[key].shape == value.shape, key
        if value.numel():
            _assert_close(ours_state[key], value)
    kept = {key.rpartition(".lora_E")[0]: sum(mask) for key, mask in configs[0]["rank_pattern"].items()}
    for module, rank in kept.items():
        assert ours_state[f"base_model.model.{module}.lora_A"].shape[0] == rank


@pytest.mark.parametrize("name", list(CASES))
def test_peft_loads_our_pruned_adapter(bases, trained, name, tmp_path):
    ours, _ = trained[name]
    _save(copy.deepcopy(ours), tmp_path)
    arch = CASES[name][0]
    config = peft.PeftConfig.from_pretrained(tmp_path)
    theirs = _quiet_load(peft.get_peft_model, copy.deepcopy(bases[arch]), config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ZERO_RANK)
        result = peft.set_peft_model_state_dict(theirs, peft.utils.load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k and ".ranknum." not in k] == []
    _assert_close(_logits(theirs.eval()), _logits(ours))
    loaded = _quiet_load(peft.PeftModel.from_pretrained, copy.deepcopy(bases[arch]), tmp_path)
    _assert_close(_logits(loaded), _logits(ours))


@pytest.mark.parametrize("name", list(CASES))
def test_ours_loads_peft_pruned_adapter_at_the_kept_ranks(bases, trained, name, tmp_path):
    _, theirs = trained[name]
    _save(copy.deepcopy(theirs), tmp_path)
    arch = CASES[name][0]
    ours = _quiet_load(peftcore_torch.PeftModel.from_pretrained, copy.deepcopy(bases[arch]), tmp_path)
    _assert_close(_logits(ours), _logits(theirs))
    reference = _quiet_load(peft.PeftModel.from_pretrained, copy.deepcopy(bases[arch]), tmp_path)
    their_params = dict(reference.named_parameters())
    for param_name, param in ours.named_parameters():
        assert param.shape == their_params[param_name].shape, param_name
    for layer in ours.modules():
        if isinstance(layer, peftcore_torch.AdaLoraLayer):
            assert layer.ranknum["default"] in (0, SCHEDULE["init_r"])
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_adapters_merge_like_peft(bases, trained, name, tmp_path):
    _save(copy.deepcopy(trained[name][1]), tmp_path)
    arch = CASES[name][0]
    ours = _quiet_load(peftcore_torch.PeftModel.from_pretrained, copy.deepcopy(bases[arch]), tmp_path)
    theirs = _quiet_load(peft.PeftModel.from_pretrained, copy.deepcopy(bases[arch]), tmp_path)
    adapted = _logits(ours)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    ours_state, their_state = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        _assert_close(ours_state[key], value)
    _assert_close(_logits(merged_ours), adapted)


def test_unpruned_trainable_save_round_trips(bases, tmp_path):
    arch, kwargs = CASES["llama"]
    ours = peftcore_torch.get_peft_model(copy.deepcopy(bases[arch]), peftcore.AdaLoraConfig(**SCHEDULE, **kwargs))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".lora_E." in name:
                param.normal_()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    _assert_close(_logits(loaded), _logits(ours.eval()))
    again = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path, is_trainable=True)
    assert again.base_model.trainable_adapter_name == "default"
    _assert_close(_logits(again.eval()), _logits(ours))
