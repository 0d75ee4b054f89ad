"""Speech-output evals (issue 23, item 3): ``tts`` and ``s2s`` generate speech in every audio layout, decode it with
the run's codec, have an independent ASR transcribe it and score it; voice latency is measured per reply."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitrain.eval import speech_output as so
from omnitrain.eval.harness import EvalConfig, ModelSpec, OmniModel, run_eval
from omnitrain.eval.results import read_results, read_samples
from omnitrain.eval.speech_output import S2SConfig, TTSConfig
from omnitrain.model.io import save_model
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import TokenLayout

LAYOUTS = ("flat", "delay", "depth")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite (bash setup.sh does)")


def paths(omni: Path, text_dir: Path) -> TokenizerPaths:
    return TokenizerPaths(text=str(text_dir), image=str(omni / "image.pt"), audio=str(omni / "audio.pt"), max_grid=16)


@pytest.fixture(scope="module")
def speakers(omni_model_dir, tmp_path_factory) -> dict[str, Path]:
    """An untrained model per audio layout over the shared tiny layout (text BPE + 2-level, 16-code codec at 100 Hz)."""
    d = tmp_path_factory.mktemp("speakers")
    layout = TokenLayout.load(omni_model_dir / "layout")
    out = {}
    for name in LAYOUTS:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, audio_layout=name))
        save_model(model, d / name, omni_model_dir / "layout", {"step": 3})
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("items")
    (d / "tts.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(["four seven two", "hello there"])))
    rows = []
    for i, answer in enumerate(["five", "nine"]):
        sf.write(d / f"q{i}.wav", (np.sin(np.arange(4000) / (4.0 + i)) * 0.3).astype("float32"), 16000)
        rows.append({"id": f"q{i}", "audio": f"q{i}.wav", "answer": answer})  # relative to the manifest
    (d / "s2s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tts": d / "tts.jsonl", "s2s": d / "s2s.jsonl"}


class HeardFive:
    """An ASR that hears "five" in every wav it is given (and records the wavs)."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    def transcribe(self, wavs: list[str]) -> list[str]:
        self.heard += wavs
        return ["five"] * len(wavs)


@pytest.mark.parametrize("audio_layout", ["flat", pytest.param("delay", marks=pytest.mark.slow), pytest.param("depth", marks=pytest.mark.slow)])
def test_tts_and_s2s_run_end_to_end_in_every_layout(audio_layout, speakers, omni_model_dir, text_tokenizer_dir, items, tmp_path, monkeypatch):
    """Generation under the layout, codec decode, wavs beside the results, transcripts scored, latency > 0."""
    asr = HeardFive()
    monkeypatch.setattr(so, "load_asr", lambda cfg, device: asr)
    out = tmp_path / "ev"
    short = {"max_audio_seconds": 0.12, "chunk_frames": 3}  # 12 frames at the test codec's 100 Hz
    cfg = EvalConfig(model=ModelSpec(path=str(speakers[audio_layout]), tokenizers=paths(omni_model_dir, text_tokenizer_dir)),
                     tasks=["tts", "s2s"], out_dir=out, progress=False, tts=TTSConfig(source=str(items["tts"]), **short),
                     s2s=S2SConfig(path=str(items["s2s"]), mode="audio", **short))  # fmt: skip
    run_eval(cfg)
    res = read_results(out)  # valid results.json (schema checked)
    samples = read_samples(out)
    assert [s["task"] for s in samples] == ["tts", "tts", "s2s", "s2s"]
    for s in samples:
        assert 1 <= s["frames"] <= 12 and s["new_tokens"] >= 1
        wav, sr = sf.read(s["wav"])
        assert Path(s["wav"]).parent == out / f"{s['task']}_wavs" and sr == 16000
        assert len(wav) == s["frames"] * 160  # the codec's hop at 16 kHz: every generated frame decoded
        assert s["latency_ms"] > 0 and s["latency_ms"] <= s["seconds"] * 1e3 + 1e3  # chunk decode on top of generation
        assert s["output"] == "five"
    assert sorted(asr.heard) == sorted(s["wav"] for s in samples)  # the ASR heard exactly the written wavs
    tts, s2s = res["tasks"]["tts"], res["tasks"]["s2s"]
    # whisper normaliser: "four seven two" -> "472", "five" -> "5": 1 S; "hello there" vs "5": 1 S + 1 D; of 3 words
    assert tts["metrics"]["wer"]["value"] == pytest.approx(3 / 3)
    assert s2s["metrics"]["exact_match"]["value"] == 0.5 and s2s["metrics"]["spoke"]["value"] == 1.0  # "five" right, "nine" wrong
    lat = [s["latency_ms"] for s in samples if s["task"] == "s2s"]
    assert s2s["metrics"]["latency_ms"]["value"] == pytest.approx(float(np.median(lat)))
    assert s2s["metrics"]["latency_ms_p90"]["value"] >= s2s["metrics"]["latency_ms"]["value"]
    assert res["model"]["audio_layout"] == audio_layout  # results.json says which layout spoke
    assert f"(audio layout {audio_layout})" in (out / "report.md").read_text()
    info = s2s["info"]
    assert info["audio_layout"] == audio_layout and info["device"] == "cpu" and info["gpt4o_latency_ms"] == 320
    assert info["model_parameters"] > 0 and info["chunk_ms"] == pytest.approx(30.0)


