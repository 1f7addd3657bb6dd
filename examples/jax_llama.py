"""A small pure-JAX Llama (transformers' ``LlamaForCausalLM``) whose linear layers take LoRA adapters.

Parameters are a nested-dict pytree keyed exactly like the torch model's state dict, layers as a list::

    {"model": {"embed_tokens": {"weight": (vocab, hidden)},
               "layers": [{"self_attn": {"q_proj": {"weight": (out, in)}, "k_proj": ..., "v_proj": ..., "o_proj": ...},
                           "mlp": {"gate_proj": ..., "up_proj": ..., "down_proj": ...},
                           "input_layernorm": {"weight"}, "post_attention_layernorm": {"weight"}}, ...],
               "norm": {"weight": (hidden,)}},
     "lm_head": {"weight": (vocab, hidden)}}          # absent when the embeddings are tied

so the module paths ``peftcore_jax`` derives from the tree (``model.layers.0.self_attn.q_proj``) are the names
``peft`` uses for the same torch model, and adapter files move between the two unchanged. Weights keep the torch
orientation (layout ``"torch"``). Every linear layer and the token embedding go through
``peftcore_jax.dense`` / ``peftcore_jax.embed`` with the adapter for their path (or ``None``), so a LoRA is applied
factored, ``x Wᵀ + s·(x Aᵀ) Bᵀ``, without forming ``W + ΔW``.

Prompt learning (``peftcore_jax.prompt_learning``): ``forward`` also takes a soft prompt (prompt tuning, P-tuning:
virtual-token embeddings put before the token embeddings) or a key/value prefix (prefix tuning: per layer
``(key, value)``, attended by every token), plus a padding ``attention_mask``; ``forward_with_prompt`` runs a
``PromptAdapter`` the way ``peft``'s ``PeftModelForCausalLM`` does.

Run ``python examples/jax_llama.py`` to compare with transformers on a tiny random model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import peftcore_jax
from peftcore.methods import prompt_learning
from peftcore_jax import prompt_learning as jax_prompt_learning

__all__ = ["LlamaSpec", "forward", "forward_with_prompt", "init_params", "params_from_state_dict",
           "spec_from_hf_config"]


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The architecture numbers the forward pass needs (hashable: pass it as a static argument to ``jax.jit``)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


def spec_from_hf_config(config: Any) -> LlamaSpec:
    """``LlamaSpec`` of a transformers ``LlamaConfig`` (default RoPE only)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r}: this example implements the default RoPE only")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaSpec(
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(theta),
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )


def params_from_state_dict(state_dict: Mapping[str, Any], /, *, tie_word_embeddings: bool = False,
                           dtype: Any = jnp.float32) -> dict:
    """Nested-dict params from a ``LlamaForCausalLM`` state dict (``{name: array}``; NumPy or torch-``.numpy()``).

    ``"model.layers.3.mlp.up_proj.weight"`` becomes ``params["model"]["layers"][3]["mlp"]["up_proj"]["weight"]``;
    digits under ``layers`` index a list. Rotary buffers are skipped; with tied embeddings ``lm_head`` is dropped.
    """
    params: dict = {}
    for name, value in state_dict.items():
        if "rotary_emb" in name or (tie_word_embeddings and name.startswith("lm_head.")):
            continue
        *parents, leaf = name.split(".")
        node: Any = params
        for i, part in enumerate(parents):
            child_is_index = i + 1 < len(parents) and parents[i + 1].isdigit()
            if isinstance(node, list):
                node = node[int(part)]
                continue
            node = node.setdefault(part, [] if child_is_index else {})
            if child_is_index:
                index = int(parents[i + 1])
                node.extend({} for _ in range(index + 1 - len(node)))
        node[leaf] = jnp.asarray(np.asarray(value), dtype=dtype)
    return params


