"""``peftcore inspect``: text and JSON descriptions of adapters written with ``peftcore.io``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from peftcore import LoraConfig
from peftcore.cli import main
from peftcore.io import save_adapter

ROOT = Path(__file__).resolve().parents[2]
P = "base_model.model."
Q0, Q1, V0 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q0: (4, 16, 16), Q1: (2, 16, 16), V0: (4, 16, 8)}  # module -> (r, in, out)


def _adapter(tmp_path, *, extra=None, shapes=SHAPES, **config):
    rng = np.random.default_rng(0)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "tiny/llama", "rank_pattern": {"layers.1.self_attn.q_proj": 2},
              "alpha_pattern": {"v_proj": 2}, **config}
    state = {}
    for module, (r, n_in, n_out) in shapes.items():
        state[f"{P}{module}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        state[f"{P}{module}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
    state.update(extra or {})
    return save_adapter(tmp_path / "adapter", LoraConfig(**config), state)


def _inspect_json(capsys, folder):
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_reports_config_and_per_module_rank_alpha_counts(tmp_path, capsys):
    folder = _adapter(tmp_path)
    info = _inspect_json(capsys, folder)
    assert info["method"] == "LORA"
    assert info["task_type"] == "CAUSAL_LM"
    assert info["base_model"] == "tiny/llama"
    assert info["target_modules"] == ["q_proj", "v_proj"]
    modules = {m["module"]: m for m in info["modules"]}
    assert set(modules) == {Q0, Q1, V0}
    # rank_pattern / alpha_pattern resolved per module
    assert (modules[Q0]["r"], modules[Q0]["lora_alpha"], modules[Q0]["scaling"]) == (4, 8.0, 2.0)
    assert (modules[Q1]["r"], modules[Q1]["lora_alpha"], modules[Q1]["scaling"]) == (2, 8.0, 4.0)
    assert (modules[V0]["r"], modules[V0]["lora_alpha"], modules[V0]["scaling"]) == (4, 2.0, 0.5)
    assert modules[V0]["kind"] == "linear"
    assert (modules[V0]["in_features"], modules[V0]["out_features"]) == (16, 8)
    assert modules[Q0]["parameters"] == 4 * 16 + 16 * 4
    assert modules[Q1]["parameters"] == 2 * 16 + 16 * 2
    assert modules[V0]["parameters"] == 4 * 16 + 8 * 4
    assert info["trainable_parameters"] == 128 + 64 + 96
    assert info["dtypes"] == ["float32"]
    assert info["size_on_disk"] == sum(p.stat().st_size for p in folder.iterdir())
    assert info["anomalies"] == []


def test_rsLoRA_scaling_uses_square_root(tmp_path, capsys):
    info = _inspect_json(capsys, _adapter(tmp_path, use_rslora=True))
    modules = {m["module"]: m for m in info["modules"]}
    assert modules[Q0]["scaling"] == 8 / 2  # alpha / sqrt(4)
    assert info["use_rslora"] is True


def test_anomalies_unknown_keys_foreign_tensors_rank_mismatch(tmp_path, capsys):
    shapes = {**SHAPES, "model.layers.0.mlp.up_proj": (4, 16, 32), Q1: (3, 16, 16)}
    folder = _adapter(tmp_path, shapes=shapes, extra={f"{P}lm_head.weight": np.zeros((4, 4), np.float32)})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["from_the_future"] = 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    info = _inspect_json(capsys, folder)
    text = "\n".join(info["anomalies"])
    assert "from_the_future" in text
    assert "'model.layers.0.mlp.up_proj' fits no target_modules" in text
    assert f"{P}lm_head.weight" in text and info["other_keys"] == [f"{P}lm_head.weight"]
    assert f"module '{Q1}': lora_A.weight has rank 3" in text
    assert info["trainable_parameters"] == 128 + 3 * 32 + 96 + (4 * 16 + 32 * 4) + 16


def test_text_output_has_table_and_summary(tmp_path, capsys):
    folder = _adapter(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "method        LORA" in out
    assert "base model    tiny/llama" in out
    assert "parameters    288" in out
    row = next(line for line in out.splitlines() if line.startswith(V0))
    assert row.split() == [V0, "linear", "4", "2", "0.5", "16", "8", "96"]
    assert "nothing unusual" in out


def test_missing_or_corrupt_adapter_is_one_line_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftcore: error:") and err.count("\n") == 1 and "nope" in err
    folder = _adapter(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    assert main(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftcore: error:") and "truncated" in err and err.count("\n") == 1


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert main([]) == 2
    assert main(["inspect"]) == 2
    assert main(["frobnicate"]) == 2
    for command in ([], ["inspect"], ["merge"], ["verify"]):
        assert main([*command, "--help"]) == 0
        assert "usage: peftcore" in capsys.readouterr().out


def test_python_dash_m_peftcore_help_runs_without_frameworks():
    code = ("import sys, runpy; sys.argv = ['peftcore', '--help']\n"
            "try:\n    runpy.run_module('peftcore', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'framework imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "inspect" in result.stdout and "merge" in result.stdout and "verify" in result.stdout
    result = subprocess.run([sys.executable, "-m", "peftcore", "inspect", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "ADAPTER_DIR" in result.stdout
