"""Run every benchmark in this folder and write one table a reader can compare across commits.

    python benchmarks/run_all.py            # all benchmarks, full size
    python benchmarks/run_all.py --quick    # smaller sizes (a smoke run; figures printed, not recorded)
    python benchmarks/run_all.py image      # only the benchmarks whose name contains "image"
    python benchmarks/run_all.py train loader model   # several: those whose name contains any of these
    python benchmarks/run_all.py audio_layouts      # flat | delay | depth at equal training FLOPs (~15 min; bench_audio_layouts.py)

Convention: each ``bench_<name>.py`` defines ``run(quick: bool) -> list[dict]``; every row is one
measured figure: ``{"metric": str, "value": float, "unit": str, "baseline": float | None,
"note": str}``. The script prints its own human-readable table while it runs; this runner appends
the rows, stamped with the git commit, the date and how busy the machine was (``load``: the 1-minute
load average before the benchmark; ``others_cpu``: CPU cores that *other* processes used on average
while it ran, from /proc/stat minus this process's own time, so a shared machine shows), to
``benchmarks/results.jsonl`` and rewrites ``benchmarks/RESULTS.md`` (latest figures per benchmark,
plus the previous commit's for comparison).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUSY = 0.25  # cores used by other processes above which a run is flagged "under load" (2-core machines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, this process's own with its children), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, sum(os.times()[:4])


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # registered before it runs: a dataclass in the module looks its module up there
    spec.loader.exec_module(mod)
    return mod


def write_markdown(history: list[dict]) -> None:
    by_bench: dict[str, list[dict]] = {}
    for row in history:
        by_bench.setdefault(row["benchmark"], []).append(row)
    lines = ["# Benchmark results", "", "Written by `python benchmarks/run_all.py`; raw rows in `results.jsonl`.", ""]
    for bench, rows in sorted(by_bench.items()):
        runs = list(dict.fromkeys((r["commit"], r["date"]) for r in rows))
        latest = runs[-1]
        prev = next((run for run in reversed(runs) if run[0] != latest[0]), None)  # the last run of another commit
        busy = next((r for r in rows if (r["commit"], r["date"]) == latest and "load" in r), None)
        load_note = "" if busy is None else f"; load average {busy['load']:.2f} before" + (
            "" if busy.get("others_cpu") is None else f", other processes used {busy['others_cpu']:.2f} cores while it ran"
            + (" (**under load**: not comparable)" if busy["others_cpu"] > BUSY else ""))
        lines += [f"## {bench}", "", f"latest: `{latest[0]}` ({latest[1]}{load_note})" + (f", previous: `{prev[0]}` ({prev[1]})" if prev else ""), ""]
        lines += ["| metric | value | unit | baseline | previous | note |", "|---|---:|---|---:|---:|---|"]
        prev_vals = {r["metric"]: r["value"] for r in rows if (r["commit"], r["date"]) == prev}
        for r in rows:
            if (r["commit"], r["date"]) != latest:
                continue
            base = "" if r.get("baseline") is None else f"{r['baseline']:.4g}"
            pv = prev_vals.get(r["metric"])
            lines.append(
                f"| {r['metric']} | {r['value']:.4g} | {r.get('unit', '')} | {base} | "
                f"{'' if pv is None else f'{pv:.4g}'} | {r.get('note', '')} |"
            )
        lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filter", nargs="*", help="run only benchmarks whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not args.filter or any(f in p.stem for f in args.filter))
    if not scripts:
        print(f"no benchmark matches {args.filter!r}", file=sys.stderr)
        return 2
    commit, date = git_commit(), dt.datetime.now().isoformat(timespec="seconds")
    results = HERE / "results.jsonl"
    new_rows = []
    for path in scripts:
        name = path.stem.removeprefix("bench_")
        print(f"=== {name} ===", flush=True)
        t0, load_before, cpu0 = time.perf_counter(), round(os.getloadavg()[0], 2), cpu_seconds()
        rows = load(path).run(quick=args.quick)
        wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
        others = None if cpu0 is None or cpu1 is None else round(((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall, 2)
        for r in rows:
            new_rows.append({"benchmark": name, "commit": commit, "date": date, "quick": args.quick, "load": load_before, "others_cpu": others, **r})
        print(f"=== {name}: {len(rows)} figures in {wall:.0f} s; load average before {load_before}, "
              f"other processes used {others} cores meanwhile{' (UNDER LOAD)' if others and others > BUSY else ''} ===", flush=True)
    if args.quick:  # a smoke run: its figures are not comparable, so they are not recorded
        print(f"quick run: {len(new_rows)} figures printed, not recorded")
        return 0
    with results.open("a") as f:
        for r in new_rows:
            f.write(json.dumps(r) + "\n")
    history = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    write_markdown(history)
    print(f"wrote {len(new_rows)} figures to {results.name} and RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
