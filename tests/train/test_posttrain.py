"""Post-training recipes on a tiny Hugging Face Llama and a byte-level BPE: continued pretraining
(vocabulary extension keeps the text logits, freeze warm-up, held-out losses), SFT (loss only on
assistant tokens, whole conversations per row) and DPO (the margin rises, the reference is untouched; with the
delay / depth audio layouts, every audio level scored); every output loads into generate and exports to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.cli import COMMANDS, compose, main, recipes_dir
from omnitrain.config import from_dict
from omnitrain.data.loader import OmniLoader
from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
from omnitrain.data.pipeline.media import MediaConfig
from omnitrain.model import io as model_io
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import TokenLayout
from omnitrain.train.loop import train
from omnitrain.train.runlog import read_metrics
from tests.tokenizer.test_hf_text import make_hf_tokenizer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
TRAIN = next(c for c in COMMANDS if c.name == "train")
SKIMAGE = Path(__import__("skimage").__file__).parent / "data"
WORDS = "red green blue cat dog bird one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny pretrained 'LLM' (random Llama in a HF folder with its byte-level BPE), random media
    tokenizers, and text / chat / preference shard sets built through the data pipelines with them."""
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.audio_io import write_wav
    from omnitrain.tokenizer.image import ImageTokenizerConfig, VQImageTokenizer

    root = tmp_path_factory.mktemp("posttrain")
    llm = make_hf_tokenizer(root / "llm")
    tok = transformers.AutoTokenizer.from_pretrained(llm)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(llm)
    VQImageTokenizer(ImageTokenizerConfig(codebook_size=64, base_channels=8, max_channels=16)).save(root / "image.pt")
    RVQAudioCodec(AudioCodecConfig(channels=8, latent_dim=16, n_levels=2, codebook_size=32)).eval().save(root / "audio.pt")
    data = root / "data"
    data.mkdir()
    for name in ("coffee", "chelsea"):
        (data / f"{name}.png").write_bytes((SKIMAGE / f"{name}.png").read_bytes())
    t = np.arange(8000) / 16000
    for i in range(2):
        write_wav(data / f"s{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32), 16000)
    rng = np.random.default_rng(0)
    say = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    texts = [{"text": say(30)} for _ in range(24)]
    chats = [{"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": [{"text": say(3)}, {"image": "coffee.png"}]},
                           {"role": "assistant", "content": [{"text": say(int(rng.integers(1, 6)))}, {"audio": f"s{i % 2}.wav"}]},
                           {"role": "user", "content": [{"audio": "s1.wav"}, {"text": say(2)}]},
                           {"role": "assistant", "content": [{"image": "chelsea.png"}, {"text": say(int(rng.integers(1, 9)))}]}]}
             for i in range(24)]  # fmt: skip
    prefs = [{"prompt": [{"role": "user", "content": [{"text": f"pick {say(2)}"}, {"image": "coffee.png"}]}],
              "chosen": [{"role": "assistant", "content": "red cat"}],
              "rejected": [{"role": "assistant", "content": [{"text": say(2)}, {"audio": "s0.wav"}]}]} for _ in range(16)]  # fmt: skip
    shards = {}
    for name, rows, template in (("text", texts, "text_lm"), ("chat", chats, "chat"), ("pref", prefs, "preference")):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_shards(BuildConfig(
            pipeline=from_dict(PipelineConfig, {"name": name, "template": template,
                                                "source": {"kind": "records", "paths": [str(data / f"{name}.jsonl")]}}),
            tokenizers=TokenizerPaths(text=llm, image=str(root / "image.pt"), audio=str(root / "audio.pt"), max_grid=8),
            media=MediaConfig(image_size=32, max_audio_seconds=1.0), out_dir=root / "shards" / name,
            templates_dir=REPO / "data_pipelines" / "template", shard_samples=4))  # fmt: skip
        shards[name] = root / "shards" / name
    return {"llm": llm, "root": root, **shards}


