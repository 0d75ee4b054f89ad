"""The chat template recorded in the layout: hash compatibility, layout.json round trip, SFT turns, generation prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omnitrain.data.pipeline.templates import Part, SampleEncoder, SkipSample, Template
from omnitrain.model.generate_command import GenerateConfig, build_prompt
from omnitrain.tokenizer.layout import (
    DEFAULT_CHAT_TEMPLATE,
    AudioSegment,
    ChatTemplate,
    ImageSegment,
    SpecialSegment,
    TextSegment,
    TokenLayout,
)

KW = dict(text_vocab_size=300, text_fingerprint="t", text_specials={"bos": 1, "eos": 2, "pad": 3},
          image_codebook_size=37, image_fingerprint="i", audio_codebook_size=11, audio_levels=3,
          audio_fingerprint="a", max_grid=6)  # fmt: skip
LAYOUT = TokenLayout.build(**KW)
# Hashes these layouts had before the chat template was recorded: shards and checkpoints carry them.
KNOWN_HASHES = {"LAYOUT": "5596480d89eeead6", "text_only_300": "6bf20a9f1deb8cbf"}
# A different, valid template: a turn also closes with <eos>.
OTHER = ChatTemplate(name="eos-after-turn", turn=("<role>", "<content>", "end_of_turn", "eos"))


class CharTokenizer:
    """Text ids = 10 + byte value (clear of bos/eos/pad at 1-3), enough for the template engine."""

    def encode(self, s: str) -> list[int]:
        return [10 + b for b in s.encode()]


class GridMedia:
    """A fixed 2x3 image grid and 4 audio frames whatever the field holds."""

    def image_codes(self, value: object) -> np.ndarray:
        return np.arange(6).reshape(2, 3) % 37

    def audio_codes(self, value: object) -> np.ndarray:
        return np.arange(12).reshape(4, 3) % 11


def text(s: str) -> TextSegment:
    return TextSegment(np.asarray(CharTokenizer().encode(s), dtype=np.int64))


def test_default_template_keeps_the_hash_layouts_had_before_it_was_recorded():
    assert LAYOUT.chat_template == DEFAULT_CHAT_TEMPLATE
    assert LAYOUT.hash == KNOWN_HASHES["LAYOUT"]
    assert TokenLayout.build(text_vocab_size=300).hash == KNOWN_HASHES["text_only_300"]


def test_a_layout_json_without_chat_template_loads_as_the_default(tmp_path):
    d = json.loads(LAYOUT.save(tmp_path).read_text())
    assert d["chat_template"] == {"name": "omnitrain-v1", "turn": ["<role>", "<content>", "end_of_turn"],
                                  "roles": ["system", "user", "assistant"]}  # fmt: skip
    del d["chat_template"]  # as written before the field existed
    (tmp_path / "layout.json").write_text(json.dumps(d))
    loaded = TokenLayout.load(tmp_path, expect_hash=KNOWN_HASHES["LAYOUT"])
    assert loaded == LAYOUT and loaded.chat_template == DEFAULT_CHAT_TEMPLATE


def test_another_template_changes_the_hash_and_round_trips(tmp_path):
    other = TokenLayout.build(**KW, chat_template=OTHER)
    assert other.hash != LAYOUT.hash
    assert TokenLayout.build(**KW, chat_template=ChatTemplate(name="renamed")).hash != LAYOUT.hash
    other.save(tmp_path)
    loaded = TokenLayout.load(tmp_path, expect_hash=other.hash)
    assert loaded == other and loaded.chat_template == OTHER
    # editing the recorded template by hand is caught like any other edit
    d = json.loads((tmp_path / "layout.json").read_text())
    d["chat_template"]["turn"] = ["<role>", "<content>"]
    (tmp_path / "layout.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match its content"):
        TokenLayout.load(tmp_path)


@pytest.mark.parametrize("turn", [["<content>", "<role>"], ["<role>", "end_of_turn"], ["<role>", "<content>", "boi"]])
def test_a_malformed_template_is_refused(turn):
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate(name="bad", turn=tuple(turn))


def test_chat_turns_are_exactly_what_the_hard_coded_format_wrote():
    """A mixed-modality conversation: ids and learned spans equal the format of before (role marker, content,
    <end_of_turn>; learned = assistant content + its <end_of_turn>)."""
    enc = SampleEncoder(LAYOUT, CharTokenizer(), GridMedia())
    template = Template("chat", [Part(special="bos", learn=False), Part(chat="messages"), Part(special="eos", learn=False)])
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"text": "what is this?"}, {"image": "x.png"}, {"audio": "x.wav"}]},
        {"role": "assistant", "content": [{"text": "a cat saying"}, {"audio": "y.wav"}]},
        {"role": "user", "content": "draw it"},
        {"role": "assistant", "content": [{"image": "z.png"}]},
    ]
    got = enc.encode(template, {"messages": messages})
    img, aud = ImageSegment(GridMedia().image_codes(None)), AudioSegment(GridMedia().audio_codes(None))
    sp = SpecialSegment
    pieces = [  # (segment, learned) as the hard-coded _chat wrote them
        (sp("bos"), False),
        (sp("system"), False), (text("be brief"), False), (sp("end_of_turn"), False),
        (sp("user"), False), (text("what is this?"), False), (img, False), (aud, False), (sp("end_of_turn"), False),
        (sp("assistant"), False), (text("a cat saying"), True), (aud, True), (sp("end_of_turn"), True),
        (sp("user"), False), (text("draw it"), False), (sp("end_of_turn"), False),
        (sp("assistant"), False), (img, True), (sp("end_of_turn"), True),
        (sp("eos"), False),
    ]  # fmt: skip
    ids = [LAYOUT.serialize([s]) for s, _ in pieces]
    np.testing.assert_array_equal(got.ids, np.concatenate(ids))
    weights = np.concatenate([np.full(len(i), float(learned)) for i, (_, learned) in zip(ids, pieces, strict=True)])
    mask = np.zeros(len(got.ids))
    for a, b in got.learn:
        mask[a:b] = 1
    np.testing.assert_array_equal(mask, weights)
    # learn: false on the chat part learns nothing; an unknown role skips the record
    assert not any(learned for _, learned in enc._chat(messages, learn=False))
    with pytest.raises(SkipSample, match="role 'bot'"):
        enc.encode(template, {"messages": [{"role": "bot", "content": "hi"}]})


def test_the_shard_builder_follows_a_non_default_template():
    layout = TokenLayout.build(**KW, chat_template=OTHER)
    enc = SampleEncoder(layout, CharTokenizer(), GridMedia())
    pieces = enc._chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    sp = SpecialSegment
    assert [(s, learned) for s, learned in pieces] == [
        (sp("user"), False), (text("hi"), False), (sp("end_of_turn"), False), (sp("eos"), False),
        (sp("assistant"), False), (text("yo"), True), (sp("end_of_turn"), True), (sp("eos"), True),
    ]  # fmt: skip
    assert layout.chat_template.stop == "end_of_turn"
    assert ChatTemplate(name="no-end", turn=("<role>", "<content>")).stop == "eos"


def test_the_generation_prompt_ends_with_the_assistant_marker():
    ids = LAYOUT.chat_prompt([("system", [text("be brief")]), ("user", [text("hi")])])
    expected = [LAYOUT.specials["system"], *text("be brief").ids, LAYOUT.specials["end_of_turn"],
                LAYOUT.specials["user"], *text("hi").ids, LAYOUT.specials["end_of_turn"], LAYOUT.specials["assistant"]]  # fmt: skip
    assert ids.tolist() == expected
    assert LAYOUT.chat_prompt([("user", [text("hi")])], add_generation_prompt=False)[-1] == LAYOUT.specials["end_of_turn"]
    with pytest.raises(ValueError, match="role 'bot'"):
        LAYOUT.chat_prompt([("bot", [text("hi")])])


def test_generate_chat_prompt_is_one_user_turn_through_the_layout(tmp_path):
    tok = CharTokenizer()
    plain = build_prompt(GenerateConfig(text="hi"), LAYOUT, tok, None)
    assert plain == [LAYOUT.specials["bos"], *tok.encode("hi")]
    chat = build_prompt(GenerateConfig(text="hi", chat=True, system="be brief"), LAYOUT, tok, None)
    sys_user = LAYOUT.chat_prompt([("system", [text("be brief")]), ("user", [text("hi")])])
    assert chat == [LAYOUT.specials["bos"], *sys_user.tolist()] and chat[-1] == LAYOUT.specials["assistant"]
    with pytest.raises(ValueError, match="chat=true"):
        build_prompt(GenerateConfig(text="hi", system="be brief"), LAYOUT, tok, None)
