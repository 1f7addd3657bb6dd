"""peft's constants: file names, shorthands and the per-architecture default target tables.

Data transcribed from ``peft/utils/constants.py`` (peft 0.21.2); the tables keep peft's names so a
reader can grep both code bases. Keys are ``config.model_type`` of a transformers model; values
are lists of module-name suffixes (or, for ``gemma4``, a full-match regex string), used only when
a config leaves ``target_modules`` as ``None``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from peftcore.errors import ConfigError, UnknownPeftTypeError

__all__ = [
    "ALLOWED_COMPUTE_DTYPES",
    "CONFIG_NAME",
    "DUMMY_MODEL_CONFIG",
    "DUMMY_TARGET_MODULES",
    "EMBEDDING_LAYER_NAMES",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "MIN_TARGET_MODULES_FOR_OPTIMIZATION",
    "SAFETENSORS_WEIGHTS_NAME",
    "SEQ_CLS_HEAD_NAMES",
    "TASK_TYPE_MODULES_TO_SAVE",
    "TARGET_MODULES_MAPPINGS",
    "TOKENIZER_CONFIG_NAME",
    "UPCAST_DTYPES",
    "WEIGHTS_NAME",
    "get_feedforward_modules",
    "get_target_modules",
]

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]
# Task heads ``peft``'s task models add to ``modules_to_save`` (PeftModelForSequenceClassification, ...).
TASK_TYPE_MODULES_TO_SAVE = MappingProxyType(
    {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
)
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
DUMMY_TARGET_MODULES = "dummy-target-modules"
DUMMY_MODEL_CONFIG = {"model_type": "custom"}
# peft compresses target lists at least this long to minimal suffixes; matching is unchanged by it
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
# dtype names, not framework objects, so the core stays framework-free
ALLOWED_COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
UPCAST_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")


def _copy_table(table: dict, **overrides: list[str]) -> dict:
    # fresh lists, so mutating one method's table never leaks into another's
    copied = {k: (list(v) if isinstance(v, list) else v) for k, v in table.items()}
    copied.update(overrides)
    return copied


_GEMMA4_QV = r".*language_model\..*\.(q_proj|v_proj)"

TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": _GEMMA4_QV,
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

_LORA = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

# identical to LoRA's table
TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_DEFT_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_GLORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_TINYLORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_PSOFT_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_GRALORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_PEANUT_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_HIRA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING = _copy_table(_LORA)
TRANSFORMERS_MODELS_TO_SUPERTUNING_TARGET_MODULES_MAPPING = _copy_table(_LORA)

# LoRA's table with a few overrides
TRANSFORMERS_MODELS_TO_ADAMSS_TARGET_MODULES_MAPPING = _copy_table(_LORA, vit=["query", "value"])
TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING = _copy_table(
    _LORA, gpt_bigcode=["mlp.c_proj"], gpt2=["mlp.c_proj"]
)
TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING = _copy_table(_LORA, gpt_bigcode=["mlp.c_proj"], gpt2=["mlp.c_proj"])
TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING = _copy_table(_LORA, phi=["q_proj", "v_proj"])
TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING = _copy_table(_LORA, phi=["q_proj", "v_proj"])
TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING = _copy_table(
    TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, vit=["query", "value"]
)
TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING = _copy_table(
    TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, dinov2=["query", "value"]
)

_GEMMA2_NORMS = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
]

TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": [
        "multi_modal_projector",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "embed_tokens",
        "lm_head",
    ],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": list(_GEMMA2_NORMS),
    "gemma3_text": list(_GEMMA2_NORMS),
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}

TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING = {
    "t5": ["v"],
    "mt5": ["v"],
    "roberta": ["value"],
    "opt": ["v_proj"],
    "gptj": ["v_proj"],
    "gpt_neo": ["v_proj"],
    "bart": ["v_proj"],
    "llama": ["v_proj"],
    "llama4": ["v_proj"],
    "mistral": ["v_proj"],
    "mixtral": ["v_proj"],
    "bert": ["value"],
    "deberta-v2": ["value_proj"],
    "phi": ["v_proj"],
    "gemma": ["v_proj"],
    "gemma2": ["v_proj"],
    "gemma3_text": ["v_proj"],
    "qwen2": ["v_proj"],
    "qwen3": ["v_proj"],
}

TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": _GEMMA4_QV,
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": _GEMMA4_QV,
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

_ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]

TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING = {
    "llama": list(_ALL_SEVEN),
    "llama4": list(_ALL_SEVEN),
    "mistral": list(_ALL_SEVEN),
    "mixtral": list(_ALL_SEVEN),
    "gemma": list(_ALL_SEVEN),
    "gemma2": list(_ALL_SEVEN),
    "gemma3_text": list(_ALL_SEVEN),
    "qwen2": list(_ALL_SEVEN),
    "qwen3": list(_ALL_SEVEN),
    "phi": list(_ALL_SEVEN),
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}

TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["mlp.c_proj"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": _GEMMA4_QV,
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# Empty with transformers >= 4.54: Bloom / GPT-BigCode needed cache post-processing only before that.
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict = {}

# peft_type -> default-target table (the table a method's tuner class uses as ``target_module_mapping``)
TARGET_MODULES_MAPPINGS: Mapping[str, dict] = MappingProxyType(
    {
        "LORA": TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "ADALORA": TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        "ADAMSS": TRANSFORMERS_MODELS_TO_ADAMSS_TARGET_MODULES_MAPPING,
        "BEFT": TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
        "BOFT": TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING,
        "C3A": TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING,
        "DEFT": TRANSFORMERS_MODELS_TO_DEFT_TARGET_MODULES_MAPPING,
        "DELORA": TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING,
        "FOURIERFT": TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING,
        "FROD": TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING,
        "GLORA": TRANSFORMERS_MODELS_TO_GLORA_TARGET_MODULES_MAPPING,
        "GRALORA": TRANSFORMERS_MODELS_TO_GRALORA_TARGET_MODULES_MAPPING,
        "HIRA": TRANSFORMERS_MODELS_TO_HIRA_TARGET_MODULES_MAPPING,
        "HRA": TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING,
        "IA3": TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        "LILY": TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING,
        "LN_TUNING": TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
        "LOHA": TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
        "LOKR": TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
        "MISS": TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING,
        "OFT": TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING,
        "OSF": TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING,
        "PEANUT": TRANSFORMERS_MODELS_TO_PEANUT_TARGET_MODULES_MAPPING,
        "POLY": TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING,
        "PSOFT": TRANSFORMERS_MODELS_TO_PSOFT_TARGET_MODULES_MAPPING,
        "PVERA": TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING,
        "RANDLORA": TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING,
        "ROAD": TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING,
        "SHIRA": TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING,
        "SUPERTUNING": TRANSFORMERS_MODELS_TO_SUPERTUNING_TARGET_MODULES_MAPPING,
        "TINYLORA": TRANSFORMERS_MODELS_TO_TINYLORA_TARGET_MODULES_MAPPING,
        "UNILORA": TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING,
        "VBLORA": TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING,
        "VERA": TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING,
        "WAVEFT": TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING,
    }
)


def _method_key(method: object) -> str:
    value = getattr(method, "value", method)  # accepts enum members such as peft's PeftType.LORA
    if not isinstance(value, str):
        raise UnknownPeftTypeError(f"method must be a peft_type string such as 'lora', got {method!r}")
    key = value.upper().replace("-", "_")
    return "LN_TUNING" if key == "LNTUNING" else key


def get_target_modules(method: object, model_type: str) -> list[str] | str:
    """peft's default ``target_modules`` for ``method`` (``"lora"``, ``"LORA"``, ``"ia3"``...) on ``model_type``.

    Returns a fresh list of module-name suffixes, or a full-match regex string where peft's table
    holds one (``gemma4``). Raises ``ConfigError`` naming both when peft has no default.
    """
    key = _method_key(method)
    if key not in TARGET_MODULES_MAPPINGS:
        raise UnknownPeftTypeError(
            f"no default target_modules table for method {method!r}; known: {sorted(TARGET_MODULES_MAPPINGS)}"
        )
    targets = TARGET_MODULES_MAPPINGS[key].get(model_type)
    if targets is None:
        raise ConfigError(
            f"Please specify `target_modules` in the config: method {key} has no default target modules "
            f"for model type {model_type!r}"
        )
    return targets if isinstance(targets, str) else list(targets)


def get_feedforward_modules(model_type: str) -> list[str]:
    """peft's default IA3 ``feedforward_modules`` for ``model_type``; ``ConfigError`` if it has none."""
    modules = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if modules is None:
        raise ConfigError(
            f"Please specify `feedforward_modules` in the config: IA3 has no default feed-forward modules "
            f"for model type {model_type!r}"
        )
    return list(modules)

__all__ += sorted(name for name in dict(globals()) if name.startswith("TRANSFORMERS_MODELS_TO_"))
