"""One decoder-only transformer over the unified vocabulary (Llama architecture, Chameleon's options).

Legend: B batch, T tokens, D dim, H heads, Hkv key/value heads, Dh head dim, V vocab, M modalities.

Llama-lineage names (``tok_embeddings``, ``layers.{i}.attention.wq``, ``feed_forward.w1``,
``norm``, ``output``) so weights convert to and from Hugging Face without guesswork; RoPE in the
Hugging Face half-split convention (``rotate_half``), so converted q/k weights need no permutation.

Packed rows: ``doc_ids`` [B, T] give each token its document; attention is causal *within* a
document and positions restart at every document start, so a packed document sees exactly what it
would alone. Padding (doc id -1, the loader's) attends only to earlier padding and carries no loss.
Without ``doc_ids`` every row is one document: plain causal attention (``is_causal``), decided from
the arguments, never from the data (no host sync, no torch.compile graph break).

Attention backends (``ModelConfig.attention``, issue 19). The document mask is built once per batch
in ``Transformer.forward``, in the form the kernel wants, and shared by every layer:
``flex`` (the CUDA default): a FlexAttention ``BlockMask`` (causal & same document), so the blocks
that causality or document boundaries rule out are skipped; FlexAttention has no backward on CPU in
torch 2.13. ``sdpa`` (the CPU default): an additive float mask [B, 1, T, T] (0 / -inf) in the
compute dtype, so SDPA does not convert a bool mask in every layer, forward and backward; on CPU it
goes to the flash kernel with ``is_causal`` as well, which skips the blocks above the diagonal.

One forward body, ``Transformer.hidden`` (embedding, RoPE, the layers), serves training
(``forward``), decoding with a KV cache (``forward_cached``, used by ``omnitrain.model.generate``) and
scoring (the eval harness projects only the positions it scores); the callers differ only in the
attention mask and positions they pass.

Chameleon's stabilisers for mixed-modal training are options: QK-norm (RMSNorm on queries and keys
per head) and z-loss (``z_loss * logsumexp(logits)^2``, Chameleon / PaLM). The loss itself (the
fused chunked output projection + cross entropy, per-modality sums) is in ``omnitrain.model.loss``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from omnitrain.data.audio_regroup import check_audio_layout
from omnitrain.model.loss import linear_cross_entropy, loss_metrics, loss_stats

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: the token layout's (training sets it; recipes never state it)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None: = n_heads
    ffn_dim: int | None = None  # None: 8/3 * dim rounded up to multiple_of (Llama)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0  # Llama 3's, and every recipe's
    tie_embeddings: bool = True
    qk_norm: bool = False
    z_loss: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    attention: str = "auto"  # one of ATTENTION_BACKENDS; auto: flex on CUDA, sdpa elsewhere
    # flat: K positions per audio frame (the shards' serialization) | delay | depth: one position per frame
    # (omnitrain.model.audio_layouts); the loader follows it (data.audio_layout, set by the recipes)
    audio_layout: str = "flat"
    depth_layers: int = 2  # audio_layout=depth: layers of the depth transformer over a frame's levels
    depth_dim: int = 0  # audio_layout=depth: its width (0: dim)

    def __post_init__(self) -> None:
        check_audio_layout(self.audio_layout, "model.audio_layout")
        if self.audio_layout == "depth" and (self.depth_layers < 1 or (self.depth_dim or self.dim) % self.n_heads):
            raise ValueError(f"model.depth_layers={self.depth_layers}, model.depth_dim={self.depth_dim}: the depth transformer "
                             f"needs >= 1 layer and a width that is a multiple of n_heads={self.n_heads}")  # fmt: skip
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention={self.attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)} "
                             "(auto: flex on CUDA, sdpa elsewhere)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        h = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # torch's fused kernel: the same numbers, faster
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # normalise in fp32 (as Llama / HF do), return in the input's dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, Dh] in the HF half-split layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))  # [Dh/2]
    freqs = positions.float()[..., None] * inv  # [B, T, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, Dh]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | BlockMask | None,
                cache: KVCache | None = None) -> torch.Tensor:  # fmt: skip
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.kv_heads
        q = self.wq(x).view(B, T, H, hd).transpose(1, 2)  # [B, T, H*Dh] -> [B, H, T, Dh]
        k = self.wk(x).view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.wv(x).view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: append this step's keys/values, attend to everything so far
            k, v = cache.update(self, k, v)  # [B, Hkv, T_past + T, Dh]
        # GQA: each key/value head serves H/Hkv query heads (broadcast without copies but on the CPU masked path)
        if isinstance(mask, BlockMask):  # packed rows, flex: only the blocks the mask keeps are computed
            out = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=Hkv != H)  # [B, H, T, Dh]
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)  # [B, H, T, Dh]
        elif cache is None and mask.dtype != torch.bool and q.device.type == "cpu":  # packed rows, sdpa, CPU
            out = cpu_causal_masked_attention(q, k, v, mask)
        else:  # decoding (a bool mask over the cache's keys), or a float mask off CPU
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * hd))  # [B, H, T, Dh] -> [B, T, D]


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | BlockMask | None,
                cache: KVCache | None = None) -> torch.Tensor:  # fmt: skip
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        c, p = model.cfg, next(model.parameters())
        shape = (batch, c.kv_heads, max_len, c.head_dim)  # [B, Hkv, T_max, Dh]
        self.k = {id(layer.attention): torch.zeros(shape, dtype=p.dtype, device=p.device) for layer in model.layers}
        self.v = {key: torch.zeros_like(t) for key, t in self.k.items()}
        self.length, self.max_len, self._step = 0, max_len, 0  # tokens stored; tokens being added now

    def update(self, attn: Attention, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} tokens is full; raise max_len")
        self.k[id(attn)][:, :, self.length : end] = k
        self.v[id(attn)][:, :, self.length : end] = v
        self._step = k.shape[2]
        return self.k[id(attn)][:, :, :end], self.v[id(attn)][:, :, :end]

    def advance(self) -> None:
        self.length += self._step


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process, on first use (uncompiled it materialises the scores)."""
    return torch.compile(flex_attention)


