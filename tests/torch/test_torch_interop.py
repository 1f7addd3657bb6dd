"""Checkpoints both ways and merges against real peft 0.21.2 on tiny BERT, T5, Llama and GPT-2.

For every case: a peft-saved adapter loads in ``peftcore_torch`` with the same outputs, ours loads in
peft with no missing/unexpected keys and the same outputs, and ``merge_and_unload`` gives peft's weights.
(Llama/GPT-2 configurations already in ``test_torch_models.py`` are not repeated here.)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import pytest
import torch

import peft
import transformers

import peftcore
import peftcore_torch

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 5 % 64
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
DECODER_IDS = torch.tensor([[0, 3, 9, 27], [0, 17, 51, 25]])
EMBED_WARNING = "Setting `save_embedding_layers` to `True`"
TIED_WARNING = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
MERGE_TIED_WARNINGS = ("(Model with `tie_word_embeddings=True` and the tied_target_modules)"
                       "|(Input and output embeddings are no longer tied)")


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    bert = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=64, max_position_embeddings=32, num_labels=3)
    llama = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=0)
    models = {
        "bert": transformers.BertModel(bert),
        "bert_cls": transformers.BertForSequenceClassification(bert),
        "t5": transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=64)),
        "llama": transformers.LlamaForCausalLM(llama),
        "llama_cls": transformers.LlamaForSequenceClassification(llama),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64,
                                                                     n_positions=32, bos_token_id=0, eos_token_id=0)),
    }
    return {name: model.eval() for name, model in models.items()}


# name: (architecture, default adapter's extra config, second adapter's extra config or None)
CASES = {
    "bert-plain": ("bert", dict(target_modules=["query", "value"]), None),
    "bert-dora": ("bert", dict(target_modules=["query", "key", "dense"], use_dora=True), None),
    "bert-rslora-patterns": ("bert", dict(target_modules=["query", "value", "intermediate.dense"], use_rslora=True,
                                          rank_pattern={"value": 2},
                                          alpha_pattern={"layer.1.attention.self.query": 3}), None),
    "bert-embedding": ("bert", dict(target_modules=["word_embeddings", "query"]), None),
    "bert-embedding-dora": ("bert", dict(target_modules=["word_embeddings", "value"], use_dora=True), None),
    "bert-seq-cls": ("bert_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS",
                                      modules_to_save=["classifier"]), None),
    "bert-two-adapters": ("bert", dict(target_modules=["query", "value"]),
                          dict(target_modules=["value", "output.dense"], use_dora=True, r=2)),
    "t5-plain": ("t5", dict(target_modules=["q", "v"]), None),
    "t5-dora": ("t5", dict(target_modules=["q", "k", "wi"], use_dora=True), None),
    "t5-rslora-patterns": ("t5", dict(target_modules=["q", "v", "wo"], use_rslora=True, rank_pattern={"wo": 2},
                                      alpha_pattern={"decoder.block.1.layer.0.SelfAttention.q": 3}), None),
    "t5-modules-to-save": ("t5", dict(target_modules=["q"], modules_to_save=["lm_head"]), None),
    "t5-embedding": ("t5", dict(target_modules=["embed_tokens", "v"]), None),
    "t5-two-adapters": ("t5", dict(target_modules=["q", "v"]),
                        dict(target_modules=["k", "o"], use_rslora=True, modules_to_save=["lm_head"])),
    "llama-lm-head": ("llama", dict(target_modules=["lm_head", "v_proj"]), None),
    "llama-embedding-dora": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True), None),
    "llama-seq-cls": ("llama_cls", dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                        modules_to_save=["score"]), None),
    "gpt2-rslora-patterns": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True,
                                          rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3}), None),
    "gpt2-modules-to-save": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True,
                                          modules_to_save=["ln_f"]), None),
    "gpt2-embedding": ("gpt2", dict(target_modules=["wte", "c_proj"], fan_in_fan_out=True), None),
    "gpt2-two-adapters": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True),
                          dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
}


def _config(cls, extra: dict):
    return cls(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **copy.deepcopy(extra)})


def _adapters(name: str) -> list[str]:
    return ["default"] if CASES[name][2] is None else ["default", "other"]


def _build(lib, bases, name: str, *, seed: int):
    """A fresh copy of the case's base with its adapter(s) from ``lib`` (``peft`` or ``peftcore_torch``)."""
    arch, first, second = CASES[name]
    config_cls = peft.LoraConfig if lib is peft else peftcore.LoraConfig
    torch.manual_seed(seed)
    with _tolerate_tied_warning():
        model = lib.get_peft_model(copy.deepcopy(bases[arch]), _config(config_cls, first))
        if second is not None:
            model.add_adapter("other", _config(config_cls, second))
    return model.eval()


