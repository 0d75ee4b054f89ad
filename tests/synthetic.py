"""Synthetic shard sets with a learnable structure, for tests, benchmarks and smoke runs of the trainer.

Each sample is a run of tokens in the right id range for its modality (text ids, image codes,
audio codes of level 0), following an arithmetic pattern that a small model learns in a few dozen
steps: ``id = base + (start + i * stride) % span``. Written with the real shard writer, so the
loader, the layout hash checks and the manifest are exercised exactly as with built shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnitrain.data.shards import SCHEMA_VERSION, Sample, ShardInfo, shard_name, write_manifest, write_shard
from omnitrain.tokenizer.layout import TokenLayout

SMALL_LAYOUT = dict(text_vocab_size=1000, text_tokenizer_id="synthetic", image_codebook_size=64, audio_codebook_size=32, audio_levels=2)


def small_layout() -> TokenLayout:
    c = SMALL_LAYOUT
    return TokenLayout.build(c["text_vocab_size"], c["text_tokenizer_id"], {"bos": 1, "eos": 2, "pad": 3},
                             image_codebook_size=c["image_codebook_size"], audio_codebook_size=c["audio_codebook_size"],
                             audio_levels=c["audio_levels"])  # fmt: skip


def _id_range(layout: TokenLayout, modality: str) -> tuple[int, int]:
    """[lo, hi) ids of a modality's plain tokens: text ids, image codes, audio codes of level 0."""
    if modality == "image":
        return layout.image_base, layout.image_base + layout.image_codebook_size
    ids = np.flatnonzero(layout.mask("text") if modality == "text" else layout.mask("audio", level=0))
    return int(ids[0]) + (10 if modality == "text" else 0), int(ids[-1]) + 1


def write_shard_set(folder: Path, name: str, layout: TokenLayout, shards: list[list[Sample]], template: str) -> Path:
    """Write ``shards`` (the samples of each shard, metas already made) as a complete one-partition shard
    set, as ``omnitrain data build`` leaves it: the shards, the partition's done marker and manifest.json."""
    for s, samples in enumerate(shards):
        tokens = dict.fromkeys(("text", "image", "audio"), 0)
        for sample in samples:
            for start, end, modality in sample.meta["segments"]:
                tokens[modality] += end - start
        write_shard(folder / shard_name(0, s), samples, ShardInfo(shard_name(0, s), len(samples), tokens, 0, 0))
    (folder / "done-p000.json").write_text("{}")
    write_manifest(folder, {"layout_hash": layout.hash, "source": name, "template": template, "partitions": 1, "complete": True}, 1)
    return folder


def make_shard_set(folder: Path, name: str, layout: TokenLayout, n_shards: int = 4, per_shard: int = 16,
                   mix: dict[str, float] | None = None, lengths: tuple[int, int] = (40, 300), seed: int = 0) -> Path:  # fmt: skip
    """Write ``n_shards`` x ``per_shard`` samples (+ manifest.json, layout.json) into ``folder``."""
    mix = mix or {"text": 1.0}
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout.save(folder)
    k, shards = 0, []
    for _ in range(n_shards):
        samples = []
        for _ in range(per_shard):
            n = int(rng.integers(*lengths))
            ids, segs, pos = [layout.specials["bos"]], [], 1
            for j, (m, share) in enumerate(mix.items()):
                m_n = n - pos if j == len(mix) - 1 else int(round(n * share))
                if m_n <= 0:
                    continue
                lo, hi = _id_range(layout, m)
                span = min(hi - lo, 97)
                start, stride = int(rng.integers(span)), int(rng.integers(1, 7))
                ids += [lo + (start + i * stride) % span for i in range(m_n)]
                segs.append([pos, pos + m_n, m])
                pos += m_n
            arr = np.asarray(ids, dtype=np.uint32)
            meta = {"schema_version": SCHEMA_VERSION, "layout_hash": layout.hash, "source": name, "template": "synthetic",
                    "segments": segs, "learn": [[1, len(arr)]], "origin": f"{name}:{k}"}  # fmt: skip
            samples.append(Sample(f"p000-{k:09d}", arr, meta))
            k += 1
        shards.append(samples)
    return write_shard_set(folder, name, layout, shards, "synthetic")


def make_omni_sources(root: Path, seed: int = 0, n_shards: int = 4, per_shard: int = 16) -> dict[str, Path]:
    """Three shard sets like the demo's: text, image+caption, audio+transcript."""
    layout = small_layout()
    root = Path(root)
    return {
        "text": make_shard_set(root / "text", "text", layout, n_shards, per_shard, {"text": 1.0}, seed=seed + 1),
        "caption": make_shard_set(root / "caption", "caption", layout, n_shards, per_shard, {"image": 0.8, "text": 0.2}, seed=seed + 2),
        "speech": make_shard_set(root / "speech", "speech", layout, n_shards, per_shard, {"audio": 0.7, "text": 0.3}, seed=seed + 3),
    }


def make_text_shard_set(folder: Path, name: str, layout: TokenLayout, docs: list[list[int]], n_shards: int = 4) -> Path:
    """Real text documents (token ids of the layout's text tokenizer) as a shard set: ``<bos> ids <eos>``,
    all learned, split over ``n_shards`` shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout.save(folder)
    sp, k = layout.specials, 0
    for s in range(n_shards):
        samples, tokens = [], dict.fromkeys(("text", "image", "audio"), 0)
        for ids in docs[s::n_shards]:
            arr = np.asarray([sp["bos"], *ids, sp["eos"]], dtype=np.uint32)
            meta = {"schema_version": SCHEMA_VERSION, "layout_hash": layout.hash, "source": name, "template": "text_lm",
                    "segments": [[0, len(arr), "text"]], "learn": [[1, len(arr)]], "origin": f"{name}:{k}"}  # fmt: skip
            samples.append(Sample(f"p000-{k:09d}", arr, meta))
            tokens["text"] += len(arr)
            k += 1
        write_shard(folder / shard_name(0, s), samples, ShardInfo(shard_name(0, s), len(samples), tokens, 0, 0))
    (folder / "done-p000.json").write_text("{}")
    write_manifest(folder, {"layout_hash": layout.hash, "source": name, "template": "text_lm", "partitions": 1, "complete": True}, 1)
    return folder


def cut_shard(path: Path, keep: int) -> int:
    """Cut a shard's tar at a member boundary, after its first ``keep`` samples (as a copy stopped
    between files leaves it: the rest parses cleanly). Returns the new size in bytes."""
    import tarfile

    with tarfile.open(path) as tar:
        starts = {}  # sample key -> offset of its first member's header
        for m in tar.getmembers():
            starts.setdefault(m.name.partition(".")[0], m.offset)
    cut = list(starts.values())[keep]
    path.write_bytes(path.read_bytes()[:cut])
    return cut


def same_batch(a: dict, b: dict) -> bool:
    """Two loader batches hold the same keys and values (tensors equal, host flags such as ``one_document`` equal)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
