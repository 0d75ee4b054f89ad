"""The Emu3 / Chameleon adapters on tiny randomly initialised VQ-VAEs saved locally (no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omnitrain.tokenizer.base import ImageTokenizer  # noqa: E402
from omnitrain.tokenizer.pretrained_image import load_pretrained_image_tokenizer  # noqa: E402


def tiny_emu3() -> torch.nn.Module:
    cfg = transformers.Emu3VQVAEConfig(
        codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2, 2],
        num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=4, hidden_size=64, num_attention_heads=1,
    )
    torch.manual_seed(0)
    return transformers.Emu3VQVAE(cfg).eval()


def tiny_chameleon() -> torch.nn.Module:
    cfg = transformers.ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=8, base_channels=32, channel_multiplier=[1, 2, 2],
        num_res_blocks=1, attn_resolutions=[],
    )
    torch.manual_seed(0)
    return transformers.ChameleonVQVAE(cfg).eval()


def images(b: int = 2, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_emu3_encode_decode_shapes_and_range(tmp_path):
    tiny_emu3().save_pretrained(tmp_path)
    tok = load_pretrained_image_tokenizer(tmp_path, kind="auto")
    assert isinstance(tok, ImageTokenizer)
    assert (tok.kind, tok.codebook_size, tok.downsample) == ("emu3", 64, 4)
    codes = tok.encode(images())
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert torch.equal(codes, tok.encode(images()))  # deterministic
    out = tok.decode(codes)
    assert out.shape == (2, 3, 32, 48) and float(out.abs().max()) <= 1.0
    assert len(tok.fingerprint) == 16 and tok.fingerprint == load_pretrained_image_tokenizer(tmp_path).fingerprint


def test_chameleon_encodes_and_refuses_to_decode(tmp_path):
    model = tiny_chameleon()
    model.save_pretrained(tmp_path)
    tok = load_pretrained_image_tokenizer(tmp_path, kind="chameleon")
    assert (tok.kind, tok.codebook_size, tok.downsample) == ("chameleon", 64, 4)
    x = images()
    codes = tok.encode(x)
    assert codes.shape == (2, 8, 12) and 0 <= int(codes.min()) and int(codes.max()) < 64
    # the same ids as transformers' own encode, in row-major grid order
    assert torch.equal(codes.flatten(), model.encode(x).image_tokens)
    with pytest.raises(ValueError, match="only the encoder"):
        tok.decode(codes)


def test_whole_checkpoint_loads_only_the_vq_weights(tmp_path):
    """A full Emu3 checkpoint (config with vq_config, weights under model.vqmodel.*) -> the same codes."""
    from safetensors.torch import save_file

    vq = tiny_emu3()
    full_cfg = transformers.Emu3Config(vq_config=vq.config.to_dict(), text_config={"hidden_size": 16,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100})
    full_cfg.to_json_file(tmp_path / "config.json")
    weights = {f"model.vqmodel.{k}": v.contiguous() for k, v in vq.state_dict().items()}
    weights["model.text_model.embed_tokens.weight"] = torch.zeros(100, 16)  # must be ignored
    save_file(weights, tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "emu3"
    tok = load_pretrained_image_tokenizer(tmp_path)
    vq_dir = tmp_path / "vq"
    vq.save_pretrained(vq_dir)
    assert torch.equal(tok.encode(images()), load_pretrained_image_tokenizer(vq_dir).encode(images()))


def test_clear_errors(tmp_path):
    tiny_emu3().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kind='chameleon'"):
        load_pretrained_image_tokenizer(tmp_path, kind="chameleon")
    with pytest.raises(ValueError, match="not a directory|no config.json"):
        load_pretrained_image_tokenizer(tmp_path / "config.json")
    tok = load_pretrained_image_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="multiple of downsample"):
        tok.encode(images(h=30))


def test_layout_from_pretrained_image_tokenizer(tmp_path):

    from omnitrain.tokenizer.bundle import load_media_tokenizers
    from omnitrain.tokenizer.layout import ImageSegment, TokenLayout

    tiny_emu3().save_pretrained(tmp_path)
    tok, _ = load_media_tokenizers(tmp_path, None)
    layout = TokenLayout.build(300, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=tok.codebook_size, image_fingerprint=tok.fingerprint)
    codes = tok.encode(images(1))[0].numpy()
    assert layout.parse(layout.serialize([ImageSegment(codes)]))[0] == ImageSegment(codes)
    assert layout.image_codebook_size == 64 and layout.image_fingerprint == tok.fingerprint
