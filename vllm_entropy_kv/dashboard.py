"""Render the Grafana dashboard's panels to a PNG with matplotlib, from a live Prometheus.

    python -m vllm_entropy_kv.dashboard --prometheus http://127.0.0.1:9090 \\
        --out docs/img/dashboard.png [--minutes 30] [--end UNIX_TIME]

Reads `deploy/grafana/dashboards/vllm-entropy-kv.json` (the same PromQL Grafana runs), asks
Prometheus' HTTP API (`/api/v1/query_range`) for every target of every panel over the last
`--minutes`, and draws one subplot per panel: lines for time series, an image (layer x time)
for heatmaps. No Grafana needed. Grafana's `$__rate_interval` becomes `--rate-interval`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

DASHBOARD_PATH = (
    Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
    / "vllm-entropy-kv.json"
)
DEFAULT_RATE_INTERVAL = "1m"


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels_with_queries(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that has PromQL targets, in dashboard order (rows flattened)."""
    found = []
    for panel in dashboard.get("panels", []):
        for p in [panel, *panel.get("panels", [])]:
            if any(t.get("expr") for t in p.get("targets", [])):
                found.append(p)
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target."""
    return [
        (panel["title"], target["expr"])
        for panel in panels_with_queries(dashboard)
        for target in panel["targets"] if target.get("expr")
    ]


def substitute(expr: str, rate_interval: str = DEFAULT_RATE_INTERVAL,
               range_s: float | None = None) -> str:
    """Replace the Grafana variables our dashboard uses by concrete PromQL durations."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}",
                                                                   rate_interval)
    if range_s is not None:
        expr = expr.replace("$__range", f"{int(range_s)}s")
    if "$" in expr:
        raise ValueError(f"unsubstituted Grafana variable in {expr!r}")
    return expr


class Prometheus:
    """The few calls of Prometheus' HTTP API we use."""

    def __init__(self, url: str, timeout_s: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, **params: Any) -> Any:
        response = requests.get(self.url + path, params=params, timeout=self.timeout_s)
        body = response.json() if response.headers.get("content-type", "").startswith(
            "application/json") else {}
        if response.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: HTTP {response.status_code} "
                               f"{body.get('error') or response.text[:300]}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._get("/api/v1/query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end,
                         step=step)["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template or "")
    return text.strip() or json.dumps(labels, sort_keys=True)


def _values(series: dict[str, Any]) -> tuple[list[float], list[float]]:
    times, values = [], []
    for t, v in series["values"]:
        value = float(v)
        if math.isfinite(value):
            times.append(float(t))
            values.append(value)
    return times, values


def _unit_scale(unit: str) -> tuple[float, str]:
    return {
        "bytes": (1 / 2**20, "MiB"), "Bps": (1 / 2**20, "MiB/s"),
        "percentunit": (100.0, "%"), "s": (1.0, "s"),
        "reqps": (1.0, "req/s"),
    }.get(unit, (1.0, ""))


def render(
    prometheus: Prometheus,
    out: Path,
    dashboard: dict[str, Any] | None = None,
    minutes: float = 30,
    end: float | None = None,
    rate_interval: str = DEFAULT_RATE_INTERVAL,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dashboard = dashboard or load_dashboard()
    end = end if end is not None else time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    panels = panels_with_queries(dashboard)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(14, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        scale, unit_label = _unit_scale(unit)
        ax.set_title(panel["title"], fontsize=10)
        drawn = 0
        if panel["type"] == "heatmap":
            target = panel["targets"][0]
            result = prometheus.query_range(
                substitute(target["expr"], rate_interval, end - start), start, end, step)
            grid_times = np.arange(start, end + step / 2, step)
            keyed = sorted(
                result, key=lambda s: _numeric(legend(target.get("legendFormat", ""),
                                                      s["metric"])))
            matrix = np.full((len(keyed), len(grid_times)), np.nan)
            for row, series in enumerate(keyed):
                for t, v in zip(*_values(series)):
                    matrix[row, min(len(grid_times) - 1, round((t - start) / step))] = v * scale
            if keyed:
                image = ax.imshow(
                    matrix, aspect="auto", origin="lower", interpolation="nearest",
                    extent=(-minutes, 0, -0.5, len(keyed) - 0.5),
                    cmap="viridis" if "budget" in panel["title"].lower() else "inferno",
                )
                fig.colorbar(image, ax=ax, label=unit_label)
                ax.set_ylabel(panel.get("options", {}).get("yAxis", {}).get("axisLabel", ""))
                drawn = len(keyed)
        else:
            for target in panel["targets"]:
                result = prometheus.query_range(
                    substitute(target["expr"], rate_interval, end - start), start, end, step)
                for series in result:
                    times, values = _values(series)
                    if not times:
                        continue
                    ax.plot([(t - end) / 60 for t in times], [v * scale for v in values],
                            label=legend(target.get("legendFormat", ""), series["metric"]),
                            linewidth=1.2)
                    drawn += 1
            if drawn:
                ax.legend(fontsize=7, loc="upper left")
            ax.set_ylabel(unit_label)
            ax.grid(alpha=0.3)
        ax.set_xlim(-minutes, 0)
        ax.set_xlabel("minutes before end")
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                    color="gray")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard.get('title', 'dashboard')}  ({prometheus.url}, "
                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(end))})")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.2 * rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _numeric(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD_PATH)
    parser.add_argument("--minutes", type=float, default=30, help="time range to draw")
    parser.add_argument("--end", type=float, default=None, help="end time (unix; default now)")
    parser.add_argument("--rate-interval", default=DEFAULT_RATE_INTERVAL,
                        help="what Grafana's $__rate_interval becomes")
    args = parser.parse_args(argv)
    out = render(Prometheus(args.prometheus), args.out, load_dashboard(args.dashboard),
                 args.minutes, args.end, args.rate_interval)
    print(out)


if __name__ == "__main__":
    main()