def test_prompts_are_the_exact_prefixes_that_the_tts_and_chat_templates_train_on(speakers, omni_model_dir, text_tokenizer_dir, items,
                                                                                  monkeypatch):  # fmt: skip
    from omnitrain.data.pipeline.build import load_template
    from omnitrain.data.pipeline.templates import SampleEncoder
    from omnitrain.model import generate as gen

    system = OmniModel(ModelSpec(path=str(speakers["flat"]), tokenizers=paths(omni_model_dir, text_tokenizer_dir)), 1)
    seen: list[list[int]] = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, layout, prompts, cfg, *a, **k: (seen.extend(prompts), real(model, layout, prompts, cfg, *a, **k))[1])
    monkeypatch.setattr(so, "load_asr", lambda cfg, device: HeardFive())
    short = {"max_audio_seconds": 0.03, "chunk_frames": 1}
    so.TTSTask(TTSConfig(source=str(items["tts"]), **short)).run(system, 1, progress=False)
    so.S2STask(S2SConfig(path=str(items["s2s"]), max_text_tokens=2, **short)).run(system, 1, progress=False)
    so.S2STask(S2SConfig(path=str(items["s2s"]), mode="audio", **short)).run(system, 1, progress=False)
    enc = SampleEncoder(system.layout, system.text_tok, system.media())
    tts = enc.encode(load_template(Path("data_pipelines/template"), "tts"), {"text": "four seven two", "audio": str(items["s2s"].parent / "q1.wav")})
    assert seen[0] == tts.ids[: tts.learn[0][0] + 1].tolist()  # <bos> text <boa>: up to the learned audio's first id
    record = {"messages": [{"role": "user", "content": [{"audio": str(items["s2s"].parent / "q0.wav")}]},
                           {"role": "assistant", "content": [{"text": "five"}, {"audio": str(items["s2s"].parent / "q1.wav")}]}]}  # fmt: skip
    chat = enc.encode(load_template(Path("data_pipelines/template"), "chat"), record)
    start = chat.learn[0][0]  # the assistant's first learned id: its content
    assert seen[1] == chat.ids[:start].tolist() and seen[2] == seen[1] + [system.layout.specials["boa"]]


