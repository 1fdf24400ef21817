"""`python -m vllm_entropy_kv.eval.ruler`: the RULER-style suite offline, every arm on one
prefill per sample; writes the leaderboard into <out>/RESULTS.md and a plot into <out>/img/.

Rows go to <out>/img/ruler.json (`--section` names another) after every sample; `--resume`
skips the samples already there, so a long grid can be stopped and continued.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from vllm_entropy_kv.eval.results import Row, load_rows, save_rows
from vllm_entropy_kv.eval.ruler.arms import DEFAULT_ARMS, arm
from vllm_entropy_kv.eval.ruler.by_reference import ORDERED_TASKS
from vllm_entropy_kv.eval.ruler.sample import CountTokens
from vllm_entropy_kv.eval.ruler.tasks import TASKS


def _list(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vllm_entropy_kv.eval.ruler", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", type=Path, default=None,
                   help="a Hugging Face model directory (default: the embedded model); with "
                   "--replot, its tokenizer regenerates the samples for the hits by place")
    p.add_argument("--tasks", type=_list(str), default=list(TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--lengths", type=_list(int), default=[2048, 4096],
                   help="prompt tokens (default 2048,4096)")
    p.add_argument("--samples", type=int, default=100, help="samples per task and length")
    p.add_argument("--first", type=int, default=0, help="index of the first sample")
    p.add_argument("--arms", type=_list(str), default=list(DEFAULT_ARMS),
                   help="registered policies, ablations, or policy:field=value variants for "
                   "tuning, e.g. entropy:exponent=0.5 (default: all of DEFAULT_ARMS)")
    p.add_argument("--focus", default=None,
                   help="the arm the others are compared with, pair by pair (default entropy; "
                   "kept in the section's rows file, so --replot and --resume keep it)")
    p.add_argument("--ratios", type=_list(float), default=[0.1, 0.25, 0.5],
                   help="kept ratios (default 0.1,0.25,0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("docs"),
                   help="RESULTS.md and img/ go here (default docs)")
    p.add_argument("--section", default="ruler",
                   help="names the section of <out>/RESULTS.md, the rows "
                   "<out>/img/<section>.json and the plot (default ruler; e.g. ruler-tuning "
                   "for a tuning split)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows in <out>/img/<section>.json and run only what is missing "
                   "(samples, or arms and ratios of a sample)")
    p.add_argument("--replot", action="store_true",
                   help="rebuild the table and plot from <out>/img/<section>.json, run nothing")
    p.add_argument("--note", action="append", default=[],
                   help="with --replot: add an observation about the runs to the rows' file; "
                   "notes are listed under the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    json_path = args.out / "img" / f"{args.section}.json"
    if args.replot:
        from vllm_entropy_kv.eval.ruler.leaderboard import write_leaderboard

        rows, meta = load_rows(json_path)
        if args.focus:
            meta["focus"] = args.focus
        if args.note:
            meta["notes"] = [*meta.get("notes", []), *args.note]
        if args.focus or args.note:
            save_rows(json_path, rows, meta)
        write_leaderboard(args.out, rows, meta, args.section, _replot_counter(args.model, rows))
        return rows

    import torch

    from vllm_entropy_kv.eval.__main__ import cpu_model
    from vllm_entropy_kv.eval.model import load_model
    from vllm_entropy_kv.eval.ruler.offline import prompt_counter, run_suite

    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; valid: {','.join(TASKS)}")
    arms = [arm(name) for name in args.arms]
    rows: list[Row] = []
    meta: dict[str, Any] = {}
    if args.resume and json_path.exists():
        rows, meta = load_rows(json_path)
    started, clock = dt.datetime.now().astimezone(), time.monotonic()
    model = load_model(args.model, threads=args.threads)
    run = {
        "command": "python -m vllm_entropy_kv.eval.ruler "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": f"{model.path.name} ({model.path})",
        "machine": f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s))",
        "date": started.isoformat(timespec="seconds"),
        "samples": f"{args.samples} per task and length from index {args.first}",
    }
    meta.setdefault("runs", []).append(run)
    if args.focus:
        meta["focus"] = args.focus
    done = {(r["task"], r["length"], r["index"], r["arm"], r["ratio"]) for r in rows}

    def checkpoint(new: list[Row]) -> None:
        rows.extend(new)
        run["wall time"] = f"{(time.monotonic() - clock) / 60:.1f} min"
        save_rows(json_path, rows, meta)

    run_suite(model, args.tasks, args.lengths, range(args.first, args.first + args.samples),
              arms, args.ratios, args.seed, done, checkpoint)
    run["wall time"] = f"{(time.monotonic() - clock) / 60:.1f} min"
    save_rows(json_path, rows, meta)
    from vllm_entropy_kv.eval.ruler.leaderboard import write_leaderboard

    write_leaderboard(args.out, rows, meta, args.section, prompt_counter(model.tokenizer))
    print(f"[eval] ruler done in {run['wall time']}: {args.out / 'RESULTS.md'}", file=sys.stderr)
    return rows


def _replot_counter(model: Path | None, rows: list[Row]) -> CountTokens | None:
    """The prompt-length counter of `model`'s tokenizer, if a task of the rows needs its
    samples regenerated (`by_reference`)."""
    if not any(r["task"] in ORDERED_TASKS for r in rows):
        return None
    from transformers import AutoTokenizer

    from vllm_entropy_kv import assets
    from vllm_entropy_kv.eval.ruler.offline import prompt_counter

    return prompt_counter(AutoTokenizer.from_pretrained(model or assets.model_dir()))


if __name__ == "__main__":
    main()
