"""``peftcore convert``: peft <-> mlx-lm LoRA adapters (transposed factors, absolute scale)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from peftcore import LoraConfig
from peftcore.cli import main
from peftcore.cli.convert import alpha_for_scale
from peftcore.io import load_adapter, load_state_dict, save_adapter, save_state_dict

P = "base_model.model."
MODULES = [f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")]


def _peft(tmp_path, *, modules=MODULES, state_extra=None, **config):
    rng = np.random.default_rng(0)
    state = {}
    for module in modules:
        r = 4
        state[f"{P}{module}.lora_A.weight"] = rng.standard_normal((r, 12)).astype(np.float32)
        state[f"{P}{module}.lora_B.weight"] = rng.standard_normal((10, r)).astype(np.float32)
    state.update(state_extra or {})
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny",
              "lora_dropout": 0.05, **config}
    return save_adapter(tmp_path / "peft", LoraConfig(**config), state), state


def _convert(src, out, *extra):
    return main(["convert", str(src), str(out), *extra])


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_to_mlx_layout_scale_and_forward(tmp_path, rslora):
    src, state = _peft(tmp_path, use_rslora=rslora)
    out = tmp_path / "mlx"
    assert _convert(src, out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == 2
    assert config["model"] == "tiny"
    assert config["lora_parameters"] == {"rank": 4, "scale": scale, "dropout": 0.05,
                                         "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    mlx = load_state_dict(out / "adapters.safetensors")
    assert sorted(mlx) == sorted(f"{m}.lora_{x}" for m in MODULES for x in "ab")
    x = np.random.default_rng(5).standard_normal((3, 12))
    for module in MODULES:
        a, b = mlx[f"{module}.lora_a"], mlx[f"{module}.lora_b"]
        A, B = state[f"{P}{module}.lora_A.weight"], state[f"{P}{module}.lora_B.weight"]
        assert a.shape == (12, 4) and b.shape == (4, 10)
        np.testing.assert_array_equal(a, A.T)
        np.testing.assert_array_equal(b, B.T)
        # mlx-lm LoRALinear: scale·(x·a)·b; peft: s·(x·Aᵀ)·Bᵀ
        np.testing.assert_allclose(config["lora_parameters"]["scale"] * (x @ a) @ b, scale * (x @ A.T) @ B.T,
                                   rtol=1e-12)


def test_round_trip_is_bit_exact(tmp_path, capsys):
    src, state = _peft(tmp_path, lora_alpha=7, use_rslora=True)
    assert _convert(src, tmp_path / "mlx") == 0
    capsys.readouterr()
    assert _convert(tmp_path / "mlx", tmp_path / "back", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    back = load_adapter(tmp_path / "back")
    assert back.config.r == 4 and not back.config.use_rslora
    assert back.config.lora_alpha / back.config.r == 7 / math.sqrt(4) == summary["scaling"]
    assert back.state_dict.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(back.state_dict[key], value)
    assert sorted(back.config.target_modules) == MODULES


@pytest.mark.parametrize(("scale", "rank"), [(20.0, 8), (0.1, 3), (1 / 3, 7), (2.0**0.5, 6), (0.7, 5)])
def test_alpha_for_scale_is_exact(scale, rank):
    alpha, use_rslora = alpha_for_scale(scale, rank)
    assert (alpha / math.sqrt(rank) if use_rslora else alpha / rank) == scale
    assert math.isclose(alpha, scale * (math.sqrt(rank) if use_rslora else rank), rel_tol=1e-15)
    if (scale, rank) == (20.0, 8):
        assert (alpha, use_rslora) == (160.0, False)


def test_mlx_to_peft_from_hand_written_mlx_folder(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "mlx"
    tensors = {"model.layers.3.mlp.down_proj.lora_a": rng.standard_normal((8, 3)).astype(np.float32),
               "model.layers.3.mlp.down_proj.lora_b": rng.standard_normal((3, 5)).astype(np.float32)}
    save_state_dict(folder / "adapters.safetensors", tensors, metadata={"format": "mlx"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "model": "m",
         "lora_parameters": {"rank": 3, "scale": 0.1, "dropout": 0.0}}))
    assert _convert(folder, tmp_path / "peft") == 0
    back = load_adapter(tmp_path / "peft")
    r, alpha = back.config.r, back.config.lora_alpha
    assert r == 3
    assert (alpha / math.sqrt(r) if back.config.use_rslora else alpha / r) == 0.1
    assert back.config.base_model_name_or_path == "m"
    np.testing.assert_array_equal(back.state_dict[f"{P}model.layers.3.mlp.down_proj.lora_A.weight"],
                                  tensors["model.layers.3.mlp.down_proj.lora_a"].T)


def test_bfloat16_factors_keep_their_bits(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    state = {f"{P}{m}.lora_{n}.weight": torch.randn(shape, generator=gen).to(torch.bfloat16)
             for m in MODULES for n, shape in (("A", (4, 12)), ("B", (10, 4)))}
    save_adapter(tmp_path / "peft", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), state)
    assert _convert(tmp_path / "peft", tmp_path / "mlx") == 0
    assert _convert(tmp_path / "mlx", tmp_path / "back") == 0
    back = load_adapter(tmp_path / "back", xp=None, dtype="float32")
    header = json.loads((tmp_path / "mlx" / "adapters.safetensors").read_bytes()[8:][:2000].split(b"}}")[0] + b"}}")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    for key, value in state.items():
        assert torch.equal(torch.from_numpy(np.asarray(back.state_dict[key])), value.float()), key


def _refused(capsys, code, needle):
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("peftcore: error:") and err.count("\n") == 1 and needle in err, err


def test_unconvertible_adapters_are_refused_without_output(tmp_path, capsys):
    src, _ = _peft(tmp_path, rank_pattern={"layers.1.self_attn.q_proj": 2})
    _refused(capsys, _convert(src, tmp_path / "out"), "one rank and scale")
    src, _ = _peft(tmp_path, modules=[*MODULES, "lm_head"], target_modules=["q_proj", "v_proj", "lm_head"])
    _refused(capsys, _convert(src, tmp_path / "out"), "lm_head")
    src, _ = _peft(tmp_path, modules=[m for m in MODULES if "layers.0.self_attn.v" not in m])
    _refused(capsys, _convert(src, tmp_path / "out"), "same keys")
    src, _ = _peft(tmp_path, use_dora=True)
    _refused(capsys, _convert(src, tmp_path / "out"), "DoRA")
    _refused(capsys, _convert(tmp_path, tmp_path / "out"), "neither")
    assert not (tmp_path / "out").exists()
