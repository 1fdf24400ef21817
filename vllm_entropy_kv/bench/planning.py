"""Planning micro-benchmark: seconds one request's `KVPolicy.plan` takes, on random
observations of real model shapes, on CPU or CUDA.

    python -m vllm_entropy_kv.bench.planning [--device cuda] [--write docs/BENCHMARKS.md]

Needs torch and `vllm_entropy_kv.policies` only (no vLLM), so it runs on a bare GPU machine
with the repository on PYTHONPATH. `--check-device` also plans every cell on CPU copies of the
same tensors and fails unless the kept indices are identical and the summaries and layer
entropies agree. `--reference DIR` times a second checkout (e.g. a git worktree of an older
commit) on the same cells, each cell right after this one, so the ratio holds on a busy
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_entropy_kv.bench.sections import table, write_section
from vllm_entropy_kv.cpu import cpu_info
from vllm_entropy_kv.policies import Budget, LayerObservation, LayerPlan, get_policy


@dataclass(frozen=True)
class Shape:
    layers: int
    q_heads: int
    kv_heads: int
    head_size: int
    window: int  # observed queries per layer


SHAPES = {
    "embedded": Shape(30, 9, 3, 64, 32),  # SmolLM2-135M, the model `make serve` embeds
    "llama3-8b": Shape(32, 32, 8, 128, 64),
    "llama3-70b": Shape(80, 64, 8, 128, 64),
}
DEFAULT_POLICIES = ["entropy", "entropy-merge", "snapkv", "src"]
# (shape, tokens): a grid this 2-core CPU runs in minutes; the GPU gets every combination.
DEFAULT_CPU_GRID = [("embedded", 3000), ("llama3-8b", 2048), ("llama3-8b", 8192)]
DEFAULT_CUDA_TOKENS = [2048, 8192, 32768]
# Peak planning memory in multiples of one request's K+V bytes in float32 (the float32
# copies of keys and values, the merge's weighted products and the attention workspace).
MEMORY_FACTOR = 4.0


def observations(shape: Shape, n: int, dtype: torch.dtype, device: str,
                 seed: int = 0) -> list[LayerObservation]:
    """Random queries and values in `dtype`; keys as the engine reads them back from the
    cache (`BlockLayout.gather`): `dtype` values, held in float32 with positions contiguous."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(shape.layers):
        # Sharper queries in deeper layers spread the layer entropies, as in real models.
        sharp = 0.5 + 2.5 * i / shape.layers
        q = torch.randn(shape.q_heads, shape.window, shape.head_size, generator=gen) * sharp
        k = torch.randn(shape.kv_heads, n, shape.head_size, generator=gen)
        v = torch.randn(shape.kv_heads, n, shape.head_size, generator=gen)
        keys = k.to(dtype).to(device, torch.float32).transpose(1, 2).contiguous()
        layers.append(LayerObservation(q.to(device, dtype), keys.transpose(1, 2),
                                       v.to(device, dtype), shape.head_size**-0.5))
    return layers


def needed_bytes(shape: Shape, n: int) -> int:
    kv_float32 = 2 * shape.layers * shape.kv_heads * n * shape.head_size * 4
    return int(MEMORY_FACTOR * kv_float32)


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_info().describe()}, {len(os.sched_getaffinity(0))} cores"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_plan(policy_name: str, layers: list[LayerObservation], budget: Budget, device: str,
              warmup: int, repeats: int) -> float:
    """Median seconds of `plan` over `repeats` runs after `warmup` runs."""
    policy = get_policy(policy_name)
    for _ in range(warmup):
        policy.plan(layers, budget)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.plan(layers, budget)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plans_agree(a: list[LayerPlan], b: list[LayerPlan], dtype: torch.dtype) -> str | None:
    """None when the plans agree, else what differs first."""
    # Summaries are stored in the input dtype: one bf16 step is 2**-8 relative.
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-2, 2**-6)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not torch.equal(x.keep.cpu(), y.keep.cpu()):
            return f"layer {i}: kept indices differ"
        if (x.layer_entropy is None) != (y.layer_entropy is None) or (
                x.layer_entropy is not None and abs(x.layer_entropy - y.layer_entropy) > 1e-4):
            return f"layer {i}: layer entropy {x.layer_entropy} vs {y.layer_entropy}"
        for name in ("summary_keys", "summary_values", "summary_counts"):
            s, t = getattr(x, name), getattr(y, name)
            if (s is None) != (t is None):
                return f"layer {i}: {name} present in one plan only"
            if s is not None and not torch.allclose(s.cpu().float(), t.cpu().float(),
                                                    atol=atol, rtol=rtol):
                return f"layer {i}: {name} differ by {(s.cpu().float() - t.cpu().float()).abs().max():.3g}"
    return None


