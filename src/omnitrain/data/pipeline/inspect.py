"""``omnitrain data inspect``: what is in a shard set, decoded back to text, PNG and WAV, and
whether every shard matches its manifest entry (sample count, size, CRC-32): a bad shard is
listed, and the command ends with an error naming it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnitrain.config import from_dict
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.data.shards import iter_shard, read_manifest, verify_shard_file
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.image import save_png
from omnitrain.tokenizer.layout import AudioSegment, ImageSegment, SpecialSegment, TextSegment, TokenLayout


@dataclass
class InspectConfig:
    shards: Path = Path("runs/shards/debian_text")
    samples: int = 3
    out_dir: Path | None = None
    tokenizers: TokenizerPaths | None = None  # None: the ones recorded in the manifest
    verify: bool = True  # read every shard and check it against the manifest (false: show samples only)


def decode_sample(ids: Any, layout: TokenLayout, text_tok: Any, media: MediaTokenizers | None, out: Path, key: str) -> list[str]:
    """Render one sample: text as text, images as PNG files, audio as WAV files; returns the parts."""
    parts = []
    for k, seg in enumerate(layout.parse(ids)):
        if isinstance(seg, TextSegment):
            parts.append(repr(text_tok.decode(seg.ids.tolist())))
        elif isinstance(seg, SpecialSegment):
            parts.append(f"<{seg.name}>")
        elif isinstance(seg, ImageSegment):
            h, w = seg.codes.shape
            if media is not None and media.image is not None:
                path = save_png(media.decode_image(seg.codes)[None], out, prefix=f"{key}-{k}")[0]
                parts.append(f"[image {h}x{w} codes -> {path}]")
            else:
                parts.append(f"[image {h}x{w} codes]")
        elif isinstance(seg, AudioSegment):
            t, lv = seg.codes.shape
            if media is not None and media.audio is not None:
                # audio_io imports scipy.signal (~0.6 s): audio only
                from omnitrain.tokenizer.audio_io import write_wav

                path = write_wav(out / f"{key}-{k}.wav", media.decode_audio(seg.codes), media.audio.sample_rate)
                parts.append(f"[audio {t} frames x {lv} levels, {t / media.audio.frame_rate:.2f}s -> {path}]")
            else:
                parts.append(f"[audio {t} frames x {lv} levels]")
    return parts


def inspect_shards(cfg: InspectConfig) -> dict[str, Any]:
    folder = Path(cfg.shards)
    manifest = read_manifest(folder, check_files=not cfg.verify)  # (verify names a missing shard among the bad)
    paths = cfg.tokenizers or from_dict(TokenizerPaths, manifest["config"]["tokenizers"])
    tok = bundle.load(paths, expect_layout=manifest["layout_hash"], what=f"shards {folder}")  # the ones used, or an error
    text, image, audio, layout = tok.text, tok.image, tok.audio, tok.layout
    media = MediaTokenizers(image, audio, MediaConfig(), layout.max_grid) if (image or audio) else None
    total = sum(manifest["tokens"].values())
    print(f"{folder}: {manifest['samples']:,} samples in {len(manifest['shards'])} shard(s), "
          f"source {manifest['source']}, template {manifest['template']}, layout {manifest['layout_hash']}, "
          f"complete={manifest['complete']}")  # fmt: skip
    for mod, n in manifest["tokens"].items():
        print(f"  {mod:5s} tokens {n:>12,}  ({n / max(total, 1):.1%})")
    bad: dict[str, str] = {}
    if cfg.verify:
        for shard in manifest["shards"]:
            problem = verify_shard_file(folder / shard["name"], shard)
            if problem:
                bad[shard["name"]] = problem
                print(f"  BAD {problem}")
        checks = "sample counts, sizes, CRC-32" if all("crc32" in sh for sh in manifest["shards"]) else "sample counts only: an old manifest"
        print(f"  {len(manifest['shards']) - len(bad)} of {len(manifest['shards'])} shard(s) match the manifest ({checks})")
    out = Path(cfg.out_dir or folder / "inspect")
    shown = []
    for shard in (sh for sh in manifest["shards"] if sh["name"] not in bad):
        for s in iter_shard(folder / shard["name"], expect_hash=layout.hash):
            if len(shown) >= cfg.samples:
                break
            learned = sum(e - b for b, e in s.meta["learn"])
            parts = decode_sample(s.ids, layout, text, media, out, s.key)
            print(f"\n{s.key} ({len(s.ids)} tokens, {learned} learned) from {s.meta['origin']}:")
            for p in parts:
                print(f"  {p[:300]}")
            shown.append({"key": s.key, "parts": parts})
        if len(shown) >= cfg.samples:
            break
    if bad:
        raise ValueError(f"{folder}: {len(bad)} of {len(manifest['shards'])} shard(s) do not match manifest.json, "
                         f"e.g. {next(iter(bad.values()))}")  # fmt: skip
    return {"manifest": manifest, "samples": shown}
