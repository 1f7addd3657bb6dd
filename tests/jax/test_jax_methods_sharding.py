"""(IA)³ and AdaLoRA adapters made for sharded base weights follow them (4 forced CPU devices, fresh interpreter).

An (IA)³ vector takes the sharding of the dim it scales (output rows, or input columns for feed-forward
modules); AdaLoRA's ``lora_A`` the input dim, ``lora_B`` the output dim, ``lora_E`` stays replicated. The
sharded forward equals the unsharded one.
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
    from peftcore.methods.adalora import AdaLoraConfig
    from peftcore.methods.ia3 import IA3Config

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)
    plain = {"up": {"weight": jnp.asarray(up)}, "down": {"weight": jnp.asarray(down)}}
    tree = {"up": {"weight": jax.device_put(up, NamedSharding(mesh, P("model", "data")))},
            "down": {"weight": jax.device_put(down, NamedSharding(mesh, P("data", "model")))}}
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))

    def run(t, a):
        return pj.dense(pj.dense(x, t["up"], a.get("up")), t["down"], a.get("down"))

    ia3 = pj.init_ia3(tree, IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    specs = {p: m.ia3_l.spec for p, m in pj.adapter_shardings(tree, ia3).params.items()}
    assert specs == {"up": P("model", None), "down": P(None, "model")}, specs
    ia3 = jax.tree_util.tree_map(lambda v: v * jnp.arange(1, v.size + 1, dtype=v.dtype).reshape(v.shape), ia3)
    sharded = pj.shard_adapters(tree, ia3)
    np.testing.assert_allclose(jax.jit(run)(tree, sharded), run(plain, ia3), rtol=1e-5)

    config = AdaLoraConfig(target_modules=["up", "down"], total_step=10, init_r=2, target_r=1)
    ada = pj.init_adalora(tree, config, jax.random.key(0))
    ada = jax.tree_util.tree_map(lambda v: v + 0.5, ada)
    sharded = pj.shard_adapters(tree, ada)
    m = sharded["up"]
    got = (m.lora_A.sharding.spec, m.lora_E.sharding.spec, m.lora_B.sharding.spec)
    assert got == (P(None, "data"), P(None, None), P("model", None)), got
    np.testing.assert_allclose(jax.jit(run)(tree, sharded), run(plain, ada), rtol=1e-5)
    print("sharding ok")
""")


def test_ia3_and_adalora_shardings_follow_base_weights_on_four_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sharding ok" in done.stdout
