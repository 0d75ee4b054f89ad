"""Training-step throughput on one CUDA GPU (issue 19): MFU, tokens/s/GPU, peak memory, the attention kernel.

For the 150m and 1b recipes (recipes/model/<size>.yaml as written, vocabulary set to 64k) at T = 4096
with packed rows (several documents per row, then padding with doc id -1 as the loader writes it), a
training step is: forward + backward through the model's own fused loss
(``model(input_ids, doc_ids, targets, loss_weights, denom)``), gradient clipping to norm 1 (no host
read), and torch's fused AdamW (``omnitrain.train.optim.build_optimizer``).

Precision: bf16 autocast over fp32 weights, gradients and optimizer state (fp32 master weights), which
is what ``strategy.precision=bf16-mixed`` (recipes/experiment/pretrain.yaml) runs through Fabric on
one GPU; not bf16 weights (bf16-true). TF32 on for what stays fp32, as ``Strategy.setup`` does on CUDA.

The grid, per size: attention ``sdpa`` (an additive [B, 1, T, T] mask) vs ``flex`` (a BlockMask),
each with torch.compile off and on. On: per block with ``fullgraph=True``, as torchtitan and as
``omnitrain train compile=true`` do (``omnitrain.train.strategy.compile_blocks``, the same function);
``--compile-scope model`` compiles the whole model instead, for comparison. Per configuration: warm-up steps (compilation included) are excluded, then
each step is timed with CUDA events and the median taken. tokens/s/GPU = B T / median step;
MFU = tokens/s x ``runlog.flops_per_token(model, T)`` / the GPU's dense bf16 peak (``strategy.GPUS``, by
``torch.cuda.get_device_name()``; an unknown GPU gets no MFU, and says so); peak memory =
``torch.cuda.max_memory_allocated`` over the timed steps; and the attention kernels of one more
step, from ``torch.profiler`` (op and kernel names matched by substrings: flash, efficient, cudnn,
math, flex). MFU counts no recomputation (as torchtitan), so the 1b recipe's activation
checkpointing costs MFU; the configuration line says whether it is on. Goal: >= 40 % MFU on one H100, bf16,
1b, packed 4096.

Without CUDA it says that it needs a GPU and returns no rows (exit 0). ``--cpu-smoke`` runs the same
code (batch, step, timing, profiler parsing, rows) on CPU: a tiny fp32 model, 5 warm-up + 2 timed steps,
sdpa only (FlexAttention has no backward on CPU), compile off and on; its figures mean nothing and are
not returned.

    python benchmarks/bench_gpu.py                       # the grid (CUDA)
    python benchmarks/bench_gpu.py --quick               # fewer steps
    python benchmarks/bench_gpu.py --sizes 1b --batch 8 --compile-scope model
    python benchmarks/bench_gpu.py --cpu-smoke
    python benchmarks/bench_gpu.py --voice-latency       # voice response latency of 1b per audio layout (CUDA)
    python benchmarks/bench_gpu.py --voice-latency --cpu-smoke   # the same for the demo's tiny model on CPU

``--voice-latency`` (issue 23): from the end of the user's audio to the first decoded audio chunk, as ``omnitrain
eval``'s tts / s2s tasks measure it (``omnitrain.eval.speech_output``): the prompt is a spoken question of
VOICE_QUESTION_S seconds in a user turn, then the assistant turn opening an audio span (s2s ``mode=audio``); the
model (the recipe, random weights, bf16 on CUDA) generates greedily with the KV cache, one reply at a time, until
its first chunk of VOICE_CHUNK_FRAMES frames (``GenerationResult.time_to_first_audio_chunk``, prefill included),
and the codec (the demo's: the mel codec, codebooks untrained; the time does not depend on them) decodes that chunk.
Per layout (flat, delay, depth): median and p90 of the sum over repeats, beside GPT-4o's 320 ms average.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from _table import print_rows  # benchmarks/ is on sys.path when these run

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"
SIZES = ("150m", "1b")
VOCAB = 65536  # the omni vocabulary the recipes are sized for (recipes never state it)
SEQ_LEN = 4096
BATCH = 4  # rows per step: 16k tokens, enough for the GEMMs at these widths; --batch to change
BACKENDS = ("sdpa", "flex")
PAD_ID = 0  # any id: padding carries no loss
GOAL = "target >= 40 % MFU on one H100, bf16, 1b, packed 4096"
GOAL_MFU = 40.0
ASSUMED_MFU = 0.40  # omnitrain plan's default (cluster.mfu): its expected tokens/s is printed beside the measured one

# (kind, substrings of a profiler op or kernel name), first match wins: cuDNN's attention kernels
# and the flex kernels may say "flash" too, so they come first. SDPA's choice shows in its op
# (aten::_scaled_dot_product_{flash,efficient,cudnn}_attention, _scaled_dot_product_attention_math)
# and in its kernels (pytorch_flash::flash_fwd_kernel, fmha_cutlassF_..., cudnn_generated_..._sdpa_...).
# "triton_tem": an Inductor template kernel; with max-autotune off (here) only FlexAttention makes one.
ATTENTION_KINDS = (
    ("cudnn", ("cudnn_attention", "fort_native_sdpa", "cudnn_sdpa")),
    ("flex", ("flex_attention", "flexattention", "triton_tem")),
    ("flash", ("flash",)),
    ("efficient", ("efficient_attention", "fmha_cutlass", "mem_eff")),
    ("math", ("attention_math",)),
)


class Setup(NamedTuple):
    """One measured configuration (a NamedTuple: run_all.py loads this file without registering it in
    sys.modules, which a dataclass needs)."""

    size: str
    backend: str  # ModelConfig.attention: sdpa | flex
    compile: bool
    batch: int
    seq_len: int
    bf16: bool  # bf16 autocast over fp32 weights; False: all fp32 (the CPU smoke)

    @property
    def name(self) -> str:
        return f"{self.size}, {self.backend}, compile {'on' if self.compile else 'off'}"


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (``omnitrain.train.strategy.GPUS``, the table training's MFU and
    ``omnitrain plan`` use), None when it is not known."""
    from omnitrain.train.strategy import gpu_of, gpu_peak_flops

    gpu = gpu_of(device_name)
    return gpu_peak_flops(gpu, "bf16-mixed") if gpu else None


