"""Adapter shardings follow the base weights (A: input dim, B: output dim), on 4 forced CPU devices.

JAX fixes its device count when it first initialises, so the check runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import peftcore_jax as pj
    from peftcore import LoraConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 12)).astype(np.float32)          # (out, in)
    emb = rng.standard_normal((16, 12)).astype(np.float32)       # (num, dim)
    torch_tree = {"proj": {"weight": jax.device_put(w, NamedSharding(mesh, P("model", "data")))},
                  "embed_tokens": {"weight": jax.device_put(emb, NamedSharding(mesh, P("data", "model")))}}
    flax_tree = {"proj": {"kernel": jax.device_put(w.T, NamedSharding(mesh, P("data", "model")))}}
    config = LoraConfig(r=2, target_modules=["proj", "embed_tokens"], use_dora=True, init_lora_weights=False)
    _, adapters = pj.init_lora(torch_tree, config, jax.random.key(0))
    sharded = pj.shard_adapters(torch_tree, adapters)
    q, e = sharded["proj"], sharded["embed_tokens"]
    assert q.lora_A.sharding.spec == P(None, "data"), q.lora_A.sharding
    assert q.lora_B.sharding.spec == P("model", None), q.lora_B.sharding
    assert q.lora_magnitude_vector.sharding.spec == P("model"), q.lora_magnitude_vector.sharding
    assert e.lora_A.sharding.spec == P(None, "data") and e.lora_B.sharding.spec == P("model", None)
    flax_config = LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    _, flax_adapters = pj.init_lora(flax_tree, flax_config, jax.random.key(0), layout="flax")
    f = pj.shard_adapters(flax_tree, flax_adapters)["proj"]
    assert f.lora_A.sharding.spec == P(None, "data") and f.lora_B.sharding.spec == P("model", None)

    x = jax.device_put(rng.standard_normal((4, 12)).astype(np.float32), NamedSharding(mesh, P("data", None)))
    run = jax.jit(lambda x, lora: pj.dense(x, torch_tree["proj"], lora))
    np.testing.assert_allclose(run(x, q), run(np.asarray(x), adapters["proj"]), rtol=1e-5, atol=1e-5)
    print("sharding ok")
""")


def test_adapter_shardings_follow_base_weights_on_four_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sharding ok" in done.stdout
