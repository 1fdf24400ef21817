"""`python -m vllm_entropy_kv.eval`: the offline evaluation on HF transformers (CPU).

Runs the measures of the three source studies on the embedded model for every registered
policy at several keep ratios, with the full cache (`none`) as the reference row, and writes
`<out>/RESULTS.md`, `<out>/img/*.png` and the raw rows in `<out>/img/results.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

TASKS = ("profile", "ppl", "recon", "needle", "stream")
DEFAULT_STREAM_POLICIES = ("none", "streaming", "h2o", "entropy", "entropy-merge", "src")
DEFAULT_PROFILE_POLICIES = ("entropy", "pyramid")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vllm_entropy_kv.eval", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--policies",
        type=_names,
        default=None,
        help="comma-separated policy names (default: every registered policy)",
    )
    p.add_argument(
        "--ratios",
        type=_floats,
        default=[0.1, 0.25, 0.5, 0.75],
        help="keep ratios (default 0.1,0.25,0.5,0.75)",
    )
    p.add_argument(
        "--tasks",
        type=_names,
        default=list(TASKS),
        help=f"comma-separated subset of {','.join(TASKS)}",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for CI (512-token contexts, one needle case, short stream)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("docs"),
        help="output directory: RESULTS.md and img/ (default docs)",
    )
    p.add_argument(
        "--bias-ablation",
        type=_names,
        default=["entropy-merge"],
        help="policies also measured without the log(count) bias (default entropy-merge)",
    )
    p.add_argument(
        "--match",
        choices=("real", "nominal"),
        default="real",
        help="budget matching for ppl/needle: equal real memory (default) or nominal",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the cores the current load leaves idle, >= 1)",
    )
    g = p.add_argument_group("sizes (defaults: full run; --quick overrides unless given)")
    g.add_argument("--context", type=int, help="perplexity context tokens (2048)")
    g.add_argument("--continuation", type=int, help="scored continuation tokens (256)")
    g.add_argument("--plays", type=int, help="Gutenberg play windows (4)")
    g.add_argument("--britannica", type=int, help="Britannica windows (2)")
    g.add_argument("--heldout", type=int, help="held-out queries for reconstruction (64)")
    g.add_argument("--needle-lengths", type=_ints, help="haystack lengths (1024,2048,4096)")
    g.add_argument("--needle-depths", type=_floats, help="needle depths in [0,1] (0.1,0.5,0.9)")
    g.add_argument("--needle-max-new", type=int, help="greedy answer tokens (24)")
    g.add_argument("--stream-policies", type=_names, help=f"({','.join(DEFAULT_STREAM_POLICIES)})")
    g.add_argument("--stream-tokens", type=int, help="stream length (4096)")
    g.add_argument("--stream-chunk", type=int, help="stream chunk tokens (256)")
    g.add_argument("--stream-budget", type=int, help="compress above this many tokens/layer (1024)")
    g.add_argument("--stream-compress-to", type=int, help="tokens/layer after compressing (512)")
    g.add_argument(
        "--profile-policies", type=_names, help=f"({','.join(DEFAULT_PROFILE_POLICIES)})"
    )
    p.add_argument(
        "--needle-mode",
        choices=("agnostic", "aware", "both"),
        default="agnostic",
        help="question appended after compression (agnostic, default, as kvpress) or inside "
        "the compressed prompt (aware)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in <out>/img/results.json and replace only the kinds of "
        "rows this run produces (e.g. add a query-aware needle run)",
    )
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="with --replot: add a note (an observation about this run) to results.json; "
        "notes are listed in RESULTS.md",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="rebuild RESULTS.md and plots from <out>/img/results.json, run nothing",
    )
    return p.parse_args(argv)


FULL = dict(
    context=2048,
    continuation=256,
    plays=4,
    britannica=2,
    heldout=64,
    needle_lengths=[1024, 2048, 4096],
    needle_depths=[0.1, 0.5, 0.9],
    needle_max_new=24,
    stream_tokens=4096,
    stream_chunk=256,
    stream_budget=1024,
    stream_compress_to=512,
)
QUICK = dict(
    context=512,
    continuation=64,
    plays=1,
    britannica=1,
    heldout=16,
    needle_lengths=[512],
    needle_depths=[0.5],
    needle_max_new=24,
    stream_tokens=768,
    stream_chunk=128,
    stream_budget=256,
    stream_compress_to=128,
)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes in effect: explicit flags, else the --quick or full defaults."""
    base = QUICK if args.quick else FULL
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _kind(row: dict[str, Any]) -> tuple[str, str | None]:
    """What a row measures, for --append: its task, and the mode of a needle row."""
    return row["task"], row.get("mode", "agnostic") if row["task"] == "needle" else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns {"rows": ..., "meta": ..., "images": ...}."""
    from vllm_entropy_kv.eval import plots
    from vllm_entropy_kv.eval.report import write_results
    from vllm_entropy_kv.eval.results import load_rows, save_rows

    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out, img = args.out, args.out / "img"
    json_path = img / "results.json"
    if args.replot:
        rows, meta = load_rows(json_path)
        if args.note:
            meta["notes"] = [*meta.get("notes", []), *args.note]
            save_rows(json_path, rows, meta)
        images = plots.all_plots(rows, img)
        write_results(out / "RESULTS.md", rows, meta, [os.path.relpath(p, out) for p in images])
        return {"rows": rows, "meta": meta, "images": images}

    from transformers import __version__ as transformers_version

    from vllm_entropy_kv.eval.documents import run_documents
    from vllm_entropy_kv.eval.model import load_model
    from vllm_entropy_kv.eval.needle import run_needle
    from vllm_entropy_kv.eval.plans import variants
    from vllm_entropy_kv.eval.profile import run_profile
    from vllm_entropy_kv.eval.stream import run_stream
    from vllm_entropy_kv.eval.texts import perplexity_documents, play_paths
    from vllm_entropy_kv.policies import available_policies

    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown tasks {sorted(unknown)}; valid: {','.join(TASKS)}")
    registered = available_policies()
    policies = args.policies or registered
    missing = [p for p in policies if p not in registered]
    if missing:
        raise SystemExit(f"unknown policies {missing}; registered: {','.join(registered)}")
    if "none" not in policies:
        policies = ["none", *policies]
    size = settings(args)
    started, clock = dt.datetime.now().astimezone(), time.monotonic()
    model = load_model(dtype=getattr(torch, args.dtype), threads=args.threads)
    cfg = model.lm.config
    meta: dict[str, Any] = {
        "command": " ".join(["python -m vllm_entropy_kv.eval", shlex.join(raw_argv)]).strip(),
        "model": f"{model.path.name} ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
        f"query heads, {cfg.num_key_value_heads} KV heads, head_dim {model.head_dim}), "
        f"computed in {args.dtype}; KV bytes counted as bf16 "
        f"({model.kv_bytes_per_token_layer * cfg.num_hidden_layers / 1024:.1f} KiB/token)",
        "machine": f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} torch thread(s)), transformers {transformers_version}",
        "date": started.isoformat(timespec="seconds"),
        "policies": ", ".join(policies),
        "keep ratios": ", ".join(f"{r:g}" for r in args.ratios),
        "budget matching": args.match,
        "settings": size,
    }
    rows_v = variants(policies, args.bias_ablation)
    rows: list[dict[str, Any]] = []
    previous = load_rows(json_path) if args.append and json_path.exists() else None

    def checkpoint() -> list[str]:
        meta["wall time"] = f"{(time.monotonic() - clock) / 60:.1f} min"
        all_rows, all_meta = rows, meta
        if previous is not None:
            produced = {_kind(r) for r in rows}
            all_rows = [r for r in previous[0] if _kind(r) not in produced] + rows
            all_meta = {
                **previous[1],
                "appended run": f"`{meta['command']}` on {meta['date']} ({meta['wall time']})",
            }
        save_rows(json_path, all_rows, all_meta)
        images = plots.all_plots(all_rows, img)
        write_results(
            out / "RESULTS.md", all_rows, all_meta, [os.path.relpath(p, out) for p in images]
        )
        return images

    docs = perplexity_documents(
        model.encode, size["plays"], size["britannica"], size["context"], size["continuation"]
    )
    if "profile" in args.tasks and docs:
        chosen = [p for p in (args.profile_policies or DEFAULT_PROFILE_POLICIES) if p in registered]
        rows += run_profile(model, docs[0], chosen, 0.25)
        checkpoint()
    if {"ppl", "recon"} & set(args.tasks):
        rows += run_documents(
            model,
            docs,
            rows_v,
            args.ratios,
            perplexity="ppl" in args.tasks,
            reconstruction="recon" in args.tasks,
            heldout_queries=size["heldout"],
            match=args.match,
        )
        checkpoint()
    modes = {"agnostic": [False], "aware": [True], "both": [False, True]}[args.needle_mode]
    for query_aware in modes if "needle" in args.tasks else []:
        rows += run_needle(
            model,
            rows_v,
            args.ratios,
            size["needle_lengths"],
            size["needle_depths"],
            max_new_tokens=size["needle_max_new"],
            match=args.match,
            query_aware=query_aware,
        )
        checkpoint()
    if "stream" in args.tasks:
        wanted = args.stream_policies or DEFAULT_STREAM_POLICIES
        stream_v = [v for v in rows_v if v.policy in wanted and v.use_bias]
        text = play_paths()[len(play_paths()) // 2]
        ids = model.encode(text.read_text(encoding="utf-8", errors="replace"))
        start = ids.shape[1] // 10
        meta["stream text"] = f"{text.stem}, {size['stream_tokens']} tokens from token {start}"
        rows += run_stream(
            model,
            stream_v,
            ids[:, start : start + size["stream_tokens"]],
            chunk=size["stream_chunk"],
            budget_tokens=size["stream_budget"],
            compress_to=size["stream_compress_to"],
        )
    images = checkpoint()
    print(f"[eval] done in {meta['wall time']}: {out / 'RESULTS.md'}", file=sys.stderr)
    return {"rows": rows, "meta": meta, "images": images}


if __name__ == "__main__":
    main()