def planned(setup: Setup, fields: dict, vocab: int, peak_flops: float | None) -> dict:
    """What ``omnitrain plan`` expects of this configuration on one GPU: peak memory, and tokens/s at ASSUMED_MFU."""
    from omnitrain.config import from_dict
    from omnitrain.model.transformer import ModelConfig
    from omnitrain.train.plan import flops_per_token, memory
    from omnitrain.train.strategy import StrategyConfig

    model = from_dict(ModelConfig, {**fields, "vocab_size": vocab, "attention": setup.backend})
    strategy = StrategyConfig(precision="bf16-mixed" if setup.bf16 else "32-true")
    peak = memory(model, strategy, 1, setup.batch, setup.seq_len)["peak"] / 2**30
    tps = None if peak_flops is None else ASSUMED_MFU * peak_flops / flops_per_token(model, setup.seq_len)
    return {"peak_gb": peak, "tokens_per_s": tps}


def attention_kind(name: str) -> str | None:
    """The attention implementation a profiler op or kernel name belongs to, or None."""
    low = name.lower()
    return next((kind for kind, keys in ATTENTION_KINDS if any(k in low for k in keys)), None)


def attention_kernels(names: Iterable[str]) -> dict[str, list[str]]:
    """Profiler event names -> {kind: sorted distinct names of that kind}, only the kinds found."""
    found: dict[str, set[str]] = {}
    for name in names:
        kind = attention_kind(name)
        if kind is not None:
            found.setdefault(kind, set()).add(name)
    return {kind: sorted(found[kind]) for kind, _ in ATTENTION_KINDS if kind in found}


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, device: str = "cpu") -> dict:
    """A loader-shaped batch of packed rows: ``{input_ids, targets, loss_weights, doc_ids}``, each [B, T].

    Each row holds documents of uniform random length in [T/16, 3T/8] (~4-5 per row) numbered 0, 1, ...,
    then 0 to T/8 padding tokens (doc id -1, id PAD_ID), as whole-document packing leaves a row. As in
    the loader, a row is built with T + 1 tokens (inputs the first T, targets the last T), and a target
    has weight 0 when it is padding or its input lies in another document."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T1 = seq_len + 1
    ids = torch.randint(0, vocab, (batch, T1), generator=g)  # [B, T+1]
    docs = torch.full((batch, T1), -1, dtype=torch.long)  # [B, T+1] document number in its row, -1: padding
    lo, hi = max(1, seq_len // 16), max(2, 3 * seq_len // 8)
    for r in range(batch):
        end_of_docs = T1 - int(torch.randint(0, seq_len // 8 + 1, (1,), generator=g))
        pos, n = 0, 0
        while pos < end_of_docs:
            end = min(pos + int(torch.randint(lo, hi + 1, (1,), generator=g)), end_of_docs)
            docs[r, pos:end], pos, n = n, end, n + 1
    ids[docs < 0] = PAD_ID
    weights = ((docs[:, :-1] == docs[:, 1:]) & (docs[:, 1:] >= 0)).float()  # [B, T]: same document, not padding
    out = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": weights, "doc_ids": docs[:, :-1]}
    return {k: v.contiguous().to(device) for k, v in out.items()}


def build(setup: Setup, device: str, model_fields: dict, vocab: int, compile_scope: str):
    """(model, optimizer, step function) for ``setup``: the model from ``model_fields``, fused AdamW on CUDA."""
    import torch

    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.train.optim import OptimConfig, build_optimizer
    from omnitrain.train.strategy import compile_blocks

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**model_fields, "vocab_size": vocab, "attention": setup.backend})).to(device)
    optimizer = build_optimizer(model, OptimConfig(), device)  # torch's fused AdamW on CUDA
    forward = model
    if setup.compile and compile_scope == "blocks":  # what `omnitrain train compile=true` does: one graph per block
        compile_blocks(model)
    elif setup.compile:  # the whole model, for comparison
        forward = torch.compile(model)
    data = packed_batch(setup.batch, setup.seq_len, vocab, device=device)
    denom = data["loss_weights"].sum().clamp(min=1.0)  # on the device: no host read
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=setup.bf16):
            loss, _ = forward(data["input_ids"], data["doc_ids"], data["targets"], data["loss_weights"], denom)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # the norm stays a device tensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def time_steps(step: Callable[[], None], n: int, cuda: bool) -> list[float]:
    """Seconds of each of ``n`` steps: CUDA events around each (read after one synchronise), else the wall clock."""
    import torch

    if not cuda:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def profile_attention(step: Callable[[], None], cuda: bool) -> dict[str, list[str]]:
    """The attention kernels (and SDPA's dispatch ops) one step runs, by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    names = set()
    for event in prof.events():  # CPU ops, and the CUDA kernels both as events and attached to their ops
        names.add(event.name)
        names.update(k.name for k in getattr(event, "kernels", []))
    return attention_kernels(names)


def measure(setup: Setup, device: str, model_fields: dict, vocab: int, warmup: int, steps: int, compile_scope: str) -> dict:
    """Median step time, tokens/s, FLOPs per token, peak memory and attention kernels of one configuration."""
    import torch

    from omnitrain.train.runlog import flops_per_token

    cuda = device == "cuda"
    model, optimizer, step = build(setup, device, model_fields, vocab, compile_scope)
    flops = flops_per_token(model, setup.seq_len)
    try:
        time_steps(step, warmup, cuda)  # compilation, autotuning, the optimizer's state: not timed
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        median = statistics.median(time_steps(step, steps, cuda))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        kernels = profile_attention(step, cuda)
    finally:
        del model, optimizer, step
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if setup.compile:
            torch._dynamo.reset()
    return {"step_s": median, "tokens_per_s": setup.batch * setup.seq_len / median, "flops_per_token": flops,
            "peak_gb": peak, "kernels": kernels}  # fmt: skip


def kernels_note(kernels: dict[str, list[str]]) -> str:
    if not kernels:
        return "attention kernel: none matched (see ATTENTION_KINDS)"
    return "attention: " + "; ".join(f"{kind} ({', '.join(n[:60] for n in names[:2])}{', ...' if len(names) > 2 else ''})"
                                     for kind, names in kernels.items())  # fmt: skip


def rows_for(setup: Setup, m: dict, peak_flops: float | None, base_tps: float | None, config: str, plan: dict) -> list[dict]:
    """The table rows of one measured configuration (MFU only with a known peak), with omnitrain plan's expectation."""
    expected = "" if plan["tokens_per_s"] is None else f"; plan at MFU {ASSUMED_MFU:.0%}: {plan['tokens_per_s']:,.0f} tokens/s"
    rows = [{"metric": f"tokens/s/GPU, {setup.name}", "value": m["tokens_per_s"], "unit": "tokens/s", "baseline": base_tps,
             "note": f"{kernels_note(m['kernels'])}; baseline: {setup.size}, sdpa, compile off; {config}{expected}"}]  # fmt: skip
    if peak_flops is not None:
        mfu = 100 * m["tokens_per_s"] * m["flops_per_token"] / peak_flops
        goal = setup.size == "1b"
        rows.append({"metric": f"MFU, {setup.name}", "value": mfu, "unit": "%", "baseline": GOAL_MFU if goal else None,
                     "note": (f"baseline: the goal, {GOAL}; " if goal else "") + f"{m['flops_per_token'] / 1e9:.3f} GFLOP/token "
                             f"over {peak_flops / 1e12:.0f} TFLOP/s; omnitrain plan assumes {ASSUMED_MFU:.0%}"})  # fmt: skip
    if m["peak_gb"] is not None:
        rows.append({"metric": f"peak memory, {setup.name}", "value": m["peak_gb"], "unit": "GiB", "baseline": None,
                     "note": f"torch.cuda.max_memory_allocated over the timed steps; omnitrain plan: {plan['peak_gb']:.1f} GiB"})  # fmt: skip
    return rows


def run(quick: bool = False, sizes: Iterable[str] = SIZES, batch: int = BATCH, compile_scope: str = "blocks",
        cpu_smoke: bool = False) -> list[dict]:  # fmt: skip
    import torch
    import yaml

    if not torch.cuda.is_available() and not cpu_smoke:
        print("bench_gpu needs a CUDA GPU (none here): it measures tokens/s/GPU, MFU, peak memory and the attention "
              "kernel of a training step of the 150m and 1b models at T=4096, packed, bf16, sdpa vs flex, compile "
              "off vs on; no figures (--cpu-smoke runs its code path on CPU)")  # fmt: skip
        return []
    if cpu_smoke:  # the same code on CPU, tiny and fp32; the figures mean nothing
        device, vocab, warmup, steps, peak_flops, device_name = "cpu", 512, 5, 2, None, "CPU"  # CPU: ~4 slow first steps
        fields = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, z_loss=1e-5)}
        setups = [Setup("tiny", "sdpa", c, 2, 256, bf16=False) for c in (False, True)]
        torch.set_num_threads(2)
    else:
        device, vocab, device_name = "cuda", VOCAB, torch.cuda.get_device_name()
        warmup, steps = (3, 5) if quick else (5, 20)
        peak_flops = peak_bf16_flops(device_name)
        fields = {s: yaml.safe_load((RECIPES / f"{s}.yaml").read_text()) for s in sizes}
        setups = [Setup(s, b, c, batch, SEQ_LEN, bf16=True) for s in sizes for b in BACKENDS for c in (False, True)]
        from omnitrain.train.strategy import allow_tf32

        allow_tf32()  # as Strategy.setup does on CUDA: TF32 for what stays fp32
    print(GOAL)
    print(f"{device_name}, torch {torch.__version__}, {'bf16 autocast over fp32 weights' if setups[0].bf16 else 'fp32'}, "
          f"fused loss, grad clip, {'fused ' if device == 'cuda' else ''}AdamW; vocab {vocab}; compile "
          f"{'per block' if compile_scope == 'blocks' else 'of the whole model'} when on; {warmup} warm-up + {steps} timed steps, median")  # fmt: skip
    if peak_flops is None:
        print(f"MFU not reported: no dense bf16 peak known for {device_name!r} (add it to omnitrain.train.strategy.GPUS)")
    rows, base_tps = [], {}
    for setup in setups:
        f = fields[setup.size]
        config = (f"B={setup.batch}, T={setup.seq_len}, dim {f['dim']}, {f['n_layers']} layers, heads {f['n_heads']}/"
                  f"{f.get('n_kv_heads') or f['n_heads']} kv, activation checkpointing {'on' if f.get('activation_checkpointing') else 'off'}")  # fmt: skip
        print(f"--- {setup.name}: {config}", flush=True)
        try:
            m = measure(setup, device, f, vocab, warmup, steps, compile_scope)
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the other configurations
            print(f"    out of memory at B={setup.batch} ({str(e).splitlines()[0]}): no figures; try --batch {max(1, setup.batch // 2)}")
            continue
        first = setup.size not in base_tps  # the first of a size: sdpa, compile off, the baseline of the others
        base_tps.setdefault(setup.size, m["tokens_per_s"])
        mfu = "" if peak_flops is None else f", MFU {100 * m['tokens_per_s'] * m['flops_per_token'] / peak_flops:.1f} %"
        peak = "" if m["peak_gb"] is None else f", peak memory {m['peak_gb']:.1f} GiB"
        plan = planned(setup, f, vocab, peak_flops)
        expected = f"plan: peak {plan['peak_gb']:.1f} GiB" + ("" if plan["tokens_per_s"] is None else f", {plan['tokens_per_s']:,.0f} tokens/s at MFU {ASSUMED_MFU:.0%}")
        print(f"    step {m['step_s'] * 1e3:.1f} ms, {m['tokens_per_s']:,.0f} tokens/s{mfu}{peak}; {kernels_note(m['kernels'])}; {expected}")
        rows += rows_for(setup, m, peak_flops, None if first else base_tps[setup.size], config, plan)
    if rows:
        print_rows(rows)
    return [] if cpu_smoke else rows  # smoke figures are not measurements


