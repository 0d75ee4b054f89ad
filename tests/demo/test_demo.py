"""The embedded demo: its corpus makers (quick), and a reduced demo end to end through the console
script (slow): every stage leaves its artefacts and training lowers the loss of every modality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnitrain.demo import corpus as demo_data
from omnitrain.demo.corpus import (
    CELL_H,
    CELL_W,
    make_digits,
    make_forms,
    read_jsonl,
    render_lines,
    spoken_digits,
)
from omnitrain.demo.report import S2S_METRIC, TABLE, comparison, loss_drop
from omnitrain.eval.tasks import DocVQAConfig

REPO = Path(__file__).resolve().parents[2]
needs_fonts = pytest.mark.skipif(not any((d / f).is_file() for d in demo_data.FONT_DIRS for f in demo_data.FONTS),
                                 reason="fonts-dejavu-core / fonts-liberation2 missing: run `bash setup.sh` as root")  # fmt: skip
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite missing: run `bash setup.sh` as root")


@needs_fonts
def test_text_is_rendered_one_character_per_cell_of_whole_image_codes():
    import random

    img = render_lines(["NO 123", "DAY MON"], demo_data.font_paths()[0], random.Random(0), width_cells=8)
    assert img.size == (8 * CELL_W, 2 * CELL_H) and img.mode == "RGB"
    assert CELL_W % 8 == 0 and CELL_H % 8 == 0  # a cell is whole codes at the tokenizers' 8-pixel downsampling
    gray = np.asarray(img.convert("L"))
    ink = [int(gray[:CELL_H, c * CELL_W : (c + 1) * CELL_W].min()) for c in range(8)]
    assert ink[2] > 150 and ink[0] < 120 and ink[7] > 150  # the space and the empty tail stay blank, letters are dark


@needs_fonts
def test_digit_strings_held_out_from_training_and_readable_back(tmp_path):
    paths = make_digits(tmp_path, n_train=60, n_test=12, length=3, seed=0)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert len(train) == 60 and len(test) == 12 and len({r["caption"] for r in test}) == 12
    assert not {r["caption"] for r in test} & {r["caption"] for r in train}
    assert all(len(r["caption"]) == 3 and r["caption"].isdigit() for r in train + test)
    assert Image.open(test[0]["image"]).size == (3 * CELL_W, CELL_H)
    raw = json.loads(paths["train"].read_text().splitlines()[0])
    assert not Path(raw["image"]).is_absolute()  # relative to the jsonl, as the records reader resolves them
    again = make_digits(tmp_path / "again", n_train=60, n_test=12, length=3, seed=0)
    assert again["train"].read_text() == paths["train"].read_text()  # deterministic


@needs_fonts
def test_forms_answer_a_field_printed_on_the_page_and_held_out_pages_are_new(tmp_path):
    paths = make_forms(tmp_path, n_train=40, n_test=10, seed=0)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    page = lambda r: tuple(sorted(r["fields"].items()))  # noqa: E731
    assert not {page(r) for r in test} & {page(r) for r in train}
    names = {v[0]: k for k, v in demo_data.FORM_FIELDS.items()}
    for r in train + test:
        key = names[r["question"].removeprefix("What is the ").removesuffix("?")]
        assert r["answers"] == [r["fields"][key]] == [r["answer"]] and len(r["fields"]) == 3
        assert r["prompted_question"] == f"{r['question']}\n{DocVQAConfig().prompt}"  # what `omnitrain eval` docvqa asks
    assert Image.open(test[0]["image"]).size == (8 * CELL_W, 3 * CELL_H)


@needs_flite
def test_speech_is_synthesised_in_several_voices_with_held_out_contents(tmp_path):
    cfg = demo_data.CorpusConfig(speech_digits_train=6, speech_digits_test=3, sentences_train=2, sentences_test=1)
    sentences = ["The package is installed.", "This command lists the files.", "A mirror holds the archive."]
    paths = demo_data.make_speech(tmp_path, cfg, sentences)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert [r["kind"] for r in test] == ["digits"] * 3 + ["sentence"]
    assert read_jsonl(paths["digits_test"]) == test[:3] and {r["kind"] for r in read_jsonl(paths["digits_train"])} == {"digits"}
    assert not {r["text"] for r in test} & {r["text"] for r in train}
    assert len({r["voice"] for r in train}) == 4 and all(Path(r["audio"]).stat().st_size > 4000 for r in train + test)
    assert spoken_digits("407") == "four zero seven"
    # TTS trains on the training digit strings in the assistant's voice; its held-out manifest is the test strings' text
    tts_train, tts_test = read_jsonl(paths["tts_train"]), read_jsonl(paths["tts_test"])
    assert [r["text"] for r in tts_train] == [r["text"] for r in train if r["kind"] == "digits"]
    assert {r["voice"] for r in tts_train} == {cfg.assistant_voice} and all(Path(r["audio"]).stat().st_size > 4000 for r in tts_train)
    assert [set(r) for r in tts_test] == [{"id", "text"}] * 3 and [r["text"] for r in tts_test] == [r["text"] for r in test[:3]]


def test_loss_drop_and_comparison_read_metrics_and_results():
    rows = [{"step": i, "loss/text": 9.0 - i * 0.1, **({"loss/audio": 5.0 - i * 0.05} if i % 2 else {})} for i in range(30)]
    d = loss_drop(rows)
    assert set(d) == {"text", "audio"} and d["text"]["last"] < d["text"]["first"] and d["audio"]["steps"] == 15
    m = lambda v: {"value": v, "stderr": None, "n": 10}  # noqa: E731
    res = lambda e, a, w, p: {"reading": {"metrics": {"exact_match": m(e), "char_accuracy": m(e)}},  # noqa: E731
                              "docvqa": {"metrics": {"anls": m(a), "exact_match": m(a)}},
                              "speech_wer": {"metrics": {"wer": m(w), "cer": m(w)}},
                              "perplexity": {"metrics": {"perplexity": m(p)}},
                              "s2s": {"metrics": {S2S_METRIC: m(e), "monologue_exact_match": m(e)}}, "tts": {"metrics": {"wer": m(w)}}}  # fmt: skip
    table = comparison(res(0.0, 0.0, 1.0, 900.0), res(0.2, 0.3, 0.8, 90.0))
    assert all(r["better"] for r in table)
    assert not any(r["better"] for r in comparison(res(0.0, 0.0, 1.0, 900.0), res(0.0, 0.0, 1.2, 900.0)))


@pytest.mark.slow
@needs_fonts
@needs_flite
def test_reduced_demo_runs_every_stage_and_training_lowers_every_modality_training_loss(tmp_path):
    """The README's main command with a smaller corpus and fewer steps, as a user runs it: from another
    folder, with a relative run_dir (as the README's runs/demo)."""
    exe = Path(sys.executable).with_name("omnitrain")
    run = tmp_path / "demo"
    proc = subprocess.run(
        [str(exe), "demo", "run_dir=demo", "data.digits_train=150", "data.digits_test=8", "data.forms_train=100", "data.forms_test=8",
         "data.speech_digits_train=40", "data.speech_digits_test=6", "data.sentences_train=20", "data.sentences_test=3",
         "data.s2s_train=40", "data.s2s_test=4",
         "data.text_docs=1", "data.text_test_docs=1", "tokenizer.vocab_size=4000", "image.steps=20", "audio.steps=20",
         "audio.data.max_eval_seconds=10", "report_languages=[fr]", "train_steps=40", "eval_batch_size=8",
         # the one handbook page (~20k tokens) fills half of these 40 steps once drawn (a cut document goes on
         # in the next row); in the rest the deficit scheduler serves the sources furthest behind, and the
         # only ones with learned images (digits_to_image, 0.06) and audio (tts, 0.11) were not reached
         # (measured: no image-loss step, then 1 audio-loss step); this short run gives them more
         "train_overrides=['data.seq_len=256','ckpt_every=20','wandb.mode=disabled','optim.warmup_steps=5',"
         "'data.sources.digits_to_image.weight=0.3','data.sources.tts.weight=0.3']"],
        cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "demo done" in proc.stdout and proc.stdout.count("\n-> ") == 11  # a one-line summary per stage
    layout_hash = json.loads((run / "layout.json").read_text())["hash"]
    for f in ("data/corpus.json", "tokenizer/text/text_tokenizer.model", "tokenizer/image/image_tokenizer.pt", "tokenizer/audio/audio_codec.pt",
              "tokenizer/report/report.md", "init/model/model.safetensors", "train/model/model.safetensors", "train/config.yaml",
              "train/checkpoints/step_000000040/meta.json", "report.md", "loss_curves.png", "summary.json"):  # fmt: skip
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    templates = {s["template"] for s in summary["shards"].values()}
    assert templates == {"text_lm", "caption", "text_to_image", "doc_qa", "asr", "tts", "chat"}  # chat: speech to speech
    for name in summary["shards"]:
        manifest = json.loads((run / "shards" / name / "manifest.json").read_text())
        assert manifest["layout_hash"] == layout_hash and manifest["samples"] > 0, name
    # before/after results in the eval results format, on the same held-out items, under the model's layout
    for which, step in (("init", 0), ("trained", 40)):
        res = json.loads((run / "eval" / which / "results.json").read_text())
        assert res["schema_version"] == 1 and res["model"]["layout_hash"] == layout_hash and res["model"]["checkpoint_step"] == step
        assert set(res["tasks"]) == {"reading", "docvqa", "speech_wer", "perplexity", "s2s", "tts"}
        assert res["tasks"]["reading"]["metrics"]["exact_match"]["n"] == 8 and res["tasks"]["speech_wer"]["metrics"]["wer"]["n"] == 6  # the digit strings
        assert res["tasks"]["s2s"]["metrics"][S2S_METRIC]["n"] == 4 and res["tasks"]["tts"]["metrics"]["wer"]["n"] > 0  # held-out questions, strings
        assert (run / "eval" / which / "samples.jsonl").is_file()
        assert res["model"]["audio_layout"] == "delay"  # the demo's layout (recipes/experiment/demo.yaml)
    # the bound of the speech-output rows: the codec's round trip of the held-out recordings of the texts TTS speaks
    ceiling, tts_n = summary["codec_ceiling"], res["tasks"]["tts"]["metrics"]["wer"]["n"]
    assert ceiling["recorded"]["n"] == ceiling["round_trip"]["n"] == tts_n
    assert [s["text"] for s in ceiling["samples"]] == [json.loads(x)["text"] for x in (run / "data" / "speech" / "tts_test.jsonl").read_text().splitlines()]
    assert len(list((run / "eval" / "codec_ceiling").glob("*.wav"))) == tts_n
    # training lowered the training loss of each modality (mean of the first vs the last logged steps): the optimizer
    # and the per-modality loss work. Measured over seeds 0-3 and AVX-512/AVX2 kernels, the smallest drop is 1.05 nats
    # (text 7.4-7.7 -> 5.8-6.4, image 8.9-9.4 -> 5.9-6.8, audio 7.0-8.2 -> 3.2-3.5), the spread between 1 and 2
    # threads 0.01: a drop this size is the optimizer working, not luck
    drops = summary["train"]["loss_by_modality"]
    assert set(drops) == {"text", "image", "audio"}
    assert all(d["last"] < d["first"] for d in drops.values()), drops
    # generated samples, linked from the report with the table and the curves
    assert list((run / "generate" / "digits_to_image").glob("*.png")) and list((run / "generate" / "tts").glob("*.wav"))
    assert (run / "generate" / "s2s" / "result.json").is_file()  # a held-out spoken question answered (text, audio or both)
    report = (run / "report.md").read_text()
    assert "pocketsphinx hears its round trip" in report
    assert "| task | untrained | trained |" in report and "loss_curves.png" in report and ".wav)" in report and ".png)" in report
    # the before/after table is read from the two results.json files and says which way each metric moved. Whether
    # the trained model beats the untrained one on held-out data after 40 steps is not asserted: that is what the
    # run learns, not what the code guarantees (issue 17: held-out perplexity after these 40 steps, seed 0, went
    # 4,578 -> 8,082 on AVX-512 kernels and 4,578 -> 1,548 with ATEN_CPU_CAPABILITY=avx2; seeds 1-3 gave ~1,000).
    # The full demo measures and reports it.
    results = {w: json.loads((run / "eval" / w / "results.json").read_text())["tasks"] for w in ("init", "trained")}
    assert [(r["task"], r["metric"]) for r in summary["comparison"]] == [(t, m) for t, m, _, _ in TABLE]
    for row in summary["comparison"]:
        before, after = (results[w][row["task"]]["metrics"][row["metric"]]["value"] for w in ("init", "trained"))
        assert (row["before"], row["after"]) == (before, after) and np.isfinite([before, after]).all(), row
        assert row["better"] == (after > before if row["higher_is_better"] else after < before), row
        assert f"| {row['label']} (" in report, row["label"]
