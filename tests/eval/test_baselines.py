"""Real runs of the classical baselines: pocketsphinx ASR and tesseract document QA."""

import importlib.util
import shutil

import pytest

from omnitrain.eval.metrics import corpus_wer, mean_anls
from omnitrain.eval.speech import LIBRIVOX, load_librivox, load_speech_set, make_flite_set

needs_pocketsphinx = pytest.mark.skipif(
    importlib.util.find_spec("pocketsphinx") is None, reason="pip install pocketsphinx"
)
needs_librivox = pytest.mark.skipif(
    not (LIBRIVOX / "transcription").is_file(), reason="apt-get install pocketsphinx-testdata"
)
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="apt-get install tesseract-ocr tesseract-ocr-eng"
)
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite")


@needs_librivox
def test_load_librivox_reads_the_transcripts():
    rows = load_librivox()
    assert len(rows) == 5
    assert rows[1]["text"] == "he was not an ill disposed young man"
    assert all(r["audio"].endswith(".wav") for r in rows)


@needs_flite
def test_flite_set_is_16k_mono_with_a_manifest(tmp_path):
    import soundfile as sf

    rows = make_flite_set(tmp_path, n=2, voices=("slt", "kal16"))
    info = sf.info(rows[0]["audio"])
    assert (info.samplerate, info.channels) == (16000, 1)
    assert [r["text"] for r in load_speech_set(f"flite:{tmp_path}")] == [r["text"] for r in rows]


@pytest.mark.slow
@needs_pocketsphinx
@needs_librivox
def test_pocketsphinx_wer_on_librivox_is_clearly_below_one():
    from omnitrain.eval.baselines import PocketsphinxASR

    rows = load_librivox()
    hyps = PocketsphinxASR().transcribe([r["audio"] for r in rows])
    out = corpus_wer([r["text"] for r in rows], hyps)
    assert out["ref_words"] == sum(len(r["text"].split()) for r in rows)
    assert out["wer"] < 0.6, (out, hyps)  # measured 0.268 with pocketsphinx 5.1.1 (evals/speech_wer.yaml)


@pytest.mark.slow
@needs_tesseract
def test_tesseract_answers_synthetic_documents(tmp_path):
    from omnitrain.eval.baselines import TesseractDocQA
    from omnitrain.eval.docqa import MakeDocQAConfig, load_docqa, make_docqa

    make_docqa(MakeDocQAConfig(out_dir=tmp_path, n=3, noise=0.0, max_rotation_deg=0.0, blur=0.0,
                               questions_per_doc=2, fonts=["DejaVuSans"]))  # fmt: skip
    rows = load_docqa(tmp_path)
    ocr = TesseractDocQA()
    preds = [ocr.answer(r["image"], r["question"]) for r in rows]
    assert mean_anls(preds, [r["answers"] for r in rows])["anls"] > 0.3, list(zip(preds, rows, strict=True))


def test_missing_engines_raise_with_install_hints(monkeypatch):
    from omnitrain.eval import baselines

    monkeypatch.setattr(baselines.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install"):
        baselines.TesseractDocQA()
