"""``peftcore verify``: ΔW per layer and backend against an independent float64 reference."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peftcore import LoraConfig
from peftcore.cli import main
from peftcore.io import save_adapter

ROOT = Path(__file__).resolve().parents[2]
P = "base_model.model."
Q, EMB, CONV = "model.layers.0.q_proj", "model.embed_tokens", "model.conv"


def _adapter(tmp_path, *, bf16=False):
    rng = np.random.default_rng(0)
    state = {
        f"{P}{Q}.lora_A.weight": rng.standard_normal((4, 12)),
        f"{P}{Q}.lora_B.weight": rng.standard_normal((10, 4)),
        f"{P}{EMB}.lora_embedding_A": rng.standard_normal((4, 11)),
        f"{P}{EMB}.lora_embedding_B": rng.standard_normal((6, 4)),
        f"{P}{CONV}.lora_A.weight": rng.standard_normal((4, 3, 2, 2)),
        f"{P}{CONV}.lora_B.weight": rng.standard_normal((5, 4, 1, 1)),
    }
    state = {k: v.astype(np.float32) for k, v in state.items()}
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "embed_tokens", "conv"])
    if bf16:
        torch = pytest.importorskip("torch")
        stored = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
        state = {k: v.float().numpy() for k, v in stored.items()}
        return save_adapter(tmp_path / "adapter", config, stored), state
    return save_adapter(tmp_path / "adapter", config, state), state


def _reference(state):
    """float64 ΔW per module from the formulas: s·B·A, s·(B·A)ᵀ (embeddings), s·Σ_j B[o,j]·A[j] (convs)."""
    s = 6 / 4
    f = {k: v.astype(np.float64) for k, v in state.items()}
    return {
        Q: s * f[f"{P}{Q}.lora_B.weight"] @ f[f"{P}{Q}.lora_A.weight"],
        EMB: s * (f[f"{P}{EMB}.lora_embedding_B"] @ f[f"{P}{EMB}.lora_embedding_A"]).T,
        CONV: s * np.einsum("oj,jchw->ochw", f[f"{P}{CONV}.lora_B.weight"][:, :, 0, 0], f[f"{P}{CONV}.lora_A.weight"]),
    }


def _run_json(capsys, *args):
    capsys.readouterr()
    code = main(["verify", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_numpy_float32_deltas_are_close_to_float64_reference(tmp_path, capsys):
    folder, state = _adapter(tmp_path)
    code, report = _run_json(capsys, str(folder), "--backends", "numpy")
    assert code == 0 and report["ok"] and report["backends"] == ["numpy"]
    layers = {layer["module"]: layer for layer in report["layers"]}
    reference = _reference(state)
    assert set(layers) == set(reference)
    for module, expected in reference.items():
        assert layers[module]["shape"] == list(expected.shape)
        result = layers[module]["backends"]["numpy"]
        # float32 rounding is visible but small; a wrong formula would be O(1)
        assert 0 < result["relative_error"] <= 1e-6
        assert result["max_abs_error"] == pytest.approx(result["relative_error"] * np.abs(expected).max())


def test_zero_tolerance_reports_disagreement_with_exit_3(tmp_path, capsys):
    folder, _ = _adapter(tmp_path)
    code, report = _run_json(capsys, str(folder), "--backends", "numpy", "--rtol", "0")
    assert code == 3 and report["ok"] is False
    capsys.readouterr()
    assert main(["verify", str(folder), "--backends", "numpy", "--rtol", "0"]) == 3
    assert "DISAGREEMENT" in capsys.readouterr().out


def test_bfloat16_adapter_on_every_installed_backend(tmp_path, capsys):
    folder, state = _adapter(tmp_path, bf16=True)
    code, report = _run_json(capsys, str(folder))
    installed = [name for name in ("numpy", "array_api_strict", "torch", "jax") if importlib.util.find_spec(name)]
    assert report["backends"] == installed
    assert code == 0, report["worst_relative_error"]
    assert all(layer["dtype"] == "bfloat16" for layer in report["layers"])
    reference = _reference(state)
    for layer in report["layers"]:
        errors = layer["backends"]
        # NumPy has no bfloat16: it computes in float32 from the exact widened values
        assert errors["numpy"]["relative_error"] <= 1e-6
        for name in set(errors) & {"torch", "jax"}:
            # the delta is rounded back to bfloat16: at most half a bfloat16 ulp (2**-9) relative to its max
            assert 0 < errors[name]["relative_error"] <= 2**-8, (layer["module"], name)
        assert layer["shape"] == list(reference[layer["module"]].shape)


def test_unknown_backend_is_a_one_line_error(tmp_path, capsys):
    folder, _ = _adapter(tmp_path)
    capsys.readouterr()
    assert main(["verify", str(folder), "--backends", "numpy,tensorflow"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftcore: error:") and "tensorflow" in err and err.count("\n") == 1


def test_numpy_only_verify_imports_no_framework(tmp_path):
    folder, _ = _adapter(tmp_path)
    code = (f"import sys; from peftcore.cli import main\nassert main(['verify', {str(folder)!r}, '--backends', "
            "'numpy']) == 0\nassert 'torch' not in sys.modules and 'jax' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
