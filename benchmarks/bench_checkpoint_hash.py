"""What the checkpoint checksums (issue 22) cost on a 150m checkpoint: model + AdamW state, as a single-process or
DDP run saves it (one ``state`` file written by Fabric + one per-rank file).

Times, on one process: ``torch.save`` of the state (what a save costs without checksums), hashing every file
(``checkpoint.checksums``: SHA-256, read back from the page cache right after the write, as ``checkpoint.save``
does), verifying (``checkpoint.verify``, as ``resume`` does), and for comparison BLAKE2b and CRC32 over the same
bytes. Medians of ``--repeats``. With N ranks the hashing is split N ways (``checkpoint._share``, biggest file
first); a single big ``state`` file is hashed by one rank.

    python benchmarks/bench_checkpoint_hash.py [--repeats 3] [--dir /tmp]

Measured 2026-12-06 on the 2-core CPU machine UNDER LOAD (load average ~6.7: other jobs running), 135M params,
1.62 GB: save 3.15 s; SHA-256 of every file 1.80 s (0.90 GB/s, 57 % of the save); verify 2.53 s; BLAKE2b 3.78 s;
CRC32 1.20 s. On a quiet core SHA-256 runs at 1.17 GB/s (SHA-NI), BLAKE2b at 1.03. A save to a parallel file
system is slower than this one (to the page cache), so the share taken by hashing is smaller there.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml

from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.train import checkpoint
from omnitrain.train.optim import OptimConfig, build_optimizer

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def digest(path: Path, make) -> None:
    h = make()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)


def crc32(path: Path) -> None:
    c = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            c = zlib.crc32(block, c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default: the temp folder)")
    args = ap.parse_args()

    cfg = ModelConfig(**{**yaml.safe_load((REPO / "recipes/model/150m.yaml").read_text()), "vocab_size": 65536})
    model = Transformer(cfg)
    optimizer = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # one step, so that AdamW holds exp_avg and exp_avg_sq for every parameter
        p.grad = torch.zeros_like(p)
    optimizer.step()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "step_000000001.tmp"
        folder.mkdir()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}
        rows: dict[str, list[float]] = {k: [] for k in ("save", "sha256", "verify", "blake2b", "crc32")}
        for _ in range(args.repeats):
            rows["save"].append(timed(lambda: (torch.save(state, folder / "state"), torch.save({"rng": 0}, folder / "rank_00000.pt"))))
            sizes = checkpoint._listing(folder)
            files: dict = {}
            rows["sha256"].append(timed(lambda files=files, sizes=sizes: files.update(checkpoint.checksums(folder, sizes))))
            (folder / "meta.json").write_text(__import__("json").dumps({"schema_version": 2, "step": 1, "world_size": 1, "files": files}))
            rows["verify"].append(timed(lambda: checkpoint.verify(folder)))
            rows["blake2b"].append(timed(lambda: digest(folder / "state", hashlib.blake2b)))
            rows["crc32"].append(timed(lambda: crc32(folder / "state")))
        total = sum(sizes.values())
    print(f"150m checkpoint: {n_params / 1e6:.0f}M params (vocab 65,536, tied), model + AdamW state = {total / 1e9:.2f} GB, "
          f"{torch.get_num_threads()} torch threads, medians of {args.repeats}")  # fmt: skip
    save = statistics.median(rows["save"])
    for name, times in rows.items():
        t = statistics.median(times)
        extra = "" if name == "save" else f"  ({t / save:.0%} of the save)"
        print(f"  {name:8s} {t:6.2f} s  {total / t / 1e9:5.2f} GB/s{extra}")


if __name__ == "__main__":
    main()
