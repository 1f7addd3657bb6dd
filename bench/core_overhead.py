"""What does writing LoRA once, against the Array API, cost? peftcore's ops vs the same math hand-written.

For each framework, times in one run and side by side:
  * peftcore ``ops.linear_forward(result, x, A, B, scaling=s)`` (namespace resolution, shape checks, casts)
  * the hand-written framework expression ``result + (x @ A.T @ B.T) * s``
on a LoRA Linear of d=1024, r=16 at 16 and 1024 tokens, and prints the ratio (1.00 = no overhead).
JAX is timed under ``jax.jit`` (where the Python layer disappears) and eagerly.

    python bench/core_overhead.py
"""

from __future__ import annotations

import importlib.util

import numpy as np

from _timing import medians, paired_rounds
from peftcore._xp import array_namespace
from peftcore.methods.lora import ops

D, R, SCALING = 1024, 16, 2.0


def cases(tokens: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, D), dtype=np.float32)
    a = rng.standard_normal((R, D), dtype=np.float32) / 32
    b = rng.standard_normal((D, R), dtype=np.float32) / 32
    result = rng.standard_normal((tokens, D), dtype=np.float32)
    yield "numpy", lambda: None, (result, x, a, b), lambda r, x, a, b: r + (x @ a.T @ b.T) * SCALING
    if importlib.util.find_spec("torch"):
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        args = tuple(torch.from_numpy(v) for v in (result, x, a, b))
        yield "torch", lambda: None, args, lambda r, x, a, b: r + (x @ a.T @ b.T) * SCALING
    if importlib.util.find_spec("jax"):
        import jax
        import jax.numpy as jnp

        args = tuple(jnp.asarray(v) for v in (result, x, a, b))
        hand = lambda r, x, a, b: r + (x @ a.T @ b.T) * SCALING  # noqa: E731
        yield "jax (eager)", lambda: None, args, hand
        yield "jax (jit)", jax.jit, args, hand


def main() -> None:
    print(f"LoRA Linear forward, d={D}, r={R}, float32: peftcore ops vs hand-written framework code\n")
    print(f"{'framework':>12} | {'tokens':>6} | {'hand-written':>12} | {'peftcore':>12} | {'ratio':>6}")
    print("-" * 62)
    for tokens in (16, 1024):
        for name, wrap, args, hand in cases(tokens):
            ours = lambda r, x, a, b: ops.linear_forward(r, x, a, b, scaling=SCALING)  # noqa: E731
            if wrap is not None and name == "jax (jit)":
                hand, ours = wrap(hand), wrap(ours)
            block = getattr(hand(*args), "block_until_ready", None)

            def run(fn):
                out = fn(*args)
                if block is not None:
                    out.block_until_ready()

            array_namespace(args[0])  # warm the namespace cache for both sides alike
            typical = medians(paired_rounds({"hand": lambda: run(hand), "ours": lambda: run(ours)}, rounds=15,
                                            min_time=0.02))
            t_hand, t_ours = typical["hand"], typical["ours"]
            print(f"{name:>12} | {tokens:>6} | {t_hand * 1e6:>9.1f} us | {t_ours * 1e6:>9.1f} us | {t_ours / t_hand:>6.2f}")


if __name__ == "__main__":
    main()
