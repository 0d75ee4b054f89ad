"""Loader throughput against plain webdataset iteration over the same shards, and packing efficiency.

Shards hold a realistic omni length mix (text documents with log-normal lengths, 16x16 image
captions, 3-10 s speech clips at 100 codec frames/s x 4 levels), written in the real shard format.
Side by side, in one run, medians of several repeats:

* plain webdataset: ``wds.WebDataset`` over the tars, decoding ids.npy and meta.json per sample;
* our loader: the same samples through the mixture (by modality token shares) and packing.

Against training: the tokens/s that omnitrain's tiny model (``recipes/model/tiny.yaml``) consumes
when trained with AdamW on the loader's own batches, in the same run.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _table import print_rows  # benchmarks/ is on sys.path when these run


def _write_sources(root: Path, n_shards: int, per_shard: int) -> dict[str, Path]:
    from omnitrain.shards import SCHEMA_VERSION, Sample, ShardInfo, shard_name, write_manifest, write_shard
    from omnitrain.tokenizer.layout import TokenLayout

    layout = TokenLayout.build(8000, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=256, audio_codebook_size=128, audio_levels=4)
    rng = np.random.default_rng(0)
    kinds = {
        "text": lambda: [[0, int(np.clip(rng.lognormal(6.2, 0.9), 16, 8000)), "text"]],
        "caption": lambda: [[0, 291, "image"], [291, 291 + int(rng.integers(6, 30)), "text"]],
        "speech": lambda: (lambda a: [[0, a, "audio"], [a, a + int(rng.integers(10, 60)), "text"]])(int(rng.uniform(3, 10) * 400) + 2),
    }
    out = {}
    for name, make in kinds.items():
        folder = root / name
        folder.mkdir(parents=True)
        layout.save(folder)
        k = 0
        for s in range(n_shards):
            samples, tokens = [], {"text": 0, "image": 0, "audio": 0}
            for _ in range(per_shard):
                segs = make()
                n = segs[-1][1]
                for a, b, m in segs:
                    tokens[m] += b - a
                meta = {"schema_version": SCHEMA_VERSION, "layout_hash": layout.hash, "source": name, "template": name,
                        "segments": segs, "learn": [[1, n]], "origin": f"{name}:{k}"}  # fmt: skip
                samples.append(Sample(f"p000-{k:09d}", rng.integers(4, 8000, n).astype(np.uint32), meta))
                k += 1
            write_shard(folder / shard_name(0, s), samples, ShardInfo(shard_name(0, s), per_shard, tokens, 0, 0))
        (folder / "done-p000.json").write_text("{}")
        write_manifest(folder, {"layout_hash": layout.hash, "source": name, "template": name, "partitions": 1, "complete": True}, 1)
        out[name] = folder
    return out


def _plain(folders: dict[str, Path], n: int) -> tuple[float, int]:
    import webdataset as wds

    urls = sorted(str(p) for f in folders.values() for p in f.glob("*.tar"))
    t0, count, tokens = time.perf_counter(), 0, 0
    while count < n:
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False):
            ids = np.load(io.BytesIO(sample["ids.npy"]))
            json.loads(sample["meta.json"])
            count, tokens = count + 1, tokens + len(ids)
            if count == n:
                break
    dt = time.perf_counter() - t0
    return count / dt, int(tokens / dt)


def _ours(folders: dict[str, Path], n_batches: int, split: bool, seq_len: int) -> tuple[float, float, float]:
    from omnitrain.data import LoaderConfig, OmniLoader, SourceSpec

    cfg = LoaderConfig(sources={k: SourceSpec(str(v)) for k, v in folders.items()},
                       modality_shares={"text": 0.5, "image": 0.3, "audio": 0.2}, seq_len=seq_len, batch_size=8,
                       split_documents=split)  # fmt: skip
    loader = OmniLoader(cfg)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    dt = time.perf_counter() - t0
    st = loader.states[0]
    return st["packing"][3] / dt, st["packing"][0] / dt, loader.packing_efficiency()


def _train_tokens_per_s(folders: dict[str, Path], steps: int) -> tuple[float, int]:
    """Tokens/s of training omnitrain's tiny model (recipes/model/tiny.yaml) on our loader's batches."""
    import torch
    import yaml

    from omnitrain.config import from_dict
    from omnitrain.data import LoaderConfig, OmniLoader, SourceSpec
    from omnitrain.model import ModelConfig, Transformer

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "model" / "tiny.yaml").read_text())
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, {**recipe, "vocab_size": 8705}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = OmniLoader(LoaderConfig(sources={k: SourceSpec(str(v)) for k, v in folders.items()}, seq_len=512, batch_size=8))
    t0, tokens = 0.0, 0
    for step in range(steps + 2):
        batch = next(loader)
        if step == 2:  # after warm-up
            t0, tokens = time.perf_counter(), 0
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - t0), model.num_params()


def run(quick: bool = False) -> list[dict]:
    repeats, n_batches = (3, 30) if quick else (5, 120)
    with tempfile.TemporaryDirectory() as d:
        folders = _write_sources(Path(d), n_shards=8, per_shard=64)
        ours = [_ours(folders, n_batches, True, 4096) for _ in range(repeats)]
        docs = int(statistics.median(o[0] for o in ours) * 2)  # about as many samples as the loader read in ~2 s
        plain = [_plain(folders, max(200, docs)) for _ in range(repeats)]
        whole = _ours(folders, n_batches, False, 4096)
        train_tps, n_params = _train_tokens_per_s(folders, 3 if quick else 8)
    plain_sps = statistics.median(p[0] for p in plain)
    ours_sps = statistics.median(o[0] for o in ours)
    rows = [
        {"metric": "plain webdataset samples/s", "value": plain_sps, "unit": "samples/s", "baseline": None, "note": "decode ids.npy + meta.json"},
        {"metric": "our loader samples/s (mixture + packing)", "value": ours_sps, "unit": "samples/s", "baseline": plain_sps, "note": "baseline: plain webdataset"},
        {"metric": "loader / plain ratio", "value": ours_sps / plain_sps, "unit": "x", "baseline": 0.8, "note": "target >= 0.8"},
        {"metric": "our loader tokens/s", "value": statistics.median(o[1] for o in ours), "unit": "tokens/s", "baseline": None, "note": "seq_len 4096, batch 8"},
        {"metric": "tiny model training tokens/s", "value": train_tps, "unit": "tokens/s", "baseline": None, "note": f"recipes/model/tiny ({n_params / 1e6:.1f}M non-embedding), seq 512 x 8, AdamW, fp32 CPU"},
        {"metric": "loader / training tokens/s", "value": statistics.median(o[1] for o in ours) / train_tps, "unit": "x", "baseline": 10, "note": "target >= 10x"},
        {"metric": "packing efficiency, documents cut across rows", "value": statistics.median(o[2] for o in ours), "unit": "share", "baseline": 0.99, "note": "pretraining"},
        {"metric": "packing efficiency, documents kept whole", "value": whole[2], "unit": "share", "baseline": 0.99, "note": "SFT mode; long documents leave row tails padded"},
    ]
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
