"""What a training step costs, by arithmetic over the config (no model is built): parameters, FLOPs per position and
memory per device; ``omnitrain plan`` (``omnitrain.train.plan``) prints it, training refuses a step it says cannot fit
and counts MFU with it for the audio layouts.

The memory model, per GPU (P parameters, S shards, N = batch x seq_len tokens of one micro-batch):

* parameters / gradients / AdamW's two moments in their dtypes (fp32, or bf16 for ``bf16-true``; DeepSpeed
  keeps bf16 weights and gradients and an fp32 master copy with the moments: 2 + 2 + 12 bytes per parameter),
  divided by S where the strategy shards them (FSDP2: all three; ZeRO 1: optimizer, 2: + gradients, 3: + weights);
* activations: what each block saves for backward (``block_bytes_per_token``: the residual stream, the norms'
  inputs and outputs, q/k/v, the attention output, SwiGLU's four [N, F] tensors), times the layers; with
  activation checkpointing only each block's input, plus one block recomputed during backward;
* the loss (``omnitrain.model.loss``): one chunk of logits (fp32 logits and log-softmax, 8 x rows x V bytes,
  rows from the same byte budget ``chunk_rows`` uses), the fp32 [V, D] output gradient and the [N, D] hidden
  gradient it computes in forward;
* communication: DDP's gradient buckets (a second copy of the gradients); FSDP2's all-gather of a block
  (and the next, prefetched) in the compute dtype, the head's gathered weight and a block's fp32
  reduce-scatter; DeepSpeed's reduce / all-gather buckets of ``bucket_size`` elements (x 4.5 with ``overlap_comm``).

Audio layouts (``model.audio_layout``, issue 23). ``delay`` and ``depth`` take one position per audio frame instead
of K (``flat``), so a step of ``seq_len`` positions holds up to K times the audio; their extra work (``AudioShape``:
K levels of C codes, the share of positions whose target is a frame, estimated from the manifests' tokens):

* ``delay``: K-1 level heads, each level's C rows of the output matrix applied at every position (no new parameters):
  6 (K-1) C D FLOPs per position; each keeps its [N, D] hidden gradient and [C, D] weight gradient until backward;
* ``depth``: the depth transformer (its parameters count) runs K-1 steps per frame: per frame
  6 (D Dd + (K-1)(D Dd + Ld P_block + Dd + Dd D + C D)) + 12 Ld Dd (K-1)^2 FLOPs, and its activations (never
  checkpointed) and level losses. Memory takes every position to be a frame (a row of speech can be), FLOPs and
  throughput the estimated share.

Checked against measured peak memory on CPU (``tests/train/test_plan.py``): single, DDP and FSDP, and delay and depth
(single), within 25 %.
"""

from __future__ import annotations

from dataclasses import dataclass

from omnitrain.model.loss import chunk_rows
from omnitrain.model.transformer import ModelConfig
from omnitrain.train.strategy import StrategyConfig


@dataclass(frozen=True)
class AudioShape:
    """What the plan needs of a grouped audio layout's data: K levels of C codes each, and the share of positions
    whose target is an audio frame (where depth runs its transformer; 1.0: every position, the memory worst case)."""

    levels: int
    codes: int
    frame_share: float = 1.0

    def per_frame(self, audio_layout: str) -> str:
        """Positions an audio frame takes, in words."""
        if audio_layout == "flat":
            return f"{self.levels} positions per audio frame (its K levels one after another)"
        tail = f" (+ {self.levels - 1} per clip for the delayed levels)" if audio_layout == "delay" else ""
        return f"1 position per audio frame{tail}"


def _block_params(model: ModelConfig) -> int:
    D, F, hd = model.dim, model.hidden_dim, model.head_dim
    Dkv = model.kv_heads * hd
    return 2 * D * D + 2 * D * Dkv + 3 * D * F + 2 * D + (2 * hd if model.qk_norm else 0)  # wq wo, wk wv, w1 w2 w3, norms


def depth_config(model: ModelConfig) -> ModelConfig:
    """The block shape of ``omnitrain.model.depth.DepthTransformer`` (width ``depth_dim or dim``, ``depth_layers``)."""
    return ModelConfig(vocab_size=1, dim=model.depth_dim or model.dim, n_layers=model.depth_layers, n_heads=model.n_heads,
                       norm_eps=model.norm_eps, qk_norm=model.qk_norm, multiple_of=model.multiple_of)  # fmt: skip


def depth_params(model: ModelConfig) -> int:
    """Parameters of the depth transformer (0 unless ``audio_layout=depth``): context, code_in, code_out, blocks, norm."""
    if model.audio_layout != "depth":
        return 0
    d = depth_config(model)
    return 3 * model.dim * d.dim + d.n_layers * _block_params(d) + d.dim