def check_device(policy_name: str, layers: list[LayerObservation], budget: Budget) -> str | None:
    """Plans on `layers` (on their device) against plans on CPU copies of them."""
    cpu_layers = [LayerObservation(o.queries.cpu(), o.keys.cpu(), o.values.cpu(), o.scale,
                                   o.query_offset) for o in layers]
    policy = get_policy(policy_name)
    return plans_agree(policy.plan(layers, budget), policy.plan(cpu_layers, budget),
                       layers[0].keys.dtype)


def reference_seconds(args: argparse.Namespace, policy: str, shape: str, n: int) -> float | None:
    """The same cell timed by the checkout in `args.reference`, in a subprocess."""
    cmd = [sys.executable, "-m", "vllm_entropy_kv.bench.planning", "--json",
           "--device", args.device, "--dtype", args.dtype, "--policies", policy,
           "--shapes", shape, "--tokens", str(n), "--budget", str(args.budget),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": str(Path(args.reference).resolve())}
    done = subprocess.run(cmd, cwd=args.reference, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    rows = json.loads(done.stdout.splitlines()[-1])
    return rows[0]["seconds"] if rows else None


def grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.shapes is None and args.tokens is None:
        if args.device == "cpu":
            return DEFAULT_CPU_GRID
        return [(s, n) for s in SHAPES for n in DEFAULT_CUDA_TOKENS]
    shapes = args.shapes or ["embedded"]
    tokens = args.tokens or [3000]
    return [(s, n) for s in shapes for n in tokens]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_entropy_kv.bench.planning",
                                     description=__doc__.split("\n\n")[0])
    csv = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="observation dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--policies", type=csv, default=DEFAULT_POLICIES)
    parser.add_argument("--shapes", type=csv, default=None, help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=lambda t: [int(x) for x in csv(t)], default=None)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-device", action="store_true",
                        help="also compare each cell's plans with plans on CPU copies")
    parser.add_argument("--reference", default=None,
                        help="another checkout to time on the same cells (speed-up column)")
    parser.add_argument("--write", type=Path, default=None,
                        help="put the table into this page's planning-<device> section")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    unknown = [s for s in args.shapes or [] if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; valid: {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    budget = Budget(keep=args.budget, block_size=args.block_size)
    rows, records, failures = [], [], 0
    log = sys.stderr if args.json else sys.stdout
    for shape_name, n in grid(args):
        shape = SHAPES[shape_name]
        need, have = needed_bytes(shape, n), available_bytes(args.device)
        if need > 0.8 * have:
            print(f"skip {shape_name} n={n}: needs ~{need / 2**30:.1f} GiB, "
                  f"{have / 2**30:.1f} GiB available on {args.device}", file=log)
            continue
        layers = observations(shape, n, dtype, args.device)
        for policy in args.policies:
            if args.check_device:
                problem = check_device(policy, layers, budget)
                failures += problem is not None
                print(f"check-device {policy} {shape_name} n={n}: "
                      f"{'PASS' if problem is None else 'FAIL: ' + problem}", file=log, flush=True)
            seconds = time_plan(policy, layers, budget, args.device, args.warmup, args.repeats)
            records.append({"policy": policy, "shape": shape_name, "n": n, "seconds": seconds})
            row = [policy, shape_name, n, shape.window, args.device, f"{seconds:.4f}"]
            if args.reference:
                ref = reference_seconds(args, policy, shape_name, n)
                row += ["–" if ref is None else f"{ref:.4f}",
                        "–" if ref is None else f"{ref / seconds:.2f}x"]
            rows.append(row)
            print(" | ".join(str(c) for c in row), file=log, flush=True)
        del layers
    if args.json:
        print(json.dumps(records))
        return 1 if failures else 0
    header = ["policy", "shape", "n", "W", "device", "median s"]
    if args.reference:
        header += ["reference s", "speed-up"]
    text = describe(args, argv) + "\n\n" + table(header, rows)
    print("\n" + text)
    if args.write:
        write_section(args.write, f"planning-{args.device}", text)
    if args.check_device:
        print(f"check-device: {'FAIL' if failures else 'PASS'} ({failures} failing cells)")
    return 1 if failures else 0


def describe(args: argparse.Namespace, argv: list[str] | None) -> str:
    command = " ".join(["python -m vllm_entropy_kv.bench.planning",
                        *(sys.argv[1:] if argv is None else argv)])
    shapes = "; ".join(f"{k} {s.layers} layers, {s.q_heads}/{s.kv_heads} heads, d {s.head_size}, "
                       f"W {s.window}" for k, s in SHAPES.items())
    text = (f"`{command}`, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
            f"{device_name(args.device)}, torch {torch.__version__}: median seconds of one "
            f"request's `plan` (all layers) over {args.repeats} runs after {args.warmup} "
            f"warm-up, random {args.dtype} observations (keys held as the engine reads them "
            f"back: float32, positions contiguous), budget {args.budget:g}, "
            f"{args.block_size}-token blocks. Shapes: {shapes}.")
    if args.reference:
        text += (f" Reference: the checkout in `{args.reference}`, each cell timed right after "
                 "this one; speed-up = reference / this.")
    return text


if __name__ == "__main__":
    sys.exit(main())
