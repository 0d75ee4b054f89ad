"""Published VQ image tokenizers (Emu3, Chameleon) through ``transformers``, behind ``ImageTokenizer``.

Legend: B batch, H/W pixels, h/w code grid, ds = downsample.

    tok = load_pretrained_image_tokenizer("path/or/hub-id", kind="emu3", device="cuda")
    codes = tok.encode(images)          # images [B, 3, H, W] in [-1, 1] -> codes [B, h, w]
    images = tok.decode(codes)          # emu3 only: transformers ships Chameleon's encoder alone

``name_or_path`` is a local directory or a hub id (needs network, or the files in the local Hugging
Face cache). It may hold the VQ-VAE alone (``model_type`` ``emu3_vqgan`` / ``chameleon_vqgan``,
as written by ``Emu3VQVAE.save_pretrained``) or a whole Emu3 / Chameleon checkpoint, whose
``vq_config`` and ``*vqmodel.*`` weights are read without loading the language model: from the
hub only the weight shards that hold the VQ-VAE are fetched.

Pixel conventions (from the models' image processors): Chameleon takes [-1, 1] as is; Emu3 takes
CLIP-normalised [0, 1] pixels and returns the same, converted here to and from [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import hf_hub_download

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VQ_TYPES = {"emu3_vqgan": "emu3", "chameleon_vqgan": "chameleon"}
_FULL_TYPES = {"emu3": "emu3", "chameleon": "chameleon"}


def _transformers() -> Any:
    try:
        import transformers  # optional (the hf extra)
    except ImportError as e:
        raise ValueError("pretrained image tokenizers need transformers: pip install 'omnitrain[hf]'") from e
    return transformers


class PretrainedImageTokenizer:
    """A frozen Emu3 / Chameleon VQ-VAE with the ``ImageTokenizer`` protocol."""

    def __init__(self, model: torch.nn.Module, kind: Literal["emu3", "chameleon"], source: str):
        self.model, self.kind, self.source = model.eval(), kind, source
        cfg = model.config
        self.codebook_size = int(cfg.codebook_size if kind == "emu3" else cfg.num_embeddings)
        self.downsample = 2 ** (len(cfg.channel_multiplier) - 1)
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def fingerprint(self) -> str:
        """First 16 hex chars of sha256(kind + config JSON + state_dict bytes); the weights are frozen."""
        h = hashlib.sha256(self.kind.encode())
        h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def _to_model_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "chameleon":
            return x
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # [3] -> [1, 3, 1, 1]
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    def _from_model_pixels(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "chameleon":
            return y.clamp(-1, 1)
        mean = torch.tensor(CLIP_MEAN, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)  # [3] -> [1, 3, 1, 1]
        std = torch.tensor(CLIP_STD, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        return ((y * std + mean) * 2 - 1).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes [B, h, w] int64 on the images' device (deterministic)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        ds = self.downsample
        if H % ds or W % ds:
            raise ValueError(f"image size {H}x{W} is not a multiple of downsample={ds}; crop or resize it first")
        dtype = next(self.model.parameters()).dtype
        out = []
        for chunk in images.split(batch_size):
            x = self._to_model_pixels(chunk.to(self.device, dtype))
            b = x.shape[0]
            if self.kind == "emu3":
                sizes = torch.tensor([[H, W]] * b)
                tokens = self.model.encode(x, image_sizes=sizes).image_tokens  # b x [h, w]
                out.append(torch.stack(tokens))  # -> [b, h, w]
            else:
                tokens = self.model.encode(x).image_tokens  # [b*h*w]
                out.append(tokens.reshape(b, H // ds, W // ds))  # [b*h*w] -> [b, h, w]
        return torch.cat(out).long().to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """codes [B, h, w] int64 -> images [B, 3, h*ds, w*ds] in [-1, 1] on the codes' device."""
        if self.kind == "chameleon":
            raise ValueError(
                "transformers ships only the encoder of Chameleon's VQ-VAE, so its codes cannot be decoded "
                "here; use kind='emu3' or a trained VQImageTokenizer when you need images back"
            )
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); subtract the layout's image-id offset first")
        out = []
        for chunk in codes.split(batch_size):
            y = self.model.decode(chunk.to(self.device).long())  # [b, 3, H, W], CLIP-normalised
            out.append(self._from_model_pixels(y.float()))
        return torch.cat(out).to(codes.device)


