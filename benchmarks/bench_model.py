"""The model, side by side in one run (medians of several repeats, CPU, fp32):

* forward + backward tokens/s of omnitrain's Transformer vs transformers' ``LlamaForCausalLM`` with
  the identical configuration and weights: through each library's own training loss (ours: the
  chunked output projection fused with the cross entropy; HF: ``labels=``), and with bare logits out
  and the same cross entropy on both;
* decoding tokens/s with the KV cache vs recomputing the whole sequence every step;
* streaming speech: time to first token and to the first audio chunk (10 codec frames) decoded to a
  waveform by the audio codec, end to end from the prompt, with the tiny model of recipes/model.
"""

from __future__ import annotations

import statistics
import time

from _table import print_rows  # benchmarks/ is on sys.path when these run


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

    from omnitrain.generate import SamplingConfig, generate
    from omnitrain.model import ModelConfig, Transformer
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


def run(quick: bool = False) -> list[dict]:
    import torch
    import transformers

    from omnitrain.generate import SamplingConfig, generate
    from omnitrain.hf import config_from_hf, state_dict_from_hf
    from omnitrain.model import Transformer

    torch.manual_seed(0)
    repeats, B, T = (3, 2, 256) if quick else (12, 4, 512)
    hf_cfg = transformers.LlamaConfig(vocab_size=8704, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg)
    ours = Transformer(config_from_hf(hf_cfg))
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    ids = torch.randint(0, 8704, (B, T), generator=torch.Generator().manual_seed(0))
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
    # all four alternate step by step, so that machine noise hits them alike; the first round warms up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(repeats + 1):
        for name, step in steps.items():
            for m in (ours, hf):
                m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            if rep:
                times[name].append(time.perf_counter() - t0)
    ours_tps, hf_tps, ours_logits, hf_logits = (B * T / statistics.median(times[n]) for n in steps)
    with torch.no_grad():  # the two training paths compute the same loss
        gap = abs(float(ours(ids, None, targets, weights)[0]) - float(hf(input_ids=ids, labels=labels).loss))
    prompt, new = [ids[0, :64].tolist()], (32 if quick else 128)
    cfg = SamplingConfig(max_new_tokens=new, greedy=True, constrain=False)
    cached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg), new, max(2, repeats // 2))
    uncached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg, use_cache=False), new, max(2, repeats // 2))
    ttft, ttfa, chunk_s = _time_to_first_audio(repeats=3 if quick else 5)
    rows = [
        {"metric": "forward+backward+loss tokens/s, omnitrain", "value": ours_tps, "unit": "tokens/s", "baseline": hf_tps,
         "note": f"baseline: LlamaForCausalLM (sdpa) with labels=, same config and weights, B={B} T={T}; losses differ by {gap:.1e}"},
        {"metric": "omnitrain / transformers (training step)", "value": ours_tps / hf_tps, "unit": "x", "baseline": 1.0, "note": "target >= 1.0x"},
        {"metric": "forward+backward tokens/s, logits out", "value": ours_logits, "unit": "tokens/s", "baseline": hf_logits,
         "note": "both return logits; the same F.cross_entropy outside the model"},
        {"metric": "omnitrain / transformers (logits out)", "value": ours_logits / hf_logits, "unit": "x", "baseline": 1.0, "note": ""},
        {"metric": "decode tokens/s with KV cache", "value": cached, "unit": "tokens/s", "baseline": uncached, "note": f"baseline: no cache; 64-token prompt, {new} new tokens, greedy"},
        {"metric": "KV cache speed-up", "value": cached / uncached, "unit": "x", "baseline": None, "note": ""},
        {"metric": "time to first token, speech output", "value": ttft * 1e3, "unit": "ms", "baseline": None, "note": "tiny model (recipes/model/tiny), 16-token prompt + <boa>"},
        {"metric": "time to first audio chunk, decoded to waveform", "value": ttfa * 1e3, "unit": "ms", "baseline": chunk_s * 1e3,
         "note": "10 frames x 4 levels generated + RVQ codec decode; baseline column: the chunk's duration (real time if below)"},
    ]
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
