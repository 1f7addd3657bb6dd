"""Float64 NumPy reference for prompt tuning, prefix tuning and P-tuning (never imports peftcore).

Written from the equations: the MLP heads and the bidirectional LSTM step by step (torch's gate
order i, f, g, o), and peft's key/value layout by literally repeating, permuting and splitting.
"""

from __future__ import annotations

import math

import numpy as np


def linear(x, weight, bias):
    return np.einsum("...i,oi->...o", x, weight) + bias


def relu(x):
    return np.where(x > 0, x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def prefix_projection(embedding, w1, b1, w2, b2):
    return linear(np.tanh(linear(embedding, w1, b1)), w2, b2)


def mlp_head(x, w0, b0, w2, b2, w4, b4):
    return linear(relu(linear(relu(linear(x, w0, b0)), w2, b2)), w4, b4)


def lstm_mlp_head(h, w0, b0, w2, b2):
    return linear(relu(linear(h, w0, b0)), w2, b2)


def _lstm_direction(x, w_ih, w_hh, b_ih, b_hh, reverse):
    """x (T, in) -> (T, H), one sequence."""
    steps, hidden = x.shape[0], w_hh.shape[1]
    h, c = np.zeros(hidden), np.zeros(hidden)
    out = np.zeros((steps, hidden))
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        z = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
        i, f, g, o = z[:hidden], z[hidden:2 * hidden], z[2 * hidden:3 * hidden], z[3 * hidden:]
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out[t] = h
    return out


def lstm(x, params, num_layers, dropout_masks=None):
    """Bidirectional LSTM; x (..., T, D) -> (..., T, 2H); params with torch nn.LSTM names.

    ``dropout_masks[k-1]`` (broadcastable to the layer output) multiplies layer k's input, k > 0.
    """
    layer_in = np.asarray(x, dtype=np.float64)
    for k in range(num_layers):
        if k and dropout_masks is not None:
            layer_in = layer_in * np.asarray(dropout_masks[k - 1], dtype=np.float64)
        flat = layer_in.reshape((-1,) + layer_in.shape[-2:])
        outputs = []
        for seq in flat:
            parts = []
            for suffix, reverse in (("", False), ("_reverse", True)):
                name = f"_l{k}{suffix}"
                parts.append(_lstm_direction(seq, params["weight_ih" + name], params["weight_hh" + name],
                                             params["bias_ih" + name], params["bias_hh" + name], reverse))
            outputs.append(np.concatenate(parts, axis=-1))
        layer_in = np.stack(outputs).reshape(layer_in.shape[:-1] + (outputs[0].shape[-1],))
    return layer_in


def past_key_values(prefix, num_layers, num_heads, token_dim, submodules, batch_size):
    """peft get_prompt: view (B,T,2L,H,hd), repeat axis 2 if N==2, permute (2,0,3,1,4), split in chunks of 2N."""
    prefix = np.asarray(prefix, dtype=np.float64)
    if prefix.ndim == 2:
        prefix = np.repeat(prefix[None], batch_size, axis=0)
    b, t = prefix.shape[:2]
    viewed = prefix.reshape(b, t, 2 * num_layers, num_heads, token_dim // num_heads)
    if submodules == 2:
        viewed = np.concatenate([viewed, viewed], axis=2)
    permuted = np.transpose(viewed, (2, 0, 3, 1, 4))
    size = 2 * submodules
    return [tuple(permuted[start + j] for j in range(size)) for start in range(0, permuted.shape[0], size)]


def prepend(prompts, embeds):
    prompts = np.asarray(prompts)
    if prompts.ndim == 2:
        prompts = prompts[None]
    prompts = np.repeat(prompts, embeds.shape[0] // prompts.shape[0], axis=0)
    return np.concatenate([prompts, embeds], axis=1)


def prepend_constant(values, n, fill):
    values = np.asarray(values)
    return np.concatenate([np.full((values.shape[0], n), fill, dtype=values.dtype), values], axis=1)


def text_init_ids(ids, total):
    ids = list(ids)
    if len(ids) >= total:
        return ids[:total]
    return (ids * math.ceil(total / len(ids)))[:total]
