"""AdaLoRA in peftcore_torch against real peft 0.21.2 on tiny Llama, GPT-2 and a Conv2d net.

Same parameters give peft's outputs; the loss carries peft's orthogonal regulariser; a whole short
schedule (warm-up to ``tinit``, budgeting every ``deltaT``, the final mask at ``total_step - tfinal``
and its re-application) fed identical gradients gives peft's importance EMAs, masks, rank patterns
and parameters; merges, disabling and peft's errors match.
(Checkpoints after pruning: ``tests/oracle/test_torch_adalora_interop.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, IncompatibleKeysError, UnsupportedLayerError
from tests.tiny_models import adalora_pair, tiny_gpt2, tiny_llama, without_ranknum

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 3 % 64
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, deltaT=2, lora_alpha=8)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.other = nn.Conv2d(4, 5, (2, 3), dilation=(1, 2))
        self.head = nn.Linear(5 * 3 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.other(torch.tanh(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    llama = tiny_llama()
    gpt2 = tiny_gpt2()
    return {"llama": llama.eval(), "gpt2": gpt2.eval(), "conv": ConvNet().eval()}


CASES = {
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-defaults": ("llama", dict(task_type="CAUSAL_LM")),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "conv": ("conv", dict(target_modules=["conv", "other"])),
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch == "conv":
        return {"x": torch.linspace(-1, 1, 2 * 3 * 8 * 12).reshape(2, 3, 8, 12)}
    return {"input_ids": IDS}


def _pair(bases, name: str, **overrides) -> tuple[nn.Module, nn.Module]:
    """peft's model with random triplets (``E`` too) and ours holding exactly the same parameters."""
    arch, kwargs = CASES[name]
    kwargs = dict(SCHEDULE, **copy.deepcopy(kwargs), **overrides)
    return adalora_pair(bases[arch], kwargs)


def _out(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(arch))
    return out if isinstance(out, torch.Tensor) else out.logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=RTOL * max(float(desired.abs().max()), 1e-6))


@pytest.mark.parametrize("name", list(CASES))
def test_same_parameters_give_peft_outputs(bases, name):
    ours, theirs = _pair(bases, name)
    arch = CASES[name][0]
    assert sorted(ours.state_dict()) == sorted(without_ranknum(theirs.state_dict()))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    _assert_close(_out(ours.eval(), arch), _out(theirs.eval(), arch))
    assert not torch.allclose(_out(ours, arch), _out(bases[arch], arch))


@pytest.mark.parametrize("name", ["llama", "gpt2", "conv"])
def test_merge_and_unload_matches_peft(bases, name):
    ours, theirs = _pair(bases, name)
    arch = CASES[name][0]
    adapted = _out(ours.eval(), arch)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    ours_state, their_state = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        _assert_close(ours_state[key], value)
    _assert_close(_out(merged_ours, arch), adapted)


def test_merge_unmerge_and_disable(bases):
    ours, _ = _pair(bases, "gpt2")
    adapted, base = _out(ours.eval(), "gpt2"), _out(bases["gpt2"], "gpt2")
    ours.merge_adapter()
    _assert_close(_out(ours, "gpt2"), adapted)
    with ours.disable_adapter():
        _assert_close(_out(ours, "gpt2"), base)
    _assert_close(_out(ours, "gpt2"), adapted)


def _orth_regulariser(model: nn.Module) -> torch.Tensor:
    """Independent of both libraries: mean over every A (A·Aᵀ) and B (Bᵀ·B) of ‖Gram − I‖_F."""
    norms = []
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            gram = param @ param.T if ".lora_A." in name else param.T @ param
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0])))
    return torch.stack(norms).mean()


def test_loss_carries_the_orthogonal_regulariser_like_peft(bases):
    ours, theirs = _pair(bases, "llama", orth_reg_weight=0.3)
    with torch.no_grad():
        ours_loss = ours(input_ids=IDS, labels=IDS).loss
        their_loss = theirs(input_ids=IDS, labels=IDS).loss
        plain_loss = ours.get_base_model()(input_ids=IDS, labels=IDS).loss
        expected = plain_loss + 0.3 * _orth_regulariser(ours)
    _assert_close(ours_loss, their_loss)
    _assert_close(ours_loss, expected)
    assert not torch.allclose(ours_loss, plain_loss)
    ours_loss = ours(input_ids=IDS, labels=IDS).loss
    ours_loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if ".lora_A." in n)


