"""Prompt tuning, prefix tuning and P-tuning core vs real peft on tiny transformers models (Llama with
grouped-query attention, T5, BERT): prepared configs, encoder parameter names/shapes, ``get_prompt``
(prompts and the key/value layout inside peft's caches), what is saved, what a saved adapter gives
after loading, TEXT init, and the input-side ops composed into peft's forward."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from peftcore import PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig  # noqa: E402
from peftcore.methods import prompt_learning as pl  # noqa: E402
from peftcore.methods.prompt_tuning import embeddings_for_token_ids, tokenize_init_text  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5

MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), "CAUSAL_LM"),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0)), "SEQ_2_SEQ_LM"),
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=16,
        max_position_embeddings=64, num_labels=3)), "SEQ_CLS"),
}

METHODS = {
    "prompt": (peft.PromptTuningConfig, PromptTuningConfig, {}),
    "prefix": (peft.PrefixTuningConfig, PrefixTuningConfig, {}),
    "prefix-proj": (peft.PrefixTuningConfig, PrefixTuningConfig, dict(prefix_projection=True, encoder_hidden_size=6)),
    "mlp": (peft.PromptEncoderConfig, PromptEncoderConfig, dict(encoder_hidden_size=5)),
    "lstm": (peft.PromptEncoderConfig, PromptEncoderConfig, dict(encoder_reparameterization_type="LSTM",
                                                                encoder_hidden_size=3)),
}


def rel_err(actual, desired):
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    return float(np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-30))


def as_numpy(t):
    return t.detach().cpu().numpy()


def legacy_layers(cache):
    """peft's cache as per-layer (key, value) numpy pairs (the self-attention part for encoder-decoders)."""
    if isinstance(cache, transformers.EncoderDecoderCache):
        assert cache.cross_attention_cache.get_seq_length() == 0  # peft drops the cross-attention prefix
        cache = cache.self_attention_cache
    return [(as_numpy(layer.keys), as_numpy(layer.values)) for layer in cache.layers]


def build(model_name, method, tokens=3, **extra):
    factory, task = MODELS[model_name]
    peft_cls, ours_cls, kwargs = METHODS[method]
    torch.manual_seed(hash((model_name, method)) % 2**31)
    model = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft_cls(task_type=task, num_virtual_tokens=tokens, **kwargs, **extra))
    ours = pl.prepare_config(ours_cls(task_type=task, num_virtual_tokens=tokens, **kwargs, **extra), model.config)
    return peft_model, ours


CASES = [(m, k) for m in MODELS for k in METHODS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request):
    return build(*request.param)


def test_prepared_config_matches_peft(case):
    peft_model, ours = case
    theirs = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=sorted))
    mine = json.loads(ours.to_json_string())
    for key in ("peft_version", "revision", "base_model_name_or_path"):
        theirs.pop(key, None), mine.pop(key, None)
    if mine["task_type"] == "SEQ_CLS":  # the task model adds its head to modules_to_save (torch backend's job)
        assert set(theirs.pop("modules_to_save")) == {"classifier", "score"} and mine.pop("modules_to_save") is None
    assert mine == theirs


def test_parameters_and_saved_prompt_match_peft(case):
    peft_model, ours = case
    params = {k: v.detach() for k, v in peft_model.prompt_encoder["default"].named_parameters()}
    assert {k: tuple(v.shape) for k, v in params.items()} == pl.parameter_shapes(ours)
    with torch.no_grad():
        saved = peft_model.get_prompt_embedding_to_save("default")
    assert rel_err(as_numpy(pl.prompt_embeddings_to_save(params, config=ours)), as_numpy(saved)) <= RTOL


def test_get_prompt_matches_peft(case):
    peft_model, ours = case
    params = {k: v.detach() for k, v in peft_model.prompt_encoder["default"].named_parameters()}
    with torch.no_grad():
        theirs = peft_model.get_prompt(batch_size=2)
        mine = pl.get_prompt(params, config=ours, batch_size=2)
    if str(ours.peft_type) != "PREFIX_TUNING":
        assert rel_err(as_numpy(mine), as_numpy(theirs)) <= RTOL
        return
    layers = legacy_layers(theirs)
    assert len(layers) == len(mine) == ours.num_layers
    for (key, value), got in zip(layers, mine):
        assert len(got) == 2 * ours.num_transformer_submodules
        assert rel_err(as_numpy(got[0]), key) <= RTOL and rel_err(as_numpy(got[1]), value) <= RTOL