def test_a_reply_that_does_not_speak_within_max_text_tokens_ends_there(speakers, omni_model_dir, text_tokenizer_dir, items, monkeypatch):
    """s2s mode=auto: the reply may talk before it speaks, but no more than max_text_tokens (an untrained model would
    fill the whole budget with text)."""
    monkeypatch.setattr(so, "load_asr", lambda cfg, device: HeardFive())
    system = OmniModel(ModelSpec(path=str(speakers["delay"]), tokenizers=paths(omni_model_dir, text_tokenizer_dir)), 1)
    o = so.S2STask(S2SConfig(path=str(items["s2s"]), max_text_tokens=3, max_audio_seconds=0.05)).run(system, None, progress=False)
    for s in o.samples:
        if s["frames"] == 0:  # it never opened an audio span: cut after 4 tokens, nothing heard
            assert s["new_tokens"] == 4 and "max_text_tokens=3" in s["note"] and s["output"] == "" and s["latency_ms"] is None
        else:
            assert len(system.text_tok.encode(s["monologue"])) <= 3 and s["latency_ms"] > 0
    assert o.metrics["spoke"]["value"] == sum(s["frames"] > 0 for s in o.samples) / 2


def test_split_reply_takes_the_monologue_and_the_first_audio_span():
    layout = TokenLayout.build(1000, "synthetic", {"bos": 1, "eos": 2, "pad": 3}, audio_codebook_size=16, audio_levels=2)
    sp, base, C = layout.specials, layout.audio_base, 16
    frames = [[base + 4, base + C + 7], [base + 0, base + C + 15]]
    new = [40, 41, sp["boa"], *frames[0], *frames[1], sp["eoa"], sp["end_of_turn"]]
    text, codes, closed = so.split_reply(new, layout, opened=False)
    assert text == [40, 41] and closed and codes.tolist() == [[4, 7], [0, 15]]
    text, codes, closed = so.split_reply([*frames[0], frames[1][0]], layout, opened=True)  # cut mid-frame by the budget
    assert text == [] and not closed and codes.tolist() == [[4, 7]]
    text, codes, _ = so.split_reply([40, sp["end_of_turn"]], layout, opened=False)  # a text-only reply
    assert text == [40] and codes.shape == (0, 2)


