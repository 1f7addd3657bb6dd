"""peftcore_torch prompt learning on tiny transformers models, against references built from the base model.

Each expected value is the base model fed by hand what peft's task models feed it: the prompt table
concatenated before the token embeddings (mask of ones, labels -100, token types 0), or a key/value
cache cut from the prefix with peft's view/permute/split written out here with torch.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache, EncoderDecoderCache

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore_torch.prompt_learning import (
    PromptModelForCausalLM,
    PromptModelForSeq2SeqLM,
    PromptModelForSequenceClassification,
    get_prompt_learning_model,
    load_prompt_learning_model,
)

VOCAB = 40
T = 3


def _close(actual, desired):
    torch.testing.assert_close(actual, desired, rtol=1e-5, atol=1e-5 * max(1.0, desired.abs().max().item()))


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     initializer_range=0.5, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    t5 = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=None, dropout_rate=0.0)
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, num_labels=3, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"llama": transformers.LlamaForCausalLM(llama).eval(),
                "t5": transformers.T5ForConditionalGeneration(t5).eval(),
                "bert": transformers.BertForSequenceClassification(bert).eval()}


@pytest.fixture()
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask, torch.randint(2, VOCAB, (2, 5), generator=generator)


def _wrap(bases, name, config, **kwargs):
    return get_prompt_learning_model(copy.deepcopy(bases[name]), config, **kwargs)


def _prefix_cache(prefix, *, batch, layers, heads, submodules=1):
    """peft's layout written out: (T, 2LD) -> view (B, T, 2L, H, hd) [-> doubled] -> (2LN, B, H, T, hd) -> chunks."""
    tokens = prefix.shape[0]
    kv = prefix.expand(batch, *prefix.shape).reshape(batch, tokens, 2 * layers, heads, -1)
    if submodules == 2:
        kv = torch.cat([kv, kv], dim=2)
    chunks = kv.permute(2, 0, 3, 1, 4).split(2 * submodules)
    if submodules == 1:
        return DynamicCache([tuple(chunk) for chunk in chunks])
    cache = EncoderDecoderCache([tuple(chunk) for chunk in chunks])
    cache.cross_attention_cache = DynamicCache()
    for key in cache.is_updated:
        cache.is_updated[key] = False
    return cache


def _ones(n):
    return torch.ones(2, n, dtype=torch.long)


def test_get_peft_model_dispatches_to_task_models(bases, tmp_path):
    for name, task, cls in [("llama", "CAUSAL_LM", PromptModelForCausalLM), ("t5", "SEQ_2_SEQ_LM", PromptModelForSeq2SeqLM),
                            ("bert", "SEQ_CLS", PromptModelForSequenceClassification)]:
        config = peftcore.PromptTuningConfig(task_type=task, num_virtual_tokens=T)
        model = peftcore_torch.get_peft_model(copy.deepcopy(bases[name]), config)
        assert type(model) is cls
        model.save_pretrained(tmp_path / name)
        loaded = peftcore_torch.PeftModel.from_pretrained(copy.deepcopy(bases[name]), tmp_path / name)
        assert type(loaded) is cls
        assert loaded.peft_config["default"].inference_mode and not loaded.training


