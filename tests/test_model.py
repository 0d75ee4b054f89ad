"""The transformer: parity with transformers' Llama, document masking, init, per-modality loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnitrain.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf
from omnitrain.model import ModelConfig, Transformer
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
        # one document per row takes the is_causal fast path and agrees with the masked path
        one = torch.zeros(1, 12, dtype=torch.long)
        assert torch.allclose(model(docs[1][None], one), model(docs[1][None]), atol=1e-6)


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
    assert model.flops_per_token(128) == 6 * model.num_params() + 12 * 2 * 64 * 128
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(dim=30, n_heads=4)


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 1e6, 6e6), ("150m", 8e7, 1.6e8), ("1b", 0.8e9, 1.4e9), ("7b", 5.5e9, 8.5e9)])
def test_model_size_recipes(name, low, high):
    import yaml

    from omnitrain.config import from_dict

    from .conftest import REPO

    cfg = from_dict(ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / f"{name}.yaml").read_text()))
    with torch.device("meta"):  # count parameters without allocating 7B of them
        model = Transformer(cfg)
    assert low < model.num_params(non_embedding=True) < high
