"""Is ``peftcore merge`` cheaper than the peft way? Wall time and peak memory, side by side in one run.

Setup (not timed): a random LlamaForCausalLM of ~340 MB in float32, saved sharded (``max_shard_size="100MB"``,
with its index), and a LoRA adapter on it (r=16, all linear layers, non-zero B so the merge changes weights).
Then, in alternating rounds, each contestant runs in its own process:
  (a) ``python -m peftcore merge --base BASE --adapter ADAPTER --out OUT``;
  (b) the peft way: ``AutoModelForCausalLM.from_pretrained``, ``PeftModel.from_pretrained``,
      ``merge_and_unload()``, ``save_pretrained(out, max_shard_size="100MB")``.
Each contestant is started by a tiny watcher process that times it and reads its peak RSS from
``getrusage(RUSAGE_CHILDREN)`` (the contestant is its only child, so that is the contestant's own peak).
Medians over the rounds are compared; the two outputs are checked to hold the same tensors (|diff| <= 1e-6).
Goal: peftcore merge takes at most half the time and a third of the peak memory of the peft way.

    python bench/cli_merge.py [--rounds N] [--layers N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB, HEADS = 1024, 2816, 16000, 16
TOLERANCE = 1e-6
TIME_GOAL, MEMORY_GOAL = 0.5, 1 / 3

# Runs argv[1:] as its only child; prints {"wall_s", "peak_rss_mb", "rc"} as its last stdout line.
WATCHER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
if done.returncode:
    sys.stderr.write(done.stderr.decode(errors="replace"))
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "rc": done.returncode}))
"""

PEFT_WAY = r"""
import sys
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out, max_shard_size="100MB")
"""


def llama_parameters(layers: int) -> int:
    attention = 4 * HIDDEN * HIDDEN
    mlp = 3 * HIDDEN * INTERMEDIATE
    norms = 2 * HIDDEN
    return 2 * VOCAB * HIDDEN + layers * (attention + mlp + norms) + HIDDEN  # untied embed + lm_head, final norm


def make_base_and_adapter(work: Path, layers: int) -> tuple[Path, Path]:
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == llama_parameters(layers), (count, llama_parameters(layers))
    base = work / "base"
    model.save_pretrained(base, max_shard_size="100MB")
    lora = LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
    adapter = work / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing deprecation
        get_peft_model(model, lora).save_pretrained(adapter)
    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    adapter_size = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"base: LlamaForCausalLM hidden={HIDDEN} intermediate={INTERMEDIATE} layers={layers} vocab={VOCAB}, "
          f"{count / 1e6:.1f} M parameters x 4 B = {count * 4 / 1e6:.0f} MB float32; "
          f"{len(shards)} shards, {size / 1e6:.0f} MB on disk")
    print(f"adapter: LoRA r=16 on all linear layers ({layers * 7} modules), {adapter_size / 1e6:.1f} MB")
    return base, adapter


def run_contestant(argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", WATCHER, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    if result is None or result["rc"] != 0:
        raise SystemExit(f"contestant {argv} failed:\n{done.stderr}")
    return result


def compare_outputs(ours: Path, theirs: Path, base: Path) -> tuple[int, float, int]:
    """Tensor count, max |ours - theirs| over all tensors, and how many tensors differ from the base.

    Fails on differing key sets, shapes or dtypes.
    """
    import numpy as np
    from safetensors.numpy import load_file

    def tensors_of(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        (single,) = folder.glob("*.safetensors")
        return {k: single for k in load_file(single)}

    ours_map, theirs_map = tensors_of(ours), tensors_of(theirs)
    if ours_map.keys() != theirs_map.keys():
        raise SystemExit(f"outputs hold different tensors: only ours {sorted(ours_map.keys() - theirs_map.keys())}, "
                         f"only peft {sorted(theirs_map.keys() - ours_map.keys())}")
    base_map = tensors_of(base)
    worst, changed = 0.0, 0
    for our_file in sorted(set(ours_map.values())):
        our_tensors = load_file(our_file)
        base_tensors = {k: v for f in sorted({base_map[k] for k in our_tensors}) for k, v in load_file(f).items()}
        for their_file in sorted({theirs_map[k] for k in our_tensors}):
            their_tensors = load_file(their_file)
            for key in our_tensors.keys() & their_tensors.keys():
                a, b = our_tensors[key], their_tensors[key]
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise SystemExit(f"{key}: ours {a.shape} {a.dtype}, peft {b.shape} {b.dtype}")
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
                changed += not np.array_equal(a, base_tensors[key])
    return len(ours_map), worst, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (4 gives ~340 MB)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="peftcore-bench-merge-"))
    try:
        start = time.perf_counter()
        base, adapter = make_base_and_adapter(work, args.layers)
        print(f"setup (not timed): {time.perf_counter() - start:.1f} s; {args.rounds} alternating rounds\n")
        contestants = {
            "peftcore merge": lambda out: [sys.executable, "-m", "peftcore", "merge", "--base", str(base),
                                           "--adapter", str(adapter), "--out", str(out), "--quiet"],
            "peft way": lambda out: [sys.executable, "-c", PEFT_WAY, str(base), str(adapter), str(out)],
        }
        results: dict[str, list[dict]] = {name: [] for name in contestants}
        outputs: dict[str, Path] = {}
        for round_ in range(args.rounds):
            order = list(contestants) if round_ % 2 == 0 else list(reversed(contestants))
            for name in order:
                out = work / f"out-{name.replace(' ', '-')}"
                shutil.rmtree(out, ignore_errors=True)
                result = run_contestant(contestants[name](out))
                results[name].append(result)
                outputs[name] = out
                print(f"  round {round_ + 1} {name:>14}: {result['wall_s']:6.2f} s, {result['peak_rss_mb']:7.1f} MB")

        count, worst, changed = compare_outputs(outputs["peftcore merge"], outputs["peft way"], base)
        print(f"\noutputs agree: {count} tensors ({changed} changed by the merge, {args.layers * 7} expected), "
              f"max |peftcore - peft| = {worst:.2e} ({'<=' if worst <= TOLERANCE else '>'} {TOLERANCE:g})")
        if worst > TOLERANCE or changed != args.layers * 7:
            raise SystemExit("the two outputs differ; the comparison is not of equivalent work")

        medians = {name: (statistics.median(r["wall_s"] for r in rs), statistics.median(r["peak_rss_mb"] for r in rs))
                   for name, rs in results.items()}
        ref_time, ref_memory = medians["peft way"]
        print(f"\nmedians of {args.rounds} rounds")
        print(f"{'contestant':>14} | {'wall time (s)':>13} | {'peak RSS (MB)':>13} | {'time ratio':>10} | {'memory ratio':>12}")
        print("-" * 75)
        for name, (wall, memory) in medians.items():
            print(f"{name:>14} | {wall:>13.2f} | {memory:>13.1f} | {wall / ref_time:>10.2f} | {memory / ref_memory:>12.2f}")
        ours_time, ours_memory = medians["peftcore merge"]
        time_ok, memory_ok = ours_time <= TIME_GOAL * ref_time, ours_memory <= MEMORY_GOAL * ref_memory
        print(f"\ngoal: time <= {TIME_GOAL:.2f}x: {'met' if time_ok else 'MISSED'} ({ours_time / ref_time:.2f}x); "
              f"memory <= {MEMORY_GOAL:.2f}x: {'met' if memory_ok else 'MISSED'} ({ours_memory / ref_memory:.2f}x)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
