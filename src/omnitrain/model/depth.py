"""The depth transformer of ``model.audio_layout=depth``: a frame's audio levels, one after another.

Legend: N frames, S = K-1 depth steps, D main dim, Dd depth dim, K levels, C codes per level.

As Moshi's Depformer (Défossez et al. 2024) and the RQ-Transformer (Lee et al. 2022): the main model runs
once per frame; its hidden state h at the position before a frame predicts the frame's level-0 code (the
main output head, over the whole vocabulary, since the next position may as well be text or ``<eoa>``);
then this small causal transformer, run over the frame's levels, predicts level l from h and the codes
of levels 0..l-1. Step s (0..K-2) reads ``context(h) + code_in(E[c_s])``, E the main model's embedding
(so no per-level tables: a level's codes have their own ids), and its output, brought back to the main
width, is scored against the output rows of level s+1 only. Its parameters do not depend on K or C.
"""

from __future__ import annotations

import torch
from torch import nn

from omnitrain.model.transformer import ModelConfig, RMSNorm, TransformerBlock, rope_tables


class DepthTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dd = cfg.depth_dim or cfg.dim
        self.cfg = ModelConfig(vocab_size=1, dim=dd, n_layers=cfg.depth_layers, n_heads=cfg.n_heads, norm_eps=cfg.norm_eps,
                               rope_theta=10000.0, qk_norm=cfg.qk_norm, multiple_of=cfg.multiple_of)  # fmt: skip
        self.context = nn.Linear(cfg.dim, dd, bias=False)  # the main model's hidden state at the frame
        self.code_in = nn.Linear(cfg.dim, dd, bias=False)  # the main embedding of the previous level's code
        self.layers = nn.ModuleList(TransformerBlock(self.cfg) for _ in range(cfg.depth_layers))
        self.norm = RMSNorm(dd, cfg.norm_eps)
        self.code_out = nn.Linear(dd, cfg.dim, bias=False)  # back to the main width, scored against a level's output rows

    def forward(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """h [N, D] (the main model's normed hidden state), prev [N, S, D] (embeddings of levels 0..S-1)
        -> [N, S, D]: step s predicts level s+1 (causal over the steps)."""
        x = self.context(h)[:, None] + self.code_in(prev)  # [N, 1, Dd] + [N, S, Dd] -> [N, S, Dd]
        positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, S]
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, None)  # mask None: plain causal attention over the levels
        return self.code_out(self.norm(x))  # [N, S, D]