def cpu_causal_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, Dh], k / v [B, Hkv, T, Dh], an additive causal document mask [B, 1, T, T] -> [B, H, T, Dh].

    SDPA refuses ``attn_mask`` with ``is_causal``; the CPU flash kernel it dispatches to takes both,
    skips the key blocks above the diagonal and adds the mask to the rest. A training step at T=2048, B=4,
    dim 256, 4 layers with ~5 documents per row: 1.34x a one-document step (+241 MB) with SDPA and the
    old bool mask, 1.10x (+60 MB) this way (benchmarks/bench_attention.py, 2 CPU threads, quiet machine)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # a private op: fall back if it goes
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:  # GQA: the kernel wants one key/value head per query head
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # [B, H, T, Dh]
    return op(q, k, v, 0.0, True, attn_mask=mask.to(q.dtype))[0]  # (to: a no-op when built in q's dtype)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> positions [B, T] that restart at 0 at every document start."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, T] start of each token's doc
    return idx - start_pos


@functools.cache
def compiled_create_block_mask():
    """``create_block_mask`` compiled once per process (as torchtitan): eager, it evaluates the mask function on the
    whole [B, T, T] grid in memory (1 GiB of bools per row at T = 32k) before it keeps one bit per 128 x 128 block."""
    return torch.compile(create_block_mask)


def document_mask(doc_ids: torch.Tensor, backend: str, dtype: torch.dtype, compile_mask: bool | None = None) -> torch.Tensor | BlockMask:
    """doc_ids [B, T] -> causal & same-document attention, built once per batch for every layer: a
    ``BlockMask`` for ``flex``, an additive mask [B, 1, T, T] (0 where a query may attend, -inf
    elsewhere) in ``dtype`` for ``sdpa``. Padding (-1) is one more document: it sees earlier padding
    and itself, so no query row is empty (never NaN). ``compile_mask`` (None: on CUDA) builds the block
    mask with the compiled ``create_block_mask``."""
    B, T = doc_ids.shape
    if backend == "flex":

        def causal_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        compiled = doc_ids.device.type == "cuda" if compile_mask is None else compile_mask
        make = compiled_create_block_mask() if compiled else create_block_mask
        return make(causal_document, B, None, T, T, device=doc_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # [B, T, T]
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=doc_ids.device)  # [B, 1, T, T]
    return mask.masked_fill_(~allowed[:, None], float("-inf"))


def decoding_mask(key_valid: torch.Tensor, T: int, past: int) -> torch.Tensor:
    """key_valid [B, T_past + T] (False on left padding) -> mask [B, 1, T, T_past + T]: each of the T new
    tokens sees the valid keys up to itself (``past``: tokens already in the KV cache)."""
    causal = torch.ones(T, past + T, dtype=torch.bool, device=key_valid.device).tril(diagonal=past)  # [T, T_past+T]
    mask = (causal[None] & key_valid[:, None, :])[:, None]  # [B, 1, T, T_past+T]
    return mask | ~mask.any(-1, keepdim=True)  # a padding query row with no valid key: never NaN


