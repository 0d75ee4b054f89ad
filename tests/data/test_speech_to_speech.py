"""Speech to speech through the ``chat`` template (issue 23, item 2): the demo's spoken questions build into
shards where the loss sits exactly on the assistant's reply (its text, when there is an inner monologue, its
audio and its end of turn), and the prompt `omnitrain eval`/`omnitrain generate` give a model is the very
prefix training produced."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.config import from_dict
from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.data.shards import iter_shard, read_manifest
from omnitrain.demo.corpus import (
    CorpusConfig,
    make_spoken_questions,
    read_jsonl,
    s2s_messages,
    spoken_question,
)
from omnitrain.model.generate_command import GenerateConfig, build_prompt
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import AudioSegment, SpecialSegment, TextSegment
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="Debian flite missing: run setup.sh as root")


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> Path:
    """A small randomly initialised codec: encoding is deterministic, which is all shards need."""
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codec") / "audio.pt"
    RVQAudioCodec(AudioCodecConfig(channels=8, latent_dim=16, n_levels=2, codebook_size=32)).eval().save(path)
    return path


def build(tmp_path: Path, text_dir: Path, codec: Path, monologue: bool) -> tuple[Path, Path, TokenizerPaths]:
    cfg = CorpusConfig(s2s_train=8, s2s_test=2, s2s_monologue=monologue)
    paths = make_spoken_questions(tmp_path / "s2s", cfg)
    pipeline = from_dict(PipelineConfig, {"name": "s2s", "source": {"kind": "records", "paths": [str(paths["train"])]}, "template": "chat"})
    tok = TokenizerPaths(text=text_dir, audio=codec)
    stats = build_shards(BuildConfig(pipeline=pipeline, tokenizers=tok, media=MediaConfig(), out_dir=tmp_path / "shards",
                             templates_dir=REPO / "data_pipelines" / "template"))  # fmt: skip
    assert stats["samples"] == 8 and stats["errors"] == 0
    return paths["train"], tmp_path / "shards", tok


@pytest.mark.parametrize("monologue", [True, False])
def test_spoken_answers_are_learned_exactly_and_the_eval_prompt_is_the_training_prefix(tmp_path, text_tokenizer_dir, codec, monologue):
    records, shards, tok = build(tmp_path, text_tokenizer_dir, codec, monologue)
    manifest = read_manifest(shards)
    samples = {s.meta["origin"]: s for sh in manifest["shards"] for s in iter_shard(shards / sh["name"], manifest["layout_hash"])}
    rows = read_jsonl(records)
    assert len(samples) == len(rows) == 8
    loaded = bundle.load(tok)
    layout, text = loaded.layout, loaded.text
    media = MediaTokenizers(None, loaded.audio, MediaConfig(), layout.max_grid)
    sp = layout.specials
    for (_origin, s), row in zip(sorted(samples.items(), key=lambda kv: int(kv[0].rsplit(":", 1)[1])), rows, strict=True):
        ids = s.ids.astype(np.int64)
        question = str(Path(records).parent / row["messages"][0]["content"][0]["audio"])
        answer_wav = str(Path(records).parent / row["messages"][1]["content"][-1]["audio"])
        # what the sample holds: <bos> <user> question audio <eot> <assistant> [answer text] answer audio <eot> <eos>
        reply = ([TextSegment(np.asarray(text.encode(row["answer"])))] if monologue else []) + [AudioSegment(media.audio_codes(answer_wav))]
        expected = layout.serialize([SpecialSegment("bos"), SpecialSegment("user"), AudioSegment(media.audio_codes(question)),
                                     SpecialSegment("end_of_turn"), SpecialSegment("assistant"), *reply,
                                     SpecialSegment("end_of_turn"), SpecialSegment("eos")])  # fmt: skip
        np.testing.assert_array_equal(ids, expected)
        # the prompt of a chat generation (omnitrain generate chat=true, omnitrain eval's s2s task) is this prefix
        prompt = build_prompt(GenerateConfig(audios=[question], chat=True, output="text"), layout, text, media)
        opening = int(np.flatnonzero(ids == sp["assistant"])[0]) + 1
        assert prompt == ids[:opening].tolist()
        # the loss sits on the reply and its end of turn, nowhere else: not on the question, the role markers, bos / eos
        assert s.meta["learn"] == [[opening, len(ids) - 1]]
        np.testing.assert_array_equal(ids[opening : len(ids) - 1], layout.serialize([*reply, SpecialSegment("end_of_turn")]))


def test_the_loader_weights_exactly_the_reply_tokens(tmp_path, text_tokenizer_dir, codec):
    """Through the training loader (whole documents packed into rows, flat layout): a target has loss weight 1
    when it is a token of an assistant reply, 0 elsewhere, padding included."""
    _, shards, _ = build(tmp_path, text_tokenizer_dir, codec, monologue=True)
    manifest = read_manifest(shards)
    by_ids = {}
    for sh in manifest["shards"]:
        for s in iter_shard(shards / sh["name"], manifest["layout_hash"]):
            learn = np.zeros(len(s.ids), dtype=np.float32)
            for b, e in s.meta["learn"]:
                learn[b:e] = 1.0
            by_ids[tuple(s.ids.tolist())] = learn
    loader = OmniLoader(LoaderConfig(sources={"s2s": SourceSpec(str(shards))}, seq_len=1024, batch_size=1, split_documents=False, pack_buffer=8))
    seen = set()
    for _ in range(8):
        batch = next(loader)
        inputs, targets, weights, docs = (batch[k][0].numpy() for k in ("input_ids", "targets", "loss_weights", "doc_ids"))
        row = np.concatenate([inputs, targets[-1:]])  # the T + 1 tokens of the row
        for d in np.unique(docs):
            at = np.flatnonzero(docs == d)  # the input positions of one document
            last = at[-1] == len(inputs) - 1  # at the end of the row its last token is a target only
            doc = row[at[0] : at[-1] + 1 + last]
            if tuple(doc.tolist()) not in by_ids:
                assert (weights[at] == 0).all()  # padding: never learned
                continue
            # the target of input t is token t + 1; a document's last input has the next document's first token as its
            # target: never learned (attention and loss stay inside a document)
            expected = by_ids[tuple(doc.tolist())][1:]
            np.testing.assert_array_equal(weights[at], expected if last else np.append(expected, 0.0))
            seen.add(tuple(doc.tolist()))
    assert seen == set(by_ids)  # every sample went through the check
    loader.close()


def test_questions_answers_and_bad_settings():
    assert spoken_question("after", 4) == ("what comes after four", "five")
    assert spoken_question("before", 1) == ("what comes before one", "zero")
    with pytest.raises(ValueError, match="nothing comes after nine"):
        spoken_question("after", 9)
    assert s2s_messages("q.wav", "a.wav", None)[1] == {"role": "assistant", "content": [{"audio": "a.wav"}]}
    with pytest.raises(ValueError, match="s2s_relations"):
        CorpusConfig(s2s_relations=["between"])
    with pytest.raises(ValueError, match="assistant_voice"):
        CorpusConfig(assistant_voice="kal")


def test_held_out_questions_are_never_heard_in_training(tmp_path):
    cfg = CorpusConfig(s2s_train=30, s2s_test=10, voices=["kal16", "awb"])
    paths = make_spoken_questions(tmp_path, cfg)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert not {r["rate"] for r in train} & {r["rate"] for r in test}  # held-out speaking rates
    assert len({(r["question"], r["voice"], r["rate"]) for r in train}) == 30
    assert all(set(r) >= {"id", "audio", "answer"} and Path(r["audio"]).stat().st_size > 4000 for r in test)  # the s2s manifest
    assert all(spoken_question(*_parse(r["question"]))[1] == r["answer"] for r in train + test)
    with pytest.raises(ValueError, match="s2s_train=1000"):
        make_spoken_questions(tmp_path / "more", CorpusConfig(s2s_train=1000))


def _parse(question: str) -> tuple[str, int]:
    words = question.split()
    return words[2], ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(words[3])
