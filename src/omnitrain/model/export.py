"""``omnitrain export``: a run leaves as a Hugging Face model folder that loads without omnitrain.

    omnitrain export run=runs/pretrain out=exports/pretrain [push_to_hub=org/name]

The folder (``out``)::

    config.json model.safetensors generation_config.json   LlamaForCausalLM, or Qwen3ForCausalLM for a QK-norm
                                                           model (omnitrain.model.hf says why Qwen3)
    tokenizer.json tokenizer_config.json                   the text tokenizer + the layout's other ids as added tokens
    layout.json                                            the TokenLayout (image / audio serialization, chat template)
    README.md                                              model card: architecture, layout, data mixture, steps,
                                                           tokens, eval results (results.json files in the run)

The tokenizer: a SentencePiece BPE (``omnitrain tokenizer train-text``) becomes a ``tokenizers`` BPE with the
same pieces, merges ranked by the merged piece's id (SentencePiece merges the highest-scoring pair; its BPE
scores fall with the id), byte fallback, spaces as U+2581 and no dummy prefix (our identity normalisation), so
``AutoTokenizer`` gives SentencePiece's ids. One difference: a literal U+2581 in the text is its three byte
tokens to us and a space piece to the converted tokenizer. A Hugging Face text tokenizer (a run started from a
pretrained LLM) is kept as it is. Every id past the text range gets an added token, in id order: the layout's
specials (``<|boi|>``, ``<|user|>``, ...), image sizes ``<|size_N|>``, image codes ``<|img_C|>`` and audio codes
``<|aud_lL_C|>`` (level L), so ``len(tokenizer)`` is the model's vocabulary and every id decodes and encodes
back. As in any Hugging Face tokenizer, these names typed into text are parsed as the tokens.

``tokenizer("text")`` starts with ``<bos>``, as every document did in training (``add_special_tokens=False``
gives the bare text ids). ``run`` may also be a checkpoint folder (``checkpoints/step_N``) of a single-process or
DDP run; sharded (FSDP / DeepSpeed) checkpoints are consolidated by ``omnitrain train`` at the end of the run.
Only ``model.audio_layout=flat`` models export: delay / depth have no Hugging Face form (``refuse_grouped``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from omnitrain.config import from_dict
from omnitrain.model.hf import export_hf
from omnitrain.model.io import find_model_dir, load_model, read_model_config, resolve_path
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.bundle import TokenizerPaths, recorded_paths
from omnitrain.tokenizer.hf_text import load_text_tokenizer
from omnitrain.tokenizer.layout import CONTENT, ROLE, TokenLayout
from omnitrain.tokenizer.text import TextTokenizer

_META = "\u2581"  # SentencePiece's space


@dataclass
class ExportConfig:
    run: str | None = None  # a run directory, its model/ folder, or a checkpoint folder (run/checkpoints/step_N)
    out: str | None = None  # the folder to write (replaced if it exists)
    tokenizers: TokenizerPaths = field(default_factory=TokenizerPaths)  # text null: the ones the run's shards were built with
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_position_embeddings: int = 8192  # what transformers records as the context length (RoPE has no limit)
    push_to_hub: str | None = None  # a hub repo id (org/name): upload the folder with huggingface_hub after writing it
    private: bool = True  # a new hub repo is private


@dataclass
class Source:
    """What an export reads: the model, its layout, step / tokens, and the run directory (for config.yaml)."""

    model: Transformer
    layout: TokenLayout
    step: int | None
    tokens: int | None
    run_dir: Path | None
    model_dir: Path | None


def read_source(path: str) -> Source:
    """A run directory / model folder (``omnitrain.model.io``) or a training checkpoint folder -> :class:`Source`."""
    root = Path(resolve_path(path))
    folder = find_model_dir(root)
    if folder is not None:
        refuse_grouped(read_model_config(folder), folder)  # before the weights are read
        model, layout = load_model(folder)
        if layout is None:
            raise ValueError(f"{folder} has no layout.json: export needs the token layout the model was trained on")
        meta = json.loads((folder / "config.json").read_text())
        run_dir = root if folder != root else (root.parent if (root.parent / "config.yaml").is_file() else None)  # run/model
        return Source(model, layout, meta.get("step"), meta.get("tokens"), run_dir, folder)
    if (root / "meta.json").is_file() and (root / "state").exists():
        return _read_checkpoint(root)
    if (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{root} is a run without its model/ export (not finished, or export=false): pass one of its "
                                f"checkpoints ({root}/checkpoints/step_N) or finish the run with `omnitrain train`")  # fmt: skip
    raise FileNotFoundError(f"run={path}: not an omnitrain run directory, model folder or checkpoint folder")


def refuse_grouped(cfg: ModelConfig, where: Path) -> None:
    """A Hugging Face Llama / Qwen3 reads one token per position through one output head: a model with
    ``model.audio_layout`` delay (a position sums K level embeddings; K heads) or depth (plus a depth transformer)
    has no such form, and exporting its weights alone would give a model that cannot read or write its audio."""
    if cfg.audio_layout != "flat":
        extra = "level heads" if cfg.audio_layout == "delay" else "depth transformer"
        raise ValueError(f"{where} is a model.audio_layout={cfg.audio_layout} model: Hugging Face LlamaForCausalLM / "
                         f"Qwen3ForCausalLM have one token per position and one output head, no {extra}, so it cannot "
                         "be exported. Use the omnitrain model folder itself (omnitrain eval / generate / init_from read it), "
                         "or train with model.audio_layout=flat for a Hugging Face export")  # fmt: skip


def _read_checkpoint(ckpt: Path) -> Source:
    run_dir = ckpt.parent.parent
    meta = json.loads((ckpt / "meta.json").read_text())
    if (ckpt / "state").is_dir():
        raise ValueError(f"{ckpt} is a sharded (FSDP / DeepSpeed) checkpoint: let `omnitrain train` write the consolidated "
                         f"model (resume the run with run_dir={run_dir}; it exports model/ at the end), then export {run_dir}")  # fmt: skip
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "layout.json").is_file():
        raise FileNotFoundError(f"{ckpt}: its run directory {run_dir} lacks config.yaml or layout.json, which say the model's shape")
    layout = TokenLayout.load(run_dir, expect_hash=meta.get("layout_hash"))
    model_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    if "audio_layout" in meta:  # the checkpoint's own record wins over config.yaml, which the run's latest start wrote
        model_cfg["audio_layout"] = meta["audio_layout"]
    cfg = from_dict(ModelConfig, {**model_cfg, "vocab_size": layout.vocab_size})
    refuse_grouped(cfg, ckpt)
    state = torch.load(ckpt / "state", map_location="cpu", weights_only=False)["model"]
    model = Transformer(cfg, device="meta")
    sd = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{ckpt}: the checkpoint has no weights for {missing[:4]}")
    model.modality_table = torch.as_tensor(layout.modality_of(np.arange(cfg.vocab_size)), dtype=torch.long)
    return Source(model.eval(), layout, meta.get("step"), meta.get("tokens"), run_dir, None)


# --- the tokenizer ---


def token_names(layout: TokenLayout, text_vocab: int) -> list[str]:
    """Names of ids ``text_vocab .. layout.vocab_size - 1``, in id order (the added tokens)."""
    by_id = {i: f"<|{name}|>" for name, i in layout.specials.items()}
    names = []
    for i in range(text_vocab, layout.vocab_size):
        if i in by_id:
            names.append(by_id[i])
        elif layout.size_base <= i < layout.image_base:
            names.append(f"<|size_{i - layout.size_base + 1}|>")
        elif layout.image_base <= i < layout.audio_base:
            names.append(f"<|img_{i - layout.image_base}|>")
        else:
            level, code = divmod(i - layout.audio_base, layout.audio_codebook_size)
            names.append(f"<|aud_l{level}_{code}|>")
    return names


def sentencepiece_to_tokenizers(proto: bytes) -> Any:
    """A SentencePiece BPE model (our exact settings) -> a ``tokenizers.Tokenizer`` giving the same ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers.models import BPE

    from tokenizers import AddedToken, Tokenizer, decoders, normalizers

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    if m.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models convert (omnitrain tokenizer train-text model_type=bpe)")
    if m.normalizer_spec.add_dummy_prefix or m.normalizer_spec.name != "identity":
        raise ValueError("the SentencePiece model normalises text; retrain it with `omnitrain tokenizer train-text`")
    NORMAL, UNKNOWN, CONTROL, USER = 1, 2, 3, 4  # SentencePiece piece types
    pieces = [(p.piece, p.type) for p in m.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = []  # (rank = id of the merged piece, left id, right id, left, right)
    for i, (piece, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next(piece for piece, kind in pieces if kind == UNKNOWN)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", _META)
    tok.decoder = decoders.Sequence([decoders.Replace(_META, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, kind in pieces if kind in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p, kind in pieces if kind == USER])  # "\n"
    return tok


def chat_template_jinja(layout: TokenLayout) -> str:
    """The layout's chat template as transformers' Jinja (text messages): ``<|user|>`` content ``<|end_of_turn|>`` ..."""
    tpl = layout.chat_template

    def items(part: tuple[str, ...], role: str) -> str:
        return "".join("{{ message['content'] }}" if t == CONTENT else (role if t == ROLE else f"<|{t}|>") for t in part)

    turn = items(tpl.turn, "<|{{ message['role'] }}|>")
    opening = items(tpl.turn[: tpl.turn.index(CONTENT)], "<|assistant|>")
    return ("{{ bos_token }}{% for message in messages %}" + turn + "{% endfor %}"
            "{% if add_generation_prompt %}" + opening + "{% endif %}")  # fmt: skip


def hf_tokenizer(text_tok: Any, layout: TokenLayout) -> Any:
    """The text tokenizer (SentencePiece converted, Hugging Face as it is) + the layout's ids as added tokens."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from tokenizers import AddedToken

    if text_tok.vocab_size != layout.text_vocab_size or text_tok.fingerprint != layout.text_fingerprint:
        raise ValueError(f"the text tokenizer {text_tok.source} is not the layout's (fingerprint {text_tok.fingerprint}, the layout "
                         f"has {layout.text_fingerprint}): pass tokenizers.text=<the one the shards were built with>")  # fmt: skip
    sp = layout.specials
    if isinstance(text_tok, TextTokenizer):
        backend = sentencepiece_to_tokenizers(text_tok._proto)
        piece = text_tok.id_to_piece
        bos, eos = piece(sp["bos"]), piece(sp["eos"])
        backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp["bos"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=piece(0),
                                      pad_token=piece(sp["pad"]) if sp["pad"] < layout.text_vocab_size else None)  # fmt: skip
    else:  # a Hugging Face text tokenizer: unchanged, the layout's ids appended
        tok = copy.deepcopy(text_tok._tok)
    names = token_names(layout, len(tok))
    tok.add_tokens([AddedToken(n, normalized=False, special=True) for n in names], special_tokens=True)
    if len(tok) != layout.vocab_size:
        raise ValueError(f"the converted tokenizer has {len(tok)} ids, the layout {layout.vocab_size}")
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(sp["pad"])
    if isinstance(text_tok, TextTokenizer):
        tok.chat_template = chat_template_jinja(layout)
    return tok


# --- the model card ---


def _results(run_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(relative path, omnitrain results.json) of every eval found under the run directory."""
    found = []
    for f in sorted(run_dir.rglob("results.json")) if run_dir else []:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict) and "schema_version" in data:
            found.append((str(f.parent.relative_to(run_dir)), data))
    return found


def model_card(src: Source, arch: str, name: str) -> str:
    """README.md: what the model is, what it was trained on, how it scored, how to load it."""
    c, lay = src.model.cfg, src.layout
    config = yaml.safe_load((src.run_dir / "config.yaml").read_text()) if src.run_dir and (src.run_dir / "config.yaml").is_file() else {}
    lines = ["---", "library_name: transformers", "tags: [omnitrain, multimodal]", "---", f"# {name}", "",
             f"Exported by `omnitrain export` from `{src.run_dir or src.model_dir}`"
             + (f" at step {src.step:,}" if src.step is not None else "") + (f", {src.tokens:,} training tokens" if src.tokens else "") + ".",
             "", "## Architecture", "", "| | |", "|---|---|", f"| transformers class | `{arch}` |",
             f"| parameters | {src.model.num_params(non_embedding=False):,} ({src.model.num_params():,} without the embedding) |",
             f"| layers / dim / FFN | {c.n_layers} / {c.dim} / {c.hidden_dim} |",
             f"| heads / key-value heads / head dim | {c.n_heads} / {c.kv_heads} / {c.head_dim} |",
             f"| QK-norm | {'per-head RMSNorm on q and k before RoPE' if c.qk_norm else 'no'} |",
             f"| RoPE theta / norm eps | {c.rope_theta:g} / {c.norm_eps:g} |", f"| tied embeddings | {c.tie_embeddings} |",
             f"| vocabulary | {c.vocab_size:,} |", "",
             "## Token layout", "", f"`layout.json` (hash `{lay.hash}`): {lay.describe()}.",
             "Ids past the text tokenizer are added tokens: specials `<|boi|>` `<|user|>` ..., image sizes `<|size_N|>`, image codes "
             "`<|img_C|>`, audio codes `<|aud_lL_C|>`. Images are `<|boi|> <|size_h|> <|size_w|>` then rows of codes each ended "
             "by `<|eol|>`, then `<|eoi|>`; audio is `<|boa|>` frames of level-ordered codes `<|eoa|>`. Decoding them to pixels "
             "or sound needs omnitrain's image tokenizer and audio codec.", ""]  # fmt: skip
    data = config.get("data") or {}
    if data.get("sources"):
        lines += ["## Training data", "", "| source | path | weight |", "|---|---|---|"]
        lines += [f"| {k} | `{v.get('path')}` | {v.get('weight', '')} |" for k, v in data["sources"].items()]
        extra = {k: data[k] for k in ("modality_shares", "seq_len", "batch_size") if data.get(k) is not None}
        extra.update({k: config[k] for k in ("steps", "grad_accum") if config.get(k) is not None})
        lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items()), ""]
    evals = _results(src.run_dir)
    if evals:
        lines += ["## Evaluation", "", "| eval | task | metric | value |", "|---|---|---|---|"]
        for where, res in evals:
            for task, t in res["tasks"].items():
                for metric, v in (t.get("metrics") or {}).items():
                    err = f" ± {v['stderr']:.4f}" if isinstance(v.get("stderr"), (int, float)) else ""
                    lines.append(f"| {where} | {task} | {metric} | {v.get('value', float('nan')):.4f}{err} (n={v.get('n')}) |")
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tok = AutoTokenizer.from_pretrained("<this folder>")', 'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
              'ids = tok("The", return_tensors="pt").input_ids  # starts with <bos>, as in training',
              "print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))", "```", ""]  # fmt: skip
    return "\n".join(lines)


