"""The model, side by side in one run (medians of several repeats, CPU, fp32):

* forward + backward tokens/s of omnitrain's Transformer vs transformers' ``LlamaForCausalLM`` with
  the identical configuration and weights;
* decoding tokens/s with the KV cache vs recomputing the whole sequence every step.
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


def run(quick: bool = False) -> list[dict]:
    import torch
    import transformers

    from omnitrain.generate import SamplingConfig, generate
    from omnitrain.hf import config_from_hf, state_dict_from_hf
    from omnitrain.model import Transformer

    torch.manual_seed(0)
    repeats, B, T = (3, 2, 256) if quick else (9, 4, 512)
    hf_cfg = transformers.LlamaConfig(vocab_size=8704, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg)
    ours = Transformer(config_from_hf(hf_cfg))
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    ids = torch.randint(0, 8704, (B, T), generator=torch.Generator().manual_seed(0))

    def train_step(model, fwd):
        def step():
            model.zero_grad(set_to_none=True)
            logits = fwd(ids)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

        return step

    # alternate the two models step by step, so that machine noise hits both alike
    steps = {"ours": train_step(ours, ours), "hf": train_step(hf, lambda x: hf(x).logits)}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for rep in range(repeats + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ours_tps, hf_tps = (B * T / statistics.median(times[n]) for n in ("ours", "hf"))
    prompt, new = [ids[0, :64].tolist()], (32 if quick else 128)
    cfg = SamplingConfig(max_new_tokens=new, greedy=True, constrain=False)
    cached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg), new, max(2, repeats // 2))
    uncached = _tokens_per_s(lambda: generate(ours, None, prompt, cfg, use_cache=False), new, max(2, repeats // 2))
    rows = [
        {"metric": "forward+backward tokens/s, omnitrain", "value": ours_tps, "unit": "tokens/s", "baseline": hf_tps, "note": f"baseline: LlamaForCausalLM (sdpa), same config and weights, B={B} T={T}"},
        {"metric": "omnitrain / transformers", "value": ours_tps / hf_tps, "unit": "x", "baseline": 1.0, "note": "target >= 1.0x"},
        {"metric": "decode tokens/s with KV cache", "value": cached, "unit": "tokens/s", "baseline": uncached, "note": f"baseline: no cache; 64-token prompt, {new} new tokens, greedy"},
        {"metric": "KV cache speed-up", "value": cached / uncached, "unit": "x", "baseline": None, "note": ""},
    ]
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