def init_params(key: jax.Array, /, *, spec: LlamaSpec, vocab_size: int, hidden_size: int, intermediate_size: int,
                num_hidden_layers: int, dtype: Any = jnp.float32) -> dict:
    """Random params (normal, std 0.02 as transformers' ``initializer_range``; norms at 1) for benchmarks.

    Same tree as ``params_from_state_dict``, without needing torch.
    """
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_key_value_heads * spec.head_dim
    shapes = {"self_attn": {"q_proj": (q_out, hidden_size), "k_proj": (kv_out, hidden_size),
                            "v_proj": (kv_out, hidden_size), "o_proj": (hidden_size, q_out)},
              "mlp": {"gate_proj": (intermediate_size, hidden_size), "up_proj": (intermediate_size, hidden_size),
                      "down_proj": (hidden_size, intermediate_size)}}
    keys = iter(jax.random.split(key, 2 + 7 * num_hidden_layers))

    def weight(shape):
        return {"weight": (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)}

    def ones():
        return {"weight": jnp.ones((hidden_size,), dtype)}

    layers = [{**{block: {name: weight(shape) for name, shape in names.items()} for block, names in shapes.items()},
               "input_layernorm": ones(), "post_attention_layernorm": ones()} for _ in range(num_hidden_layers)]
    params = {"model": {"embed_tokens": weight((vocab_size, hidden_size)), "layers": layers, "norm": ones()}}
    head = weight((vocab_size, hidden_size))
    if not spec.tie_word_embeddings:
        params["lm_head"] = head
    return params


