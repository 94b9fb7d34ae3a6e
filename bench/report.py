"""Markdown rendering of a suite result (the JSON written by `python -m bench`).

    .venv/bin/python -m bench.report bench/results/latest.json     (prints the Markdown again)
"""

from __future__ import annotations

import json
import sys


def fmt(x) -> str:
    """Numbers with about 3-4 significant digits; other values as text."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


def table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v).replace("|", "/") for v in row) + " |" for row in rows]
    return lines


def _better(c: dict) -> str:
    return {True: "higher", False: "lower"}.get(c.get("higher_is_better"), "")


def comparison_rows(result: dict) -> list[list]:
    rows = []
    for c in result.get("comparisons", []):
        if "skipped" in c:
            rows.append([c["name"], c["metric"], c["baseline"], c.get("baseline_value"), c["candidate"],
                         f"skipped: {c['skipped']}", "-", ""])
        else:
            rows.append([c["name"], c["metric"], c["baseline"], c["baseline_value"], c["candidate"], c["value"],
                         f"{c['ratio']:.3g}x", _better(c)])
    return rows


def machine_lines(m: dict) -> list[str]:
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in m.get("versions", {}).items())
    rows = [["CPU", m.get("cpu")],
            ["cores", f"{m.get('logical_cores')} logical, {m.get('physical_cores') or '?'} physical, "
                      f"{m.get('usable_cores')} usable" + (f", cgroup quota {m['cgroup_cpu_quota']}"
                                                           if m.get("cgroup_cpu_quota") else "")],
            ["RAM", f"{m.get('ram_gib')} GiB"], ["GPU", m.get("gpu")],
            ["load average at start", " / ".join(fmt(x) for x in m.get("load_average_1_5_15", []))],
            ["torch threads", m.get("torch_threads")], ["Python", m.get("python")], ["versions", versions]]
    return table(["", ""], rows)


def headline(result: dict) -> dict | None:
    """The comparison a benchmark names as its headline (`headline`: its name), else its first measured one."""
    measured = [c for c in result.get("comparisons", []) if "ratio" in c]
    named = [c for c in measured if c["name"] == result.get("headline")]
    return (named or measured or [None])[0]


def summary_lines(doc: dict) -> list[str]:
    rows = []
    for name, r in doc["benchmarks"].items():
        if "skipped" in r:
            rows.append([name, f"skipped: {r['skipped']}", "", "", "", r.get("wall_s")])
            continue
        c = headline(r)
        if c is None:
            rows.append([name, "nothing measured", "", "", "", r.get("wall_s")])
            continue
        rows.append([name, f"{c['name']} ({c['metric']})", f"{c['baseline']}: {fmt(c['baseline_value'])}",
                     f"{c['candidate']}: {fmt(c['value'])}", f"{c['ratio']:.3g}x", r.get("wall_s")])
    return table(["benchmark", "figure", "baseline", "candidate", "ratio", "wall s"], rows)


def section(name: str, r: dict) -> list[str]:
    lines = [f"## {name}: {r.get('title', '')}", ""]
    if "skipped" in r:
        return lines + [f"Skipped: {r['skipped']}", ""] + ([f"Log: `{r['log']}`", ""] if r.get("log") else [])
    lines += table(["case", "metric", "baseline", "baseline value", "candidate", "value", "ratio", "better"],
                   comparison_rows(r))
    for extra in r.get("tables", []):
        lines += ["", f"**{extra['title']}**", ""] + table(extra["columns"], extra["rows"])
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    lines += ["", f"Wall time {fmt(r.get('wall_s'))} s" + (f"; log `{r['log']}`" if r.get("log") else ""), ""]
    return lines


def busy_warning(doc: dict) -> list[str]:
    """A loaded machine makes every figure unreliable (OpenMP threads wait for descheduled peers): say so."""
    m = doc["machine"]
    cores = m.get("usable_cores") or m.get("logical_cores") or 1
    loads = [m.get("load_average_1_5_15", [0])[0], (doc.get("load_average_at_end") or [0])[0]]
    if max(loads) <= 0.5 * cores:
        return []
    return [f"**Warning: the machine was busy** (1-minute load {fmt(loads[0])} at the start, {fmt(loads[1])} at "
            f"the end, on {cores} usable cores): other work shared the cores, so the figures are not reliable. "
            "Rerun on a quiet machine.", ""]


def markdown(doc: dict) -> str:
    lines = [f"# tspin-ray benchmarks ({doc['mode']})", "",
             f"`{doc['command']}`, started {doc['started']}, {fmt(doc.get('wall_s'))} s in all; in-process torch "
             f"threads: {doc.get('in_process_threads', 'torch default')}. Every ratio is "
             "candidate / baseline, both measured in this run; `better` says which direction is good.", "",
             *busy_warning(doc), "## Machine", ""] + machine_lines(doc["machine"]) + ["", "## Summary", ""] + summary_lines(doc) + [""]
    for name, r in doc["benchmarks"].items():
        lines += section(name, r)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(open(sys.argv[1]).read())), end="")
