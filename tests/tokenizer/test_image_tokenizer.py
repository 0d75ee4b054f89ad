"""The VQ image tokenizer: training on real images, the protocol, checkpoints, data errors, configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from omnitrain.config import ConfigError, from_dict, to_dict
from omnitrain.tokenizer.base import ImageTokenizer
from omnitrain.tokenizer.image import (
    ImageTokenizerConfig,
    VectorQuantizer,
    VQImageTokenizer,
    load_image_tokenizer,
    pil_to_tensor,
    save_png,
    tensor_to_uint8,
    to_rgb,
    uint8_to_tensor,
)
from omnitrain.tokenizer.image_train import (
    ImageDataConfig,
    ImageSource,
    ImageTrainConfig,
    make_view,
    train_image_tokenizer,
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tokenizer_image.yaml"
TINY_MODEL = {"codebook_size": 64, "base_channels": 16, "max_channels": 32}


def tiny_cfg(run_dir: Path, **over) -> ImageTrainConfig:
    raw = {"model": TINY_MODEL, "data": {"image_size": 32}, "steps": 2, "batch_size": 4, "run_dir": str(run_dir),
           "device": "cpu", "num_threads": 1, "progress": False, "n_recon_images": 2}  # 1 thread: shared CPUs
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(ImageTrainConfig, raw)


def real_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Crops of scikit-image's astronaut photo, [n, 3, size, size] in [-1, 1]."""
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut())
    rng = random.Random(0)
    return torch.stack([make_view(img, size, "random_crop", rng) for _ in range(n)])