def overrides(world: dict[str, Path], run_dir: Path, experiment: str, sources: dict[str, Path], *extra: str) -> list[str]:
    """Every run here starts from the tiny LLM (hf_init): model=hf, its architecture is the checkpoint's."""
    srcs = ",".join(f"{k}:{{path:'{v}'}}" for k, v in sources.items())
    return [f"experiment={experiment}", "model=hf", f"run_dir={run_dir}", "threads=1", "wandb.mode=disabled", "ckpt_every=100",
            "data.batch_size=2", "data.seq_len=128", "~data.sources", f"+data.sources={{{srcs}}}", *extra]  # fmt: skip


def run(world: dict[str, Path], run_dir: Path, experiment: str, sources: dict[str, Path], *extra: str) -> dict:
    cfg, plain = compose(TRAIN, overrides(world, run_dir, experiment, sources, *extra), recipes_dir())
    return train(cfg, plain)


def check_outputs_load(run_dir: Path, tmp_path: Path) -> None:
    """model/ loads back, generates through `omnitrain generate` (tokenizers from the manifest) and exports."""
    from omnitrain.model.hf import export_hf

    model, layout = model_io.load_model(run_dir)
    assert layout is not None and layout.hash == TokenLayout.load(run_dir).hash
    assert main(["generate", f"run={run_dir}", "text=red", "sampling.max_new_tokens=4", f"out_dir={tmp_path / 'gen'}"]) == 0
    assert json.loads((tmp_path / "gen" / "result.json").read_text())["samples"][0]["new_tokens"] >= 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, str(tmp_path / "hf")))
    ids = torch.tensor([[1, 40, 41, 42]])
    assert (hf(ids).logits - model(ids)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- continued pretraining
@torch.no_grad()
def test_vocabulary_extension_keeps_the_pretrained_text_logits(world):
    from omnitrain.model.hf import extend_vocabulary, load_hf_llama

    hf = transformers.AutoModelForCausalLM.from_pretrained(world["llm"], dtype=torch.float32).eval()
    layout = TokenLayout.load(world["text"])
    ours, _ = load_hf_llama(str(world["llm"]))
    V = ours.cfg.vocab_size
    grown = extend_vocabulary(ours, layout.vocab_size)
    assert grown.cfg.vocab_size == layout.vocab_size > V
    ids = torch.randint(3, V, (2, 40), generator=torch.Generator().manual_seed(0))  # text-only inputs
    diff = (grown(ids)[..., :V] - hf(ids).logits).abs().max()
    assert diff < 1e-5, diff


def test_continued_pretraining_trains_only_the_new_rows_in_the_warmup_then_everything(world, tmp_path):
    from omnitrain.model.hf import extend_vocabulary, load_hf_llama

    layout = TokenLayout.load(world["text"])
    start, _ = load_hf_llama(str(world["llm"]))
    V = start.cfg.vocab_size
    start = extend_vocabulary(start, layout.vocab_size).state_dict()
    srcs = {"text": world["text"], "chat": world["chat"]}
    common = [f"hf_init.path={world['llm']}", "hf_init.gguf_file=null", "optim.lr=1e-2", "optim.warmup_steps=1", "data.modality_shares=null",
              "~val.sources", f"+val.sources={{text:{{path:'{world['text']}'}}}}", "val.batches=1", "val.every=0"]  # fmt: skip
    run(world, tmp_path / "frozen", "continue_pretrain", srcs, "steps=3", "freeze_warmup_steps=3", *common)
    frozen = model_io.load_model(tmp_path / "frozen")[0].state_dict()
    for name, w in frozen.items():
        if name == "tok_embeddings.weight":
            assert torch.equal(w[:V], start[name][:V]) and not torch.equal(w[V:], start[name][V:])
        elif name != "output.weight":
            assert torch.equal(w, start[name]), name  # bit for bit: nothing but the new rows learned
    run(world, tmp_path / "thawed", "continue_pretrain", srcs, "steps=3", "freeze_warmup_steps=1", *common)
    thawed = model_io.load_model(tmp_path / "thawed")[0].state_dict()
    assert not torch.equal(thawed["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    assert not torch.equal(thawed["tok_embeddings.weight"][:V], start["tok_embeddings.weight"][:V])
    rows = read_metrics(tmp_path / "thawed")
    assert rows[0]["step"] == 0 and "val/text/loss/text" in rows[0]  # held-out loss before training
    assert "val/text/loss/text" in rows[-1] and [r["frozen"] for r in rows[1:]] == [1, 0, 0]
    check_outputs_load(tmp_path / "thawed", tmp_path)


def test_architecture_settings_the_checkpoint_contradicts_are_refused(world, tmp_path):
    from omnitrain.model.transformer import ModelConfig
    from omnitrain.train.objectives import HFInitConfig, init_from_hf

    layout = TokenLayout.load(world["text"])
    hf = HFInitConfig(path=str(world["llm"]))
    model, _ = init_from_hf(hf, ModelConfig(z_loss=1e-4), layout)  # nothing set: the checkpoint's architecture
    assert (model.cfg.dim, model.cfg.kv_heads, model.cfg.hidden_dim, model.cfg.z_loss) == (64, 2, 128, 1e-4)
    init_from_hf(hf, ModelConfig(dim=64, n_layers=2, n_kv_heads=2, ffn_dim=128), layout)  # set, and agreeing
    with pytest.raises(ValueError) as err:
        init_from_hf(hf, ModelConfig(dim=128, qk_norm=True, rope_theta=10000.0), layout)
    msg = str(err.value)
    assert "model.dim=128 (the checkpoint's dim: 64)" in msg and "model.qk_norm=True" in msg and "model=hf" in msg
    assert "rope_theta" not in msg  # the checkpoint's is 10000 too
    # the shipped recipe takes the checkpoint's architecture; a size recipe with it is refused before training
    cfg, _ = compose(TRAIN, ["experiment=continue_pretrain"], recipes_dir())
    assert cfg.model == from_dict(type(cfg.model), {"z_loss": 0.0, "activation_checkpointing": False})
    size = [o if o != "model=hf" else "model=1b" for o in overrides(world, tmp_path / "1b", "continue_pretrain", {"text": world["text"]},
            f"hf_init.path={world['llm']}", "hf_init.gguf_file=null", "freeze_warmup_steps=0")]  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.dim=2048 .*model\.qk_norm=True"):
        train(compose(TRAIN, size, recipes_dir())[0])
    assert not (tmp_path / "1b").exists()


def test_freeze_warmup_needs_a_pretrained_model():
    with pytest.raises(Exception, match="hf_init.path"):
        compose(TRAIN, ["experiment=continue_pretrain", "hf_init.path=null", "freeze_warmup_steps=2"], recipes_dir())


# ----------------------------------------------------------------------------- SFT
def test_sft_weights_are_one_exactly_on_assistant_tokens_and_rows_hold_whole_conversations(world):
    cfg, _ = compose(TRAIN, overrides(world, Path("unused"), "sft", {"chat": world["chat"]}, "data.seq_len=512"), recipes_dir())
    assert cfg.data.split_documents is False
    layout = TokenLayout.load(world["chat"])
    sp = layout.specials
    whole = {tuple(s.ids.tolist()) for name in sorted(p.name for p in world["chat"].glob("*.tar"))
             for s in __import__("omnitrain.data.shards", fromlist=["iter_shard"]).iter_shard(world["chat"] / name)}  # fmt: skip
    loader = OmniLoader(cfg.data)
    seen_mods: set[int] = set()
    for _ in range(6):
        b = loader.__next__()
        for r in range(b["input_ids"].shape[0]):
            docs, ids = b["doc_ids"][r].numpy(), b["input_ids"][r].numpy()
            full = np.append(ids, b["targets"][r, -1].item())  # the row's T+1 tokens
            for d in set(docs[docs >= 0].tolist()):
                pos = np.flatnonzero(docs == d)
                conv = full[pos]
                if tuple(conv.tolist()) not in whole and pos[-1] == len(docs) - 1:
                    conv = full[pos[0] :]  # its last token is the row's last target
                assert tuple(conv.tolist()) in whole  # a whole conversation, never cut
                # expected weight of each target: 1 inside an assistant turn (content + <end_of_turn>), else 0
                expect, inside = np.zeros(len(conv) - 1, dtype=np.float32), False
                for t in range(1, len(conv)):
                    tok = int(conv[t])
                    if tok in (sp["system"], sp["user"], sp["assistant"]):
                        inside = tok == sp["assistant"]
                        continue
                    expect[t - 1] = 1.0 if inside else 0.0
                    if tok == sp["end_of_turn"]:
                        inside = False
                got = b["loss_weights"][r, pos[0] : pos[0] + len(conv) - 1].numpy()
                assert np.array_equal(got, expect)
                seen_mods |= set(layout.modality_of(conv[1:][expect == 1]).tolist())
            assert (b["loss_weights"][r][docs < 0] == 0).all()  # padding
    assert seen_mods == {0, 1, 2}  # learned assistant tokens of every modality


def test_sft_recipe_trains_and_its_output_loads(world, tmp_path):
    out = run(world, tmp_path / "sft", "sft", {"chat": world["chat"]}, "steps=4", f"hf_init.path={world['llm']}",
              "hf_init.gguf_file=null", "data.seq_len=512")  # fmt: skip
    assert out["step"] == 4
    check_outputs_load(tmp_path / "sft", tmp_path)


# ----------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("reference", ["on_the_fly", "precomputed"])
def test_dpo_raises_the_margin_and_leaves_the_reference_untouched(world, tmp_path, monkeypatch, reference):
    import omnitrain.train.dpo as train_mod

    made = []
    original = train_mod.DPOObjective.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(train_mod.DPOObjective, "__init__", spy)
    run_dir = tmp_path / "dpo"
    run(world, run_dir, "dpo", {"pref": world["pref"]}, "steps=12", "log_every=1", "grad_accum=1", f"hf_init.path={world['llm']}", "hf_init.gguf_file=null",
        f"dpo.reference={reference}", "optim.lr=1e-3", "optim.warmup_steps=1", "dpo.beta=0.5", "dpo.label_smoothing=0.05",
        "~val.sources", f"+val.sources={{pref:{{path:'{world['pref']}'}}}}", "val.batches=4")  # fmt: skip
    rows = read_metrics(run_dir)
    before, after = rows[0], rows[-1]
    assert abs(before["val/pref/rewards/margin"]) < 1e-3  # policy == reference before training
    assert abs(rows[1]["rewards/margin"]) < 1e-3 and rows[1]["loss"] == pytest.approx(np.log(2), abs=1e-3)
    assert after["val/pref/rewards/margin"] > 0.5 and after["val/pref/rewards/accuracy"] > 0.9
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen"} <= set(after)
    from omnitrain.model.hf import extend_vocabulary, load_hf_llama

    start, _ = load_hf_llama(str(world["llm"]))
    start = extend_vocabulary(start, TokenLayout.load(world["pref"]).vocab_size).state_dict()
    if reference == "on_the_fly":
        ref = made[0].reference.state_dict()
        assert all(torch.equal(ref[k], start[k]) for k in start)  # the frozen reference, bit for bit
    else:
        table = json.loads((run_dir / "reference_logps.json").read_text())
        assert table["pairs"] == 16 and made[0].reference is None
    trained = model_io.load_model(run_dir)[0].state_dict()
    assert not torch.equal(trained["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    check_outputs_load(run_dir, tmp_path)


@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_grouped_pairs_are_scored_on_every_audio_level_as_the_training_loss_scores_them(world, audio_layout):
    """DPO with model.audio_layout delay / depth: each row regrouped as the LM loader does, and its log-likelihood
    (``forward(per_row=True)``) is minus the fused training loss of that row alone, every level included."""
    from omnitrain.data.loader import LoaderConfig, SourceSpec
    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.train.dpo import PreferenceLoader

    layout = TokenLayout.load(world["pref"])
    b = next(PreferenceLoader(LoaderConfig(sources={"pref": SourceSpec(str(world["pref"]))}, seq_len=128, batch_size=2,
                                           audio_layout=audio_layout)))  # fmt: skip
    assert b["input_ids"].shape == (4, 128, 2) and b["loss_weights"].shape == (4, 128, 2)
    learned_levels = (b["loss_weights"][..., 1] > 0).sum(-1)  # [R]: the rejected answers speak, the chosen do not
    assert learned_levels[1::2].min() > 0 and learned_levels[0::2].max() == 0
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=1, n_heads=4, audio_layout=audio_layout))
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    logps = model(b["input_ids"], b["doc_ids"], b["targets"], b["loss_weights"], per_row=True)  # [R]
    for r in range(4):
        alone = torch.zeros_like(b["loss_weights"])
        alone[r] = b["loss_weights"][r]
        loss, _ = model(b["input_ids"], b["doc_ids"], b["targets"], alone, 1.0)  # sum of weighted CE, every channel
        assert float(logps[r].detach()) == pytest.approx(-float(loss.detach()), rel=1e-5)
    logps[1::2].sum().backward()  # the rejected rows' levels reach the level heads / the depth transformer
    if audio_layout == "depth":  # K = 2: one depth step attending to itself, so its query / key weights get no gradient
        one_step = (".wq.", ".wk.", ".q_norm.", ".k_norm.")
        reached = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.depth.named_parameters()}
        assert all(v for n, v in reached.items() if not any(k in n for k in one_step)), reached
    with pytest.raises(ValueError, match="per_row=True scores the"):
        Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=1, n_heads=4))(
            b["input_ids"][..., 0], b["doc_ids"], b["targets"][..., 0], b["loss_weights"][..., 0], per_row=True)