# ----------------------------------------------------------------------------- voice response latency (issue 23)
# recipes/demo.yaml's codec (audio.model over recipes/tokenizer_audio.yaml): the mel codec, 25 frames/s, K = 2 levels
# of 128 codes, decoded by 48 Griffin-Lim rounds (its decode time does not depend on the codebooks' values)
VOICE_CODEC = {"kind": "mel", "strides": [2, 4, 5, 8, 2], "n_levels": 2, "codebook_size": 128, "n_mels": 64, "griffin_lim_iters": 48}
VOICE_QUESTION_S = 3.0  # seconds of the spoken question in the prompt
VOICE_CHUNK_FRAMES = 5  # frames of the first chunk (omnitrain eval's chunk_frames default: 200 ms at 25 Hz)
VOICE_LAYOUTS = ("flat", "delay", "depth")


def voice_prompt(layout, frames: int, seed: int) -> list[int]:
    """``<bos> <user> <boa> question codes <eoa> <end_of_turn> <assistant> <boa>``: a spoken question (random codes)
    answered in speech, the chat template's prefix as omnitrain eval's s2s task builds it (mode=audio)."""
    import numpy as np

    from omnitrain.tokenizer.layout import AudioSegment

    codes = np.random.default_rng(seed).integers(0, layout.audio_codebook_size, (frames, layout.audio_levels))  # [F, K]
    sp = layout.specials
    return [sp["bos"], *layout.chat_prompt([("user", [AudioSegment(codes)])]).tolist(), sp["boa"]]


