"""``peftcore merge`` without torch: hand-built safetensors bases, float64 formula references, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftcore import LoraConfig
from peftcore.cli import main
from peftcore.io import load_state_dict, save_adapter, save_state_dict

P = "base_model.model."


def _base(tmp_path, *, sharded=False, bias=True):
    rng = np.random.default_rng(1)
    tensors = {
        "layers.0.proj.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "layers.0.proj.bias": rng.standard_normal((6,)).astype(np.float32),
        "layers.1.proj.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "emb.weight": rng.standard_normal((9, 5)).astype(np.float32),
        "conv.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "step": np.arange(3, dtype=np.int64),
    }
    if not bias:
        del tensors["layers.0.proj.bias"]
    folder = tmp_path / "base"
    if sharded:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for file, keys in shards.items():
            save_state_dict(folder / file, {k: tensors[k] for k in keys})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_state_dict(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text("{}")
    return folder, tensors


def _adapter(tmp_path, *, lora_bias=False, **config):
    rng = np.random.default_rng(2)
    state = {
        f"{P}layers.0.proj.lora_A.weight": rng.standard_normal((2, 5)),
        f"{P}layers.0.proj.lora_B.weight": rng.standard_normal((6, 2)),
        f"{P}layers.1.proj.lora_A.weight": rng.standard_normal((3, 5)),
        f"{P}layers.1.proj.lora_B.weight": rng.standard_normal((6, 3)),
        f"{P}emb.lora_embedding_A": rng.standard_normal((2, 9)),
        f"{P}emb.lora_embedding_B": rng.standard_normal((5, 2)),
        f"{P}conv.lora_A.weight": rng.standard_normal((2, 3, 2, 2)),
        f"{P}conv.lora_B.weight": rng.standard_normal((4, 2, 1, 1)),
    }
    if lora_bias:
        state[f"{P}layers.0.proj.lora_B.bias"] = rng.standard_normal((6,))
    state = {k: v.astype(np.float32) for k, v in state.items()}
    config = {"r": 2, "lora_alpha": 3, "target_modules": ["proj", "emb", "conv"], "rank_pattern": {"layers.1.proj": 3},
              "lora_bias": lora_bias, **config}
    return save_adapter(tmp_path / "adapter", LoraConfig(**config), state), state


def _expected(base, state, *, rslora=False):
    f = {k.removeprefix(P): v.astype(np.float64) for k, v in state.items()}
    s2, s3 = (3 / np.sqrt(2), 3 / np.sqrt(3)) if rslora else (3 / 2, 3 / 3)
    out = {k: v.astype(np.float64) for k, v in base.items()}
    out["layers.0.proj.weight"] += s2 * f["layers.0.proj.lora_B.weight"] @ f["layers.0.proj.lora_A.weight"]
    out["layers.1.proj.weight"] += s3 * f["layers.1.proj.lora_B.weight"] @ f["layers.1.proj.lora_A.weight"]
    out["emb.weight"] += s2 * (f["emb.lora_embedding_B"] @ f["emb.lora_embedding_A"]).T
    out["conv.weight"] += s2 * np.einsum("oj,jchw->ochw", f["conv.lora_B.weight"][:, :, 0, 0], f["conv.lora_A.weight"])
    if "layers.0.proj.lora_B.bias" in f:
        out["layers.0.proj.bias"] += s2 * f["layers.0.proj.lora_B.bias"]
    return out


def _merge(base, adapter, out, *extra):
    return main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_float64_formulas(tmp_path, sharded, rslora):
    base, tensors = _base(tmp_path, sharded=sharded)
    adapter, state = _adapter(tmp_path, use_rslora=rslora, lora_bias=True)
    assert _merge(base, adapter, tmp_path / "out") == 0
    expected = _expected(tensors, state, rslora=rslora)
    merged = {}
    for file in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_state_dict(file))
        assert file.read_bytes()[:200] == (base / file.name).read_bytes()[:200]  # same header and layout
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key].dtype == tensors[key].dtype, key
        np.testing.assert_allclose(merged[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    assert not np.allclose(merged["conv.weight"], tensors["conv.weight"])
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    if sharded:
        index = (tmp_path / "out" / "model.safetensors.index.json").read_text()
        assert index == (base / "model.safetensors.index.json").read_text()


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("peftcore: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_refusals_leave_no_output(tmp_path, capsys):
    base, _ = _base(tmp_path, bias=False)
    out = tmp_path / "out"
    adapter, _ = _adapter(tmp_path, lora_bias=True)
    _one_line_error(capsys, _merge(base, adapter, out), "layers.0.proj", "no bias")
    assert not out.exists()
    adapter, _ = _adapter(tmp_path, init_lora_weights="pissa")
    _one_line_error(capsys, _merge(base, adapter, out), "pissa")
    adapter, state = _adapter(tmp_path)
    wrong_base = tmp_path / "wrong"
    save_state_dict(wrong_base / "model.safetensors", {"other.weight": np.zeros((2, 2), np.float32)})
    _one_line_error(capsys, _merge(wrong_base, adapter, out), "base checkpoint", ".weight")
    _one_line_error(capsys, _merge(tmp_path / "missing", adapter, out), "missing")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "wrong"]


def test_grouped_conv_is_refused(tmp_path, capsys):
    base, tensors = _base(tmp_path)
    tensors["conv.weight"] = np.zeros((4, 1, 2, 2), np.float32)  # groups=3 would need in/groups = 1
    save_state_dict(base / "model.safetensors", tensors)
    adapter, _ = _adapter(tmp_path)
    _one_line_error(capsys, _merge(base, adapter, tmp_path / "out"), "grouped", "conv")
    assert not (tmp_path / "out").exists()


def test_memory_stays_near_the_largest_tensor(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(3)
    n, tensor_bytes = 256, 256 * 256 * 4  # 16 tensors of 256 KiB: a 4 MiB base
    base = {f"layers.{i}.proj.weight": rng.standard_normal((n, n)).astype(np.float32) for i in range(16)}
    save_state_dict(tmp_path / "base" / "model.safetensors", base)
    state = {}
    for i in range(16):
        state[f"{P}layers.{i}.proj.lora_A.weight"] = rng.standard_normal((2, n)).astype(np.float32)
        state[f"{P}layers.{i}.proj.lora_B.weight"] = rng.standard_normal((n, 2)).astype(np.float32)
    save_adapter(tmp_path / "adapter", LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), state)
    del base, state
    tracemalloc.start()
    try:
        assert _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out") == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a tensor's raw bytes, its float32 copy, the merged result and its stored bytes, plus temporaries: never the base
    assert peak < 8 * tensor_bytes, peak  # the whole base would be 16
