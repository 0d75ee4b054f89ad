"""Build a run's ``layout.json`` from the tokenizers it uses (``omnitrain tokenizer layout``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import TokenLayout


@dataclass
class LayoutConfig(TokenizerPaths):
    """The tokenizers (``text``, ``image``, ``audio``, ``max_grid``: see `TokenizerPaths`) and where the layout goes."""

    text: str | None = "runs/tokenizer/text"
    out: Path = Path("runs/tokenizer/layout.json")


def build_layout(cfg: LayoutConfig) -> TokenLayout:
    layout = bundle.load(cfg).layout
    path = layout.save(cfg.out)
    print(f"{layout.describe()} -> {path}")
    return layout