# --- the command ---


def export(cfg: ExportConfig) -> Path:
    """Write the Hugging Face folder ``cfg.out`` for ``cfg.run`` (and upload it when ``push_to_hub`` is set)."""
    if not cfg.run or not cfg.out:
        raise ValueError("pass run=<run dir, model folder or checkpoint folder> and out=<folder to write>")
    src = read_source(cfg.run)
    paths = cfg.tokenizers
    if not paths.text:
        paths = recorded_paths(src.model_dir or src.run_dir, src.run_dir)
    text_tok = load_text_tokenizer(paths.text)
    tok = hf_tokenizer(text_tok, src.layout)
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    sp = src.layout.specials
    export_hf(src.model, str(out), cfg.max_position_embeddings, getattr(torch, cfg.dtype),
              bos_token_id=sp["bos"], eos_token_id=sp["eos"], pad_token_id=sp["pad"])  # fmt: skip
    tok.model_max_length = cfg.max_position_embeddings
    tok.save_pretrained(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())  # a class every transformers version knows (v5: an alias)
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    src.layout.save(out / "layout.json")
    arch = "Qwen3ForCausalLM" if src.model.cfg.qk_norm else "LlamaForCausalLM"
    name = cfg.push_to_hub or (src.run_dir or Path(cfg.run)).name
    (out / "README.md").write_text(model_card(src, arch, name))
    print(f"export: {arch} ({src.model.num_params(non_embedding=False):,} parameters, vocab {src.layout.vocab_size:,}), "
          f"tokenizer from {paths.text}, layout {src.layout.hash} -> {out}", flush=True)  # fmt: skip
    if cfg.push_to_hub:
        url = push_to_hub(out, cfg.push_to_hub, cfg.private)
        print(f"export: uploaded to {url}", flush=True)
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created if missing); needs a login (``hf auth login``)."""
    from huggingface_hub import HfApi  # with transformers

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="omnitrain export")
    except Exception as e:  # offline, no token, no rights: the hub client's own message says which
        raise ValueError(f"cannot upload {folder} to {repo_id} ({type(e).__name__}: {e}); log in with `hf auth login`, "
                         "or upload the folder later") from e  # fmt: skip
    return f"https://huggingface.co/{repo_id}"
