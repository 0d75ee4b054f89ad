"""Train the RVQ audio codec (``omnitrain tokenizer train-audio``) and measure it.

Legend: B batch, S samples, F STFT frames, M mel bands, T codec frames, K levels, N codes per level.

    cfg = from_dict(AudioTrainConfig, composed_yaml)
    metrics = train_audio_codec(cfg)   # writes run_dir/{audio_codec.pt, config.json, metrics.json,
                                       #   errors.jsonl, examples/*.wav}

Data: every file (or dataset row) is decoded once, converted to mono at the codec rate and kept
in memory (tokenizer corpora here are minutes to hours; cap with ``data.max_files``). Whole files
are held out, so evaluation never sees audio the codec trained on. Training batches are random
``segment_seconds`` crops. Losses: multi-scale STFT (L1 on log and linear magnitude), L1 on log
mel, L1 on the waveform, plus the RVQ commitment loss; no adversarial term (left for later).
Single process: the codebooks' EMA updates would need an all-reduce under DDP.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from omnitrain.config import to_dict
from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
from omnitrain.tokenizer.audio_io import list_audio_files, read_audio, read_hf_audio, write_wav
from omnitrain.tokenizer.mel_codec import fit_codebooks, mel_filterbank  # noqa: F401 (mel_filterbank: re-exported)


@dataclass
class AudioDataConfig:
    source: str = "/usr/share/pocketsphinx/test/data/librivox"  # folder, .jsonl of paths, or HF dataset
    format: Literal["auto", "folder", "jsonl", "hf"] = "auto"  # auto: folder / *.jsonl / otherwise HF
    jsonl_key: str = "path"  # jsonl lines are {"path": ...} (relative to the jsonl's folder) or bare strings
    hf_split: str = "train"
    hf_audio_column: str = "audio"
    segment_seconds: float = 0.5  # training crop length
    held_out_fraction: float = 0.2  # whole files kept for evaluation
    max_eval_seconds: float = 60.0  # evaluate on at most this much held-out audio
    max_files: int | None = None
    channels: Literal["downmix", "error"] = "downmix"
    resample: bool = True  # convert other sample rates to the codec's (false: error)
    min_sample_rate: int = 8000  # refuse files below this rate (upsampling cannot restore the band)
    on_error: Literal["raise", "skip"] = "raise"  # skip: log bad files to run_dir/errors.jsonl

    def __post_init__(self) -> None:
        if self.segment_seconds <= 0:
            raise ValueError(f"data.segment_seconds={self.segment_seconds} must be > 0, e.g. 1.0")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"data.held_out_fraction={self.held_out_fraction} must be in (0, 1), e.g. 0.2")


@dataclass
class AudioLossConfig:
    stft_windows: list[int] = field(default_factory=lambda: [256, 512, 1024])  # hop = window / 4
    stft_weight: float = 1.0  # per scale: L1(log |X|) + L1(|X|)
    mel_weight: float = 1.0  # L1(log mel), n_fft 1024
    n_mels: int = 64
    waveform_weight: float = 1.0  # sum|y - x| / sum|x|: keeps the phase, hence SI-SNR, in check
    commitment_weight: float = 0.25


@dataclass
class AudioOptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # as in SoundStream/EnCodec-style codecs
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0


@dataclass
class AudioTrainConfig:
    model: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    loss: AudioLossConfig = field(default_factory=AudioLossConfig)
    optim: AudioOptimConfig = field(default_factory=AudioOptimConfig)
    steps: int = 300
    batch_size: int = 8
    seed: int = 0
    run_dir: Path = Path("runs/tokenizer/audio")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 25
    n_examples: int = 3  # reconstructed WAVs written to run_dir/examples

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} must be >= 0 and batch_size={self.batch_size} >= 1")
        seg = self.data.segment_seconds * self.model.sample_rate
        if seg < self.model.hop or seg < max(self.loss.stft_windows + [1024]):
            raise ValueError(
                f"data.segment_seconds={self.data.segment_seconds} gives {int(seg)} samples, shorter than the hop "
                f"({self.model.hop}) or the largest STFT window; use at least 0.1 s"
            )


# ------------------------------------------------------------------------------------------ data


def _sources(cfg: AudioDataConfig) -> list[tuple[str, Any]]:
    """(name, what to read) for every file or dataset row the config points at."""
    src = Path(cfg.source)
    fmt = cfg.format
    if fmt == "auto":
        is_hf_dir = src.is_dir() and any((src / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
        fmt = "jsonl" if src.suffix == ".jsonl" else "folder" if src.is_dir() and not is_hf_dir else "hf"
    if fmt == "folder":
        items: list[tuple[str, Any]] = [(str(p), p) for p in list_audio_files(src)]
    elif fmt == "jsonl":
        if not src.is_file():
            raise ValueError(f"data.source={cfg.source}: no such jsonl file")
        items = []
        for i, line in enumerate(src.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                p = Path(rec if isinstance(rec, str) else rec[cfg.jsonl_key])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{src}:{i + 1}: expected a JSON string or an object with key '{cfg.jsonl_key}' ({e!r})") from e
            p = p if p.is_absolute() else src.parent / p
            items.append((str(p), p))
    else:
        items = _hf_rows(cfg)
    if cfg.max_files is not None:
        items = items[: cfg.max_files]
    return items


def _hf_rows(cfg: AudioDataConfig) -> list[tuple[str, Any]]:
    import datasets  # datasets: ~0.5 s to import, only for Hugging Face datasets

    src = Path(cfg.source)
    if src.is_dir() and ((src / "state.json").exists() or (src / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(src))  # a save_to_disk folder
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise ValueError(f"data.hf_split={cfg.hf_split!r} not in {cfg.source} (splits: {list(ds)})")
            ds = ds[cfg.hf_split]
    else:
        ds = datasets.load_dataset(cfg.source, split=cfg.hf_split)  # local script/data dir, or hub id when online
    col = cfg.hf_audio_column
    if col not in ds.column_names:
        raise ValueError(f"data.hf_audio_column={col!r} not in {cfg.source} (columns: {ds.column_names})")
    if isinstance(ds.features[col], datasets.Audio):
        ds = ds.cast_column(col, datasets.Audio(decode=False))  # decode ourselves: no torchcodec needed
    return [(f"{cfg.source}[{i}]", ds[i][col]) for i in range(len(ds))]


def load_clips(cfg: AudioDataConfig, sample_rate: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """Decode every source -> (train clips, held-out clips, skipped [{source, error}]); clips are mono [S]."""
    items = _sources(cfg)
    clips, skipped = [], []
    for name, what in tqdm(items, desc="reading audio", leave=False, disable=len(items) < 50):
        try:
            if isinstance(what, Path):
                wav = read_audio(what, sample_rate, cfg.channels, cfg.resample, cfg.min_sample_rate)
            else:
                wav = read_hf_audio(what, sample_rate, cfg.channels, cfg.resample, cfg.min_sample_rate, where=name)
        except ValueError as e:
            if cfg.on_error == "raise":
                raise
            skipped.append({"source": name, "error": str(e)})
            continue
        clips.append(wav)
    if len(clips) < 2:
        raise ValueError(
            f"data.source={cfg.source}: {len(clips)} readable clip(s) ({len(skipped)} skipped); need at least 2 "
            "(one to train on, one held out)"
        )
    order = np.random.default_rng(seed).permutation(len(clips))
    n_eval = min(len(clips) - 1, max(1, round(cfg.held_out_fraction * len(clips))))
    return [clips[i] for i in order[n_eval:]], [clips[i] for i in order[:n_eval]], skipped


def sample_batch(clips: list[np.ndarray], batch: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """Random crops -> [B, 1, length]; clips are drawn in proportion to their length, short ones zero-padded."""
    sizes = np.array([len(c) for c in clips], dtype=np.float64)
    out = np.zeros((batch, 1, length), dtype=np.float32)
    for b, i in enumerate(rng.choice(len(clips), size=batch, p=sizes / sizes.sum())):
        start = int(rng.integers(0, max(1, len(clips[i]) - length + 1)))
        crop = clips[i][start : start + length]
        out[b, 0, : len(crop)] = crop
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------- losses/metrics


def stft_mag(wav: torch.Tensor, n_fft: int) -> torch.Tensor:
    """wav [B, 1, S] -> magnitude [B, n_fft//2+1, F] (Hann window, hop n_fft/4)."""
    window = torch.hann_window(n_fft, device=wav.device)
    spec = torch.stft(wav.squeeze(1), n_fft, hop_length=n_fft // 4, window=window, return_complex=True)  # [B, f, F]
    return spec.abs()


def log_mel(wav: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """wav [B, 1, S] -> log mel [B, M, F] (n_fft 1024, natural log, floor 1e-5)."""
    return torch.log(torch.clamp(fb.to(wav.device) @ stft_mag(wav, 1024), min=1e-5))  # [M, f] @ [B, f, F]


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, cfg: AudioLossConfig, fb: torch.Tensor) -> torch.Tensor:
    """Weighted sum of multi-scale STFT, mel and relative waveform L1 losses; x target, y output, both [B, 1, S]."""
    loss = cfg.waveform_weight * (y - x).abs().sum() / x.abs().sum().clamp(min=1e-8)  # relative: level-free
    for n_fft in cfg.stft_windows:
        mx, my = stft_mag(x, n_fft), stft_mag(y, n_fft)
        log_l1 = F.l1_loss(torch.log(mx.clamp(min=1e-5)), torch.log(my.clamp(min=1e-5)))
        loss = loss + cfg.stft_weight * (log_l1 + F.l1_loss(my, mx)) / len(cfg.stft_windows)
    return loss + cfg.mel_weight * F.l1_loss(log_mel(y, fb), log_mel(x, fb))


def si_snr(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SNR in dB of est against ref, both [..., S] -> [...]."""
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + 1e-8) * ref
    noise = est - target
    return 10 * torch.log10((target.pow(2).sum(-1) + 1e-8) / (noise.pow(2).sum(-1) + 1e-8))


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, list[float]]:
    """codes [*, K] -> per level: fraction of the N codes used, and perplexity exp(entropy) of their counts."""
    codes = codes.reshape(-1, codes.shape[-1])  # [*, K] -> [frames, K]
    used, ppl = [], []
    for k in range(codes.shape[1]):
        p = torch.bincount(codes[:, k], minlength=codebook_size).double() / codes.shape[0]  # [N]
        used.append(float((p > 0).double().mean()))
        ppl.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return {"usage": used, "perplexity": ppl}


def reconstruction_metrics(refs: list[torch.Tensor], outs: list[torch.Tensor], sample_rate: int) -> dict[str, float]:
    """Mean SI-SNR (dB) and mean log-mel L1 distance over pairs of 1-D clips."""
    fb = mel_filterbank(sample_rate, 1024, 64)
    snrs = [float(si_snr(r, o[: len(r)])) for r, o in zip(refs, outs, strict=True)]
    mels = [float(F.l1_loss(log_mel(o[None, None, : len(r)], fb), log_mel(r[None, None], fb))) for r, o in zip(refs, outs, strict=True)]
    return {"si_snr_db": float(np.mean(snrs)), "mel_distance": float(np.mean(mels))}


@torch.no_grad()
def evaluate_codec(codec: RVQAudioCodec, clips: list[np.ndarray]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Encode/decode each held-out clip -> (metrics, reconstructions); codec must be in eval mode."""
    refs, outs, all_codes = [], [], []
    for clip in clips:
        ref = torch.from_numpy(clip)
        codes = codec.encode(ref[None, None])  # [S] -> [1, 1, S] -> codes [1, T, K]
        outs.append(codec.decode(codes)[0, 0, : len(clip)].cpu())  # [1, 1, T*hop] -> [S]
        refs.append(ref)
        all_codes.append(codes[0].cpu())
    metrics: dict[str, Any] = reconstruction_metrics(refs, outs, codec.sample_rate)
    metrics.update(codebook_usage(torch.cat(all_codes), codec.codebook_size))
    return metrics, outs


# ------------------------------------------------------------------------------------- training


def lr_at(step: int, cfg: AudioOptimConfig, total: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (a pure function of the step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)


def _clip_budget(clips: list[np.ndarray], seconds: float, rate: int) -> list[np.ndarray]:
    out, left = [], int(seconds * rate)
    for c in clips:
        if left <= 0:
            break
        out.append(c[:left])
        left -= len(out[-1])
    return out


def train_audio_codec(cfg: AudioTrainConfig) -> dict[str, Any]:
    """Train a codec per ``cfg``, evaluate it before/after on held-out audio, write the run dir, return metrics."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    device = resolve_device(cfg.device)
    rate = cfg.model.sample_rate
    train_clips, eval_clips, skipped = load_clips(cfg.data, rate, cfg.seed)
    with (run_dir / "errors.jsonl").open("w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    eval_clips = _clip_budget(eval_clips, cfg.data.max_eval_seconds, rate)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    codec = RVQAudioCodec(cfg.model).to(device)
    init_metrics, _ = evaluate_codec(codec.eval(), eval_clips)
    t0, history = time.perf_counter(), []
    if cfg.model.kind == "mel":  # no network: k-means of the training clips' log-mel frames, `steps` Lloyd rounds per level
        frames = torch.cat([codec.encoder(codec._pad(torch.from_numpy(c)[None, None].to(device)))[0].T for c in train_clips])
        rms = fit_codebooks(codec.quantizer, frames, cfg.steps, cfg.seed)
        history = [{"level": k, "residual_rms": r} for k, r in enumerate(rms)]
        print(f"mel codec: k-means of {len(frames):,} frames, residual RMS per level {', '.join(f'{r:.3f}' for r in rms)}")
    steps = 0 if cfg.model.kind == "mel" else cfg.steps
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay) if steps else None
    fb = mel_filterbank(rate, 1024, cfg.loss.n_mels).to(device)
    seg = int(cfg.data.segment_seconds * rate)
    codec.train()
    bar = tqdm(range(steps), desc="train audio codec", mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, cfg.steps)
        x = sample_batch(train_clips, cfg.batch_size, seg, rng).to(device)  # [B, 1, S]
        y, _, commit = codec(x)
        y = y[..., :seg]  # [B, 1, T*hop] -> [B, 1, S]
        rec = reconstruction_loss(x, y, cfg.loss, fb)
        loss = rec + cfg.loss.commitment_weight * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), cfg.optim.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "recon": rec.item(), "commit": commit.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - t0

    codec.eval()
    final, outs = evaluate_codec(codec, eval_clips)
    codec.save(run_dir / "audio_codec.pt")
    for i in range(min(cfg.n_examples, len(eval_clips))):
        write_wav(run_dir / "examples" / f"{i}_original.wav", eval_clips[i], rate)
        write_wav(run_dir / "examples" / f"{i}_reconstructed.wav", outs[i], rate)
    metrics = {
        "init": init_metrics,
        "trained": final,
        "history": history,
        "train_seconds": train_seconds,
        "steps": cfg.steps,
        "frame_rate": codec.frame_rate,
        "bits_per_second": cfg.model.bits_per_second,
        "fingerprint": codec.fingerprint,
        "n_train_clips": len(train_clips),
        "n_eval_clips": len(eval_clips),
        "train_audio_seconds": sum(len(c) for c in train_clips) / rate,
        "eval_audio_seconds": sum(len(c) for c in eval_clips) / rate,
        "skipped_files": len(skipped),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"audio codec: held-out SI-SNR {init_metrics['si_snr_db']:.1f} -> {final['si_snr_db']:.1f} dB, "
        f"mel distance {init_metrics['mel_distance']:.2f} -> {final['mel_distance']:.2f}, codebook usage "
        f"{np.mean(final['usage']):.0%} (min {min(final['usage']):.0%}), {cfg.model.bits_per_second:.0f} bit/s, "
        f"{cfg.steps} steps in {train_seconds:.0f} s, {len(skipped)} files skipped -> {run_dir / 'audio_codec.pt'}"
    )
    return metrics
