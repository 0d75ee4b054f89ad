"""`omnitrain export`: a run as a Hugging Face folder that transformers loads alone, and back (issue 21, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omnitrain.model.export import ExportConfig, export, sentencepiece_to_tokenizers
from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.hf import export_hf, load_hf_llama
from omnitrain.model.io import save_model
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import TextSegment, TokenLayout

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello  world", "def f(x):\n\treturn x  + 1\n\n", "Ünïcödé ☃ 日本語 🙂", "12345 67.8", " leading and trailing  ",
         "mixed\r\nline ends", "Le système de paquets Debian gère les dépendances."]  # fmt: skip


def tiny_model(vocab: int, qk_norm: bool, tie: bool, seed: int = 0) -> Transformer:
    """Random weights, the norms' too (all ones would hide a q/k-norm that is applied in the wrong place)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=qk_norm,
                                    tie_embeddings=tie, rope_theta=10000.0, norm_eps=1e-6))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("qk_norm,tie", [(True, True), (True, False), (False, True), (False, False)])
@torch.no_grad()
def test_exported_logits_greedy_continuation_and_reimport_match_ours(qk_norm, tie, tmp_path):
    ours = tiny_model(300, qk_norm, tie)
    export_hf(ours, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == tie and hf.config.head_dim == 16 and hf.config.num_key_value_heads == 2
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    prompt = ids[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 8:].tolist()
    mine = generate(ours, None, [prompt[0].tolist()], SamplingConfig(max_new_tokens=16, greedy=True, constrain=False)).tokens[0]
    assert theirs == mine
    back, hf_cfg = load_hf_llama(str(tmp_path))
    assert back.cfg.qk_norm == qk_norm and back.cfg.tie_embeddings == tie and back.cfg.rope_theta == 10000.0
    assert (back(ids) - ours(ids)).abs().max() < 1e-6


def _write_run(root: Path, text_tok_dir: Path, qk_norm: bool = True) -> tuple[Path, Transformer, TokenLayout]:
    """A finished run as `omnitrain train` leaves it: config.yaml, layout.json, model/, an eval's results.json."""
    from omnitrain.tokenizer.text import TextTokenizer

    sp = TextTokenizer.load(text_tok_dir)
    layout = TokenLayout.build(sp.vocab_size, sp.fingerprint, sp.special_ids, image_codebook_size=32, audio_codebook_size=16,
                               audio_levels=2, max_grid=8)  # fmt: skip
    run = root / "run"
    layout.save(run / "layout.json")
    model = tiny_model(layout.vocab_size, qk_norm, tie=True)
    model_cfg = {k: v for k, v in vars(model.cfg).items() if k != "vocab_size"}
    config = {"model": model_cfg, "steps": 40, "data": {"sources": {"text_lm": {"path": "runs/shards/text", "weight": 0.7},
              "caption": {"path": "runs/shards/caption", "weight": 0.3}}, "seq_len": 128, "batch_size": 4}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_model(model, run / "model", run, {"step": 40, "tokens": 20480})
    results = {"schema_version": 1, "model": {}, "config": {}, "tasks": {"mmlu": {"metrics": {"acc": {"value": 0.27, "stderr": 0.01, "n": 100}}}}}
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(results))
    return run, model, layout


@pytest.fixture(scope="module")
def exported(tmp_path_factory, text_tokenizer_dir):
    from omnitrain.cli import main

    root = tmp_path_factory.mktemp("export")
    run, model, layout = _write_run(root, text_tokenizer_dir)
    out = root / "hf"
    assert main(["export", f"run={run}", f"out={out}", f"tokenizers.text={text_tokenizer_dir}"]) == 0
    return run, model, layout, out


def test_the_cli_writes_model_tokenizer_layout_and_a_model_card(exported):
    run, model, layout, out = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "layout.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert TokenLayout.load(out).hash == layout.hash
    card = (out / "README.md").read_text()
    for want in ("Qwen3ForCausalLM", "at step 40, 20,480 training tokens", "per-head RMSNorm", "| text_lm | `runs/shards/text` | 0.7 |",
                 "seq_len: 128", "| eval | mmlu | acc | 0.2700 ± 0.0100 (n=100) |", layout.hash):  # fmt: skip
        assert want in card, want
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.vocab_size == layout.vocab_size and hf.generation_config.eos_token_id == layout.specials["eos"]


def test_autotokenizer_encodes_like_our_sentencepiece_and_every_layout_id_round_trips(exported, text_tokenizer):
    _, _, layout, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == layout.vocab_size
    for text in TEXTS:
        ids = text_tokenizer.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == ids, text
        assert tok(text).input_ids == [layout.specials["bos"]] + ids  # documents start with <bos>, as in training
        assert tok.decode(ids) == text
    beyond = list(range(layout.text_vocab_size, layout.vocab_size))  # specials, sizes, image and audio codes
    names = tok.convert_ids_to_tokens(beyond)
    assert names[:2] == ["<|boi|>", "<|eoi|>"] and "<|img_31|>" in names and names[-1] == "<|aud_l1_15|>"
    assert tok("".join(names), add_special_tokens=False).input_ids == beyond
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    prompt = layout.chat_prompt([("user", [TextSegment(text_tokenizer.encode("Hi"))])])  # our chat template, as ids
    assert list(chat) == [layout.specials["bos"], *prompt.tolist()]


@torch.no_grad()
def test_the_exported_run_reimports_with_the_same_logits(exported):
    _, model, layout, out = exported
    back, _ = load_hf_llama(str(out))
    ids = torch.randint(0, layout.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    assert back.cfg.qk_norm and (back(ids) - model(ids)).abs().max() < 1e-6


@torch.no_grad()
def test_a_checkpoint_folder_exports_like_the_model_folder(tmp_path, text_tokenizer_dir):
    run, model, layout = _write_run(tmp_path, text_tokenizer_dir, qk_norm=False)
    ckpt = run / "checkpoints" / "step_000000040"
    ckpt.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 40, "tokens": 20480}, ckpt / "state")
    (ckpt / "meta.json").write_text(json.dumps({"schema_version": 2, "step": 40, "tokens": 20480, "layout_hash": layout.hash}))
    out = export(ExportConfig(run=str(ckpt), out=str(tmp_path / "hf"), tokenizers=TokenizerPaths(text=str(text_tokenizer_dir))))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, layout.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    assert type(hf).__name__ == "LlamaForCausalLM" and (hf(ids).logits - model(ids)).abs().max() < 1e-4
    assert "at step 40" in (out / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="not an omnitrain run directory, model folder or checkpoint"):
        export(ExportConfig(run=str(tmp_path / "nothing"), out=str(tmp_path / "x")))


