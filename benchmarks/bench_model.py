"""The model, side by side in one run (medians of several repeats, CPU, fp32, torch threads fixed):

* forward + backward tokens/s of omnitrain's Transformer vs transformers' ``LlamaForCausalLM`` with
  the identical configuration and weights: through each library's own training loss (ours: the
  chunked output projection fused with the cross entropy; HF: ``labels=``), and with bare logits out
  and the same cross entropy on both. At two sizes, each figure naming its configuration: the
  small one (4 layers, 8.7k vocabulary), where the fused loss saves a visible share of the step,
  and 8 layers with a 32k vocabulary. The four steps run round-robin, the order reversed every
  other round (ABBA), after a warm-up round;
* decoding tokens/s with the KV cache vs recomputing the whole sequence every step;
* streaming speech: time to first token and to the first audio chunk (10 codec frames) decoded to a
  waveform by the audio codec, end to end from the prompt, with the tiny model of recipes/model.
"""

from __future__ import annotations

import statistics
import time

from _table import print_rows  # benchmarks/ is on sys.path when these run

THREADS = 2  # torch intra-op threads, fixed so that figures compare across runs
# (name, LlamaConfig fields, B, T): the size of the tests and the demo, and a bigger one
SIZES = [
    ("4 layers, 8.7k vocab", dict(vocab_size=8704, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2), 4, 512),
    ("8 layers, 32k vocab", dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2), 4, 512),
]  # fmt: skip


def _tokens_per_s(step, tokens: int, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def _time_to_first_audio(repeats: int) -> tuple[float, float, float]:
    """Median (time to first token, time to first decoded audio chunk, chunk duration) in seconds."""
    from pathlib import Path

    import torch
    import yaml

    from omnitrain.model.generate import SamplingConfig, generate
    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.layout import TokenLayout

    torch.manual_seed(0)
    codec = RVQAudioCodec(AudioCodecConfig()).eval()  # the recipe's architecture (weights do not change the timing)
    layout = TokenLayout.build(8000, "bench", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=256,
                               audio_codebook_size=codec.codebook_size, audio_levels=codec.n_levels)  # fmt: skip
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "model" / "tiny.yaml").read_text())
    model = Transformer(ModelConfig(**{**recipe, "vocab_size": layout.vocab_size})).eval()
    prompt = [1, *range(100, 116), layout.specials["boa"]]
    cfg = SamplingConfig(max_new_tokens=10 * codec.n_levels, audio_chunk_frames=10, seed=0)
    ttft, ttfa = [], []
    for _ in range(repeats):
        first: list[float] = []
        t0 = time.perf_counter()

        def on_event(row: int, kind: str, payload: object, first: list[float] = first, t0: float = t0) -> None:
            if kind == "audio_chunk" and not first:
                with torch.no_grad():
                    codec.decode(torch.as_tensor(payload)[None])  # [1, frames, K] -> waveform
                first.append(time.perf_counter() - t0)

        res = generate(model, layout, [prompt], cfg, on_event=on_event)
        ttft.append(res.time_to_first_token)
        ttfa.append(first[0])
    return statistics.median(ttft), statistics.median(ttfa), 10 / codec.frame_rate


def _models(fields: dict) -> tuple:
    """(LlamaForCausalLM, our Transformer) with ``fields`` and the same weights."""
    import torch
    import transformers

    from omnitrain.model.hf import config_from_hf, state_dict_from_hf
    from omnitrain.model.transformer import Transformer

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**fields, max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    ours = Transformer(config_from_hf(hf_cfg))
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    return hf, ours