def test_causal_prompt_tuning_prepends_prompt_mask_and_ignored_labels(bases, batch):
    ids, mask, labels = batch
    model = _wrap(bases, "llama", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    table = model.prompt_encoder["default"].embedding.weight
    base = bases["llama"]
    embeds = torch.cat([table.expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
    expected = base(inputs_embeds=embeds, attention_mask=torch.cat([_ones(T), mask], 1),
                    labels=torch.cat([torch.full((2, T), -100), labels], 1))
    actual = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert actual.logits.shape == (2, T + 5, VOCAB)
    _close(actual.logits, expected.logits)
    _close(actual.loss, expected.loss)


def test_causal_prefix_is_a_cache_with_kv_heads_and_shifted_positions(bases, batch):
    ids, mask, labels = batch
    model = _wrap(bases, "llama", peftcore.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    config = model.peft_config["default"]
    # grouped-query attention: the prefix has the 2 key/value heads of width 4, not 4 query heads
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 8, 2)
    prefix = model.prompt_encoder["default"].embedding.weight
    assert prefix.shape == (T, 2 * 2 * 8)
    positions = torch.arange(5).expand(2, -1)
    expected = bases["llama"](input_ids=ids, attention_mask=torch.cat([_ones(T), mask], 1), labels=labels,
                              position_ids=positions + T, cache=_prefix_cache(prefix, batch=2, layers=2, heads=2))
    actual = model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)
    _close(actual.logits, expected.logits)
    _close(actual.loss, expected.loss)


def test_seq2seq_prefix_fills_the_decoder_self_attention(bases, batch):
    ids, mask, labels = batch
    config = peftcore.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T, prefix_projection=True,
                                         encoder_hidden_size=6)
    model = _wrap(bases, "t5", config)
    params = model.prompt_encoder["default"]
    hidden = torch.tanh(params.embedding.weight @ params.transform[0].weight.T + params.transform[0].bias)
    prefix = hidden @ params.transform[2].weight.T + params.transform[2].bias
    cache = _prefix_cache(prefix, batch=2, layers=2, heads=4, submodules=2)
    expected = bases["t5"](input_ids=ids, attention_mask=mask, labels=labels, cache=cache)
    actual = model(input_ids=ids, attention_mask=mask, labels=labels)
    _close(actual.logits, expected.logits)
    _close(model.get_prompt_embedding_to_save("default"), prefix.detach())


def test_seq2seq_prompt_goes_before_the_encoder_input_only(bases, batch):
    ids, mask, labels = batch
    model = _wrap(bases, "t5", peftcore.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T))
    table = model.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * T, 16)  # one half per transformer submodule; peft feeds only the encoder's
    base = bases["t5"]
    embeds = torch.cat([table[:T].expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
    expected = base(inputs_embeds=embeds, attention_mask=torch.cat([_ones(T), mask], 1), labels=labels)
    _close(model(input_ids=ids, attention_mask=mask, labels=labels).logits, expected.logits)


def test_sequence_classification_prompt_with_token_types_and_trained_head(bases, batch):
    ids, mask, _ = batch
    token_types = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    labels = torch.tensor([0, 2])
    config = peftcore.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=T, encoder_hidden_size=6)
    model = _wrap(bases, "bert", config)
    assert model.peft_config["default"].modules_to_save == ["classifier", "score", "classifier", "score"]
    encoder = model.prompt_encoder["default"]
    x = encoder.embedding.weight
    for index in (0, 2):
        x = torch.relu(x @ encoder.mlp_head[index].weight.T + encoder.mlp_head[index].bias)
    prompt = x @ encoder.mlp_head[4].weight.T + encoder.mlp_head[4].bias
    base = bases["bert"]
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
    expected = base(inputs_embeds=embeds, attention_mask=torch.cat([_ones(T), mask], 1), labels=labels,
                    token_type_ids=torch.cat([torch.zeros(2, T, dtype=torch.long), token_types], 1))
    actual = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
    _close(actual.logits, expected.logits)
    _close(actual.loss, expected.loss)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(["base_model.classifier.modules_to_save.default.weight",
                                "base_model.classifier.modules_to_save.default.bias",
                                *(f"prompt_encoder.default.{n}" for n, _ in encoder.named_parameters())])


def test_sequence_classification_prefix_reaches_the_backbone_cache(bases, batch):
    """peft 0.21.2 refuses here on transformers 5 (it looks for ``past_key_values``); ours passes ``cache``."""
    ids, mask, _ = batch
    model = _wrap(bases, "bert", peftcore.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    prefix = model.prompt_encoder["default"].embedding.weight
    expected = bases["bert"](input_ids=ids, attention_mask=torch.cat([_ones(T), mask], 1),
                             cache=_prefix_cache(prefix, batch=2, layers=2, heads=2))
    _close(model(input_ids=ids, attention_mask=mask).logits, expected.logits)


def test_training_updates_only_the_prompt_encoder(bases, batch):
    ids, mask, labels = batch
    config = peftcore.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_hidden_size=4,
                                          encoder_reparameterization_type="LSTM")
    model = _wrap(bases, "llama", config).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("prompt_encoder.")}
    assert any("lstm_head.weight_hh_l1_reverse" in n for n in changed)


def test_lstm_dropout_applies_in_training_only(bases):
    config = peftcore.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=4,
                                          encoder_reparameterization_type="LSTM", encoder_dropout=0.5)
    encoder = _wrap(bases, "llama", config).prompt_encoder["default"]
    encoder.train()
    torch.manual_seed(0)
    draws = [encoder() for _ in range(3)]
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    encoder.eval()
    lstm = torch.nn.LSTM(16, 4, num_layers=2, bidirectional=True, batch_first=True)
    lstm.load_state_dict({k.removeprefix("lstm_head."): v for k, v in encoder.state_dict().items()
                          if k.startswith("lstm_head.")})
    hidden = lstm(encoder.embedding.weight[None])[0][0]
    expected = encoder.mlp_head[2](torch.relu(encoder.mlp_head[0](hidden)))
    _close(encoder(), expected)


def test_warnings_for_dropped_ids(bases, batch):
    ids, mask, _ = batch
    model = _wrap(bases, "llama", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    with pytest.warns(UserWarning, match="Position ids are not supported"):
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(5).expand(2, -1))
    with pytest.warns(UserWarning, match="Token type ids are not supported"):
        model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def test_mlp_layers_warning_once_at_construction(bases, batch):
    config = peftcore.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_num_layers=3)
    with pytest.warns(UserWarning, match="encoder_num_layers` is ignored") as record:
        model = _wrap(bases, "llama", config)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=batch[0])