def set_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole value ``full`` (any device) into ``param`` in place. A sharded parameter (an FSDP2 DTensor)
    keeps only this rank's shard of it, cut locally (no communication) the way DTensor places shards: each
    ``Shard(d)`` placement of the mesh is a ``torch.chunk`` along d, taken at this rank's mesh coordinate."""
    if not hasattr(param, "device_mesh"):  # a plain tensor
        param.copy_(full)
        return
    mesh, local = param.device_mesh, full
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            chunks = torch.chunk(local, mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
    target = param.to_local()
    if target.shape != local.shape:
        raise ValueError(f"cannot place a {tuple(full.shape)} tensor into a parameter sharded as {param.placements} "
                         f"(local shard {tuple(target.shape)}, cut {tuple(local.shape)})")  # fmt: skip
    target.copy_(local)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None):
        """The model with its initial weights (``init_weights``) on ``device`` (None: torch's default, CPU unless
        a ``with torch.device(...)`` says otherwise). ``device="meta"``:
        shapes only, no memory and no random draw; ``materialise`` (or ``to_empty`` + ``init_weights``) gives
        it weights later, e.g. after FSDP2 has sharded it so that each rank holds only its shards."""
        super().__init__()
        if cfg.vocab_size < 1:  # ModelConfig's 0 means "the layout's": omnitrain train sets it from layout.json
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it to the token layout's vocabulary "
                             "(TokenLayout.load(...).vocab_size); omnitrain train does this from the data's layout.json")
        self.cfg = cfg
        with torch.device("meta"):  # the submodules' own initialisation would draw from the RNG: init_weights alone does
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.depth = None
            if cfg.audio_layout == "depth":
                from omnitrain.model.depth import DepthTransformer  # (it builds on this module's blocks)

                self.depth = DepthTransformer(cfg)
            self.register_buffer("modality_table", torch.zeros(cfg.vocab_size, dtype=torch.long), persistent=False)
        self.tie_weights()
        self.audio_base = cfg.vocab_size  # the first audio code id (set_modalities; the delay / depth heads need it)
        device = torch.device(device) if device is not None else torch.get_default_device()  # with torch.device(...) too
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Transformer:
        """``nn.Module.to_empty``, keeping tied embeddings tied (a meta parameter becomes a new one per module)."""
        super().to_empty(device=device, recurse=recurse)
        if not hasattr(self.tok_embeddings.weight, "device_mesh"):  # FSDP2 keeps one shared sharded parameter itself
            self.tie_weights()
        return self

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter: N(0, init_std) for matrices, the residual outputs (wo, w2) scaled by
        1/sqrt(2 n_layers) (GPT-2), ones for norms; the modality table zeros.

        The values are drawn from the global CPU RNG, parameter by parameter in ``named_parameters`` order, on
        the full shape, also for a sharded parameter (``set_full_`` keeps this rank's shard): a model sharded
        over any number of ranks starts from exactly the weights of a single process with the same seed, and
        a rank holds one full parameter at a time, never the whole model."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            full = torch.empty(p.shape, dtype=p.dtype)
            if name.endswith("norm.weight"):
                nn.init.ones_(full)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(full, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(full, 0.0, std)
            set_full_(p, full)
        self.modality_table.zero_()

    def set_modalities(self, table: torch.Tensor) -> None:
        """Modality index per vocabulary id (``TokenLayout.modality_of(arange(V))``), for per-modality metrics."""
        self.modality_table.copy_(torch.as_tensor(table, dtype=torch.long))
        if self.cfg.audio_layout != "flat":
            from omnitrain.model.audio_layouts import audio_base_of  # (it imports this module)

            self.audio_base = audio_base_of(self.modality_table)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per processed token: 6 N + 12 L D T (PaLM appendix B, as torchtitan).

        N counts every weight a token's matmuls use: the blocks and norms, and the output projection V x D
        whether or not it is tied to the embedding (a tied matrix is stored once but still multiplied in
        every forward and backward; leaving it out undercounted the tied 150m model by 24 % at V = 64k, T = 4096).
        The embedding lookup is a gather, not a matmul, and is not counted. 12 L D T is the attention scores and
        their weighted sum (forward + backward) at full causal length T, as PaLM and torchtitan count it."""
        cfg = self.cfg
        matmul = sum(p.numel() for name, p in self.named_parameters() if name not in ("tok_embeddings.weight", "output.weight"))
        matmul += cfg.vocab_size * cfg.dim  # the output projection, tied or not
        return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len

    def attention_backend(self, device: torch.device) -> str:
        """``cfg.attention`` with auto resolved: flex on CUDA, sdpa elsewhere (no FlexAttention backward on CPU)."""
        if self.cfg.attention != "auto":
            return self.cfg.attention
        return "flex" if device.type == "cuda" else "sdpa"

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the attention inputs: autocast's when it is on, else the weights'."""
        device = self.tok_embeddings.weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.tok_embeddings.weight.dtype

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | BlockMask | None = None,
               cache: KVCache | None = None) -> torch.Tensor:  # fmt: skip
        """The one forward body: input_ids [B, T] -> the last layer's output h [B, T, D], before the final norm.

        ``positions`` [B, T] or [1, T] (None: 0..T-1 in every row); ``mask``: None for plain causal
        attention (SDPA's fast ``is_causal`` path), ``document_mask``'s (a ``BlockMask`` or an additive
        [B, 1, T, T]) or ``decoding_mask``'s ([B, 1, T, T_keys], True where a query may attend). With ``cache``, the layers also attend
        to the keys / values stored by earlier calls, and the cache grows by T."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, T]: broadcast over the batch
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)  # [B or 1, 1, T, Dh]
        if input_ids.dim() == 2:
            h = self.tok_embeddings(input_ids)  # [B, T, D]
        else:  # delay / depth audio layouts: [B, T, K] -> the sum of each position's code embeddings [B, T, D]
            h = (self.tok_embeddings(input_ids.clamp(min=0)) * (input_ids >= 0).unsqueeze(-1)).sum(dim=2)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training and cache is None:  # a recompute would write the cache twice
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance()
        return h

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None, denom: torch.Tensor | float | None = None,
                frames: torch.Tensor | None = None, per_row: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """input_ids [B, T] (and doc_ids [B, T]) -> logits [B, T, V]. With ``audio_layout`` delay / depth,
        input_ids [B, T, K] (``omnitrain.model.audio_layouts``) and the logits are channel 0's.

        ``doc_ids`` None: every row is one document (plain causal attention, no mask). Given, the
        document mask is built here once (``document_mask``) and every layer shares it.

        With ``targets`` and ``loss_weights`` [B, T]: the training loss instead, ``(loss, stats)``, from a
        chunked output projection fused with the cross entropy (``loss.linear_cross_entropy``: the
        [B*T, V] logits are never held whole). It is computed inside ``forward`` so that DDP / FSDP /
        DeepSpeed wrappers see one call. ``stats`` [len(LOSS_KEYS)] are additive sums (``loss.LOSS_KEYS``).
        Delay / depth: ``frames`` are depth's frame rows when the caller found them on the host (``train.step.host_side``);
        ``per_row=True`` returns each row's weighted log-likelihood [B] instead (``audio_layouts.grouped_logps``: DPO)."""
        if (input_ids.dim() == 3) != (self.cfg.audio_layout != "flat"):
            raise ValueError(f"model.audio_layout={self.cfg.audio_layout} got input_ids of shape {tuple(input_ids.shape)}: "
                             "set data.audio_layout to the model's (the recipes do: ${model.audio_layout})")  # fmt: skip
        mask, positions = None, None  # no doc_ids: one document per row, plain causal attention
        if doc_ids is not None:
            mask = document_mask(doc_ids, self.attention_backend(input_ids.device), self.compute_dtype())
            positions = document_positions(doc_ids)  # [B, T]
        h = self.norm(self.hidden(input_ids, positions, mask))  # [B, T, D]
        if targets is None:
            return self.output(h)  # [B, T, V]
        if per_row and targets.dim() != 3:
            raise ValueError("per_row=True scores the [B, T, K] rows of model.audio_layout delay / depth; for flat rows "
                             "take the logits (forward without targets)")  # fmt: skip
        w = torch.ones_like(targets, dtype=torch.float32) if loss_weights is None else loss_weights.float()
        denom = w.sum().clamp(min=1.0) if denom is None else denom
        if targets.dim() == 3:  # delay / depth: every audio level's loss (omnitrain.model.audio_layouts)
            from omnitrain.model.audio_layouts import grouped_logps, grouped_loss  # (it imports this module)

            if per_row:  # DPO: each row's weighted log-likelihood [B], differentiable
                return grouped_logps(self, h, targets, w, frames)
            return grouped_loss(self, h, targets, w, denom, frames)  # frames: depth's frame rows, found on the host
        loss, ce, correct, lse = linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), w.flatten(),
                                                      self.cfg.z_loss, denom)  # fmt: skip
        return loss, loss_stats(ce, correct, lse, targets.flatten(), w.flatten(), self.modality_table, self.cfg.z_loss)

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                       cache: KVCache | None) -> torch.Tensor:  # fmt: skip
        """Decoding: input_ids / positions [B, T] new tokens, key_valid [B, T_past + T] (False on left
        padding) -> logits [B, T, V]. With ``cache`` the new tokens also attend to its T_past stored ones
        and it grows by T; ``cache=None``: the T tokens are the whole sequence (the no-cache path)."""
        past = cache.length if cache is not None else 0
        h = self.hidden(input_ids, positions, decoding_mask(key_valid, input_ids.shape[1], past), cache)
        return self.output(self.norm(h))  # [B, T, V]

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted next-token loss of a loader batch, and loss / accuracy / tokens per modality."""
        w = batch["loss_weights"].float()
        denom = w.sum().clamp(min=1.0)
        loss, stats = self(batch["input_ids"], batch.get("doc_ids"), batch["targets"], w, denom)
        return loss, loss_metrics(stats, loss, denom)

