"""Regenerate the golden vectors in ``spec/vectors/`` from the float64 NumPy reference.

    python spec/tools/make_vectors.py

Inputs are drawn from a fixed seed; expected outputs come from ``tests/reference``
(written from the formulas, independent of peftcore). Each case stores its input
and output tensors in ``spec/vectors/<method>.safetensors`` (the AdaLoRA allocator
trajectories, from their own seed, in ``adalora_allocator.safetensors``) under
``<case id>/inputs/<name>`` and ``<case id>/outputs/<name>``; ``manifest.json``
lists, per case, the operation (a formula of ``spec/<method>.md``), the positional
inputs in order, the scalar parameters and the outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference import adalora as aref  # noqa: E402
from tests.reference import dora as dref  # noqa: E402
from tests.reference import ia3 as iref  # noqa: E402
from tests.reference import lora as lref  # noqa: E402
from tests.reference import prompt as pref  # noqa: E402

VECTORS = ROOT / "spec" / "vectors"
SEED = 20261129
TOLERANCES = {"float64": {"rtol": 1e-10}, "float32": {"rtol": 2e-5}}


class Collector:
    """Accumulates cases of one method: tensors for the safetensors file, entries for the manifest."""

    def __init__(self, method: str, *, file: str | None = None, seed: int = SEED):
        self.method = method
        self.file = f"{file or method}.safetensors"
        self.seed = seed
        self.tensors: dict[str, np.ndarray] = {}
        self.cases: list[dict] = []

    def add(self, case_id, operation, spec, inputs, params, outputs, *, description):
        full_id = f"{self.method}/{case_id}"
        for role, named in (("inputs", inputs), ("outputs", outputs)):
            for name, value in named.items():
                if value is None:
                    continue
                value = np.asarray(value)
                if value.dtype.kind in "iu":
                    value = value.astype(np.int64)
                elif value.dtype.kind != "b":
                    value = value.astype(np.float64)
                self.tensors[f"{full_id}/{role}/{name}"] = np.ascontiguousarray(value)
        self.cases.append(
            {
                "id": full_id,
                "operation": operation,
                "spec": spec,
                "description": description,
                "file": self.file,
                "inputs": [name if value is not None else None for name, value in inputs.items()],
                "params": params,
                "outputs": list(outputs),
                "tolerance": TOLERANCES,
            }
        )


def lora_cases(rng: np.random.Generator) -> Collector:
    c = Collector("lora")
    n = rng.standard_normal
    spec = "lora.md#3-forward-adapter-enabled-not-merged"

    for case_id, r, alpha, rslora, with_bias in (
        ("linear_forward/basic", 3, 6, False, False),
        ("linear_forward/rslora_lora_bias", 4, 8, True, True),
    ):
        x, weight, bias = n((2, 3, 5)), n((6, 5)), n(6)
        a, b = n((r, 5)), n((6, r))
        bias_b = n(6) if with_bias else None
        s = lref.scaling(r, alpha, use_rslora=rslora)
        result = lref.linear_dense(x, weight, bias)
        c.add(
            case_id, "lora.linear_forward", spec,
            {"result": result, "x": x, "lora_A": a, "lora_B": b, "lora_B_bias": bias_b},
            {"scaling": s},
            {"output": result + lref.linear_update(x, a, b, s, bias_b)},
            description=f"Linear(5->6), r={r}, alpha={alpha}, use_rslora={rslora}, lora_bias={with_bias}",
        )

    for fan_in_fan_out in (False, True):
        a, b = n((3, 5)), n((6, 3))
        c.add(
            f"delta_weight/fan_in_fan_out_{str(fan_in_fan_out).lower()}", "lora.delta_weight",
            "lora.md#4-delta-weight-merge-unmerge",
            {"lora_A": a, "lora_B": b}, {"scaling": 1.5, "fan_in_fan_out": fan_in_fan_out},
            {"delta": lref.linear_delta(a, b, 1.5, fan_in_fan_out=fan_in_fan_out)},
            description="Linear delta (out, in); transposed for GPT-2 Conv1D",
        )

    weight, delta = n((6, 5)), n((6, 5))
    c.add("merge/linear", "lora.merge", "lora.md#4-delta-weight-merge-unmerge",
          {"weight": weight, "delta": delta}, {}, {"merged": lref.merge(weight, delta)},
          description="W + ΔW")
    c.add("unmerge/linear", "lora.unmerge", "lora.md#4-delta-weight-merge-unmerge",
          {"weight": weight, "delta": delta}, {}, {"unmerged": lref.unmerge(weight, delta)},
          description="W − ΔW")

    for case_id, kwargs in (
        ("embedding_forward/basic", {}),
        ("embedding_forward/max_norm_embed_scale", {"max_norm": 1.0, "embed_scale": 2.5}),
    ):
        table, a, b = n((11, 4)), n((3, 11)), n((4, 3))
        ids = rng.integers(0, 11, size=(2, 5))
        result = table[ids]
        c.add(
            case_id, "lora.embedding_forward", spec,
            {"result": result, "indices": ids, "lora_embedding_A": a, "lora_embedding_B": b},
            {"scaling": 2.0, **kwargs},
            {"output": result + lref.embedding_update(ids, a, b, 2.0, **kwargs)},
            description=f"Embedding(11, 4), r=3 {kwargs}",
        )
    a, b = n((3, 11)), n((4, 3))
    c.add("embedding_delta_weight/basic", "lora.embedding_delta_weight", "lora.md#4-delta-weight-merge-unmerge",
          {"lora_embedding_A": a, "lora_embedding_B": b}, {"scaling": 0.5},
          {"delta": lref.embedding_delta(a, b, 0.5)}, description="(num_embeddings, dim)")

    for case_id, x_shape, a_shape, b_shape, stride, padding, groups in (
        ("conv_forward/conv1d_stride2_pad1", (2, 3, 9), (4, 3, 3), (6, 4, 1), 2, 1, 1),
        ("conv_forward/conv2d_same", (1, 3, 6, 5), (2, 3, 3, 3), (4, 2, 1, 1), 1, "same", 1),
        ("conv_forward/conv2d_groups2", (2, 4, 5, 5), (4, 4, 3, 3), (6, 2, 1, 1), (1, 2), (1, 0), 2),
        ("conv_forward/conv3d", (1, 2, 4, 4, 3), (2, 2, 2, 2, 2), (3, 2, 1, 1, 1), 1, 0, 1),
    ):
        x, a, b = n(x_shape), n(a_shape), n(b_shape)
        kernel = a_shape[2:]
        weight = n((b_shape[0], x_shape[1] // groups, *kernel))
        result = lref.conv(x, weight, stride=stride, padding=padding, groups=groups)
        s = 1.25
        c.add(
            case_id, "lora.conv_forward", spec,
            {"result": result, "x": x, "lora_A": a, "lora_B": b},
            {"scaling": s, "stride": stride, "padding": padding, "groups": groups},
            {"output": result + lref.conv_update(x, a, b, s, stride=stride, padding=padding, groups=groups)},
            description=f"Conv{len(kernel)}d, stride={stride}, padding={padding}, groups={groups}",
        )

    for case_id, a_shape, b_shape in (
        ("conv_delta_weight/conv2d_3x3", (3, 4, 3, 3), (5, 3, 1, 1)),
        ("conv_delta_weight/conv2d_1x1", (3, 4, 1, 1), (5, 3, 1, 1)),
    ):
        a, b = n(a_shape), n(b_shape)
        c.add(case_id, "lora.conv_delta_weight", "lora.md#4-delta-weight-merge-unmerge",
              {"lora_A": a, "lora_B": b}, {"scaling": 2.0}, {"delta": lref.conv_delta(a, b, 2.0)},
              description="(out, in, *k)")
    return c


def dora_cases(rng: np.random.Generator) -> Collector:
    c = Collector("dora")
    n = rng.standard_normal
    spec = "lora.md#6-dora-use_dora-true"

    for fan_in_fan_out in (False, True):
        weight = n((5, 6)) if fan_in_fan_out else n((6, 5))
        a, b = n((3, 5)), n((6, 3))
        c.add(f"magnitude_init/fan_in_fan_out_{str(fan_in_fan_out).lower()}", "dora.magnitude_init", spec,
              {"weight": weight, "lora_A": a, "lora_B": b}, {"scaling": 0.75, "fan_in_fan_out": fan_in_fan_out},
              {"magnitude": dref.linear_norm(weight, a, b, 0.75, fan_in_fan_out=fan_in_fan_out)},
              description="m = ‖W' + sBA‖ per output row")

    for recompute in (False, True):
        x, weight, bias = n((2, 3, 5)), n((6, 5)), n(6)
        a, b, m = n((3, 5)), n((6, 3)), np.abs(n(6)) + 0.5
        result = lref.linear_dense(x, weight, bias)
        c.add(f"linear_forward/recompute_base_{str(recompute).lower()}", "dora.linear_forward", spec,
              {"result": result, "x": x, "lora_A": a, "lora_B": b, "magnitude": m, "weight": weight, "bias": bias},
              {"scaling": 0.75, "recompute_base": recompute},
              {"output": dref.linear_forward(result, x, a, b, m, weight, bias, 0.75, recompute_base=recompute)},
              description="DoRA Linear forward; recompute_base is the dropout-active path")

    weight, a, b, m = n((6, 5)), n((3, 5)), n((6, 3)), np.abs(n(6)) + 0.5
    delta = lref.linear_delta(a, b, 0.75)
    merged, norm = dref.merge(weight, delta, m)
    c.add("merge/linear", "dora.merge", spec, {"weight": weight, "delta": delta, "magnitude": m}, {},
          {"merged": merged, "weight_norm": norm}, description="(m/‖W+ΔW‖)(W+ΔW) and the norm to cache")
    c.add("unmerge/linear", "dora.unmerge", spec,
          {"weight": merged, "delta": delta, "magnitude": m, "weight_norm": norm}, {},
          {"unmerged": dref.unmerge(merged, delta, m, norm)}, description="W/(m/n) − ΔW")

    table, a, b = n((11, 4)), n((3, 11)), n((4, 3))
    m = np.abs(n(4)) + 0.5
    ids = rng.integers(0, 11, size=(2, 5))
    c.add("embedding_magnitude_init/basic", "dora.embedding_magnitude_init", spec,
          {"weight": table, "lora_embedding_A": a, "lora_embedding_B": b}, {"scaling": 2.0},
          {"magnitude": dref.embedding_norm(table, a, b, 2.0)}, description="(dim,)")
    c.add("embedding_forward/basic", "dora.embedding_forward", spec,
          {"result": table[ids], "indices": ids, "lora_embedding_A": a, "lora_embedding_B": b,
           "magnitude": m, "weight": table}, {"scaling": 2.0},
          {"output": dref.embedding_forward(table[ids], ids, a, b, m, table, 2.0)},
          description="g·result + g·s·Aᵀ[ids]Bᵀ")

    x, weight, bias = n((2, 3, 6, 5)), n((4, 3, 3, 3)), n(4)
    a, b, m = n((2, 3, 3, 3)), n((4, 2, 1, 1)), np.abs(n((1, 4, 1, 1))) + 0.5
    result = lref.conv(x, weight, stride=1, padding=1) + bias.reshape(1, -1, 1, 1)
    c.add("conv_magnitude_init/conv2d", "dora.conv_magnitude_init", spec,
          {"weight": weight, "lora_A": a, "lora_B": b}, {"scaling": 0.5},
          {"magnitude": dref.conv_norm(weight, a, b, 0.5)}, description="(1, out, 1, 1)")
    for recompute in (False, True):
        c.add(f"conv_forward/conv2d_recompute_base_{str(recompute).lower()}", "dora.conv_forward", spec,
              {"result": result, "x": x, "lora_A": a, "lora_B": b, "magnitude": m, "weight": weight, "bias": bias},
              {"scaling": 0.5, "stride": 1, "padding": 1, "recompute_base": recompute},
              {"output": dref.conv_forward(result, x, a, b, m, weight, bias, 0.5, stride=1, padding=1,
                                           recompute_base=recompute)},
              description="DoRA Conv2d forward")
    delta = dref.conv_delta(a, b, 0.5)
    merged, norm = dref.conv_merge(weight, delta, m)
    c.add("conv_merge/conv2d", "dora.conv_merge", spec, {"weight": weight, "delta": delta, "magnitude": m}, {},
          {"merged": merged, "weight_norm": norm}, description="per out-channel")
    c.add("conv_unmerge/conv2d", "dora.conv_unmerge", spec,
          {"weight": merged, "delta": delta, "magnitude": m, "weight_norm": norm}, {},
          {"unmerged": dref.conv_unmerge(merged, delta, m, norm)}, description="per out-channel")
    return c


def adalora_cases(rng: np.random.Generator) -> Collector:
    c = Collector("adalora")
    n = rng.standard_normal
    spec = "adalora.md"
    # ranknum = init_r = 6, lora_alpha = 8; E has pruned (zero) entries as after masking
    s = aref.scaling(6, 8)
    for fan_in_fan_out in (False, True):
        a, e, b = n((6, 5)), n((6, 1)), n((7, 6))
        e[[1, 4]] = 0.0
        c.add(f"delta_weight/fan_in_fan_out_{str(fan_in_fan_out).lower()}", "adalora.delta_weight", spec,
              {"lora_A": a, "lora_E": e, "lora_B": b}, {"scaling": s, "fan_in_fan_out": fan_in_fan_out},
              {"delta": aref.delta(a, e, b, s, fan_in_fan_out=fan_in_fan_out)},
              description="s·B (A ⊙ E), s = lora_alpha / (init_r + 1e-5)")
    x, weight, bias = n((2, 3, 5)), n((7, 5)), n(7)
    a, e, b = n((6, 5)), n((6, 1)), n((7, 6))
    e[[0, 3]] = 0.0
    result = lref.linear_dense(x, weight, bias)
    c.add("linear_forward/pruned", "adalora.linear_forward", spec,
          {"result": result, "x": x, "lora_A": a, "lora_E": e, "lora_B": b}, {"scaling": s},
          {"output": result + aref.linear_update(x, a, e, b, s)}, description="Linear(5->7), init_r=6, 2 pruned")
    x = n((1, 3, 6, 5))
    a, e, b = n((6, 3 * 3 * 3)), n((6, 1)), n((4, 6))
    weight_shape = (4, 3, 3, 3)
    result = lref.conv(x, n(weight_shape), padding=1)
    c.add("conv_forward/conv2d", "adalora.conv_forward", spec,
          {"result": result, "x": x, "lora_A": a, "lora_E": e, "lora_B": b},
          {"scaling": s, "weight_shape": list(weight_shape), "stride": 1, "padding": 1},
          {"output": result + aref.conv_update(x, a, e, b, s, weight_shape=weight_shape, padding=1)},
          description="Conv2d(3->4, 3x3, padding 1): A is (r, in·kh·kw)")
    return c


# The allocator trajectories draw from their own seed, so that cases added elsewhere never move them
# (their masking margins are checked for this draw).
ALLOCATOR_SEED = SEED + 1
ADAPTER = "default"
ALLOCATOR_LAYERS = (("layers.0.q_proj", 5, 4), ("layers.0.v_proj", 4, 6), ("layers.1.q_proj", 6, 3))
FACTORS = ("lora_A", "lora_E", "lora_B")
# Smallest relative gap above the masking threshold: float32 replays must mask the same triplets.
ALLOCATOR_MARGIN = 1e-3


class _MarginCheckedAllocator(aref.Allocator):
    """The reference allocator, refusing a masking decision that float32 rounding could flip."""

    def mask(self, bgt):
        flat = sorted(v for layer in self.scores() for v in layer)
        threshold = flat[self.schedule["init_bgt"] - bgt - 1]
        if flat.count(threshold) > 1 and threshold != 0.0:
            raise AssertionError(f"budget {bgt}: a non-zero tie at the threshold {threshold}")
        above = [v for v in flat if v > threshold]
        if above and above[0] - threshold <= ALLOCATOR_MARGIN * max(abs(v) for v in flat):
            raise AssertionError(f"budget {bgt}: the score above the threshold is too close to it")
        return super().mask(bgt)



def _factor_shape(factor, n_in, n_out, r):
    return {"lora_A": (r, n_in), "lora_E": (r, 1), "lora_B": (n_out, r)}[factor]


def _allocator_case(c, rng, case_id, *, init_r, target_r, schedule, frozen=(), description):
    """One ``update_and_allocate(t)`` per step ``t = 0..total_step-1`` of the float64 reference allocator.

    Step ``t`` sees ``params[t]`` (after the optimiser step: step ``t-1``'s output plus a small update)
    and ``grads[t]``; modules in ``frozen`` get zero gradients and no updates (unused in the forward),
    so their triplets tie at score 0.
    """
    modules = [m for m, _, _ in ALLOCATOR_LAYERS]
    shapes = {(m, f): _factor_shape(f, n_in, n_out, init_r) for m, n_in, n_out in ALLOCATOR_LAYERS for f in FACTORS}
    names = {key: f"{key[0]}.{key[1]}.{ADAPTER}" for key in shapes}
    e_keys = [key for key in shapes if key[1] == "lora_E"]
    ref = _MarginCheckedAllocator([{f[-1]: np.zeros(shapes[m, f]) for f in FACTORS} for m in modules],
                                  target_r=target_r, **schedule)

    trail = {k: [] for k in ("params", "grads", "exp_avg_ipt", "exp_avg_unc", "lora_E", "budget", "mask_now",
                             "new_pattern")}
    patterns = []
    current = {key: rng.standard_normal(shape) for key, shape in shapes.items()}
    for step in range(schedule["total_step"]):
        if step:
            current = {key: v if key[0] in frozen else v + 0.1 * rng.standard_normal(v.shape)
                       for key, v in current.items()}
        grads = {key: np.zeros(v.shape) if key[0] in frozen else rng.standard_normal(v.shape)
                 for key, v in current.items()}
        for (m, f), v in current.items():
            ref.layers[modules.index(m)][f[-1]] = v.copy()
        budget, mask_now = aref.budget(step, **ref.schedule)
        pattern = ref.step(step, [{f[-1]: grads[m, f] for f in FACTORS} for m in modules])
        trail["params"].append(current)
        trail["grads"].append(grads)
        current = {(m, f): ref.layers[modules.index(m)][f[-1]].copy() for m, f in shapes}
        for ema, per_layer in (("exp_avg_ipt", ref.avg), ("exp_avg_unc", ref.unc)):
            trail[ema].append({(m, f): per_layer[modules.index(m)][f[-1]].copy() for m, f in shapes})
        trail["lora_E"].append(current)
        trail["budget"].append(budget)
        trail["mask_now"].append(mask_now)
        trail["new_pattern"].append(pattern is not None)
        if pattern is not None:
            patterns.append(pattern)

    def stacked(kind, keys):
        return {f"{kind}/{names[key]}": np.stack([row[key] for row in trail[kind]]) for key in keys}

    inputs = {**stacked("params", shapes), **stacked("grads", shapes)}
    outputs = {
        "budget": np.array(trail["budget"], dtype=np.int64),
        "mask_now": np.array(trail["mask_now"]),
        "new_pattern": np.array(trail["new_pattern"]),
        **stacked("exp_avg_ipt", shapes),
        **stacked("exp_avg_unc", shapes),
        **stacked("lora_E", e_keys),
        **{f"masks/{names[key]}": np.array([p[modules.index(key[0])] for p in patterns]) for key in e_keys},
        **{f"rank_pattern/{names[key]}": np.array(patterns[-1][modules.index(key[0])]) for key in e_keys},
    }
    params = {"parameter_names": list(names.values()), "target_r": target_r, **schedule, "adapter_name": ADAPTER}
    c.add(case_id, "adalora.allocator_trajectory", "adalora.md#7-golden-vectors-of-the-rank-allocator",
          inputs, params, outputs, description=description)


def allocator_cases(rng: np.random.Generator) -> Collector:
    c = Collector("adalora", file="adalora_allocator", seed=ALLOCATOR_SEED)
    _allocator_case(
        c, rng, "allocator_trajectory/three_layers", init_r=4, target_r=2,
        schedule=dict(tinit=2, tfinal=3, total_step=14, deltaT=2, beta1=0.8, beta2=0.7),
        description="3 Linear layers, init_r=4, target_r=2: warm-up to step 2, masking at steps 4, 6, 8, 10 "
                    "(budgets 8, 7, 6, 6), final allocation at step 11 = total_step - tfinal, the mask re-applied "
                    "at steps 12, 13",
    )
    _allocator_case(
        c, rng, "allocator_trajectory/frozen_layer_ties", init_r=4, target_r=2, frozen=("layers.0.v_proj",),
        schedule=dict(tinit=0, tfinal=2, total_step=8, deltaT=1, beta1=0.85, beta2=0.85),
        description="layers.0.v_proj gets zero gradients: its 4 triplets tie at score 0 and are all masked at "
                    "step 1 although the budget 9 masks only 3; deltaT=1, final allocation at step 6",
    )
    return c


def ia3_cases(rng: np.random.Generator) -> Collector:
    c = Collector("ia3")
    n = rng.standard_normal
    spec = "ia3.md"
    x, weight, bias = n((2, 3, 5)), n((6, 5)), n(6)
    l_out = n((6, 1))
    result = iref.linear(x, weight, bias)
    c.add("scale_output/linear", "ia3.scale_output", spec, {"result": result, "ia3_l": l_out}, {},
          {"output": iref.scale_channels(result, l_out[:, 0], -1)}, description="non-feed-forward: (x Wᵀ + b) ⊙ l")
    l_in = n((1, 5))
    c.add("scale_input/linear", "ia3.scale_input", spec, {"x": x, "ia3_l": l_in}, {},
          {"output": iref.scale_channels(x, l_in[0], -1)}, description="feed-forward: x ⊙ l, then the base layer")
    for feedforward, vec in ((False, l_out), (True, l_in)):
        c.add(f"merge_weight/linear_feedforward_{str(feedforward).lower()}", "ia3.merge_weight", spec,
              {"weight": weight, "ia3_l": vec}, {"feedforward": feedforward},
              {"merged": iref.merged_linear_weight(weight, vec.reshape(-1), feedforward=feedforward)},
              description="rows scaled (non-feed-forward) or columns scaled (feed-forward)")
    return c


def _lstm_params(rng, num_layers, dim, hidden):
    """``nn.LSTM(bidirectional=True)`` parameters in its ``named_parameters`` order."""
    params = {}
    for layer in range(num_layers):
        width = dim if layer == 0 else 2 * hidden
        for direction in ("", "_reverse"):
            suffix = f"_l{layer}{direction}"
            params["weight_ih" + suffix] = rng.standard_normal((4 * hidden, width))
            params["weight_hh" + suffix] = rng.standard_normal((4 * hidden, hidden))
            params["bias_ih" + suffix] = rng.standard_normal(4 * hidden)
            params["bias_hh" + suffix] = rng.standard_normal(4 * hidden)
    return params


def prompt_cases(rng: np.random.Generator) -> Collector:
    c = Collector("prompt_learning")
    n = rng.standard_normal
    doc = "prompt_learning.md"

    prompts, embeds = n((3, 4)), n((2, 5, 4))
    c.add("prepend_virtual_tokens/broadcast", "prompt_learning.prepend_virtual_tokens", f"{doc}#4-virtual-tokens-in-the-input",
          {"prompts": prompts, "inputs_embeds": embeds}, {}, {"out": pref.prepend(prompts, embeds)},
          description="(T, D) prompt broadcast over the batch and put before the input embeddings")
    labels = rng.integers(-100, 30, size=(2, 5))
    c.add("extend_labels/basic", "prompt_learning.extend_labels", f"{doc}#4-virtual-tokens-in-the-input",
          {"labels": labels}, {"num_virtual_tokens": 3}, {"out": pref.prepend_constant(labels, 3, -100)},
          description="-100 (ignored by the loss) for each virtual token")
    mask = rng.integers(0, 2, size=(2, 5))
    c.add("extend_attention_mask/basic", "prompt_learning.extend_attention_mask", f"{doc}#4-virtual-tokens-in-the-input",
          {"attention_mask": mask}, {"num_virtual_tokens": 2}, {"out": pref.prepend_constant(mask, 2, 1)},
          description="virtual tokens are always attended")

    for case_id, layers, heads, dim, submodules, batched in (
        ("past_key_values_layout/decoder_only", 3, 2, 4, 1, False),
        ("past_key_values_layout/encoder_decoder", 3, 1, 2, 2, True),
    ):
        prefix = n((2, 2, 2 * layers * dim) if batched else (2, 2 * layers * dim))
        expected = pref.past_key_values(prefix, layers, heads, dim, submodules, 2)
        names = ("key", "value") if submodules == 1 else ("self_key", "self_value", "cross_key", "cross_value")
        outputs = {f"l{i}_{name}": t for i, layer in enumerate(expected) for name, t in zip(names, layer)}
        params = {"num_layers": layers, "num_attention_heads": heads, "token_dim": dim,
                  "num_transformer_submodules": submodules}
        if not batched:
            params["batch_size"] = 2
        c.add(case_id, "prompt_learning.past_key_values_layout", f"{doc}#5-key-value-prefix-layout", {"prefix": prefix},
              params, outputs, description="peft's per-layer key/value prefix; outputs flattened layer by layer")

    emb, w1, b1, w2, b2 = n((3, 4)), n((5, 4)), n(5), n((2 * 2 * 4, 5)), n(2 * 2 * 4)
    c.add("prefix_projection/basic", "prefix_tuning.prefix_projection", f"{doc}#2-prefix-tuning",
          {"embedding": emb, "w1": w1, "b1": b1, "w2": w2, "b2": b2}, {},
          {"out": pref.prefix_projection(emb, w1, b1, w2, b2)}, description="tanh(E W1^T + b1) W2^T + b2")

    mlp = {"x": n((3, 4)), "w0": n((5, 4)), "b0": n(5), "w2": n((5, 5)), "b2": n(5), "w4": n((4, 5)), "b4": n(4)}
    c.add("mlp_head/basic", "p_tuning.mlp_head", f"{doc}#3-p-tuning", mlp, {},
          {"out": pref.mlp_head(*mlp.values())}, description="MLP reparameterisation: two ReLU hidden layers")

    for case_id, num_layers, batched in (("lstm/two_layers", 2, False), ("lstm/one_layer_batched", 1, True)):
        x = n((2, 3, 4) if batched else (3, 4))
        params = _lstm_params(rng, num_layers, 4, 2)
        c.add(case_id, "p_tuning.lstm", f"{doc}#3-p-tuning", {"x": x, **params}, {"num_layers": num_layers},
              {"out": pref.lstm(x, params, num_layers)},
              description="bidirectional LSTM, inputs: x then nn.LSTM parameters in named_parameters order")

    head = {"h": n((3, 4)), "w0": n((4, 4)), "b0": n(4), "w2": n((3, 4)), "b2": n(3)}
    c.add("lstm_mlp_head/basic", "p_tuning.lstm_mlp_head", f"{doc}#3-p-tuning", head, {},
          {"out": pref.lstm_mlp_head(*head.values())}, description="Linear-ReLU-Linear after the LSTM")
    return c


def main() -> None:
    rng = np.random.default_rng(SEED)
    VECTORS.mkdir(parents=True, exist_ok=True)
    cases = []
    collectors = [lora_cases(rng), dora_cases(rng), adalora_cases(rng), ia3_cases(rng), prompt_cases(rng)]
    collectors.append(allocator_cases(np.random.default_rng(ALLOCATOR_SEED)))
    for collector in collectors:
        save_file(collector.tensors, str(VECTORS / collector.file), metadata={"seed": str(collector.seed)})
        cases.extend(collector.cases)
    manifest = {
        "format": "peftcore-golden-vectors",
        "version": 1,
        "generator": "spec/tools/make_vectors.py (float64 NumPy reference, tests/reference)",
        "tensor_key": "<case id>/inputs/<name> and <case id>/outputs/<name>",
        "tolerance_rule": "|actual - expected| <= rtol * |expected| + rtol * max|expected| per output",
        "cases": cases,
    }
    (VECTORS / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {VECTORS}")


if __name__ == "__main__":
    main()