@pytest.mark.slow
@needs_flite
@pytest.mark.parametrize("asr", ["pocketsphinx", "pocketsphinx_digits"])
def test_flite_speech_of_the_prompt_scores_a_low_wer_and_silence_or_noise_about_one(asr, omni_model_dir, speakers, text_tokenizer_dir,
                                                                                   tmp_path, monkeypatch):  # fmt: skip
    """The scoring path with real speech: a system whose 'generated' audio is flite reading the prompt text is heard
    by pocketsphinx (open vocabulary on sentences; the digit grammar on digit strings) with a low WER; one that says
    nothing, or noise, scores a WER near 1."""
    system = OmniModel(ModelSpec(path=str(speakers["flat"]), tokenizers=paths(omni_model_dir, text_tokenizer_dir)), 1)
    texts = (["the quick brown fox jumps over the lazy dog", "please call me back when you get this message"] if asr == "pocketsphinx"
             else ["four seven two", "zero nine one", "eight three five"])  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def voiced(kind: str):
        def speak(system, prompt, cfg, max_new, stop, max_frames, max_text_tokens=None):
            text = system.decode(prompt[1:-1])
            if kind == "flite":
                wav = tmp_path / "f.wav"
                subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)
                audio = so.read_16k(wav)
            else:
                audio = np.random.default_rng(0).normal(0, 0.1 if kind == "noise" else 0.0, 32000).astype(np.float32)
            return so.Spoken("", np.zeros((len(audio) // 160, 2), np.int64), audio, 1.0, 1, 0.1)
        return speak

    wer = {}
    for kind in ("flite", "silence", "noise"):
        monkeypatch.setattr(so, "speak", voiced(kind))
        o = so.TTSTask(TTSConfig(source=str(tmp_path / "t.jsonl"), asr=asr, normalizer="basic")).run(system, None, progress=False)
        wer[kind] = o.metrics["wer"]["value"]
    assert wer["flite"] < 0.35, wer
    assert wer["silence"] >= 0.9 and wer["noise"] >= 0.9, wer


def test_bad_inputs_get_errors_that_say_what_to_pass(omni_model_dir, text_tokenizer_dir, speakers, tmp_path):
    with pytest.raises(FileNotFoundError, match="tts.source=.*does not exist"):
        so.TTSTask(TTSConfig(source=str(tmp_path / "none.jsonl")))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a row needs \['text'\]"):
        so.TTSTask(TTSConfig(source=str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match="s2s needs s2s.path="):
        so.S2STask(S2SConfig())
    (tmp_path / "noans.jsonl").write_text(json.dumps({"audio": "q.wav"}) + "\n")
    with pytest.raises(ValueError, match="needs answer"):
        so.S2STask(S2SConfig(path=str(tmp_path / "noans.jsonl")))
    (tmp_path / "noaudio.jsonl").write_text(json.dumps({"audio": "missing.wav", "answer": "five"}) + "\n")
    with pytest.raises(FileNotFoundError, match="question audio .*missing.wav does not exist"):
        so.S2STask(S2SConfig(path=str(tmp_path / "noaudio.jsonl")))
    with pytest.raises(ValueError, match="tts.asr=whisper needs tts.whisper_model"):
        so.TTSTask(TTSConfig(asr="whisper"))
    with pytest.raises(ValueError, match="asr='wav2vec'; choose from pocketsphinx, pocketsphinx_digits, whisper"):
        so.TTSTask(TTSConfig(asr="wav2vec"))
    with pytest.raises(ValueError, match="digits:<N>"):
        so.tts_items("digits:many")
    assert len(so.tts_items("digits:7")) == 7 and all(len(r["text"].split()) == 3 for r in so.tts_items("digits"))
    # a model whose layout has no audio codec cannot speak
    from omnitrain.tokenizer.text import TextTokenizer

    layout = TokenLayout.from_tokenizers(TextTokenizer.load(text_tokenizer_dir))
    layout.save(tmp_path / "layout")
    save_model(Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=1, n_heads=2)), tmp_path / "m", tmp_path / "layout", {})
    cfg = EvalConfig(model=ModelSpec(path=str(tmp_path / "m"), tokenizers=TokenizerPaths(text=str(text_tokenizer_dir))),
                     tasks=["tts"], out_dir=tmp_path / "ev", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="has no audio codec.*model.tokenizers.audio="):
        run_eval(cfg)
    with pytest.raises(ValueError, match="task tts needs an omnitrain model"):
        run_eval(EvalConfig(model=ModelSpec(kind="pocketsphinx"), tasks=["tts"], out_dir=tmp_path / "ev2", progress=False))


def test_whisper_weights_that_cannot_be_loaded_are_named(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"asr=whisper: the Whisper weights .*no_whisper.* cannot be loaded.*asr=pocketsphinx"):
        so.WhisperASR(str(tmp_path / "no_whisper"))


def test_eval_in_training_runs_tts_on_the_training_model(speakers, omni_model_dir, text_tokenizer_dir, tmp_path, monkeypatch):
    """``eval_in_training.tasks: {tts: {limit: 1}}``: the evaluator's OmniModel adapter over the training model speaks."""
    from omnitrain.eval.in_training import InTrainingEvaluator
    from omnitrain.model.io import load_model
    from omnitrain.train.evaluation import EvalInTrainingConfig

    monkeypatch.setattr(so, "load_asr", lambda cfg, device: HeardFive())
    model, layout = load_model(speakers["delay"], "cpu")
    fabric = SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu"))
    run = SimpleNamespace(fabric=fabric, model=model, layout=layout, strategy=SimpleNamespace(unwrap=lambda: model),
                          cfg=SimpleNamespace(run_dir=tmp_path / "run", strategy=SimpleNamespace(name="single")))  # fmt: skip
    cfg = EvalInTrainingConfig(every=2, tasks={"tts": {"limit": 1, "source": "digits:3", "max_audio_seconds": 0.05}}, batch_size=2)
    ev = InTrainingEvaluator(cfg, tmp_path / "run", paths(omni_model_dir, text_tokenizer_dir))
    row = ev.evaluate(run, 4)
    assert row["eval/tts/wer"] >= 0 and row["eval/tts/latency_ms"] > 0
    res = read_results(tmp_path / "run" / "eval" / "step_4")
    assert res["tasks"]["tts"]["items"] == 1 and res["tasks"]["tts"]["info"]["wav_dir"] is None  # wavs not kept in training
