"""One LoRA adapter, many array libraries, the same numbers.

1. Initialise a LoRA adapter (and a DoRA magnitude) for a Linear(64 -> 32) layer with peftcore.
2. Save it in HuggingFace PEFT's format: adapter_config.json + adapter_model.safetensors.
3. Load that folder into every installed array library -- NumPy, array-api-strict, PyTorch, JAX (and JAX
   under jax.jit) -- and run the same peftcore functions: forward, delta weight, merged forward, DoRA.
4. If `peft` and `torch` are installed, load the same folder with `peft` and compare with its output.

    python examples/demo.py
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile

import numpy as np

from peftcore import LoraConfig
from peftcore._xp import array_namespace
from peftcore.io import load_adapter, save_adapter
from peftcore.methods.lora import dora, ops
from peftcore.methods.lora.init import init_linear
from peftcore.random import NumpySampler
from peftcore.testing import to_numpy

IN, OUT, TOKENS = 64, 32, 8
PREFIX = "base_model.model.proj"


def make_adapter(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Create and save a rank-8 LoRA (non-zero B: ``init_lora_weights=False``); return base weight, bias, input."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((OUT, IN)) / IN**0.5).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    x = rng.standard_normal((2, TOKENS, IN)).astype(np.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False)
    scaling = ops.scaling(config.r, config.lora_alpha)
    init = init_linear(weight, r=config.r, init_lora_weights=False, sampler=NumpySampler(1), scaling=scaling)
    state_dict = {f"{PREFIX}.lora_A.weight": init.lora_A, f"{PREFIX}.lora_B.weight": init.lora_B}
    save_adapter(directory, config, state_dict)
    return weight, bias, x


def run(xp, jit, directory, weight, bias, x) -> dict[str, np.ndarray]:
    """Load the adapter into namespace ``xp`` and compute everything with peftcore."""
    adapter = load_adapter(directory, xp=xp)
    config = adapter.config
    A = adapter.state_dict[f"{PREFIX}.lora_A.weight"]
    B = adapter.state_dict[f"{PREFIX}.lora_B.weight"]
    W, b, X = xp.asarray(weight), xp.asarray(bias), xp.asarray(x)
    s = ops.scaling(config.r, config.lora_alpha, use_rslora=config.use_rslora)

    def compute(W, b, X, A, B):
        result = X @ xp.matrix_transpose(W) + b  # the base layer, as a framework would compute it
        merged = ops.merge(W, ops.delta_weight(A, B, scaling=s))
        magnitude = dora.magnitude_init(W, A, B, scaling=s)
        return {
            "forward": ops.linear_forward(result, X, A, B, scaling=s),
            "merged forward": X @ xp.matrix_transpose(merged) + b,
            "DoRA forward": dora.linear_forward(result, X, A, B, magnitude * 1.1, W, b, scaling=s),
        }

    if jit:
        import jax

        compute = jax.jit(compute)
    return {name: to_numpy(value) for name, value in compute(W, b, X, A, B).items()}


def peft_outputs(directory, weight, bias, x) -> dict[str, np.ndarray] | None:
    """The same adapter folder loaded by HuggingFace PEFT onto a torch Linear."""
    if not (importlib.util.find_spec("peft") and importlib.util.find_spec("torch")):
        return None
    import torch
    from peft import PeftModel

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(IN, OUT)

        def forward(self, x):
            return self.proj(x)

    model = Model()
    with torch.no_grad():
        model.proj.weight.copy_(torch.from_numpy(weight))
        model.proj.bias.copy_(torch.from_numpy(bias))
    peft_model = PeftModel.from_pretrained(model, directory)
    with torch.no_grad():
        forward = peft_model(torch.from_numpy(x)).numpy()
        merged = peft_model.merge_and_unload()(torch.from_numpy(x)).numpy()
    return {"forward": forward, "merged forward": merged}


def main() -> None:
    backends = [("numpy", "numpy", False), ("array-api-strict", "array_api_strict", False),
                ("torch", "torch", False), ("jax", "jax.numpy", False), ("jax.jit", "jax.numpy", True)]
    with tempfile.TemporaryDirectory() as directory:
        weight, bias, x = make_adapter(directory)
        print(f"adapter saved in peft's format: {sorted(os.listdir(directory))}\n")
        results = {}
        for label, module, jit in backends:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                print(f"{label:>17}: not installed, skipped")
                continue
            lib = importlib.import_module(module)
            results[label] = run(array_namespace(lib.asarray(0.0)), jit, directory, weight, bias, x)
        reference = results["numpy"]
        peft_result = peft_outputs(directory, weight, bias, x)
        if peft_result is not None:
            results["peft (torch)"] = peft_result

    names = list(reference)
    print(f"max |difference| from the NumPy result, float32, Linear({IN}->{OUT}), r=8, {2 * TOKENS} tokens\n")
    print(f"{'backend':>17} | " + " | ".join(f"{n:>14}" for n in names))
    print("-" * (20 + 17 * len(names)))
    for label, outputs in results.items():
        cells = [
            f"{float(np.max(np.abs(outputs[n] - reference[n]))):14.2e}" if n in outputs else f"{'-':>14}"
            for n in names
        ]
        print(f"{label:>17} | " + " | ".join(cells))
    scale = max(float(np.max(np.abs(v))) for v in reference.values())
    worst = max(float(np.max(np.abs(o[n] - reference[n]))) for o in results.values() for n in o)
    print(f"\nlargest output magnitude {scale:.2f}; largest disagreement {worst:.1e} "
          f"({worst / scale:.1e} relative): the same adapter, the same numbers.")
    if worst > 1e-5 * scale:
        raise SystemExit("backends disagree beyond float32 tolerance")


if __name__ == "__main__":
    main()