def image_folder(path: Path, n_good: int = 3, corrupt: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P"]  # mixed modes: all must arrive as RGB
    for i in range(n_good):
        arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(modes[i % len(modes)]).save(path / f"good_{i}.png")
    if corrupt:
        (path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


# ----------------------------------------------------------------------------- training on real images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run on scikit-image's photos (random 32 px crops), shared by the tests that need it."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(run_dir, steps=150, batch_size=16, optim={"lr": 3e-3, "warmup_steps": 20}, n_recon_images=4)
    return cfg, train_image_tokenizer(cfg)


@pytest.mark.slow
def test_training_beats_init_on_held_out_images_with_most_codes_used(trained):
    cfg, m = trained
    init, final = m["init"], m["final"]
    assert m["n_eval_images"] >= 4 and m["n_eval_views"] == m["n_eval_images"] * cfg.data.eval_crops
    assert final["psnr"] > init["psnr"] + 8.0, (init, final)  # measured: ~7 dB -> ~21 dB
    assert final["psnr"] > 18.0
    assert final["codebook_usage"] >= 0.6, final  # measured: ~0.9 of 64 codes
    assert final["perplexity"] > 0.3 * cfg.model.codebook_size
    assert m["history"][-1]["loss"] < m["history"][0]["loss"] / 4


@pytest.mark.slow
def test_run_dir_holds_checkpoint_config_metrics_and_pngs(trained):
    cfg, m = trained
    run = Path(cfg.run_dir)
    assert json.loads((run / "metrics.json").read_text())["final"] == m["final"]
    assert from_dict(ImageTrainConfig, json.loads((run / "config.json").read_text())) == cfg
    pngs = sorted((run / "recon").glob("*.png"))
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (64, 32)  # original | reconstruction
    tok = load_image_tokenizer(run / "image_tokenizer.pt")
    assert tok.fingerprint == m["fingerprint"]
    x = real_images()
    assert torch.equal(tok.encode(x), tok.encode(x))


# ----------------------------------------------------------------------------- the model and its protocol


def test_protocol_shapes_and_input_errors():
    torch.manual_seed(0)
    for ds in (8, 16):
        tok = VQImageTokenizer(ImageTokenizerConfig(downsample=ds, **TINY_MODEL)).eval()
        assert isinstance(tok, ImageTokenizer) and tok.downsample == ds and tok.codebook_size == 64
        codes = tok.encode(torch.rand(3, 3, 32, 48) * 2 - 1)
        assert codes.shape == (3, 32 // ds, 48 // ds) and codes.dtype == torch.int64
        out = tok.decode(codes)
        assert out.shape == (3, 3, 32, 48) and float(out.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="multiple of downsample=16"):
        tok.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="image-id offset"):
        tok.decode(torch.full((1, 2, 2), 64))


def test_encode_is_deterministic_batched_and_side_effect_free():
    torch.manual_seed(0)
    tok = VQImageTokenizer(ImageTokenizerConfig(**TINY_MODEL))
    tok.train()  # even in train mode, encode must not touch the usage statistics or codebook
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    x = real_images(6)
    codes = tok.encode(x)
    assert torch.equal(codes, tok.encode(x, batch_size=2))
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())
    assert torch.equal(codes, tok.eval().encode(x))


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    torch.manual_seed(0)
    tok = VQImageTokenizer(ImageTokenizerConfig(codebook_update="ema", **TINY_MODEL))
    tok.train()
    tok(real_images(4))  # one training pass: restarts codes and moves EMA buffers, so they must be saved
    tok.eval()
    path = tok.save(tmp_path / "tok.pt")
    loaded = load_image_tokenizer(path)
    x = real_images(4)
    assert loaded.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    other = VQImageTokenizer(ImageTokenizerConfig(**TINY_MODEL))
    assert other.fingerprint != tok.fingerprint
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_image_tokenizer(tmp_path / "junk.pt")


@pytest.mark.parametrize("update", ["gradient", "ema"])
def test_first_training_pass_restarts_every_code_on_encoder_outputs(update):
    torch.manual_seed(0)
    vq = VectorQuantizer(ImageTokenizerConfig(codebook_size=16, embed_dim=4, codebook_update=update))
    vq.init_weights()
    z = torch.randn(2, 4, 8, 8) + 5.0  # far from the initial codebook
    vq.eval()
    vq(z)
    assert float(vq.usage.sum()) == 0.0  # eval mode: no statistics
    vq.train()
    vq(z)
    with torch.no_grad():
        nearest = torch.cdist(vq.table(), vq.flatten(z)).min(dim=1).values  # [16]: each code sits on a data point
    assert float(nearest.max()) < 0.05
    assert float(vq.usage.min()) > 0


# ----------------------------------------------------------------------------- data


def test_corrupt_image_raises_naming_the_file(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"bad\.png.*on_error: skip"):
        train_image_tokenizer(tiny_cfg(tmp_path / "run", data={"source": str(folder)}))


def test_corrupt_image_skipped_and_logged(tmp_path):
    folder = image_folder(tmp_path / "imgs", n_good=4)
    cfg = tiny_cfg(tmp_path / "run", data={"source": str(folder), "on_error": "skip", "held_out_fraction": 0.4})
    m = train_image_tokenizer(cfg)
    assert m["n_skipped"] == 1 and m["skipped"][0].endswith("bad.png")
    rows = [json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["item"].endswith("bad.png") and "UnidentifiedImageError" in rows[0]["reason"]
    assert m["n_train_images"] + m["n_eval_images"] == 4


def test_jsonl_and_hf_dataset_sources(tmp_path):
    folder = image_folder(tmp_path / "imgs", corrupt=False)
    lines = [json.dumps({"path": "imgs/good_0.png"}), json.dumps({"image": str(folder / "good_1.png")}), ""]
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    src = ImageSource(ImageDataConfig(source=str(tmp_path / "list.jsonl")))
    assert len(src) == 2 and src.read(0).mode == "RGB" and src.read(1).mode == "RGB"  # good_1 is grayscale

    import datasets

    ds = datasets.Dataset.from_dict({"img": [str(p) for p in sorted(folder.glob("*.png"))]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    src = ImageSource(ImageDataConfig(source=str(tmp_path / "hf"), image_column="img"))
    assert len(src) == 3 and src.read(2).size == (56, 40) and src.read(2).mode == "RGB"
    with pytest.raises(ValueError, match="image_column"):
        ImageSource(ImageDataConfig(source=str(tmp_path / "hf")))
    (tmp_path / "bad.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*'path' or 'image'"):
        ImageSource(ImageDataConfig(source=str(tmp_path / "bad.jsonl")))


def test_mode_conversion_and_view_policies():
    rgba = Image.new("RGBA", (20, 50), (255, 0, 0, 0))  # fully transparent -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("P", (4, 4), 0)).mode == "RGB"
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert [to_rgb(deep).getpixel((i, 0))[0] for i in range(2)] == [0, 255]  # rescaled, not clipped
    img = to_rgb(Image.new("L", (20, 50), 200))
    for policy in ("center_crop", "random_crop", "resize", "pad"):
        assert make_view(img, 32, policy, random.Random(0)).shape == (3, 32, 32)
    padded = make_view(img, 32, "pad", random.Random(0))
    assert float(padded[:, :, 0].max()) == -1.0 and float(padded[:, 16, 16].min()) > 0.5  # black bars, gray middle


def test_uint8_conversions_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)
    t = uint8_to_tensor(arr)
    assert t.shape == (2, 3, 8, 16) and float(t.min()) >= -1 and float(t.max()) <= 1
    assert np.array_equal(tensor_to_uint8(t), arr)
    assert torch.equal(pil_to_tensor(Image.fromarray(arr[0])), t[0])
    paths = save_png(t, tmp_path / "png")
    assert np.array_equal(np.asarray(Image.open(paths[1])), arr[1])


# ----------------------------------------------------------------------------- configs


def test_config_errors_name_the_key_and_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.polcy.*Did you mean 'policy'"):
        from_dict(ImageTrainConfig, {"data": {"polcy": "resize"}})
    with pytest.raises(ConfigError, match=r"data\.policy='stretch'.*'center_crop'.*'random_crop'"):
        from_dict(ImageTrainConfig, {"data": {"policy": "stretch"}})
    with pytest.raises(ConfigError, match=r"model\.downsample=12.*8, 16"):
        from_dict(ImageTrainConfig, {"model": {"downsample": 12}})
    with pytest.raises(ConfigError, match="image_size=40 must be a positive multiple of model.downsample=16"):
        from_dict(ImageTrainConfig, {"model": {"downsample": 16}, "data": {"image_size": 40}})
    with pytest.raises(ConfigError, match="perceptual_net"):
        from_dict(ImageTrainConfig, {"model": {"perceptual_weight": 0.1}})
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        from_dict(ImageTrainConfig, {"data": {"on_error": "ignore"}})


def test_recipe_mirrors_the_config_exactly():
    raw = yaml.safe_load(RECIPE.read_text())
    cfg = from_dict(ImageTrainConfig, raw)

    def keys(d: dict, prefix: str = "") -> set[str]:
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}

    assert keys(raw) == keys(to_dict(cfg))  # every field spelled out, nothing extra
    assert cfg.data.source == "skimage"  # runs offline


def test_optional_loss_terms(tmp_path):
    auto = torch.export.Dim.AUTO
    net = torch.export.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.zeros(2, 3, 32, 32),),
                              dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    torch.export.save(net, tmp_path / "feat.pt2")
    folder = image_folder(tmp_path / "imgs", corrupt=False)
    model = {"perceptual_weight": 0.1, "perceptual_net": str(tmp_path / "feat.pt2"), "adversarial_weight": 0.1}
    m = train_image_tokenizer(tiny_cfg(tmp_path / "run", model=model, data={"source": str(folder)}))
    assert np.isfinite(m["history"][-1]["loss"])
    model["perceptual_net"] = str(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match=r"missing\.pt2.*perceptual_weight: 0"):
        train_image_tokenizer(tiny_cfg(tmp_path / "run2", model=model, data={"source": str(folder)}))
