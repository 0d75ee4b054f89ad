"""The printed table every benchmark ends with (its rows follow run_all.py's convention)."""

from __future__ import annotations


def print_rows(rows: list[dict], value_label: str = "value", baseline_label: str = "baseline", notes: bool = False) -> None:
    width = max(len(r["metric"]) for r in rows) + 2
    print(f"\n{'metric':{width}s} {value_label:>12s} {baseline_label:>12s}  unit")
    for r in rows:
        base = "" if r.get("baseline") is None else f"{r['baseline']:.3f}"
        note = f"   {r.get('note', '')}" if notes else ""
        print(f"{r['metric']:{width}s} {r['value']:12.3f} {base:>12s}  {r['unit']}{note}")