def _read_config(name_or_path: str, local: Path | None) -> dict:
    if local is not None:
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{local} has no config.json; point at a save_pretrained directory")
        return json.loads(cfg_file.read_text())
    try:
        cfg_file = Path(hf_hub_download(name_or_path, "config.json"))
    except Exception as e:  # offline, unknown repo, gated: say what was tried and what to do
        raise ValueError(
            f"cannot fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local directory, or go online / log in for gated models"
        ) from e
    return json.loads(cfg_file.read_text())


def _vq_weights_from_full_checkpoint(name_or_path: str, local: Path | None) -> dict[str, torch.Tensor]:
    """The ``*vqmodel.*`` tensors of a whole Emu3 / Chameleon checkpoint, prefix stripped."""
    from safetensors import safe_open  # safetensors: optional (the hf extra)

    def fetch(fname: str) -> Path:
        if local is not None:
            return local / fname
        return Path(hf_hub_download(name_or_path, fname))

    try:
        index = json.loads(fetch("model.safetensors.index.json").read_text())
        files = sorted({f for k, f in index["weight_map"].items() if "vqmodel." in k})
    except Exception:  # no index file (local or hub): a single-file checkpoint
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        path = fetch(fname)
        if not path.is_file():
            raise ValueError(f"{name_or_path}: weight file {fname} is missing")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if "vqmodel." in key:
                    state[key.split("vqmodel.", 1)[1]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{name_or_path}: no 'vqmodel.' weights found in {files}; is this an Emu3/Chameleon checkpoint?")
    return state


def load_pretrained_image_tokenizer(
    name_or_path: str | Path,
    kind: Literal["auto", "emu3", "chameleon"] = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PretrainedImageTokenizer:
    """Load an Emu3 or Chameleon VQ-VAE (local directory or hub id) as an ``ImageTokenizer``.

    Args:
        name_or_path: a ``save_pretrained`` directory (VQ-VAE alone or the whole model) or a hub id.
        kind: ``"auto"`` reads it from ``config.json``'s ``model_type``.
        device: where encoding runs.
        dtype: weight dtype (bfloat16 on GPUs halves memory; codes may then differ slightly from fp32).
    """
    tf = _transformers()
    if kind not in ("auto", "emu3", "chameleon"):
        raise ValueError(f"kind={kind!r} is not one of 'auto', 'emu3', 'chameleon'")
    path = Path(name_or_path).expanduser()
    local = path if path.is_dir() else None
    if local is None and (str(name_or_path).startswith((".", "/", "~")) or path.exists()):
        raise ValueError(f"{name_or_path} is not a directory; give a save_pretrained folder or a hub id")
    raw = _read_config(str(name_or_path), local)
    model_type = raw.get("model_type", "")
    found = _VQ_TYPES.get(model_type) or _FULL_TYPES.get(model_type)
    if found is None:
        raise ValueError(
            f"{name_or_path}: model_type {model_type!r} is not an Emu3/Chameleon model or VQ-VAE; "
            f"supported: {sorted(_VQ_TYPES) + sorted(_FULL_TYPES)}"
        )
    if kind != "auto" and kind != found:
        raise ValueError(f"{name_or_path} holds a {found} model (model_type {model_type!r}) but kind={kind!r}")
    cls = tf.Emu3VQVAE if found == "emu3" else tf.ChameleonVQVAE
    if model_type in _VQ_TYPES:
        model = cls.from_pretrained(str(name_or_path), dtype=dtype)
    else:  # a whole checkpoint: build the VQ-VAE from its vq_config, load only its weights
        cfg_cls = tf.Emu3VQVAEConfig if found == "emu3" else tf.ChameleonVQVAEConfig
        vq_raw = {k: v for k, v in (raw.get("vq_config") or {}).items() if k not in ("model_type", "transformers_version")}
        model = cls(cfg_cls(**vq_raw))
        missing, unexpected = model.load_state_dict(_vq_weights_from_full_checkpoint(str(name_or_path), local), strict=False)
        if missing or unexpected:
            raise ValueError(f"{name_or_path}: VQ-VAE weights do not match its vq_config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model = model.to(dtype)
    return PretrainedImageTokenizer(model.to(device), found, str(name_or_path))
