"""The token layout: exact serialize/parse inverses, masks, constrained decoding, the hash contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnitrain.tokenizer.constraints import LayoutConstraint
from omnitrain.tokenizer.layout import (
    AUDIO,
    IMAGE,
    TEXT,
    TEXT_SPECIALS,
    AudioSegment,
    ImageSegment,
    LayoutMismatchError,
    SpecialSegment,
    TextSegment,
    TokenLayout,
    check_layout_hash,
    normalize,
)

# A layout shaped like a real one: SentencePiece-style bos/eos/pad at 1-3 inside the text range.
LAYOUT = TokenLayout.build(
    text_vocab_size=300, text_fingerprint="t", text_specials={"bos": 1, "eos": 2, "pad": 3},
    image_codebook_size=37, image_fingerprint="i", audio_codebook_size=11, audio_levels=3,
    audio_fingerprint="a", max_grid=6,
)  # fmt: skip
PLAIN_TEXT_IDS = [i for i in range(LAYOUT.text_vocab_size) if i not in (1, 2, 3)]

text_seg = st.lists(st.sampled_from(PLAIN_TEXT_IDS), min_size=0, max_size=12).map(lambda x: TextSegment(np.array(x, dtype=np.int64)))
image_seg = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1)).map(
    lambda t: ImageSegment(np.random.default_rng(t[2]).integers(0, 37, size=(t[0], t[1])))
)
audio_seg = st.tuples(st.integers(0, 7), st.integers(0, 2**32 - 1)).map(
    lambda t: AudioSegment(np.random.default_rng(t[1]).integers(0, 11, size=(t[0], 3)))
)
special_seg = st.sampled_from(TEXT_SPECIALS).map(SpecialSegment)
segments = st.lists(st.one_of(text_seg, image_seg, audio_seg, special_seg), max_size=8)


@settings(max_examples=300, deadline=None)
@given(segments)
def test_parse_inverts_serialize(segs):
    ids = LAYOUT.serialize(segs)
    assert ids.dtype == np.int64 and (ids >= 0).all() and (ids < LAYOUT.vocab_size).all()
    parsed = LAYOUT.parse(ids)
    assert parsed == normalize(segs)
    np.testing.assert_array_equal(LAYOUT.serialize(parsed), ids)  # and back: ids -> segments -> ids


@settings(max_examples=200, deadline=None)
@given(segments.filter(lambda segs: SpecialSegment("pad") not in segs))  # <pad> is never generated
def test_constraint_accepts_every_serialized_sequence_and_tracks_modality(segs):
    ids = LAYOUT.serialize(segs)
    c = LayoutConstraint(LAYOUT)
    modality = LAYOUT.modality_of(ids)
    for tok, mod in zip(ids, modality, strict=True):
        assert c.allowed()[tok]
        if tok not in (LAYOUT.specials["boi"], LAYOUT.specials["boa"]):  # openers are emitted from text mode
            assert c.modality == ("text", "image", "audio")[mod]
        c.step(int(tok))
    assert c.mode == "text"  # every span closed


def test_image_and_audio_serialization_is_the_documented_format():
    sp = LAYOUT.specials
    ids = LAYOUT.serialize([ImageSegment(np.array([[0, 1, 2], [3, 4, 5]]))])
    b = LAYOUT.image_base
    expected = [sp["boi"], LAYOUT.size_token(2), LAYOUT.size_token(3), b, b + 1, b + 2, sp["eol"], b + 3, b + 4, b + 5, sp["eol"], sp["eoi"]]
    assert ids.tolist() == expected
    codes = np.array([[1, 2, 3], [4, 5, 6]])  # T=2 frames, K=3 levels
    ids = LAYOUT.serialize([AudioSegment(codes)])
    a, c = LAYOUT.audio_base, LAYOUT.audio_codebook_size
    assert ids.tolist() == [sp["boa"], a + 1, a + c + 2, a + 2 * c + 3, a + 4, a + c + 5, a + 2 * c + 6, sp["eoa"]]
    assert LAYOUT.modality_of(ids).tolist() == [AUDIO] * 8


def test_constraint_forbids_what_the_grammar_forbids():
    sp = LAYOUT.specials
    c = LayoutConstraint(LAYOUT)
    assert not c.allowed()[sp["eoi"]] and not c.allowed()[LAYOUT.image_base] and not c.allowed()[sp["pad"]]
    c.feed([sp["boi"], LAYOUT.size_token(1), LAYOUT.size_token(2), LAYOUT.image_base])
    assert c.allowed().sum() == LAYOUT.image_codebook_size  # one more code, nothing else
    c.step(LAYOUT.image_base)
    assert c.allowed().tolist() == (np.arange(LAYOUT.vocab_size) == sp["eol"]).tolist()
    c.step(sp["eol"])
    assert c.allowed()[sp["eoi"]] and c.allowed().sum() == 1
    c.step(sp["eoi"])
    c.step(sp["boa"])
    assert c.allowed()[sp["eoa"]]  # empty audio is fine; level-0 codes allowed
    c.step(LAYOUT.audio_base + 5)
    level1 = LAYOUT.mask("audio", level=1)
    assert (c.allowed() == level1).all()  # mid-frame: only the next level, no <eoa>
    with pytest.raises(ValueError, match="not allowed"):
        c.step(LAYOUT.audio_base)  # a level-0 code where level 1 must come


@pytest.mark.parametrize(
    ("ids", "fragment"),
    [
        ([LAYOUT.image_base], "outside an image/audio span"),
        ([LAYOUT.specials["boi"], LAYOUT.size_token(2)], "truncated"),
        ([LAYOUT.specials["boi"], LAYOUT.size_token(1), LAYOUT.size_token(1), LAYOUT.image_base, LAYOUT.specials["eoi"]], "truncated or lacks <eoi>"),
        ([LAYOUT.specials["boa"], LAYOUT.audio_base], "no <eoa>"),
        ([LAYOUT.specials["boa"], LAYOUT.audio_base, LAYOUT.specials["eoa"]], "not a multiple of K=3"),
        ([LAYOUT.specials["boa"], LAYOUT.audio_base + 11, LAYOUT.audio_base, LAYOUT.audio_base, LAYOUT.specials["eoa"]], "wrong level"),
        ([LAYOUT.vocab_size], "out of the layout's range"),
    ],
)
def test_parse_rejects_malformed_sequences(ids, fragment):
    with pytest.raises(ValueError, match=fragment):
        LAYOUT.parse(ids)


def test_serialize_rejects_bad_segments():
    with pytest.raises(ValueError, match="special id"):
        LAYOUT.serialize([TextSegment(np.array([5, 1]))])  # bos inside text would parse as a special
    with pytest.raises(ValueError, match="outside 1..6"):
        LAYOUT.serialize([ImageSegment(np.zeros((7, 2), dtype=int))])
    with pytest.raises(ValueError, match="out of range"):
        LAYOUT.serialize([ImageSegment(np.full((1, 1), 37))])
    with pytest.raises(ValueError, match="K=3"):
        LAYOUT.serialize([AudioSegment(np.zeros((2, 2), dtype=int))])
    text_only = TokenLayout.build(300, text_specials={"bos": 1, "eos": 2, "pad": 3})
    with pytest.raises(ValueError, match="no image range"):
        text_only.serialize([ImageSegment(np.zeros((1, 1), dtype=int))])


def test_ranges_are_disjoint_and_cover_the_vocabulary():
    masks = [LAYOUT.mask(w) for w in ("text", "image", "audio", "size", "special")]
    total = np.sum(masks, axis=0)
    assert (total == 1).all()  # every id in exactly one class
    assert LAYOUT.modality_of(np.arange(LAYOUT.vocab_size)).tolist().count(TEXT) == 300 + 4  # + chat roles
    assert (LAYOUT.modality_of(np.arange(LAYOUT.image_base, LAYOUT.audio_base)) == IMAGE).all()


def test_layout_json_round_trip_and_hash(tmp_path):
    path = LAYOUT.save(tmp_path)
    assert path.name == "layout.json"
    loaded = TokenLayout.load(tmp_path, expect_hash=LAYOUT.hash)
    assert loaded == LAYOUT and loaded.hash == LAYOUT.hash
    d = json.loads(path.read_text())
    assert d["hash"] == LAYOUT.hash and d["schema_version"] == 1 and d["audio_order"] == "frame_major_level_order"
    # every ingredient changes the hash
    for change in ({"image_codebook_size": 38}, {"audio_levels": 4}, {"text_fingerprint": "other"}, {"max_grid": 7}):
        kw = dict(text_vocab_size=300, text_fingerprint="t", text_specials={"bos": 1, "eos": 2, "pad": 3},
                  image_codebook_size=37, image_fingerprint="i", audio_codebook_size=11, audio_levels=3,
                  audio_fingerprint="a", max_grid=6)  # fmt: skip
        assert TokenLayout.build(**{**kw, **change}).hash != LAYOUT.hash


def test_loading_under_another_hash_is_a_clear_error(tmp_path):
    LAYOUT.save(tmp_path)
    with pytest.raises(LayoutMismatchError) as err:
        TokenLayout.load(tmp_path, expect_hash="0123456789abcdef")
    assert LAYOUT.hash in str(err.value) and "0123456789abcdef" in str(err.value)
    with pytest.raises(LayoutMismatchError, match="shard shard-000003.tar"):
        check_layout_hash("aaaa", "bbbb", "shard shard-000003.tar")


def test_tampered_missing_or_future_layout_files_fail_clearly(tmp_path):
    path = LAYOUT.save(tmp_path)
    d = json.loads(path.read_text())
    d["image_codebook_size"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="edited by hand or corrupted"):
        TokenLayout.load(path)
    d["schema_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema_version 99"):
        TokenLayout.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenLayout.load(path)
    with pytest.raises(FileNotFoundError, match="omnitrain tokenizer layout"):
        TokenLayout.load(tmp_path / "nowhere")


def test_layout_from_real_text_tokenizer(text_tokenizer):
    layout = TokenLayout.from_tokenizers(text_tokenizer)
    assert layout.specials["bos"] == 1 and layout.specials["eos"] == 2  # SentencePiece's own, reused
    assert layout.specials["boi"] >= text_tokenizer.vocab_size  # new specials live outside text
    text = "print('hi')\n    x = 1"
    ids = layout.serialize([SpecialSegment("bos"), TextSegment(np.array(text_tokenizer.encode(text)))])
    assert text_tokenizer.decode(layout.parse(ids)[1].ids.tolist()) == text