def test_saved_adapter_is_prompt_embeddings_and_loads(case, tmp_path):
    peft_model, ours = case
    params = {k: v.detach() for k, v in peft_model.prompt_encoder["default"].named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)
    tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    extra = {k for k in tensors if k != "prompt_embeddings"}
    assert "prompt_embeddings" in tensors and all(".modules_to_save." in k or "classifier" in k for k in extra)
    expected = as_numpy(pl.prompt_embeddings_to_save(params, config=ours))
    assert rel_err(tensors["prompt_embeddings"], expected) <= RTOL
    # peft's loaded (inference-mode) adapter vs ours built from the file alone
    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert loaded_config.inference_mode and type(loaded_config) is type(ours)
    loaded_config = pl.prepare_config(loaded_config, peft_model.get_base_model().config)
    mine = pl.get_prompt(pl.load_prompt_embeddings(tensors["prompt_embeddings"], config=loaded_config),
                         config=loaded_config, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(peft_model.get_base_model(), tmp_path, adapter_name="reloaded")
    assert set(dict(reloaded.prompt_encoder["reloaded"].named_parameters())) == set(pl.parameter_shapes(loaded_config))
    with torch.no_grad():
        theirs = reloaded.get_prompt(batch_size=1)
    if str(ours.peft_type) == "PREFIX_TUNING":
        for (key, value), got in zip(legacy_layers(theirs), mine, strict=True):
            assert rel_err(got[0], key) <= RTOL and rel_err(got[1], value) <= RTOL
    else:
        assert rel_err(mine, as_numpy(theirs)) <= RTOL


def test_text_init_matches_peft(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "review", "as", "positive", "or", "negative"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    text = "classify the review as positive"
    for tokens in (2, 7):  # cut, and repeated
        peft_model, ours = build("llama", "prompt", tokens=tokens, prompt_tuning_init="TEXT",
                                 prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path))
        ids = tokenize_init_text(fast, text, total_virtual_tokens=ours.total_virtual_tokens)
        table = peft_model.get_base_model().get_input_embeddings().weight.detach()
        mine = embeddings_for_token_ids(table, torch.asarray(ids))
        theirs = peft_model.prompt_encoder["default"].embedding.weight.detach()
        assert mine.dtype == theirs.dtype == torch.float32 and rel_err(as_numpy(mine), as_numpy(theirs)) <= RTOL


@pytest.mark.parametrize("method", ["prompt", "lstm", "prefix"])
def test_ops_composed_give_peft_causal_lm_forward(method):
    peft_model, ours = build("llama", method)
    base = peft_model.get_base_model()
    params = {k: v.detach() for k, v in peft_model.prompt_encoder["default"].named_parameters()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x: `past_key_values` renamed `cache`
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        extended = pl.extend_attention_mask(mask, num_virtual_tokens=ours.num_virtual_tokens)
        if method == "prefix":
            cache = transformers.DynamicCache(pl.get_prompt(params, config=ours, batch_size=2))
            mine = base(input_ids=ids, attention_mask=extended, labels=labels, past_key_values=cache)
        else:
            embeds = pl.prepend_virtual_tokens(pl.get_prompt(params, config=ours, batch_size=2),
                                               base.get_input_embeddings()(ids))
            mine = base(inputs_embeds=embeds, attention_mask=extended,
                        labels=pl.extend_labels(labels, num_virtual_tokens=ours.num_virtual_tokens))
    assert rel_err(as_numpy(mine.logits), as_numpy(theirs.logits)) <= RTOL
    assert rel_err(as_numpy(mine.loss), as_numpy(theirs.loss)) <= RTOL


GEOMETRIES = [
    dict(n_layer=2, n_embd=12, n_head=3),
    dict(num_layers=2, d_model=8, num_heads=2),
    dict(num_hidden_layers=2, d_model=8, encoder_attention_heads=4),
    dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=2),
    dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=1, head_dim=6),
    dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, global_head_dim=8,
         num_global_key_value_heads=1),
    dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
         per_layer_config={"0": {"head_dim": 8, "num_key_value_heads": 1}, "2": {"head_dim": 6}}),
    dict(text_config=dict(num_hidden_layers=1, hidden_size=6, num_attention_heads=2, num_key_value_heads=1)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(sorted(g))[:60])
@pytest.mark.parametrize("method", ["prompt", "prefix", "mlp"])
def test_prepare_config_matches_peft_on_config_dicts(geometry, method):
    from peft.utils.other import _prepare_prompt_learning_config

    peft_cls, ours_cls, _ = METHODS[method]
    theirs = _prepare_prompt_learning_config(peft_cls(num_virtual_tokens=2), dict(geometry))
    ours = pl.prepare_config(ours_cls(num_virtual_tokens=2), geometry)
    # (peft also sets a stray, never-saved `encoder_hidden_size` attribute on PromptTuningConfig)
    fields = [f for f in ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size")
              if f in ours.field_names()]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
