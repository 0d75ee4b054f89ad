"""Weights between omnitrain's Transformer and Hugging Face Llama (``LlamaForCausalLM``).

Both use RoPE's half-split convention, so the mapping is a renaming, no permutation. The full
import (vocabulary extension, GGUF) and export of a checkpoint folder build on these (issue 6).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from omnitrain.model import ModelConfig

_NAMES = [  # (hugging face, omnitrain); {i} is a layer index
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attention.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attention.k_norm.weight"),
]


def _rename(name: str, src: int) -> str | None:
    for pair in _NAMES:
        pattern = "^" + re.escape(pair[src]).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
        m = re.match(pattern, name)
        if m:
            return pair[1 - src].format(**m.groupdict())
    return None


def config_from_hf(hf: Any) -> ModelConfig:
    """A ``transformers.LlamaConfig`` -> ModelConfig (errors on options omnitrain does not model)."""
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported yet; use a checkpoint with plain RoPE")
    theta = rope.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, ffn_dim=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(hf.tie_word_embeddings),
    )  # fmt: skip


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama parameter names -> omnitrain's (``rotary_emb`` buffers are dropped)."""
    out = {}
    for name, t in sd.items():
        new = _rename(name, 0)
        if new is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"unexpected Hugging Face parameter {name}; is this a Llama-architecture checkpoint?")
        out[new] = t
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """omnitrain parameter names -> Hugging Face Llama's."""
    out = {}
    for name, t in sd.items():
        new = _rename(name, 1)
        if new is None:
            raise ValueError(f"no Hugging Face name for omnitrain parameter {name}")
        out[new] = t
    return out