def _training_steps(fields: dict, B: int, T: int, repeats: int) -> tuple[dict[str, float], float]:
    """Median tokens/s of the four steps (ours, hf, ours_logits, hf_logits) at one size, and the loss gap."""
    import torch

    hf, ours = _models(fields)
    ids = torch.randint(0, fields["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, dims=1)  # next token; the last position carries no loss (as HF's shifted labels)
    weights = torch.ones(B, T)
    weights[:, -1] = 0.0
    labels = ids.clone()  # HF shifts labels itself: labels[:, 1:] are its targets

    ce = torch.nn.functional.cross_entropy
    steps = {  # (1) each library's own training path: our forward with targets (chunked output projection
        # fused with the loss) vs LlamaForCausalLM(labels=...) (logits, then its ForCausalLM loss)
        "ours": lambda: ours(ids, None, targets, weights)[0].backward(),
        "hf": lambda: hf(input_ids=ids, labels=labels).loss.backward(),
        # (2) the bare networks: logits out, the same cross entropy on both outside the model
        "ours_logits": lambda: ce(ours(ids).flatten(0, 1), ids.flatten()).backward(),
        "hf_logits": lambda: ce(hf(ids).logits.flatten(0, 1), ids.flatten()).backward(),
    }
    # all four alternate step by step, so that machine noise hits them alike; the order is reversed
    # every other round (ABBA), and round 0 warms up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(repeats + 1):
        for name in list(steps) if rep % 2 == 0 else list(steps)[::-1]:
            for m in (ours, hf):
                m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            steps[name]()
            if rep:
                times[name].append(time.perf_counter() - t0)
    with torch.no_grad():  # the two training paths compute the same loss
        gap = abs(float(ours(ids, None, targets, weights)[0]) - float(hf(input_ids=ids, labels=labels).loss))
    return {n: B * T / statistics.median(times[n]) for n in steps}, gap


def run(quick: bool = False) -> list[dict]:
    import torch

    from omnitrain.model.generate import SamplingConfig, generate

    torch.set_num_threads(THREADS)
    repeats = 3 if quick else 8
    rows = []
    for name, fields, B, T in SIZES:
        B, T = (2, 256) if quick else (B, T)
        config = (f"{fields['num_hidden_layers']} layers, dim {fields['hidden_size']}, ffn {fields['intermediate_size']}, heads "
                  f"{fields['num_attention_heads']}/{fields['num_key_value_heads']} kv, vocab {fields['vocab_size']}, tied, B={B} T={T}, "
                  f"fp32, sdpa, torch threads {torch.get_num_threads()}, ABBA x {repeats}, medians")  # fmt: skip
        print(f"config [{name}]: {config}", flush=True)
        tps, gap = _training_steps(fields, B, T, repeats)
        rows += [
            {"metric": f"forward+backward+loss tokens/s, omnitrain [{name}]", "value": tps["ours"], "unit": "tokens/s", "baseline": tps["hf"],
             "note": f"baseline: LlamaForCausalLM with labels=, same weights; losses differ by {gap:.1e}; {config}"},
            {"metric": f"omnitrain / transformers (training step) [{name}]", "value": tps["ours"] / tps["hf"], "unit": "x", "baseline": 1.0,
             "note": f"target >= 1.0x; {config}"},
            {"metric": f"forward+backward tokens/s, logits out [{name}]", "value": tps["ours_logits"], "unit": "tokens/s", "baseline": tps["hf_logits"],
             "note": "both return logits; the same F.cross_entropy outside the model"},
            {"metric": f"omnitrain / transformers (logits out) [{name}]", "value": tps["ours_logits"] / tps["hf_logits"], "unit": "x", "baseline": 1.0,
             "note": config},
        ]  # fmt: skip
    ours = _models(SIZES[0][1])[1]  # decoding: the small model
    prompt = torch.randint(0, SIZES[0][1]["vocab_size"], (64,), generator=torch.Generator().manual_seed(0))
    prompt, new = [prompt.tolist()], (32 if quick else 128)
    cfg = SamplingConfig(max_new_tokens=new, greedy=True, constrain=False)
    cached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg), new, max(2, repeats // 2))
    uncached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg, use_cache=False), new, max(2, repeats // 2))
    ttft, ttfa, chunk_s = _time_to_first_audio(repeats=3 if quick else 5)
    rows += [
        {"metric": "decode tokens/s with KV cache", "value": cached, "unit": "tokens/s", "baseline": uncached,
         "note": f"baseline: no cache; {SIZES[0][0]} model, 64-token prompt, {new} new tokens, greedy, torch threads {torch.get_num_threads()}"},
        {"metric": "KV cache speed-up", "value": cached / uncached, "unit": "x", "baseline": None, "note": ""},
        {"metric": "time to first token, speech output", "value": ttft * 1e3, "unit": "ms", "baseline": None, "note": "tiny model (recipes/model/tiny), 16-token prompt + <boa>"},
        {"metric": "time to first audio chunk, decoded to waveform", "value": ttfa * 1e3, "unit": "ms", "baseline": chunk_s * 1e3,
         "note": "10 frames x 4 levels generated + RVQ codec decode; baseline column: the chunk's duration (real time if below)"},
    ]
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
