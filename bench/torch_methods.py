"""peftcore_torch against peft beyond the LoRA Linear: other layer kinds and methods, side by side in one run.

One layer each (float32, frozen base, the same adapter values on both sides, outputs checked equal first):
LoRA on ``nn.Embedding(32000, 512)`` and ``nn.Conv2d(64, 64, 3)``, DoRA on ``nn.Linear(1024, 1024)``, (IA)³ and
AdaLoRA on ``nn.Linear(1024, 1024)``; "tokens" are token ids (Embedding), tokens (Linear) or 32×32 images
(Conv2d, tokens // 16 of them). Forward under ``no_grad``, and forward+backward (input gradient included).
Ratios are medians of per-round ratios [interquartile range] over alternating rounds (``_timing.py``).

    python bench/torch_methods.py [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import peft
import peftcore
import peftcore_torch
from _timing import paired_rounds, ratio_stats
from torch_lora import Holder


def cases() -> dict[str, tuple[nn.Module, Callable[[int], torch.Tensor], Callable, Callable]]:
    """``{name: (base, make input for n tokens, peft config, peftcore config)}``."""
    lora = dict(r=16, lora_alpha=32, target_modules=["layer"], init_lora_weights=False)
    ada = dict(target_modules=["layer"], init_r=12, target_r=8, total_step=100)
    ia3 = dict(target_modules=["layer"], feedforward_modules=[])
    return {
        "LoRA Embedding": (nn.Embedding(32000, 512), lambda n: torch.randint(0, 32000, (1, n)),
                           lambda: peft.LoraConfig(**lora), lambda: peftcore.LoraConfig(**lora)),
        "LoRA Conv2d": (nn.Conv2d(64, 64, 3, padding=1), lambda n: torch.randn(max(n // 16, 1), 64, 32, 32),
                        lambda: peft.LoraConfig(**lora), lambda: peftcore.LoraConfig(**lora)),
        "DoRA Linear": (nn.Linear(1024, 1024), lambda n: torch.randn(1, n, 1024),
                        lambda: peft.LoraConfig(use_dora=True, **lora),
                        lambda: peftcore.LoraConfig(use_dora=True, **lora)),
        "(IA)³ Linear": (nn.Linear(1024, 1024), lambda n: torch.randn(1, n, 1024),
                         lambda: peft.IA3Config(**ia3), lambda: peftcore.IA3Config(**ia3)),
        "AdaLoRA Linear": (nn.Linear(1024, 1024), lambda n: torch.randn(1, n, 1024),
                           lambda: peft.AdaLoraConfig(**ada), lambda: peftcore.AdaLoraConfig(**ada)),
    }


def contestants(base: nn.Module, peft_config, ours_config) -> tuple[nn.Module, nn.Module]:
    base.requires_grad_(False)
    theirs = peft.inject_adapter_in_model(peft_config(), Holder(copy.deepcopy(base))).layer
    ours = peftcore_torch.inject_adapter_in_model(ours_config(), Holder(copy.deepcopy(base))).layer
    with torch.no_grad():  # non-zero adapters everywhere (AdaLoRA/IA3 start at zero / one)
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    # peft's AdaLoRA keeps its rank count as a buffer (never saved); ours keeps it as a number
    assert not result.missing_keys and all(k.startswith("ranknum.") for k in result.unexpected_keys), result
    return ours, theirs


def runners(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    trainable = [p for p in module.parameters() if p.requires_grad]
    x_grad = x.clone().requires_grad_(True) if x.is_floating_point() else x

    def forward() -> object:
        with torch.no_grad():
            return module(x)

    def forward_backward() -> object:
        for param in trainable:
            param.grad = None
        if x_grad.is_floating_point():
            x_grad.grad = None
        module(x_grad).square().mean().backward()

    return {"forward": forward, "fwd+bwd": forward_backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, float32; "
          "ours/peft = median of per-round ratios [interquartile range]\n")
    header = f"{'case':<16} | {'tokens':>6} | {'forward':>16} | {'fwd+bwd':>16}"
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for name, (base, make_input, peft_config, ours_config) in cases().items():
        ours, theirs = contestants(base, peft_config, ours_config)
        for tokens in (16, 1024):
            x = make_input(tokens)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5 * float(theirs(x).abs().max()))
            ours_runs, theirs_runs = runners(ours, x), runners(theirs, x)
            cells = []
            for what in ("forward", "fwd+bwd"):
                times = paired_rounds({"ours": ours_runs[what], "peft": theirs_runs[what]}, rounds=args.rounds)
                cells.append("%.2f [%.2f-%.2f]" % ratio_stats(times, "ours", "peft"))
            print(f"{name:<16} | {tokens:>6} | {cells[0]:>16} | {cells[1]:>16}", flush=True)


if __name__ == "__main__":
    main()