@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_dpo_trains_a_grouped_model_from_the_reference_it_precomputed(world, tmp_path, audio_layout):
    """The precomputed reference scores the grouped pairs as the policy does at the start: rewards 0 and loss log 2 at
    the first step; audio level targets are counted; the run exports and resumes like any other."""
    run_dir = tmp_path / "dpo"
    extra = ("log_every=1", "grad_accum=1", f"hf_init.path={world['llm']}", "hf_init.gguf_file=null", "dpo.reference=precomputed",
             "optim.lr=1e-3", "optim.warmup_steps=1", f"model.audio_layout={audio_layout}", "ckpt_every=2", "~val.sources")  # fmt: skip
    run(world, run_dir, "dpo", {"pref": world["pref"]}, "steps=4", *extra)
    rows = read_metrics(run_dir)
    assert abs(rows[0]["rewards/margin"]) < 1e-4 and rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert rows[0]["tokens_per_s/audio"] > 0 and all(r["loss"] == r["loss"] for r in rows)
    assert json.loads((run_dir / "reference_logps.json").read_text())["pairs"] == 16
    assert model_io.load_model(run_dir)[0].cfg.audio_layout == audio_layout
    run(world, tmp_path / "cut", "dpo", {"pref": world["pref"]}, "steps=2", *extra)  # stopped at step 2, then resumed
    run(world, tmp_path / "cut", "dpo", {"pref": world["pref"]}, "steps=4", *extra)
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [r["loss"] for r in rows]


def test_dpo_loader_pairs_chosen_and_rejected_with_the_same_prompt(world):
    from omnitrain.data.loader import LoaderConfig, SourceSpec
    from omnitrain.train.dpo import PreferenceLoader

    b = next(PreferenceLoader(LoaderConfig(sources={"pref": SourceSpec(str(world["pref"]))}, seq_len=128, batch_size=3)))
    assert b["input_ids"].shape == (6, 128)
    for p in range(3):
        c, r = b["input_ids"][2 * p], b["input_ids"][2 * p + 1]
        wc, wr = b["loss_weights"][2 * p], b["loss_weights"][2 * p + 1]
        first = int(torch.nonzero(wc)[0]) + 1  # the first learned target: where the answers begin
        assert torch.equal(c[:first], r[:first]) and wr[: first - 1].sum() == 0  # the same prompt, never learned
        assert wc.sum() > 0 and wr.sum() > 0