def param_counts(model: ModelConfig) -> tuple[int, int]:
    """(all parameters, one block's) of ``Transformer(model)``, by arithmetic (tests hold it equal to the model's count).
    Depth's transformer is counted in the first; delay's level heads are slices of the output matrix."""
    D, V, block = model.dim, model.vocab_size, _block_params(model)
    return V * D * (1 if model.tie_embeddings else 2) + D + model.n_layers * block + depth_params(model), block


def flops_per_token(model: ModelConfig, seq_len: int, audio: AudioShape | None = None) -> float:
    """Training FLOPs per position. ``flat``: ``omnitrain.train.runlog.flops_per_token`` from the config, 6 x the
    matmul weights (the blocks, the final norm and the V x D output projection, tied or not) + 12 L D T. ``delay`` /
    ``depth`` (``audio`` required): + the level heads at every position, or the depth transformer and its level heads
    at ``audio.frame_share`` of the positions (module docstring)."""
    P, _ = param_counts(model)
    V, D = model.vocab_size, model.dim
    matmul = P - depth_params(model) - V * D * (1 if model.tie_embeddings else 2) + V * D
    main = 6.0 * matmul + 12.0 * model.n_layers * D * seq_len
    if model.audio_layout == "flat":
        return main
    if audio is None:
        raise ValueError(f"model.audio_layout={model.audio_layout}: the FLOPs of its audio levels need the data's K and C (pass audio=AudioShape)")
    S, C = audio.levels - 1, audio.codes
    if model.audio_layout == "delay":
        return main + 6.0 * S * C * D
    d = depth_config(model)
    step = D * d.dim + d.n_layers * _block_params(d) + d.dim + d.dim * D + C * D  # code_in, blocks, norm, code_out, level head
    per_frame = 6.0 * (D * d.dim + S * step) + 12.0 * d.n_layers * d.dim * S * S  # + context once; attention over the S steps
    return main + audio.frame_share * per_frame


def _dtypes(strategy: StrategyConfig) -> tuple[int, int, bool]:
    """(compute bytes, residual-stream bytes, fused fp32 norms) of a step: under ``bf16-mixed`` single/DDP keep
    fp32 weights under autocast (an fp32 residual stream), FSDP2 and DeepSpeed compute with bf16 weights."""
    if strategy.precision == "32-true":
        return 4, 4, True
    low_weights = strategy.precision == "bf16-true" or strategy.name in ("fsdp", "deepspeed")
    return 2, (2 if low_weights else 4), not low_weights


def block_bytes_per_token(model: ModelConfig, strategy: StrategyConfig, device: str) -> float:
    """Bytes one transformer block saves for backward per token (see the module docstring)."""
    c, r, fused = _dtypes(strategy)
    D, H, F = model.dim, model.n_heads, model.hidden_dim
    Dkv = model.kv_heads * model.head_dim
    norm = r if fused else 6  # fused fp32 rms_norm saves its input; otherwise the fp32 upcast and the normalised output
    kv = D if device == "cpu" and Dkv != D and model.attention != "flex" else Dkv  # CPU masked path repeats k/v per head
    out = 2 * norm * D + 2 * c * D  # the two norms, and their outputs (the inputs of wq/wk/wv and of w1/w3)
    out += c * (D + 2 * kv) + 2 * c * D + 4 * H  # q, k, v after RoPE; attention output and its copy (wo's input); lse
    out += 4 * c * F  # SwiGLU: w1(x), w3(x), silu(w1 x), the product (w2's input)
    if model.qk_norm:
        out += (4 if fused else 6) * (D + Dkv)
    return out


def audio_memory(model: ModelConfig, strategy: StrategyConfig, batch: int, seq_len: int, audio: AudioShape | None,
                 device: str = "cuda") -> float:  # fmt: skip
    """Bytes a step of a grouped layout holds beyond flat's, at ``audio.frame_share`` (module docstring): delay's level
    losses (each an [N, D] hidden and a [C, D] weight gradient, computed in forward); depth's gathered frames, its
    transformer's activations over K-1 steps a frame (not checkpointed) and its level losses."""
    if model.audio_layout == "flat" or audio is None:
        return 0.0
    c, r, _ = _dtypes(strategy)
    N, D, S, C = batch * seq_len, model.dim, audio.levels - 1, audio.codes
    if model.audio_layout == "delay":
        return S * (N * D * r + 4 * C * D)
    d = depth_config(model)
    Na = audio.frame_share * N
    steps = Na * S * (d.n_layers * block_bytes_per_token(d, strategy, device) + 2 * c * d.dim + 2 * D * r)  # blocks, in/out
    return Na * D * r + steps + S * (Na * D * r + 4 * C * D)  # + the frames' hidden states; the level losses


