"""Is peftcore_torch as fast as peft? LoRA layers and a LoRA training step, side by side in one run.

  (a) one LoRA Linear (d=1024, r=16, float32) at 16 and 1024 tokens, forward (under ``no_grad``) and
      forward+backward: peftcore_torch's ``LoraLayer`` vs peft's ``lora.Linear`` vs a plain ``nn.Linear``
      (the base alone: the floor an adapter adds to);
  (b) a full training step (forward, backward, AdamW) of a small Llama with LoRA r=16 on all linear
      layers: peftcore_torch vs peft.

Alongside (a)'s forwards, hand-written LoRA expressions (no module, no checks) are timed in the same rounds
to show where the time above ``nn.Linear`` goes and what fusing the update into the GEMM saves: an
out-of-place ``addmm`` still copies the base output once; accumulating into it in place (what ``LoraLayer``
does under ``no_grad`` when the base is a hook-free ``nn.Linear``) does not.

Contestants are timed in alternating rounds (``_timing.py``) and each ratio is the median of per-round
ratios, so a noisy machine's slow spells hit all of them alike. Both adapters hold the same values and are
checked to give the same outputs first.
Goals: ours/peft <= 1 everywhere; the Linear forward at 1024 tokens within 10% of ``nn.Linear``.

    python bench/torch_lora.py [--threads N] [--rounds N]
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
import transformers

import peftcore
import peftcore_torch
from _timing import medians, paired_rounds, ratio_stats

D, R, ALPHA = 1024, 16, 32


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = max(float(theirs.abs().max()), 1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def linear_contestants() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(nn.Linear, peft lora.Linear, peftcore_torch LoraLayer) over the same base and adapter values."""
    torch.manual_seed(0)
    base = nn.Linear(D, D)
    base.requires_grad_(False)
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules=["layer"], init_lora_weights=False)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).layer
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).layer
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return base, theirs, ours


def bench_linear(tokens: int, *, rounds: int) -> list[tuple[str, dict[str, list[float]]]]:
    plain, theirs, ours = linear_contestants()
    modules = {"nn.Linear": plain, "peft": theirs, "ours": ours}
    x = torch.randn(1, tokens, D)
    grad_out = torch.randn(1, tokens, D)
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), f"forward at {tokens} tokens")

    def forward(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)
        return run

    x_train = x.clone().requires_grad_(True)  # an inner layer: the input needs its gradient too

    def forward_backward(module: nn.Module) -> Callable[[], object]:
        trainable = [p for p in module.parameters() if p.requires_grad]

        def run() -> object:
            x_train.grad = None
            for param in trainable:
                param.grad = None
            module(x_train).backward(grad_out)
            return x_train.grad
        return run

    forwards = {name: forward(m) for name, m in modules.items()}
    forwards.update(hand_written_forwards(plain, ours, x))
    forward_times = paired_rounds(forwards, rounds=rounds)
    train_times = paired_rounds({name: forward_backward(m) for name, m in modules.items()}, rounds=rounds)
    return [("Linear forward", forward_times), ("Linear fwd+bwd", train_times)]


def hand_written_forwards(plain: nn.Module, ours: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Module-free LoRA forwards on the same base and factors: where the time over ``nn.Linear`` goes.

    ``peft's expression`` is ``base(x) + B(A(x)) * s`` (two extra full-size passes: scale, add);
    ``torch.addmm`` accumulates ``s·(x·Aᵀ)·Bᵀ`` onto a copy of the base output inside one GEMM call;
    ``addmm_ in place`` accumulates into the base output's own buffer (no copy).
    """
    lora_A, lora_B = ours.lora_A["default"].weight.detach(), ours.lora_B["default"].weight.detach()
    scaling = ours.scaling["default"]
    flat = x.reshape(-1, D)
    variants = {
        "hand: peft's expression": lambda: plain(x) + (x @ lora_A.T @ lora_B.T) * scaling,
        "hand: scale on (tok, r)": lambda: plain(x) + ((x @ lora_A.T) * scaling) @ lora_B.T,
        "hand: torch.addmm": lambda: torch.addmm(plain(flat), flat @ lora_A.T, lora_B.T, alpha=scaling),
        "hand: addmm_ in place": lambda: plain(flat).addmm_(flat @ lora_A.T, lora_B.T, alpha=scaling),
    }
    with torch.no_grad():
        expected = variants["hand: peft's expression"]().reshape(-1, D)
        for name, fn in variants.items():
            _assert_same(fn().reshape(-1, D), expected, name)

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn()
        return run
    return {name: no_grad(fn) for name, fn in variants.items()}


def llama_contestants() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
        vocab_size=1024, max_position_embeddings=256))
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = peftcore_torch.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.train(), ours.train()


def bench_llama_step(*, rounds: int, seq: int = 128, batch: int = 4) -> tuple[str, dict[str, list[float]]]:
    theirs, ours = llama_contestants()
    ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_same(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, "Llama logits")

    def step(model: nn.Module) -> Callable[[], object]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run() -> object:
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            return loss
        return run

    times = paired_rounds({"peft": step(theirs), "ours": step(ours)}, rounds=rounds, min_time=0.0)
    return f"Llama train step (b={batch}, seq={seq})", times


def _ratio(times: dict[str, list[float]], name: str, baseline: str) -> str:
    median, q1, q3 = ratio_stats(times, name, baseline)
    return f"{median:.2f} [{q1:.2f}-{q3:.2f}]"


def _row(case: str, tokens: str, times: dict[str, list[float]]) -> str:
    typical = medians(times)
    has_base = "nn.Linear" in times
    base_ms = f"{typical['nn.Linear'] * 1e3:>9.3f}" if has_base else f"{'-':>9}"
    to_base = _ratio(times, "ours", "nn.Linear") if has_base else "-"
    return (f"{case:<34} | {tokens:>6} | {base_ms} | {typical['peft'] * 1e3:>9.3f} | {typical['ours'] * 1e3:>9.3f} "
            f"| {_ratio(times, 'ours', 'peft'):>16} | {to_base:>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=21, help="alternating rounds per measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, float32, "
          f"d={D}, r={R}; {args.rounds} alternating rounds: median times in ms, ratios = median of per-round "
          "ratios [interquartile range]\n")
    header = (f"{'case':<34} | {'tokens':>6} | {'nn.Linear':>9} | {'peft':>9} | {'ours':>9} | {'ours/peft':>16} "
              f"| {'ours/nn.Linear':>16}")
    print(header)
    print("-" * len(header))
    by_hand = []
    for tokens in (16, 1024):
        for case, times in bench_linear(tokens, rounds=args.rounds):
            print(_row(case, str(tokens), times), flush=True)
            by_hand += [(name, tokens, _ratio(times, name, "nn.Linear")) for name in times if name.startswith("hand")]
    case, times = bench_llama_step(rounds=args.rounds)
    print(_row(case, str(4 * 128), times), flush=True)

    print("\nLoRA Linear forward written by hand, timed in the same rounds (ratio to nn.Linear):")
    for name, tokens, ratio in by_hand:
        print(f"  {name:<26} {tokens:>5} tokens: {ratio}")


if __name__ == "__main__":
    main()
