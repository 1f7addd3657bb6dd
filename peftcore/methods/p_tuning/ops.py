"""P-tuning's prompt encoder: an MLP, or a bidirectional LSTM followed by an MLP (``peft``'s ``PromptEncoder``).

The LSTM is written from its equations with ``torch.nn.LSTM``'s parameter layout (gates stacked
``i, f, g, o``; ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}[_reverse]``, ``bias_ih_l{k}[...]``,
``bias_hh_l{k}[...]``), ``batch_first``, zero initial state. The time loop is a Python loop over the
(static) number of virtual tokens, so it traces under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from peftcore._xp import Array, Namespace, array_namespace
from peftcore.errors import ShapeMismatchError

__all__ = ["lstm", "lstm_mlp_head", "lstm_parameter_names", "mlp_head"]

_DIRECTIONS = ("", "_reverse")


def _linear(x: Array, weight: Array, bias: Array, *, xp: Namespace) -> Array:
    return xp.matmul(x, xp.matrix_transpose(weight)) + bias


def _relu(x: Array, *, xp: Namespace) -> Array:
    return xp.maximum(x, xp.zeros_like(x))


def _sigmoid(x: Array, *, xp: Namespace) -> Array:
    # the tanh form never overflows, unlike 1 / (1 + exp(-x))
    return (xp.tanh(x / 2) + 1) / 2


def mlp_head(x: Array, w0: Array, b0: Array, w2: Array, b2: Array, w4: Array, b4: Array, /) -> Array:
    """``relu(relu(x·W0ᵀ + b0)·W2ᵀ + b2)·W4ᵀ + b4``: ``(..., D)`` -> ``(..., D)``.

    ``peft``'s MLP reparameterisation ``mlp_head = Sequential(Linear(D, E), ReLU(), Linear(E, E), ReLU(),
    Linear(E, D))`` (always two hidden layers, whatever ``encoder_num_layers`` says).
    """
    xp = array_namespace(x, w0, b0, w2, b2, w4, b4)
    hidden = _relu(_linear(x, w0, b0, xp=xp), xp=xp)
    hidden = _relu(_linear(hidden, w2, b2, xp=xp), xp=xp)
    return _linear(hidden, w4, b4, xp=xp)


def lstm_mlp_head(h: Array, w0: Array, b0: Array, w2: Array, b2: Array, /) -> Array:
    """``relu(h·W0ᵀ + b0)·W2ᵀ + b2``: ``(..., 2E)`` -> ``(..., D)`` (the MLP after ``peft``'s LSTM)."""
    xp = array_namespace(h, w0, b0, w2, b2)
    return _linear(_relu(_linear(h, w0, b0, xp=xp), xp=xp), w2, b2, xp=xp)


def lstm_parameter_names(num_layers: int) -> tuple[str, ...]:
    """``torch.nn.LSTM(bidirectional=True)`` parameter names, in its ``named_parameters`` order."""
    return tuple(
        f"{kind}_l{layer}{direction}"
        for layer in range(num_layers)
        for direction in _DIRECTIONS
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


def _direction(x: Array, params: Mapping[str, Array], suffix: str, *, reverse: bool, xp: Namespace) -> Array:
    """One direction of one layer: ``(..., T, in)`` -> ``(..., T, E)``."""
    w_hh, b_hh = params[f"weight_hh{suffix}"], params[f"bias_hh{suffix}"]
    hidden_size = w_hh.shape[-1]
    # input contributions of every step at once; only the recurrent part is sequential
    gates_x = _linear(x, params[f"weight_ih{suffix}"], params[f"bias_ih{suffix}"], xp=xp)
    h = xp.zeros_like(gates_x[..., 0, :hidden_size])
    c = xp.zeros_like(h)
    steps = range(x.shape[-2] - 1, -1, -1) if reverse else range(x.shape[-2])
    outputs = {}
    for t in steps:
        gates = gates_x[..., t, :] + _linear(h, w_hh, b_hh, xp=xp)
        i, f, g, o = (gates[..., k * hidden_size:(k + 1) * hidden_size] for k in range(4))
        c = _sigmoid(f, xp=xp) * c + _sigmoid(i, xp=xp) * xp.tanh(g)
        h = _sigmoid(o, xp=xp) * xp.tanh(c)
        outputs[t] = h
    return xp.stack([outputs[t] for t in range(x.shape[-2])], axis=-2)


def lstm(
    x: Array, params: Mapping[str, Array], /, *, num_layers: int, dropout_masks: Sequence[Array] | None = None
) -> Array:
    """Bidirectional ``num_layers``-layer LSTM: ``(..., T, D)`` -> ``(..., T, 2E)``.

    Per direction and step: ``[i f g o] = x_t·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh``;
    ``c = σ(f)·c + σ(i)·tanh(g)``; ``h = σ(o)·tanh(c)`` (``h = c = 0`` at the start). Output ``t`` is
    ``concat(h_forward_t, h_backward_t)``; layer ``k > 0`` reads layer ``k-1``'s output, multiplied by
    ``dropout_masks[k-1]`` when given (``nn.LSTM``'s inter-layer dropout in training; the caller draws
    the masks, scaled by ``1/(1-p)``). ``params``: ``nn.LSTM`` names without the ``lstm_head.`` prefix.
    """
    xp = array_namespace(x, *params.values())
    expected = set(lstm_parameter_names(num_layers))
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        raise ShapeMismatchError(f"lstm parameters: missing {missing}, unexpected {extra}")
    if dropout_masks is not None and len(dropout_masks) != num_layers - 1:
        raise ShapeMismatchError(f"lstm: {len(dropout_masks)} dropout masks for {num_layers} layers (need one fewer)")
    for layer in range(num_layers):
        if layer and dropout_masks is not None:
            x = x * dropout_masks[layer - 1]
        weight = params[f"weight_ih_l{layer}"]
        if weight.shape[-1] != x.shape[-1]:
            raise ShapeMismatchError(
                f"lstm layer {layer}: weight_ih_l{layer} {tuple(weight.shape)} does not take inputs "
                f"of width {x.shape[-1]}"
            )
        x = xp.concat(
            [_direction(x, params, f"_l{layer}{d}", reverse=bool(d), xp=xp) for d in _DIRECTIONS], axis=-1
        )
    return x
