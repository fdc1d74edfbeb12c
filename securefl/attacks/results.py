"""Harness results: ``results.jsonl`` records, Markdown tables, heatmaps, and the combined
report (``attacks/RESULTS.md``).

A poisoning table has one row per attack and one column per defense; each entry is the final
clean test accuracy as mean ± sample standard deviation over seeds.  Backdoor attacks get a
second table with the attack success rate.  Inference cells are tabulated per metric.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from securefl.output import atomic_write, pyplot, save_figure

__all__ = ["append_result", "load_results", "mean_sd", "plot_heatmap", "record_json",
           "scenario_markdown", "write_results_document"]

_log = logging.getLogger(__name__)

NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
COMMAND = (
    "securefl attack run attacks/poisoning/*.toml attacks/inference/*.toml "
    "--results attacks/RESULTS.md")


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Records by cell key; a later line for the same key wins; a torn last line is skipped."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            _log.warning("%s:%d: unreadable line skipped (interrupted write?)", path, number)
            continue
        records[record["key"]] = record
    return records


def append_result(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line and flush it to disk before returning.  JSON has no
    NaN or infinity: a non-finite metric (a diverged model's loss) is written as null."""
    line = record_json(record) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def record_json(record: Mapping[str, Any]) -> str:
    """One record as a line of JSON, keys sorted, a non-finite float as null."""
    return json.dumps(_json_safe(record), sort_keys=True, allow_nan=False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return value


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean, sd = mean_sd(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {sd:.3f}"


def _groups(scenario: Any, records: Mapping[str, Mapping[str, Any]]
            ) -> list[tuple[str, float, dict[tuple[str, str], list[Mapping[str, Any]]]]]:
    """``(distribution, fraction, {(attack, defense): records})`` in scenario order."""
    out = []
    for dist in scenario.distributions:
        for fraction in scenario.fractions:
            table: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
            for record in records.values():
                if (record.get("kind") == "poisoning" and record["distribution"] == dist["name"]
                        and record["fraction"] == fraction):
                    table.setdefault((record["attack"], record["defense"]), []).append(record)
            out.append((dist["name"], fraction, table))
    return out


def _metric(group: Iterable[Mapping[str, Any]], name: str) -> list[float]:
    return [r[name] for r in group if r["status"] == "ok" and r.get(name) is not None]


def _table(scenario: Any, table: Mapping[tuple[str, str], list[Mapping[str, Any]]],
           metric: str, errors: dict[str, int]) -> list[str]:
    defenses = [d["name"] for d in scenario.defenses]
    lines = ["| attack | " + " | ".join(defenses) + " |",
             "|---|" + "---|" * len(defenses)]
    for attack in scenario.attacks:
        cells = []
        for defense in defenses:
            group = table.get((attack["name"], defense), [])
            text = _fmt(_metric(group, metric))
            for record in group:
                if record["status"] != "ok":
                    mark = errors.setdefault(record["error"], len(errors) + 1)
                    text = f"n/a [{mark}]"
            cells.append(text)
        measured = any(_metric(table.get((attack["name"], d), []), metric) for d in defenses)
        if metric == "accuracy" or measured:
            lines.append(f"| {attack['name']} | " + " | ".join(cells) + " |")
    return lines


def scenario_markdown(scenario: Any, records: Mapping[str, Mapping[str, Any]], *,
                      level: int = 1, image: str | None = None) -> str:
    """The Markdown tables of one scenario."""
    head = "#" * level
    base = scenario.base
    data, run, model = base.get("data", {}), base.get("run", {}), base.get("model", {})
    lines = [f"{head} {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description.strip(), ""]
    lines += [f"Dataset `{data.get('dataset', 'digits')}`, {data.get('num_clients', 10)} "
              f"clients, {run.get('rounds', 20)} rounds, model `{model.get('name', 'mlp')}`; "
              f"seeds {list(scenario.seeds)}.  Entries: final clean test accuracy, mean ± sd "
              "over seeds.", ""]
    if image:
        lines += [f"![heatmap]({image})", ""]
    errors: dict[str, int] = {}
    for dist, fraction, table in _groups(scenario, records):
        if not table:
            continue
        lines += [f"{head}# {dist}, {fraction:.0%} byzantine clients", ""]
        lines += [*_table(scenario, table, "accuracy", errors), ""]
        asr = _table(scenario, table, "attack_success_rate", errors)
        if len(asr) > 2:
            lines += ["Backdoor attack success rate (triggered test inputs of other classes "
                      "classified as the target):", "", *asr, ""]
    for message, mark in errors.items():
        lines.append(f"[{mark}] not runnable: {message}  ")
    inference = [r for r in records.values() if r.get("kind") == "inference"]
    if inference:
        lines += ["", f"{head}# Inference", "", *_inference_table(inference)]
    return "\n".join(lines).rstrip() + "\n"


def _inference_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    metrics: list[str] = []
    for record in records:
        for key, value in record.get("metrics", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and key not in metrics:
                metrics.append(key)
    lines = ["| cell | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, group in by_name.items():
        ok = [r for r in group if r["status"] == "ok"]
        cells = [_fmt([r["metrics"][m] for r in ok if r["metrics"].get(m) is not None])
                 for m in metrics]
        if not ok:
            cells = [f"error: {group[0].get('error', '')}"] + [""] * (len(metrics) - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_heatmap(scenario: Any, records: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Mean final accuracy, attacks x defenses, one panel per (distribution, fraction); a
    second row of panels shows the backdoor attack success rate when there is one."""
    import numpy as np

    plt = pyplot()

    groups = [g for g in _groups(scenario, records) if g[2]]
    if not groups:
        return
    attacks = [a["name"] for a in scenario.attacks]
    defenses = [d["name"] for d in scenario.defenses]
    panels = [("accuracy", "final test accuracy", "viridis", attacks)]
    backdoored = [a for a in attacks if any(_metric(g[2].get((a, d), []), "attack_success_rate")
                                           for g in groups for d in defenses)]
    if backdoored:
        panels.append(("attack_success_rate", "attack success rate", "magma_r", backdoored))
    heights = [1.0 + 0.45 * len(rows) for *_, rows in panels]
    fig, axes = plt.subplots(len(panels), len(groups), squeeze=False,
                             gridspec_kw={"height_ratios": heights},
                             figsize=(2.5 + 0.75 * len(defenses) * len(groups), 1.0 + sum(heights)))
    for row, (metric, label, cmap, names) in enumerate(panels):
        for col, (dist, fraction, table) in enumerate(groups):
            ax = axes[row][col]
            grid = np.full((len(names), len(defenses)), np.nan)
            for i, attack in enumerate(names):
                for j, defense in enumerate(defenses):
                    values = _metric(table.get((attack, defense), []), metric)
                    if values:
                        grid[i, j] = mean_sd(values)[0]
            image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap,
                              aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                shade = value if metric == "accuracy" else 1 - value
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center",
                        va="center", fontsize=7, color="white" if shade < 0.6 else "black")
            last = row == len(panels) - 1
            ax.set_xticks(range(len(defenses)), defenses if last else [], rotation=45,
                          ha="right", fontsize=8)
            ax.set_yticks(range(len(names)), names if col == 0 else [], fontsize=8)
            if row == 0:
                ax.set_title(f"{dist}, {fraction:.0%} byzantine", fontsize=9)
        fig.colorbar(image, ax=list(axes[row]), label=label, shrink=0.9)
    save_figure(fig, path, dpi=100, bbox_inches="tight")


def write_results_document(path: Path, collected: Sequence[tuple[Any, Mapping[str, Any], Path]]
                           ) -> None:
    """Write the combined report; the notes block of an existing file is kept verbatim, and
    each scenario's heatmap is copied to ``<path's folder>/heatmaps/``."""
    notes = f"{NOTES_BEGIN}\n{NOTES_END}"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        start, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
        if 0 <= start < end:
            notes = text[start:end + len(NOTES_END)]
    parts = ["# Attack suite results", "",
             f"Regenerate with `{COMMAND}` (finished cells in `runs/attacks/*/results.jsonl` "
             "are reused, not recomputed).  Tables are generated; the discussion between the "
             "notes markers is kept across regenerations.", "", notes, ""]
    inference: list[Mapping[str, Any]] = []
    # smoke scenarios last: the report leads with the suites that carry the results
    ordered = sorted(collected, key=lambda item: "quick" in item[0].path.stem)
    for scenario, records, out_dir in ordered:
        image = None
        heatmap = Path(out_dir) / "heatmap.png"
        if heatmap.exists():
            target = path.parent / "heatmaps" / f"{scenario.path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(heatmap, target)
            image = target.relative_to(path.parent).as_posix()
        poisoning = {k: r for k, r in records.items() if r.get("kind") == "poisoning"}
        inference += [r for r in records.values() if r.get("kind") == "inference"]
        if poisoning:
            parts.append(scenario_markdown(scenario, poisoning, level=2, image=image))
        elif scenario.attacks:
            parts += [f"## {scenario.name}", "", f"Not run here ({scenario.path.name}); see "
                      "`attacks/README.md` for the dataset it needs.", ""]
    if inference:
        parts += ["## Inference", "", *_inference_table(inference), ""]
    atomic_write(path, "\n".join(parts).rstrip() + "\n")
