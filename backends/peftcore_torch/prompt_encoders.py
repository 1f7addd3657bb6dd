"""Torch holders of the prompt encoders' parameters, under ``peft``'s module names.

``PromptEncoderParams`` builds the sub-modules ``peft`` builds for a prompt-learning adapter
(``embedding``; prefix tuning's ``transform``; P-tuning's ``mlp_head`` / ``lstm_head``), so
``prompt_encoder.<adapter>.<name>`` state-dict keys are peft's. Its forward hands the parameters to
``peftcore.methods.prompt_learning``: torch only stores tensors and draws dropout masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.methods import prompt_learning as pl
from peftcore.methods.p_tuning import ops as p_tuning_ops
from peftcore.methods.prompt_learning import PromptLearningConfig

__all__ = ["PromptEncoderParams", "initial_params"]


def _module_tree(config: PromptLearningConfig, shapes: dict[str, tuple[int, ...]], *,
                 device: torch.device) -> dict[str, nn.Module]:
    """The child modules ``peft``'s encoder has for ``config``, uninitialised (values are copied in after)."""

    def _empty_linear(in_features: int, out_features: int) -> nn.Linear:
        return nn.utils.skip_init(nn.Linear, in_features, out_features, device=device)

    rows, cols = shapes["embedding.weight"]
    children: dict[str, nn.Module] = {"embedding": nn.utils.skip_init(nn.Embedding, rows, cols, device=device)}
    if "transform.0.weight" in shapes:
        hidden, dim = shapes["transform.0.weight"]
        children["transform"] = nn.Sequential(
            _empty_linear(dim, hidden), nn.Tanh(), _empty_linear(hidden, shapes["transform.2.weight"][0]))
    if "lstm_head.weight_hh_l0" in shapes:
        hidden = shapes["lstm_head.weight_hh_l0"][1]
        # nn.LSTM takes no device argument skip_init could see; meta + to_empty skips its initialisation too
        children["lstm_head"] = nn.LSTM(
            input_size=cols, hidden_size=hidden, num_layers=config.encoder_num_layers,
            dropout=config.encoder_dropout, bidirectional=True, batch_first=True, device="meta").to_empty(device=device)
        children["mlp_head"] = nn.Sequential(_empty_linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                             _empty_linear(2 * hidden, cols))
    elif "mlp_head.0.weight" in shapes:
        hidden = shapes["mlp_head.0.weight"][0]
        children["mlp_head"] = nn.Sequential(_empty_linear(cols, hidden), nn.ReLU(), _empty_linear(hidden, hidden),
                                             nn.ReLU(), _empty_linear(hidden, cols))
    return children


class PromptEncoderParams(nn.Module):
    """One adapter's prompt-encoder parameters (peft's ``PromptEmbedding`` / ``PrefixEncoder`` / ``PromptEncoder``).

    ``forward()`` is ``peftcore``'s ``encode_prompt``: ``(T·N, D)`` virtual tokens, or the ``(T, 2·L·D)``
    prefix, without a batch axis. In training mode, P-tuning's LSTM applies ``encoder_dropout`` between
    its layers as ``nn.LSTM`` does (masks from torch's RNG).
    """

    def __init__(self, config: PromptLearningConfig, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        shapes = pl.parameter_shapes(config)
        device = params["embedding.weight"].device
        for name, child in _module_tree(config, shapes, device=device).items():
            self.add_module(name, child)
        own = dict(self.named_parameters())
        if set(own) != set(params):
            raise ValueError(f"prompt encoder parameters {sorted(params)} do not match {sorted(own)}")
        with torch.no_grad():
            for name, value in params.items():
                own[name].copy_(value)

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def forward(self) -> torch.Tensor:
        config = self.config
        if self.training and not config.inference_mode and "lstm_head" in self._modules and config.encoder_dropout:
            return self._lstm_with_dropout()
        return pl.encode_prompt(self.params(), config=config)

    def _lstm_with_dropout(self) -> torch.Tensor:
        config, params = self.config, self.params()
        table = params["embedding.weight"]
        keep = 1.0 - config.encoder_dropout
        width = 2 * params["lstm_head.weight_hh_l0"].shape[1]
        masks = [torch.bernoulli(torch.full((table.shape[0], width), keep, device=table.device, dtype=table.dtype))
                 / keep for _ in range(config.encoder_num_layers - 1)]
        lstm_params = {name.removeprefix("lstm_head."): v for name, v in params.items()
                       if name.startswith("lstm_head.")}
        hidden = p_tuning_ops.lstm(table, lstm_params, num_layers=config.encoder_num_layers, dropout_masks=masks)
        head = [params[f"mlp_head.{i}.{kind}"] for i in (0, 2) for kind in ("weight", "bias")]
        return p_tuning_ops.lstm_mlp_head(hidden, *head)

    def extra_repr(self) -> str:
        return f"peft_type={self.config.peft_type}, inference_mode={self.config.inference_mode}"


def initial_params(config: PromptLearningConfig, *, sampler: Any, device: Any) -> dict[str, torch.Tensor]:
    """Fresh float32 parameters (torch's default initialisations, as peft) from ``sampler``, on ``device``."""
    return {name: torch.as_tensor(value, device=device)
            for name, value in pl.init_params(config, sampler=sampler, dtype=torch.float32).items()}
