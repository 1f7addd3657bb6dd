"""AdaLoRA's rank budget over a training run: per layer, how many SVD triplets survive from ``init_r`` to ``target_r``.

Trains AdaLoRA on a tiny random Llama (``examples/jax_llama.py``) to predict a fixed token batch, in JAX with
``peftcore_jax``: one jitted train step (loss + orthogonal regulariser, gradients, Adam, then the rank
allocator ``peftcore_jax.allocator_step``), compiled once for the whole schedule: the step enters as the array
plan of ``peftcore_jax.allocator_plan``, only the schedule is static. Then the same with ``peftcore_torch`` if
that backend has AdaLoRA (skipped otherwise). Prints, per adapted layer, its rank at each step where the
allocator masked::

    python examples/adalora_budget.py
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [p for p in (os.path.join(os.path.dirname(__file__), ".."),
                            os.path.join(os.path.dirname(__file__), "..", "backends")) if p not in sys.path]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import peftcore_jax as pj  # noqa: E402
from examples import jax_llama  # noqa: E402
from peftcore.methods.adalora import AdaLoraConfig  # noqa: E402

CONFIG = dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_r=6, target_r=2, lora_alpha=8,
              tinit=3, tfinal=5, deltaT=3, total_step=24, orth_reg_weight=0.1)
SIZES = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
LEARNING_RATE = 1e-2


def _batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], size=(4, 12))


def _print_table(title: str, history: list[tuple[int, dict[str, int]]]) -> None:
    """Rows: layers; columns: the start, then the steps at which the allocator masked; entries: kept triplets."""
    print(f"\n{title}: rank per layer at each masking step (init_r={CONFIG['init_r']}, "
          f"target_r={CONFIG['target_r']} on average)")
    layers = sorted(history[0][1])
    history = [("init", {name: CONFIG["init_r"] for name in layers}), *history]
    width = max(len(name) for name in layers)
    print(f"{'step':<{width}} | " + " ".join(f"{step!s:>4}" for step, _ in history))
    for name in layers:
        print(f"{name:<{width}} | " + " ".join(f"{ranks[name]:>4d}" for _, ranks in history))
    print(f"{'budget (total)':<{width}} | " + " ".join(f"{sum(ranks.values()):>4d}" for _, ranks in history))


def run_jax() -> tuple[list[tuple[int, dict[str, int]]], object]:
    spec = jax_llama.LlamaSpec(num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    params = jax_llama.init_params(jax.random.key(0), spec=spec, **SIZES)
    adapters = pj.init_adalora(params, AdaLoraConfig(**CONFIG), jax.random.key(1))
    ids = jnp.asarray(_batch())

    def loss_fn(adapters):
        logits = jax_llama.forward(params, ids[:, :-1], spec=spec, adapters=adapters)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
        return nll + CONFIG["orth_reg_weight"] * pj.orth_regularizer(adapters)

    @functools.partial(jax.jit, static_argnames=("schedule",))
    def train_step(adapters, moments, count, state, plan, schedule):
        """Gradients, one Adam update, then the allocator on these gradients (peft's order)."""
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        first, second = moments
        first = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, first, grads)
        second = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, second, grads)
        correction = jnp.sqrt(1 - 0.999**count) / (1 - 0.9**count)
        adapters = jax.tree_util.tree_map(
            lambda p, m, v: p - LEARNING_RATE * correction * m / (jnp.sqrt(v) + 1e-8), adapters, first, second)
        state, adapters = pj.allocator_step(state, adapters, grads, plan, schedule=schedule)
        return adapters, (first, second), state, loss

    schedule = pj.allocator_schedule(adapters)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, adapters)
    # committed from the start, as the step's outputs are: one jit signature for every step
    adapters, moments, state = jax.device_put((adapters, (zeros, zeros), pj.allocator_init(adapters)),
                                              jax.devices()[0])
    history, losses = [], []
    for step in range(CONFIG["total_step"]):
        plan = pj.allocator_plan(step, schedule=schedule)
        adapters, moments, state, loss = train_step(adapters, moments, step + 1, state, plan, schedule=schedule)
        losses.append(float(loss))
        if plan.mask:
            pattern = pj.with_rank_pattern(adapters, state).config.rank_pattern
            history.append((step, {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}))
    print(f"JAX: loss {losses[0]:.3f} -> {losses[-1]:.3f}; the train step compiled {train_step._cache_size()} "
          f"time(s) for {CONFIG['total_step']} steps")
    return history, schedule


def run_torch(schedule) -> list[tuple[int, dict[str, int]]] | None:
    """The same run with ``peftcore_torch`` (peft's API); ``schedule`` tells which steps mask (the same layers)."""
    try:
        import torch
        import transformers

        import peftcore_torch
        from peftcore_torch.adalora import AdaLoraModel  # noqa: F401  (the backend has AdaLoRA)
    except ImportError as error:
        print(f"\ntorch: skipped ({error})")
        return None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **SIZES)
    model = peftcore_torch.get_peft_model(transformers.LlamaForCausalLM(config), AdaLoraConfig(**CONFIG))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    ids = torch.as_tensor(_batch())
    history = []
    for step in range(CONFIG["total_step"]):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        if pj.allocator_plan(step, schedule=schedule).mask:
            pattern = model.peft_config["default"].rank_pattern
            history.append((step, {k.removesuffix(".lora_E.default").removesuffix(".lora_E"): sum(v)
                                   for k, v in pattern.items()}))
    return history


def main() -> None:
    history, schedule = run_jax()
    _print_table("JAX (peftcore_jax)", history)
    history = run_torch(schedule)
    if history:
        _print_table("torch (peftcore_torch)", history)


if __name__ == "__main__":
    main()
