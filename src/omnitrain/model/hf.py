"""Weights between omnitrain's Transformer and Hugging Face: ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with QK-norm.

Both use RoPE's half-split convention, so the mapping is a renaming, no permutation. A model with
``qk_norm`` is a Qwen3 to transformers: Qwen3 has exactly our per-head RMSNorm on queries and keys
(weights [Dh], applied to each head before RoPE, the same eps as the other norms), no attention bias
(``attention_bias=False``), no sliding window (``use_sliding_window=False``) and an explicit ``head_dim``.
OLMo2's QK-norm would not fit: it normalises the whole [H*Dh] projection at once. The full import
(vocabulary extension, GGUF) and the export of a run (``omnitrain.model.export``) build on these.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from omnitrain.model.transformer import ModelConfig, Transformer

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


HF_MODEL_TYPES = ("llama", "qwen3")  # what config_from_hf reads: qwen3 is a Llama with per-head QK-norm


def config_from_hf(hf: Any) -> ModelConfig:
    """A ``transformers.LlamaConfig`` or ``Qwen3Config`` -> ModelConfig (errors on options omnitrain does not model)."""
    if hf.model_type not in HF_MODEL_TYPES:
        raise ValueError(f"a {hf.model_type!r} model: omnitrain imports {' and '.join(HF_MODEL_TYPES)} checkpoints")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError(f"{hf.model_type} checkpoints with attention/MLP biases are not supported")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("a Qwen3 checkpoint with use_sliding_window=true: omnitrain attends over the whole context")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        raise ValueError(f"head_dim={head_dim} is not hidden_size / num_attention_heads ({hf.hidden_size}/{hf.num_attention_heads}): "
                         "omnitrain's heads split the model dimension")  # fmt: skip
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported yet; use a checkpoint with plain RoPE")
    theta = rope.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, ffn_dim=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(hf.tie_word_embeddings), qk_norm=hf.model_type == "qwen3",
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
    return {hf_name(name): t for name, t in sd.items()}


def load_hf_llama(name_or_path: str, gguf_file: str | None = None) -> tuple[Transformer, Any]:
    """A Llama-architecture checkpoint, or a Qwen3 (e.g. an ``omnitrain export`` of a QK-norm model): a folder, a
    hub id when online, or a GGUF file inside a folder via ``gguf_file`` (de-quantised to fp32 by transformers)
    -> (omnitrain Transformer, HF config)."""
    from transformers import AutoModelForCausalLM  # transformers: optional (the hf extra), ~0.6 s to import

    try:
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {name_or_path!r}{f' ({gguf_file})' if gguf_file else ''} with transformers: {e}") from e
    if hf.config.model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{name_or_path} is a {hf.config.model_type!r} model; omnitrain imports {' and '.join(HF_MODEL_TYPES)} checkpoints")
    model = Transformer(config_from_hf(hf.config))
    missing, unexpected = model.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    if unexpected or set(missing) - ({"output.weight"} if model.cfg.tie_embeddings else set()):
        raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval(), hf.config


@torch.no_grad()
def extend_vocabulary(model: Transformer, vocab_size: int, seed: int = 0) -> Transformer:
    """Grow the embedding (and output) matrix to ``vocab_size`` rows for a layout's image/audio ranges.

    New rows are drawn from N(mean, diag(var)) of the existing rows, shrunk towards the mean by a
    factor 0.1: near the mean, new ids start with logits close to the average text token's, so the
    model's text predictions barely move before it learns them (Hewitt 2021, "Initializing New Word
    Embeddings"). The original rows are kept bit for bit, so the logits of the original ids stay the
    same (up to the float rounding of a larger matmul, ~1e-5).
    """
    old = model.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the model's {old}")
    if vocab_size == old:
        return model
    gen = torch.Generator().manual_seed(seed)

    def grow(w: torch.Tensor) -> torch.Tensor:
        return grow_rows(w, vocab_size, gen)

    emb = grow(model.tok_embeddings.weight.data)
    model.tok_embeddings = torch.nn.Embedding(vocab_size, model.cfg.dim, _weight=emb)
    if model.cfg.tie_embeddings:
        model.output = torch.nn.Linear(model.cfg.dim, vocab_size, bias=False)
        model.output.weight = model.tok_embeddings.weight
    else:
        out = grow(model.output.weight.data)
        model.output = torch.nn.Linear(model.cfg.dim, vocab_size, bias=False)
        model.output.weight.data.copy_(out)
    model.cfg.vocab_size = vocab_size
    model.modality_table = torch.zeros(vocab_size, dtype=torch.long)
    return model


def grow_rows(w: torch.Tensor, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    """``w`` [V_old, D] with ``vocab_size - V_old`` rows appended, drawn as ``extend_vocabulary`` says (from ``gen``)."""
    mean, std = w.mean(0), w.std(0)
    new = mean + 0.1 * std * torch.randn(vocab_size - w.shape[0], w.shape[1], generator=gen, dtype=w.dtype)
    return torch.cat([w, new])


def hf_name(name: str) -> str:
    """An omnitrain parameter name -> Hugging Face Llama's."""
    new = _rename(name, 1)
    if new is None:
        raise ValueError(f"no Hugging Face name for omnitrain parameter {name}")
    return new


def hf_config(cfg: ModelConfig, max_position_embeddings: int = 8192, **token_ids: int | None) -> Any:
    """The transformers config of our architecture: ``Qwen3Config`` with QK-norm, else ``LlamaConfig``.
    ``token_ids``: bos_token_id / eos_token_id / pad_token_id, recorded for generate()."""
    import transformers  # transformers: optional (the hf extra), ~0.6 s

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=max_position_embeddings,
        attention_bias=False, hidden_act="silu", **token_ids,
    )  # fmt: skip
    if cfg.qk_norm:
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, mlp_bias=False)


def export_hf(model: Transformer, out_dir: str, max_position_embeddings: int = 8192, dtype: torch.dtype = torch.float32,
              **token_ids: int | None) -> str:  # fmt: skip
    """Write a folder that transformers' ``AutoModelForCausalLM.from_pretrained`` loads: ``LlamaForCausalLM``, or
    ``Qwen3ForCausalLM`` for a model with QK-norm (the module docstring says why). The weights only: the
    tokenizer, layout and model card are ``omnitrain.model.export``'s. ``dtype``: of the saved weights."""
    import transformers  # transformers: optional (the hf extra), ~0.6 s

    c = model.cfg
    hf_cfg = hf_config(c, max_position_embeddings, **token_ids)
    cls = transformers.Qwen3ForCausalLM if c.qk_norm else transformers.LlamaForCausalLM
    hf = cls(hf_cfg)  # (not on the meta device: the RoPE buffers would stay empty)
    sd = state_dict_to_hf({k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items() if k != "modality_table"})
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if c.tie_embeddings:
        hf.tie_weights()
    hf.config.dtype = dtype
    hf.save_pretrained(out_dir)  # handles tied embeddings (safetensors' save_file refuses them)
    return out_dir
