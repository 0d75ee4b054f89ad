"""Document-masked attention on CPU (issue 19, item 1): what a packed row costs over a one-document row.

A training step (forward + backward through the fused loss, fp32, torch threads fixed) at T=2048,
B=4, dim 256, 4 layers (the tiny recipe's heads: 4 query, 2 key/value), vocabulary 4096, on

* packed rows: several documents per row (lengths 100-700 tokens, pretraining-style, no padding);
* one-document rows: the same tokens, one document per row,

for the old path (reproduced inline: ``doc_ids`` -> a bool [B, 1, T, T] mask after a ``bool(...)``
check of the data, passed to SDPA in every layer, which turns it into a float mask in every call,
forward and backward; one-document rows found by that check and sent to ``is_causal``) and the new
one (``Transformer.forward``: an additive mask built once per batch, the CPU flash kernel with
``is_causal`` and the mask, so the blocks above the diagonal are skipped; one-document rows pass no
``doc_ids``). The four steps run round-robin, the order reversed every other round (ABBA), after a
warm-up round; medians. Peak memory: each step alone in a fresh process, the growth of its maximum
resident set over its first step (Linux /proc high-water mark; tracemalloc does not see torch's
allocations); skipped off Linux.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run

THREADS = 2  # torch intra-op threads, fixed so that figures compare across runs
B, T, VOCAB = 4, 2048, 4096
MODEL = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, qk_norm=True)
STEPS = ("old packed", "old one-doc", "new packed", "new one-doc")


def _setup():
    """(model, the four step functions) on one fixed batch."""
    import torch

    from omnitrain.model.loss import linear_cross_entropy
    from omnitrain.model.transformer import ModelConfig, Transformer, document_positions

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, **MODEL, attention="sdpa"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    targets, weights = ids.roll(-1, dims=1), torch.ones(B, T)
    packed = torch.zeros(B, T, dtype=torch.long)  # [B, T] document number of each token
    for r in range(B):
        bounds = torch.randint(100, 700, (T // 100,), generator=g).cumsum(0)
        packed[r] = torch.bucketize(torch.arange(T), bounds[bounds < T], right=True)
    one_doc = torch.zeros(B, T, dtype=torch.long)

    def old_step(doc_ids: torch.Tensor) -> None:
        """The code before issue 19: the mask and the one-document check of every forward, then the same layers and loss."""
        positions = document_positions(doc_ids)
        mask = None
        if not (bool((doc_ids == doc_ids[:, :1]).all()) and bool((doc_ids >= 0).all())):  # a host sync
            same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
            mask = (same & torch.ones(T, T, dtype=torch.bool).tril() | torch.eye(T, dtype=torch.bool))[:, None]  # [B, 1, T, T] bool
        h = model.norm(model.hidden(ids, positions, mask))  # [B, T, D]; a bool mask goes to F.scaled_dot_product_attention
        w = weights.flatten()
        linear_cross_entropy(h.flatten(0, 1), model.output.weight, targets.flatten(), w, 0.0, w.sum())[0].backward()

    steps = {
        "old packed": lambda: old_step(packed),
        "old one-doc": lambda: old_step(one_doc),
        "new packed": lambda: model(ids, packed, targets, weights)[0].backward(),
        "new one-doc": lambda: model(ids, None, targets, weights)[0].backward(),
    }
    return model, steps, int(packed.amax(1).float().mean().item()) + 1


def _peak_memory_mb(name: str) -> float:
    """Growth of the maximum resident set over the first step of ``name``, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory", name], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])["peak_mb"]


def _status_mb(key: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _memory_child(name: str) -> None:
    _, steps, _ = _setup()
    # ru_maxrss is inherited across fork + exec (the parent's peak, after its timed steps), so reset the
    # high-water mark (Linux: "5" to clear_refs) and read it back from /proc
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    steps[name]()
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


def run(quick: bool = False) -> list[dict]:
    import torch

    repeats = 1 if quick else 4
    model, steps, docs_per_row = _setup()
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    for rep in range(repeats + 1):  # round 0 warms up
        for name in STEPS if rep % 2 == 0 else STEPS[::-1]:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            steps[name]()
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    mem = {} if quick or not Path("/proc/self/clear_refs").exists() else {name: _peak_memory_mb(name) for name in STEPS}
    config = (f"B={B}, T={T}, dim {MODEL['dim']}, {MODEL['n_layers']} layers, heads {MODEL['n_heads']}/{MODEL['n_kv_heads']} kv, "
              f"vocab {VOCAB}, fp32, ~{docs_per_row} documents per packed row, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}, medians of {repeats} ABBA rounds")  # fmt: skip
    print(config)
    rows = [{"metric": f"training step, {name}", "value": med[name], "unit": "s", "baseline": med[f"old {name[4:]}"] if name.startswith("new") else None,
             "note": "baseline: the old path" if name.startswith("new") else ""} for name in STEPS]  # fmt: skip
    rows += [
        {"metric": "packed / one-document step, new", "value": med["new packed"] / med["new one-doc"], "unit": "x",
         "baseline": med["old packed"] / med["old one-doc"], "note": f"target <= 1.1x; baseline: the old path; {config}"},
        {"metric": "packed step speed-up, new vs old", "value": med["old packed"] / med["new packed"], "unit": "x", "baseline": 1.0, "note": config},
    ]  # fmt: skip
    if mem:
        rows += [{"metric": f"peak memory growth over a step, {name}", "value": mem[name], "unit": "MB", "baseline": None,
                  "note": "peak RSS (VmHWM) growth over the first step, fresh process"} for name in STEPS]  # fmt: skip
        rows += [{"metric": "packed - one-document peak memory, new", "value": mem["new packed"] - mem["new one-doc"], "unit": "MB",
                  "baseline": mem["old packed"] - mem["old one-doc"], "note": "baseline: the old path"}]  # fmt: skip
    print_rows(rows)
    return rows


if __name__ == "__main__":
    if "--memory" in sys.argv:
        _memory_child(sys.argv[sys.argv.index("--memory") + 1])
    else:
        run(quick="--quick" in sys.argv)
