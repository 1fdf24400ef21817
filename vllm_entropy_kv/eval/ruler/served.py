"""The served cross-check: the offline suite's very prompts (same token ids) through a running
`vllm serve`, each request naming its policy and budget, scored the same way and compared
with the offline rows of the same samples.

`python -m vllm_entropy_kv.eval.ruler.served --url URL`: the server must have been started
with a KV policy (so requests may choose theirs) and the model the offline rows came from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import requests

from vllm_entropy_kv import assets
from vllm_entropy_kv.bench.sections import table, write_section
from vllm_entropy_kv.eval.results import Row, load_rows
from vllm_entropy_kv.eval.ruler.arms import REFERENCE
from vllm_entropy_kv.eval.ruler.offline import prompt_counter, prompt_ids
from vllm_entropy_kv.eval.ruler.sample import Sample
from vllm_entropy_kv.eval.ruler.stats import estimate
from vllm_entropy_kv.eval.ruler.tasks import make_sample

SECTION = "ruler-served"


def answer(url: str, model: str, ids: list[int], sample: Sample, policy: str,
           ratio: float) -> str:
    """The greedy answer of the server, the prompt compressed at the end of its prefill."""
    xargs = {"kv_policy": policy} | ({} if policy == REFERENCE else {"kv_budget": ratio})
    response = requests.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": ids, "max_tokens": sample.max_new_tokens,
        "temperature": 0, "vllm_xargs": xargs,
    })
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def cross_check(rows: Sequence[Row], served: Sequence[Row]) -> str:
    """Served vs offline per (task, policy, ratio) on the same samples: mean [95% CI] each and
    whether the intervals overlap; and how many answers agree sample by sample."""
    offline = {(r["task"], r["length"], r["index"], r["arm"], r["ratio"]): r for r in rows}
    cells: dict[tuple[str, int, str, float], list[tuple[Row, Row]]] = {}
    for s in served:
        o = offline.get((s["task"], s["length"], s["index"], s["arm"], s["ratio"]))
        if o is not None:
            cells.setdefault((s["task"], s["length"], s["arm"], s["ratio"]), []).append((s, o))
    lines = []
    for (task, length, arm, ratio), pairs in sorted(cells.items()):
        es = estimate([s["score"] for s, _ in pairs])
        eo = estimate([o["score"] for _, o in pairs])
        overlap = es.low <= eo.high and eo.low <= es.high
        same = sum(s["score"] == o["score"] for s, o in pairs)
        lines.append([task, length, arm, f"{ratio:g}", len(pairs),
                      f"{100 * es.mean:.0f} [{100 * es.low:.0f}, {100 * es.high:.0f}]",
                      f"{100 * eo.mean:.0f} [{100 * eo.low:.0f}, {100 * eo.high:.0f}]",
                      "yes" if overlap else "NO", f"{same}/{len(pairs)}"])
    return table(["task", "length", "policy", "ratio", "samples", "served", "offline",
                  "intervals overlap", "same score"], lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="the server (not needed with --compare)")
    p.add_argument("--compare", action="store_true",
                   help="send nothing: compare <out>/img/ruler-served.json with --offline")
    p.add_argument("--model", type=Path, default=None,
                   help="the model directory the server runs (default: the embedded model)")
    p.add_argument("--served-name", default=assets.SERVED_MODEL_NAME)
    p.add_argument("--offline", type=Path, default=Path("docs/img/ruler.json"),
                   help="the offline rows to compare with (their seed is used)")
    p.add_argument("--tasks", default="niah_single,niah_multikey")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--policies", default="none,entropy,snapkv")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--out", type=Path, default=Path("docs"),
                   help="RESULTS.md gets the comparison, img/ruler-served.json the rows")
    args = p.parse_args(argv)
    rows, _ = load_rows(args.offline)
    served_path = args.out / "img" / "ruler-served.json"
    served = json.loads(served_path.read_text()) if args.compare else query(args, rows[0]["seed"])
    served_path.parent.mkdir(parents=True, exist_ok=True)
    served_path.write_text(json.dumps(served, indent=1))
    text = cross_check(rows, served)
    print(text)
    write_section(args.out / "RESULTS.md", SECTION, "### Served cross-check\n\n" + text)


def query(args: argparse.Namespace, seed: int) -> list[Row]:
    """The server's answers to the samples, one row per (sample, policy)."""
    from transformers import AutoTokenizer

    if not args.url:
        raise SystemExit("--url is needed unless --compare is given")
    tokenizer = AutoTokenizer.from_pretrained(str(args.model or assets.model_dir()))
    count = prompt_counter(tokenizer)
    served: list[Row] = []
    for task in args.tasks.split(","):
        for index in range(args.samples):
            sample = make_sample(task, args.length, index, seed, count)
            ids = prompt_ids(tokenizer, sample)
            for policy in args.policies.split(","):
                ratio = 1.0 if policy == REFERENCE else args.ratio
                text = answer(args.url.rstrip("/"), args.served_name, ids, sample, policy, ratio)
                served.append({"task": task, "length": args.length, "index": index,
                               "arm": policy, "ratio": ratio, "score": sample.score(text),
                               "answer": text})
            print(f"[served] {task} #{index}: " + ", ".join(
                f"{r['arm']} {r['score']:.2f}" for r in served[-len(args.policies.split(",")):]),
                flush=True)
    return served


if __name__ == "__main__":
    main()