def test_generate_equals_greedy_decoding_with_the_forward(bases, batch):
    ids, mask, _ = batch
    for config in (peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T),
                   peftcore.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)):
        model = _wrap(bases, "llama", config)
        if str(config.peft_type) == "PREFIX_TUNING":
            mask = torch.ones_like(ids)  # generate counts positions from the mask; the forward from the cache
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        expected, running_mask = ids, mask
        with torch.no_grad():
            for _ in range(4):
                step = model(input_ids=expected, attention_mask=running_mask).logits[:, -1].argmax(-1, keepdim=True)
                expected = torch.cat([expected, step], 1)
                running_mask = torch.cat([running_mask, torch.ones_like(step)], 1)
        torch.testing.assert_close(generated, expected, rtol=0, atol=0)
        assert "prepare_inputs_for_generation" not in model.base_model.__dict__


def test_disable_adapter_runs_the_base_model(bases, batch):
    ids, mask, _ = batch
    model = _wrap(bases, "llama", peftcore.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    with model.disable_adapter():
        _close(model(input_ids=ids, attention_mask=mask).logits, bases["llama"](input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              bases["llama"](input_ids=ids, attention_mask=mask).logits)


def test_save_load_round_trip_and_trainable_counts(bases, batch, tmp_path, capsys):
    ids, mask, labels = batch
    config = peftcore.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=T, encoder_hidden_size=6)
    model = _wrap(bases, "bert", config).eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = load_prompt_learning_model(copy.deepcopy(bases["bert"]), tmp_path)
    assert set(dict(loaded.prompt_encoder["default"].named_parameters())) == {"embedding.weight"}
    _close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


def test_load_errors_name_the_key(bases, tmp_path):
    model = _wrap(bases, "llama", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    state = model.adapter_state_dict("default")
    with pytest.raises(ShapeMismatchError, match="prompt_embeddings"):
        model.set_adapter_state_dict("default", {"prompt_embeddings": state["prompt_embeddings"][:2]})
    with pytest.raises(IncompatibleKeysError, match="prompt_embeddings"):
        model.set_adapter_state_dict("default", {})
    with pytest.raises(IncompatibleKeysError, match="extra"):
        model.set_adapter_state_dict("default", {**state, "extra": state["prompt_embeddings"]})
    report = model.set_adapter_state_dict("default", {**state, "extra": state["prompt_embeddings"]}, strict=False)
    assert report.unexpected_keys == ["extra"] and report.missing_keys == []


def test_several_adapters(bases, batch, tmp_path):
    ids, mask, _ = batch
    model = _wrap(bases, "llama", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    first = model(input_ids=ids, attention_mask=mask).logits
    model.add_adapter("other", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    _close(model(input_ids=ids, attention_mask=mask).logits, first)
    model.set_adapter("other")
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 2 + 5, VOCAB)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("other", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="different peft types"):
        model.add_adapter("prefix", peftcore.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.set_adapter("default")
    model.delete_adapter("other")
    model.load_adapter(tmp_path, adapter_name="reloaded")
    model.set_adapter("reloaded")
    _close(model(input_ids=ids, attention_mask=mask).logits, first)


def test_text_init_takes_any_tokenizer(bases):
    config = peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text="ignored by the stub", tokenizer_name_or_path="stub")
    model = _wrap(bases, "llama", config, tokenizer=lambda text: {"input_ids": [7, 3]})
    rows = bases["llama"].get_input_embeddings().weight[[7, 3, 7, 3, 7]]
    _close(model.prompt_encoder["default"].embedding.weight, rows)
    through_get_peft_model = peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), config,
                                                           tokenizer=lambda text: {"input_ids": [7, 3]})
    _close(through_get_peft_model.prompt_encoder["default"].embedding.weight, rows)
    with pytest.raises(ConfigError, match="tokenizer"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), peftcore.LoraConfig(target_modules=["q_proj"]),
                                      tokenizer=lambda text: {"input_ids": [7]})


def test_bfloat16_base_gets_a_float32_encoder(bases, batch):
    ids, mask, _ = batch
    base = copy.deepcopy(bases["llama"]).to(torch.bfloat16)
    model = get_prompt_learning_model(base, peftcore.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    assert model.prompt_encoder["default"].embedding.weight.dtype == torch.float32
    assert model.prefix_layout(2)[0][0].dtype == torch.bfloat16
    assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16


def test_bad_configs_are_refused(bases):
    with pytest.raises(ConfigError, match="task_type"):
        _wrap(bases, "llama", peftcore.PromptTuningConfig(num_virtual_tokens=T))
    with pytest.raises(ConfigError, match="not a prompt-learning config"):
        _wrap(bases, "llama", peftcore.LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        _wrap(bases, "llama", peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T), bogus=1)
