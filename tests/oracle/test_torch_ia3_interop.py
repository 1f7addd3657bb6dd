"""(IA)³ checkpoints between peftcore_torch and real peft 0.21.2, both ways, on tiny Llama, GPT-2, BERT and T5.

A peft-saved adapter loads here (``from_pretrained``, ``load_adapter``) with peft's outputs and state;
ours loads in peft with no missing or unexpected keys and the same outputs; the configs agree.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
import peftcore_torch  # noqa: E402
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 5 % 64
FAN_IN_FAN_OUT = "fan_in_fan_out is set to False but the target module is `Conv1D`"


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = tiny_llama()
    gpt2 = tiny_gpt2()
    bert = tiny_bert_classifier()
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=64, decoder_start_token_id=0))
    return {"llama": llama.eval(), "gpt2": gpt2.eval(), "bert": bert.eval(), "t5": t5.eval()}


CASES = {
    "llama-defaults": ("llama", dict(task_type="CAUSAL_LM")),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "bert-seq-cls": ("bert", dict(task_type="SEQ_CLS", target_modules=["query", "intermediate.dense"],
                                  feedforward_modules=["intermediate.dense"], modules_to_save=["classifier"])),
    "t5-seq2seq-defaults": ("t5", dict(task_type="SEQ_2_SEQ_LM")),  # peft's table: k, v, wo (feed-forward)
}


def _build(module, bases, name: str, seed: int):
    """``module`` (``peft`` or ``peftcore_torch``)'s model for case ``name`` with random vectors."""
    config_module = peftcore if module is peftcore_torch else peft
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        config = config_module.IA3Config(init_ia3_weights=False, **copy.deepcopy(CASES[name][1]))
        model = module.get_peft_model(copy.deepcopy(bases[CASES[name][0]]), config)
    if name == "bert-seq-cls":  # a trained-looking head, so a missing classifier copy would show
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    return model.eval()


def _logits(model) -> torch.Tensor:
    seq2seq = {"decoder_input_ids": IDS[:, :4]} if getattr(model.config, "is_encoder_decoder", False) else {}
    with torch.no_grad():
        return model(input_ids=IDS, **seq2seq).logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=RTOL * max(float(desired.abs().max()), 1e-6))


@pytest.mark.parametrize("name", list(CASES))
def test_peft_checkpoint_loads_here(bases, name, tmp_path):
    theirs = _build(peft, bases, name, seed=1)
    theirs.save_pretrained(tmp_path)
    arch = CASES[name][0]
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
    _assert_close(_logits(ours), _logits(theirs))
    assert not torch.allclose(_logits(ours), _logits(bases[arch]))
    assert not any(p.requires_grad for p in ours.parameters())
    ours_state, their_state = peftcore_torch.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        _assert_close(ours_state[key], value)


@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_loads_in_peft(bases, name, tmp_path):
    ours = _build(peftcore_torch, bases, name, seed=2)
    ours.save_pretrained(tmp_path)
    arch = CASES[name][0]
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, peft.IA3Config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), config)
    result = peft.set_peft_model_state_dict(theirs, peft.utils.load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "ia3_" in k or "modules_to_save" in k] == []
    _assert_close(_logits(theirs.eval()), _logits(ours))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)  # warns on any missing key
    _assert_close(_logits(loaded), _logits(ours))


@pytest.mark.parametrize("name", list(CASES))
def test_saved_configs_agree(bases, name, tmp_path):
    _build(peftcore_torch, bases, name, seed=3).save_pretrained(tmp_path / "ours")
    _build(peft, bases, name, seed=3).save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs"))
    for field in ("target_modules", "feedforward_modules", "modules_to_save"):
        ours[field], theirs[field] = (sorted(c[field]) if c[field] is not None else None for c in (ours, theirs))
    for config in (ours, theirs):
        config.pop("revision", None)
    assert {k: v for k, v in ours.items() if k != "peft_version"} == \
        {k: v for k, v in theirs.items() if k != "peft_version"}


def test_load_adapter_adds_a_second_peft_adapter(bases, tmp_path):
    first, second = _build(peft, bases, "llama-defaults", seed=4), _build(peft, bases, "llama-defaults", seed=5)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "first")
    report = ours.load_adapter(tmp_path / "second", "second")
    assert report.complete
    _assert_close(_logits(ours), _logits(first))
    ours.set_adapter("second")
    _assert_close(_logits(ours), _logits(second))


def test_trainable_load_trains_the_same_parameters_as_peft(bases, tmp_path):
    _build(peft, bases, "bert-seq-cls", seed=6).save_pretrained(tmp_path)
    ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path, is_trainable=True)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)