def measure_voice(fields: dict, audio_layout: str, vocab: int, device: str, repeats: int) -> dict:
    """Time to the first decoded audio chunk of one model in one audio layout (medians over ``repeats`` replies)."""
    import torch

    from omnitrain.eval.speech_output import audio_budget
    from omnitrain.model.generate import SamplingConfig, generate
    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.layout import TokenLayout

    cuda = device == "cuda"
    codec = RVQAudioCodec(AudioCodecConfig(**VOICE_CODEC)).to(device).eval()
    layout = TokenLayout.build(vocab, "bench", {"bos": 1, "eos": 2, "pad": 3}, audio_codebook_size=codec.codebook_size,
                               audio_levels=codec.n_levels)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**fields, "vocab_size": layout.vocab_size, "audio_layout": audio_layout}))
    model = model.to(device, torch.bfloat16 if cuda else torch.float32).eval()
    with torch.no_grad():  # random weights: keep the reply from closing its span before the first chunk
        model.output.weight[layout.specials["eoa"]] = 0
    frames = round(VOICE_QUESTION_S * codec.frame_rate)
    cfg = SamplingConfig(max_new_tokens=audio_budget(model, layout, VOICE_CHUNK_FRAMES), greedy=True,
                         stop=[[layout.specials["eoa"]]], audio_chunk_frames=VOICE_CHUNK_FRAMES)  # fmt: skip
    first, decode, ttft, chunks = [], [], [], []

    def on_event(row: int, kind: str, payload: object) -> None:
        if kind == "audio_chunk":
            chunks.append(payload)  # [frames, K] codes

    try:
        for r in range(repeats + 1):  # the first reply warms up (allocations, kernels): not counted
            chunks.clear()
            res = generate(model, layout, [voice_prompt(layout, frames, r)], cfg, on_event)
            assert res.time_to_first_audio_chunk is not None and chunks, "no audio chunk: raise max_new_tokens"
            t0 = time.perf_counter()
            codec.decode(torch.as_tensor(chunks[0], dtype=torch.long, device=device)[None])  # [1, F, K] -> [1, 1, S]
            if cuda:
                torch.cuda.synchronize()
            if r:
                first.append(res.time_to_first_audio_chunk)
                decode.append(time.perf_counter() - t0)
                ttft.append(res.time_to_first_token)
        total = sorted(1e3 * (a + b) for a, b in zip(first, decode, strict=True))
        prompt = voice_prompt(layout, frames, 0)
        positions = len(prompt) if audio_layout == "flat" else len(prompt) - frames * (layout.audio_levels - 1)
        return {"ms": statistics.median(total), "p90_ms": total[min(len(total) - 1, round(0.9 * (len(total) - 1)))],
                "first_chunk_ms": 1e3 * statistics.median(first), "decode_ms": 1e3 * statistics.median(decode),
                "first_token_ms": 1e3 * statistics.median(ttft), "params": sum(p.numel() for p in model.parameters()),
                "prompt_positions": positions, "steps": audio_budget(model, layout, VOICE_CHUNK_FRAMES) - 2}  # fmt: skip
    finally:
        del model, codec
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def run_voice(sizes: Iterable[str] = ("1b",), repeats: int = 10, cpu_smoke: bool = False) -> list[dict]:
    """The voice-latency rows of ``sizes`` on the first GPU (``--cpu-smoke``: the demo's tiny model on CPU, printed
    and not returned)."""
    import torch
    import yaml

    from omnitrain.eval.speech_output import GPT4O_LATENCY_MS

    if not torch.cuda.is_available() and not cpu_smoke:
        print("bench_gpu --voice-latency needs a CUDA GPU (none here): it measures the time from the end of a spoken "
              "question to the first decoded audio chunk of the 1b model, bf16, per audio layout; no figures "
              "(--cpu-smoke measures the demo's tiny model on CPU)")  # fmt: skip
        return []
    device, sizes = ("cpu", ["tiny"]) if cpu_smoke else ("cuda", list(sizes))
    vocab = 8000 if cpu_smoke else VOCAB  # the demo's text vocabulary on CPU
    name = "CPU" if cpu_smoke else torch.cuda.get_device_name()
    from omnitrain.tokenizer.audio import AudioCodecConfig

    rate = AudioCodecConfig(**VOICE_CODEC).frame_rate
    print(f"voice latency on {name}, torch {torch.__version__}, {'fp32' if cpu_smoke else 'bf16 weights'}, "
          f"{torch.get_num_threads()} threads; question {VOICE_QUESTION_S:.0f} s, first chunk {VOICE_CHUNK_FRAMES} frames "
          f"({1e3 * VOICE_CHUNK_FRAMES / rate:.0f} ms at {rate:.0f} Hz), {repeats} replies after one warm-up, greedy, KV cache")  # fmt: skip
    rows = []
    for size in sizes:
        fields = yaml.safe_load((RECIPES / f"{size}.yaml").read_text())
        for audio_layout in VOICE_LAYOUTS:
            m = measure_voice(fields, audio_layout, vocab, device, repeats)
            print(f"--- {size}, {audio_layout}: {m['ms']:.1f} ms (p90 {m['p90_ms']:.1f}) = first chunk {m['first_chunk_ms']:.1f} "
                  f"(first token {m['first_token_ms']:.1f}: prefill of {m['prompt_positions']} positions; then {m['steps']} "
                  f"decoding steps) + codec decode {m['decode_ms']:.1f}; {m['params'] / 1e6:.1f}M parameters", flush=True)  # fmt: skip
            rows.append({"metric": f"voice latency, {size}, {audio_layout}", "value": m["ms"], "unit": "ms", "baseline": GPT4O_LATENCY_MS,
                         "note": f"median of {repeats}, p90 {m['p90_ms']:.1f} ms; first chunk {m['first_chunk_ms']:.1f} ms + codec "
                                 f"decode {m['decode_ms']:.1f} ms; {name}; baseline: GPT-4o's published average"})  # fmt: skip
    print_rows(rows)
    return [] if cpu_smoke else rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    ap.add_argument("--batch", type=int, default=BATCH, help=f"rows of {SEQ_LEN} tokens per step (default {BATCH})")
    ap.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                    help="compile on: each block (torchtitan, omnitrain train compile=true) or the whole model")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code path on CPU: a tiny fp32 model, 2 timed steps")
    ap.add_argument("--voice-latency", action="store_true",
                    help="measure voice response latency per audio layout instead (1b on CUDA; --cpu-smoke: the demo's tiny model)")
    args = ap.parse_args()
    if args.voice_latency:
        run_voice([s for s in args.sizes if s == "1b"] or list(args.sizes), repeats=3 if args.quick else 10, cpu_smoke=args.cpu_smoke)
        return
    run(args.quick, args.sizes, args.batch, args.compile_scope, args.cpu_smoke)


if __name__ == "__main__":
    main()