@contextlib.contextmanager
def _tolerate_tied_warning() -> Iterator[None]:
    """peft warns when an adapter touches T5's tied embeddings; that warning is checked on its own below."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TIED_WARNING)
        yield


def _outputs(arch: str, model) -> torch.Tensor:
    with torch.no_grad():
        if arch == "bert":
            out = model(input_ids=IDS, attention_mask=MASK)
            return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])
        if arch == "t5":
            return model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS).logits
        return model(input_ids=IDS, attention_mask=MASK).logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=RTOL * max(float(desired.abs().max()), 1e-6))


def _save(model, path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMBED_WARNING)
        model.save_pretrained(path)


def _activations(name: str) -> list[list[str]]:
    """Each adapter alone, then (for two adapters) both at once."""
    names = _adapters(name)
    return [[n] for n in names] + ([names] if len(names) > 1 else [])


def _assert_same_outputs(name: str, actual_model, desired_model, base) -> None:
    arch = CASES[name][0]
    base_out = _outputs(arch, base)
    for active in _activations(name):
        actual_model.base_model.set_adapter(active)
        desired_model.base_model.set_adapter(active)
        expected = _outputs(arch, desired_model)
        assert not torch.allclose(expected, base_out), f"adapter(s) {active} leave the base output unchanged"
        _assert_close(_outputs(arch, actual_model), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_checkpoint_loads_here_with_same_outputs(bases, name, tmp_path):
    arch = CASES[name][0]
    theirs = _build(peft, bases, name, seed=1)
    _save(theirs, tmp_path)
    with _tolerate_tied_warning():  # we warn about tied embeddings as peft does
        ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
        if "other" in _adapters(name):
            assert ours.load_adapter(tmp_path / "other", "other").complete
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _assert_same_outputs(name, ours, theirs, bases[arch])


@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_loads_in_peft_with_same_outputs(bases, name, tmp_path):
    arch = CASES[name][0]
    ours = _build(peftcore_torch, bases, name, seed=2)
    _save(ours, tmp_path)
    for adapter in _adapters(name):
        folder = tmp_path if adapter == "default" else tmp_path / adapter
        with _tolerate_tied_warning():
            target = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.PeftConfig.from_pretrained(folder))
        result = peft.set_peft_model_state_dict(target, peft.utils.load_peft_weights(str(folder)))
        assert result.unexpected_keys == []
        assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []

    # peft's own front door warns on any missing adapter key, and warnings are errors here
    with _tolerate_tied_warning():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
        if "other" in _adapters(name):
            theirs.load_adapter(tmp_path / "other", adapter_name="other")
    assert sorted(theirs.state_dict()) == sorted(ours.state_dict())
    _assert_same_outputs(name, theirs, ours, bases[arch])


@pytest.mark.parametrize("name", list(CASES))
def test_merge_and_unload_equals_peft(bases, name, tmp_path):
    arch = CASES[name][0]
    theirs = _build(peft, bases, name, seed=3)
    _save(theirs, tmp_path)
    with _tolerate_tied_warning():
        ours = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[arch]), tmp_path)
        adapters = _adapters(name)
        if "other" in adapters:
            ours.load_adapter(tmp_path / "other", "other")
    # with two adapters the merged pair is the one that is active; modules_to_save follows the first
    for model in (ours, theirs):
        model.base_model.set_adapter(adapters)
    with warnings.catch_warnings():  # both warn alike about tied embeddings when merging
        warnings.filterwarnings("ignore", message=MERGE_TIED_WARNINGS)
        merged_ours = ours.merge_and_unload(adapter_names=adapters)
        merged_theirs = theirs.merge_and_unload(adapter_names=adapters)
    assert type(merged_ours) is type(merged_theirs)
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key, value in theirs_sd.items():
        _assert_close(ours_sd[key], value)
    # merging into an embedding tied to the output layer changes that layer too (in peft as well),
    # so the merged model is compared with peft's merged model, not with the unmerged outputs
    _assert_close(_outputs(arch, merged_ours), _outputs(arch, merged_theirs))
    assert {n for n, p in merged_ours.named_parameters()} == {n for n, p in merged_theirs.named_parameters()}


def test_seq_cls_task_type_saves_the_classifier_like_peft(bases):
    extra = dict(target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(bases["bert_cls"]), _config(peft.LoraConfig, extra))
    ours = peftcore_torch.get_peft_model(copy.deepcopy(bases["bert_cls"]), _config(peftcore.LoraConfig, extra))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)
    assert sorted(peftcore_torch.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))


def test_merge_and_unload_unties_config_when_output_embedding_diverged(bases, tmp_path):
    ours = _build(peftcore_torch, bases, "t5-modules-to-save", seed=4)
    with pytest.warns(UserWarning, match="Input and output embeddings are no longer tied after merging"):
        merged = ours.merge_and_unload()
    assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    # with the flag still set, a save/reload ties lm_head back to the embedding and the saved head is lost
    assert merged.config.tie_word_embeddings is False


def test_adapting_tied_embeddings_warns_like_peft(bases):
    arch, first, _ = CASES["t5-embedding"]
    for lib, config_cls in ((peft, peft.LoraConfig), (peftcore_torch, peftcore.LoraConfig)):
        with warnings.catch_warnings():
            # pytest.warns re-emits what it did not match; transformers' deprecation notices are not ours
            warnings.filterwarnings("ignore", category=FutureWarning)
            with pytest.warns(UserWarning, match=TIED_WARNING):
                lib.get_peft_model(copy.deepcopy(bases[arch]), _config(config_cls, first))


def test_ensure_weight_tying_is_refused_not_ignored(bases):
    arch, first, _ = CASES["t5-embedding"]
    with pytest.raises(peftcore.errors.ConfigError, match="ensure_weight_tying=True is not supported"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases[arch]),
                                      _config(peftcore.LoraConfig, {**first, "ensure_weight_tying": True}))
