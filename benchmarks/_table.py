"""What the benchmarks share: the printed table every one ends with (its rows follow run_all.py's convention), and
a fixed number of torch threads while one runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch with ``n`` threads inside, its setting back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_rows(rows: list[dict], value_label: str = "value", baseline_label: str = "baseline", notes: bool = False) -> None:
    width = max(len(r["metric"]) for r in rows) + 2
    print(f"\n{'metric':{width}s} {value_label:>12s} {baseline_label:>12s}  unit")
    for r in rows:
        base = "" if r.get("baseline") is None else f"{r['baseline']:.3f}"
        note = f"   {r.get('note', '')}" if notes else ""
        print(f"{r['metric']:{width}s} {r['value']:12.3f} {base:>12s}  {r['unit']}{note}")