def _train(ours: nn.Module, theirs: nn.Module, steps: int):
    """peft's training loop on both models, ours fed peft's gradients; yields after each step."""
    ours.train(), theirs.train()
    ours_params = dict(ours.named_parameters())
    ours_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    their_opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        theirs(input_ids=IDS, labels=IDS).loss.backward()
        ours(input_ids=IDS, labels=IDS).loss.backward()
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                _assert_close(ours_params[name].grad, param.grad)
                ours_params[name].grad = param.grad.clone()
        their_opt.step(), ours_opt.step()
        theirs.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        their_opt.zero_grad(), ours_opt.zero_grad()
        yield step


def test_whole_schedule_gives_peft_masks_rank_patterns_and_parameters(bases):
    ours, theirs = _pair(bases, "llama")
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    patterns = []
    for step in _train(ours, theirs, final + 3):
        config, their_config = ours.peft_config["default"], theirs.peft_config["default"]
        assert config.rank_pattern == their_config.rank_pattern, step
        patterns.append(copy.deepcopy(config.rank_pattern))
        their_params = dict(theirs.named_parameters())
        for name, param in ours.named_parameters():
            _assert_close(param, their_params[name])
        allocator = theirs.base_model.rankallocator
        state = ours.base_model.allocator_state
        if step < final:
            assert sorted(state.exp_avg_ipt) == sorted(allocator.exp_avg_ipt)
            for name, value in allocator.exp_avg_ipt.items():
                _assert_close(state.exp_avg_ipt[name], value)
                _assert_close(state.exp_avg_unc[name], allocator.exp_avg_unc[name])
        else:  # peft resets its EMAs at the final mask; the core keeps zeros
            assert allocator.exp_avg_ipt == {}
            assert all(not torch.any(value) for value in state.exp_avg_ipt.values())
    # warm-up up to tinit, then masks at deltaT steps, the final mask at total_step - tfinal, then kept
    assert patterns[0] is None and patterns[1] is None
    kept = [sum(map(sum, p.values())) for p in patterns[2:]]
    assert kept[-1] == SCHEDULE["target_r"] * 6 and kept[0] > kept[-1]
    assert patterns[final] == patterns[-1]
    for name, param in ours.get_base_model().named_parameters():
        if ".lora_E." in name:
            keep = torch.tensor(ours.peft_config["default"].rank_pattern[name]).unsqueeze(1)
            assert torch.all(param[~keep] == 0) and torch.all(param[keep] != 0)


def test_only_one_trainable_adapter_as_in_peft(bases):
    ours, theirs = _pair(bases, "llama")
    kwargs = dict(SCHEDULE, target_modules=["k_proj"])
    message = "supports only 1 trainable adapter"
    with pytest.raises(ValueError, match=message):
        theirs.add_adapter("second", peft.AdaLoraConfig(**kwargs))
    with pytest.raises(ConfigError, match=message):
        ours.add_adapter("second", peftcore.AdaLoraConfig(**kwargs))
    ours.add_adapter("frozen", peftcore.AdaLoraConfig(inference_mode=True, **kwargs))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".frozen" in n)
    assert ours.base_model.trainable_adapter_name == "default"


def test_add_weighted_adapter_is_refused_as_in_peft(bases):
    ours, theirs = _pair(bases, "gpt2")
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        theirs.add_weighted_adapter(["default"], [1.0], "mix")
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        ours.add_weighted_adapter(["default"], [1.0], "mix")


def test_unsupported_layer_is_named(bases):
    config = peftcore.AdaLoraConfig(target_modules=["embed_tokens", "q_proj"], **SCHEDULE)
    with pytest.raises(UnsupportedLayerError, match=r"embed_tokens.*Embedding"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), config)


def test_update_and_allocate_needs_gradients(bases):
    ours, _ = _pair(bases, "llama")
    with pytest.raises(IncompatibleKeysError, match="lora_A"):
        ours.update_and_allocate(0)


def test_inference_only_model_cannot_allocate(bases):
    ours, _ = _pair(bases, "llama", inference_mode=True)
    assert not any(p.requires_grad for p in ours.parameters())
    with pytest.raises(ConfigError, match="trainable AdaLoRA adapter"):
        ours.update_and_allocate(0)
