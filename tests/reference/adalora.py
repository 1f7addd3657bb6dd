"""Float64 NumPy reference for AdaLoRA, written from the formulas (never imports peftcore).

SVD form (Zhang et al. 2023, as in peft): ``ΔW = s · Σ_i E_i · B[:, i] ⊗ A[i, :]``,
``s = α / (ranknum + 1e-5)``; Conv2d reshapes ``ΔW (out, in·kh·kw)`` to the kernel.
The allocator is written as explicit per-triplet loops (one layer, one triplet at a time),
independently of peftcore's array formulation.
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference.lora import conv


def scaling(ranknum, lora_alpha, r=None):
    return (lora_alpha if lora_alpha > 0 else float(ranknum if r is None else r)) / (ranknum + 1e-5)


def delta(lora_A, lora_E, lora_B, s, *, fan_in_fan_out=False):
    """``s·Σ_i E_i B[:, i] A[i, :]`` ``(out, in)``; transposed with ``fan_in_fan_out``."""
    out = np.zeros((lora_B.shape[0], lora_A.shape[1]))
    for i in range(lora_A.shape[0]):
        out += lora_E[i, 0] * np.outer(lora_B[:, i], lora_A[i])
    out = s * out
    return out.T if fan_in_fan_out else out


def linear_update(x, lora_A, lora_E, lora_B, s):
    return np.einsum("...i,oi->...o", x, delta(lora_A, lora_E, lora_B, s))


def conv_update(x, lora_A, lora_E, lora_B, s, *, weight_shape, stride=1, padding=0, dilation=1):
    kernel = delta(lora_A, lora_E, lora_B, s).reshape(weight_shape)
    return conv(x, kernel, stride=stride, padding=padding, dilation=dilation)


def orth_regularizer(factors):
    """``factors``: list of ``(P, is_B)``; mean of ``‖G − I‖_F`` with ``G = PᵀP`` (B) or ``PPᵀ`` (A)."""
    norms = []
    for p, is_B in factors:
        r = p.shape[1] if is_B else p.shape[0]
        total = 0.0
        for i in range(r):
            for j in range(r):
                g = np.dot(p[:, i], p[:, j]) if is_B else np.dot(p[i], p[j])
                total += (g - (i == j)) ** 2
        norms.append(math.sqrt(total))
    return sum(norms) / len(norms)


# ---------------------------------------------------------------------------------------------- allocator


def budget(step, *, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    """``(budget, mask?)`` of the cubic schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int(target_bgt + (init_bgt - target_bgt) * (1 - progress) ** 3), step % deltaT == 0


class Allocator:
    """AdaLoRA's allocator on a list of layers ``{"A": (r,in), "E": (r,1), "B": (out,r)}`` (mutated in place)."""

    def __init__(self, layers, *, target_r, tinit, tfinal, total_step, deltaT, beta1, beta2):
        self.layers = layers
        self.schedule = dict(
            init_bgt=sum(layer["A"].shape[0] for layer in layers), target_bgt=target_r * len(layers),
            tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=deltaT,
        )
        self.beta1, self.beta2 = beta1, beta2
        self.reset()
        self.pattern = None

    def reset(self):
        self.avg = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in self.layers]
        self.unc = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in self.layers]

    def update(self, grads):
        for layer, grad, avg, unc in zip(self.layers, grads, self.avg, self.unc):
            for k in layer:
                sensitivity = np.abs(layer[k] * grad[k])
                avg[k] = self.beta1 * avg[k] + (1 - self.beta1) * sensitivity
                unc[k] = self.beta2 * unc[k] + (1 - self.beta2) * np.abs(sensitivity - avg[k])

    def scores(self):
        out = []
        for layer, avg, unc in zip(self.layers, self.avg, self.unc):
            s = {k: avg[k] * unc[k] for k in layer}
            r = layer["E"].shape[0]
            out.append([s["E"][i, 0] + (s["A"][i, :].mean() + s["B"][:, i].mean()) for i in range(r)])
        return out

    def mask(self, bgt):
        scores = self.scores()
        flat = sorted(v for layer in scores for v in layer)
        threshold = flat[self.schedule["init_bgt"] - bgt - 1]
        self.pattern = [[v > threshold for v in layer] for layer in scores]
        self.apply()
        return self.pattern

    def apply(self):
        for layer, keep in zip(self.layers, self.pattern):
            for i, k in enumerate(keep):
                if not k:
                    layer["E"][i, 0] = 0.0

    def step(self, step, grads):
        """One ``update_and_allocate(step)``; returns the new pattern or None."""
        final = self.schedule["total_step"] - self.schedule["tfinal"]
        if step < final:
            self.update(grads)
            bgt, now = budget(step, **self.schedule)
            return self.mask(bgt) if now else None
        if step == final:
            pattern = self.mask(self.schedule["target_bgt"])
            self.reset()
            return pattern
        self.apply()
        return None