def _rms_norm(x, weight, eps):
    # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _rotary(positions, head_dim, theta, dtype):
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(x, layer, adapters, path, spec, cos, sin, past, key_mask):
    batch, seq, _ = x.shape
    heads, kv_heads, head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim

    def proj(name, n):
        y = peftcore_jax.dense(x, layer[name], adapters.get(f"{path}.{name}"))
        return y.reshape(batch, seq, n, head_dim).transpose(0, 2, 1, 3)  # (batch, heads, seq, head_dim)

    q, k, v = proj("q_proj", heads), proj("k_proj", kv_heads), proj("v_proj", kv_heads)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    past_len = 0
    if past is not None:  # a prefix is cached as keys are: already rotated (here: used as given)
        past_len = past[0].shape[2]
        k = jnp.concatenate([jnp.broadcast_to(past[0], (batch, *past[0].shape[1:])).astype(k.dtype), k], axis=2)
        v = jnp.concatenate([jnp.broadcast_to(past[1], (batch, *past[1].shape[1:])).astype(v.dtype), v], axis=2)
    k = jnp.repeat(k, heads // kv_heads, axis=1)
    v = jnp.repeat(v, heads // kv_heads, axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * head_dim**-0.5
    # query i sits at position past_len + i and sees every key up to it
    allowed = jnp.arange(past_len + seq)[None, :] <= past_len + jnp.arange(seq)[:, None]
    if key_mask is not None:
        allowed = allowed[None, None] & (key_mask[:, None, None, :] != 0)
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim)
    return peftcore_jax.dense(out, layer["o_proj"], adapters.get(f"{path}.o_proj"))


def _mlp(x, mlp, adapters, path):
    gate = peftcore_jax.dense(x, mlp["gate_proj"], adapters.get(f"{path}.gate_proj"))
    up = peftcore_jax.dense(x, mlp["up_proj"], adapters.get(f"{path}.up_proj"))
    return peftcore_jax.dense(jax.nn.silu(gate) * up, mlp["down_proj"], adapters.get(f"{path}.down_proj"))


def forward(params: dict, input_ids: jax.Array, /, *, spec: LlamaSpec,
            adapters: Mapping[str, Any] | Any = None, soft_prompt: jax.Array | None = None,
            prefix: Any = None, attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits for ``input_ids (batch, seq)``, causal.

    ``adapters``: a ``peftcore_jax.LoraAdapters``, several active at once (``peftcore_jax.ActiveAdapters`` or a
    list of ``LoraAdapters``, peft's ``set_adapter([...])``), or a ``{module_path: LoraParams}`` mapping
    (``None``: base model).
    ``soft_prompt`` ``(T, D)`` or ``(batch|1, T, D)``: virtual tokens before the token embeddings (cast to their
    dtype); the logits then cover ``T + seq`` positions, positions ``0..T+seq-1``, as ``peft``'s.
    ``prefix``: per layer ``(key, value)``, each ``(batch|1, kv_heads, T, head_dim)`` (``peftcore``'s
    ``past_key_values_layout``): attended by every token; the tokens sit at positions ``T..T+seq-1``.
    ``attention_mask (batch, seq)``: 1 for tokens, 0 for padding; virtual tokens are always attended.
    """
    adapters = _adapter_map(adapters)
    model = params["model"]
    hidden = peftcore_jax.embed(input_ids, model["embed_tokens"], adapters.get("model.embed_tokens"))
    virtual = 0
    if soft_prompt is not None:
        hidden = prompt_learning.prepend_virtual_tokens(soft_prompt, hidden)
        virtual = hidden.shape[1] - input_ids.shape[1]
    past_len = 0
    if prefix is not None:
        if len(prefix) != len(model["layers"]):
            raise ValueError(f"prefix has {len(prefix)} layers, the model {len(model['layers'])}")
        past_len = prefix[0][0].shape[2]
    key_mask = None
    if attention_mask is not None:
        key_mask = prompt_learning.extend_attention_mask(jnp.asarray(attention_mask),
                                                         num_virtual_tokens=virtual + past_len)
    cos, sin = _rotary(jnp.arange(past_len, past_len + hidden.shape[1]), spec.head_dim, spec.rope_theta, hidden.dtype)
    for i, layer in enumerate(model["layers"]):
        path = f"model.layers.{i}"
        past = None if prefix is None else prefix[i]
        normed = _rms_norm(hidden, layer["input_layernorm"]["weight"], spec.rms_norm_eps)
        hidden = hidden + _attention(normed, layer["self_attn"], adapters, f"{path}.self_attn", spec, cos, sin,
                                     past, key_mask)
        normed = _rms_norm(hidden, layer["post_attention_layernorm"]["weight"], spec.rms_norm_eps)
        hidden = hidden + _mlp(normed, layer["mlp"], adapters, f"{path}.mlp")
    hidden = _rms_norm(hidden, model["norm"]["weight"], spec.rms_norm_eps)
    head = model["embed_tokens"] if spec.tie_word_embeddings else params["lm_head"]
    return peftcore_jax.dense(hidden, head, adapters.get("lm_head"))


def forward_with_prompt(params: dict, input_ids: jax.Array, prompt_adapter: Any, /, *, spec: LlamaSpec,
                        attention_mask: jax.Array | None = None, adapters: Any = None) -> jax.Array:
    """``peft``'s ``PeftModelForCausalLM.forward`` for a ``peftcore_jax.prompt_learning.PromptAdapter``.

    Prompt tuning / P-tuning: logits ``(batch, T + seq, vocab)``; prefix tuning (prefix cast to the model's
    dtype, as ``peft``): ``(batch, seq, vocab)``.
    """
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    prompt = jax_prompt_learning.get_prompt(prompt_adapter, batch_size=input_ids.shape[0], dtype=dtype)
    if prompt_adapter.peft_type == "PREFIX_TUNING":
        return forward(params, input_ids, spec=spec, adapters=adapters, prefix=prompt, attention_mask=attention_mask)
    return forward(params, input_ids, spec=spec, adapters=adapters, soft_prompt=prompt, attention_mask=attention_mask)


def _adapter_map(adapters: Any) -> Any:
    """Something with ``.get(path)`` giving a module's ``LoraParams`` (or a tuple of them), or None."""
    if adapters is None:
        return {}
    if isinstance(adapters, (list, tuple)):
        return peftcore_jax.ActiveAdapters(tuple(adapters))
    return adapters


def _main() -> None:  # pragma: no cover - a demo
    import torch
    import transformers

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    spec = spec_from_hf_config(config)
    params = params_from_state_dict(state, tie_word_embeddings=spec.tie_word_embeddings)
    ids = np.arange(12).reshape(2, 6) % config.vocab_size
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(forward, static_argnames="spec")(params, jnp.asarray(ids), spec=spec))
    print("max |jax - torch| / max |torch| =", np.abs(got - expected).max() / np.abs(expected).max())


if __name__ == "__main__":  # pragma: no cover
    _main()