def memory(model: ModelConfig, strategy: StrategyConfig, world: int, batch: int, seq_len: int, grad_accum: int = 1,
           device: str = "cuda", audio: AudioShape | None = None) -> dict[str, float]:  # fmt: skip
    """Bytes per GPU (``device="cpu"``: per process, the CPU code paths) by component; ``peak`` sums a step's.
    ``audio``: a grouped layout's data (``AudioShape``; its ``audio`` row, 0 for flat)."""
    P, P_block = param_counts(model)
    c, r, fused = _dtypes(strategy)
    N, V, D, L = batch * seq_len, model.vocab_size, model.dim, model.n_layers
    mixed = strategy.precision != "32-true"
    name, zero = strategy.name, strategy.zero_stage
    # weights, gradients, optimizer (bytes per parameter), then what the strategy shards
    if name == "deepspeed" and mixed:
        w, g, o = 2, 2, 12  # bf16 weights and gradients; fp32 master weights + two fp32 moments
    else:
        pb = 2 if strategy.precision == "bf16-true" else 4
        w, g, o = pb, pb, 2 * pb
    shards = {"single": 1, "ddp": 1, "fsdp": world // max(strategy.hsdp_replicas, 1)}.get(name, world)
    sw = shards if name == "fsdp" or (name == "deepspeed" and zero == 3) else 1
    sg = shards if name == "fsdp" or (name == "deepspeed" and zero >= 2) else 1
    so = shards if name in ("fsdp", "deepspeed") else 1
    out = {"params": P * w / sw, "grads": P * g / sg, "optimizer": 0.0 if strategy.offload_optimizer and name == "deepspeed" else P * o / so}
    if name == "fsdp" and not strategy.fsdp_sync_each_microbatch and grad_accum > 1:
        out["grads"] = P * 4  # unsharded fp32 gradients held until the last micro-batch
    # activations of one micro-batch
    per_layer = block_bytes_per_token(model, strategy, device) * N
    outside = N * D * (r if fused else 6) + 2 * N * model.head_dim * 4 * 2  # final norm; RoPE cos/sin [B, 1, T, Dh]
    if device == "cpu" or model.attention == "sdpa":
        outside += batch * seq_len * seq_len * c  # the additive document mask [B, 1, T, T]
    plain, checkpointed = L * per_layer + outside, L * N * D * r + per_layer + outside  # ckpt: block inputs + one recomputed
    out["activations"] = checkpointed if model.activation_checkpointing else plain
    out["activations_other"] = plain if model.activation_checkpointing else checkpointed  # the other setting, for comparison
    out["backward_working"] = per_layer  # the gradients of one block's activations while it is back-propagated
    # the fused loss: one chunk of logits, its gradients computed in forward, the low-precision copies
    rows = chunk_rows(N, V, device)
    # fp32 logits + log-softmax of a chunk; fp32 [V, D] and [N, D] gradients; in 16 bits a [V, D] copy (the weight cast
    # for the matmuls, or the gradient cast back) and, under autocast, the hidden states cast
    out["loss"] = 8 * rows * V + 4 * V * D + N * D * r + (2 * V * D if c == 2 else 0) + (2 * N * D if c == 2 and r == 4 else 0)
    # communication buffers
    if name == "ddp":
        out["comm"] = P * g  # DDP's gradient buckets: a flat copy of every gradient
    elif name == "fsdp":
        head = V * D * c  # the head (or the tied embedding) stays gathered through the loss
        # a block and the prefetched next one; without resharding after forward every block stays gathered until backward
        gathered = 2 * P_block * c if strategy.reshard_after_forward else L * P_block * c
        out["comm"] = gathered + head + P_block * 4  # + one block's fp32 gradients being reduce-scattered
    elif name == "deepspeed":
        elems = min(strategy.bucket_size, P)
        out["comm"] = (4.5 if strategy.overlap_comm and zero >= 2 else 1.0) * 2 * elems * (2 if mixed else 4)
    else:
        out["comm"] = 0.0
    out["audio"] = audio_memory(model, strategy, batch, seq_len, audio, device)  # delay's level heads, depth's transformer
    out["peak"] = sum(out[k] for k in ("params", "grads", "optimizer", "activations", "backward_working", "loss", "comm", "audio"))
    if name == "deepspeed" and strategy.offload_optimizer:
        out["cpu_optimizer"] = P * (12 if mixed else 8) / shards + P * 4 / shards  # per rank, in host memory: + fp32 gradients
    return out