@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_a_delay_or_depth_model_is_refused_before_anything_is_written(tmp_path, text_tokenizer_dir, audio_layout):
    """Hugging Face Llama / Qwen3 have one output head and no depth transformer (issue 23): a grouped model folder,
    and a checkpoint whose meta.json records a grouped layout (also when the run's config.yaml says flat), are
    refused with what to do instead, and no output folder appears."""
    run, _, layout = _write_run(tmp_path, text_tokenizer_dir, qk_norm=False)
    grouped = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout))
    save_model(grouped, run / "model", run, {"step": 40, "tokens": 20480})
    paths = TokenizerPaths(text=str(text_tokenizer_dir))
    refused = f"model.audio_layout={audio_layout} model: Hugging Face LlamaForCausalLM / Qwen3ForCausalLM have one token"
    for source in (run, run / "model"):
        with pytest.raises(ValueError, match=refused):
            export(ExportConfig(run=str(source), out=str(tmp_path / "hf"), tokenizers=paths))
    assert not (tmp_path / "hf").exists()
    ckpt = run / "checkpoints" / "step_000000040"  # config.yaml (the run's latest start) says flat; the checkpoint says not
    ckpt.mkdir(parents=True)
    torch.save({"model": grouped.state_dict(), "optimizer": {}, "step": 40}, ckpt / "state")
    meta = {"schema_version": 2, "step": 40, "world_size": 1, "layout_hash": layout.hash, "audio_layout": audio_layout}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=refused):
        export(ExportConfig(run=str(ckpt), out=str(tmp_path / "hf"), tokenizers=paths))
    assert not (tmp_path / "hf").exists()


def test_a_hugging_face_text_tokenizer_passes_through_with_the_layout_ids_added(tmp_path, text_tokenizer):
    from omnitrain.tokenizer.hf_text import HFTextTokenizer

    text_dir = tmp_path / "hf_text"  # a Hugging Face tokenizer (e.g. a pretrained LLM's): ours, converted
    transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_to_tokenizers(text_tokenizer._proto), eos_token="</s>",
                                         bos_token="<s>").save_pretrained(text_dir)  # fmt: skip
    hf_text = HFTextTokenizer.load(text_dir)
    layout = TokenLayout.from_tokenizers(hf_text, max_grid=4)
    model = tiny_model(layout.vocab_size, qk_norm=True, tie=False)
    save_model(model, tmp_path / "model", None, {"step": 1})
    layout.save(tmp_path / "model" / "layout.json")
    out = export(ExportConfig(run=str(tmp_path / "model"), out=str(tmp_path / "hf"), tokenizers=TokenizerPaths(text=str(text_dir))))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == layout.vocab_size and tok.convert_ids_to_tokens(layout.vocab_size - 1) == "<|size_4|>"
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == hf_text.encode(text)


def test_push_to_hub_uploads_the_written_folder_through_huggingface_hub(tmp_path, text_tokenizer_dir, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # the hub is never contacted in tests
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run, _, _ = _write_run(tmp_path, text_tokenizer_dir)
    out = export(ExportConfig(run=str(run), out=str(tmp_path / "hf"), tokenizers=TokenizerPaths(text=str(text_tokenizer_dir)),
                              push_to_hub="someone/tiny-omni"))  # fmt: skip
    assert calls == [("create_repo", "someone/tiny-omni", {"private": True, "exist_ok": True}),
                     ("upload_folder", "someone/tiny-omni", str(out))]  # fmt: skip
    assert (out / "README.md").read_text().count("# someone/tiny-omni") == 1
