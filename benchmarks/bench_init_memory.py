"""Peak host memory per rank while FSDP2 ranks build their model (issue 19, item 5), before and after meta-device init.

Two gloo ranks on this machine, each doing what ``omnitrain train strategy=fsdp`` does up to the first step:

* ``full``: every rank builds the whole fp32 model on CPU, then ``fully_shard`` shards it (``init_device=cpu``,
  the only way before);
* ``meta``: the model is built on the meta device, sharded, and each rank materialises its own shards
  (``init_device=meta``, the default under FSDP: ``omnitrain.model.weights``), one full parameter at a time;
* ``hf-full`` / ``hf-meta``: the same for a Hugging Face Llama checkpoint in safetensors (``hf_init``): transformers
  loads the whole model on every rank and it is grown and sharded, vs read tensor by tensor into the shards.

Per mode, a fresh pair of processes; the figure is the peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` once imports, the process group and a warm-up sharding are done) minus the resident memory
then (what the model building adds), and the
resident memory left once the shards are built. The initial weights are checked equal across modes (sharded
sums of the first and last parameters), so both sides do the same work.

    python benchmarks/bench_init_memory.py [--model 150m] [--vocab 32768] [--repeats 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml

from omnitrain.config import from_dict
from omnitrain.model.transformer import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "meta", "hf-full", "hf-meta")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _rank(rank: int, port: int, mode: str, model_cfg: dict, hf_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from omnitrain.model.hf import extend_vocabulary, load_hf_llama
    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.model.weights import GrownVocabulary, hf_weights, materialise
    from omnitrain.train.strategy import StrategyConfig, fsdp_parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    cfg = from_dict(ModelConfig, model_cfg)
    # warm-up: what sharding itself loads (FSDP2, DTensor code) is not the model's
    warm = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2), device="meta")
    fsdp_parallelize(StrategyConfig(name="fsdp", devices=2), lambda m, device: materialise(m, device))(warm, mesh)
    warm(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    del warm
    gc.collect()
    torch.manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here: imports peaked higher
    base, base_file = _rss_mb(), _status_mb("RssFile")
    strategy, weights, grown = StrategyConfig(name="fsdp", devices=2), None, None
    if mode == "full":
        model = Transformer(cfg)
        fsdp_parallelize(strategy)(model, mesh)
    elif mode == "meta":
        model = Transformer(cfg, device="meta")
        fsdp_parallelize(strategy, lambda m, device: materialise(m, device))(model, mesh)
    elif mode == "hf-full":
        model = extend_vocabulary(load_hf_llama(hf_dir)[0], cfg.vocab_size)
        fsdp_parallelize(strategy)(model, mesh)
    else:
        imported, weights = hf_weights(hf_dir)
        model = Transformer(replace(imported, vocab_size=cfg.vocab_size), device="meta")
        grown = GrownVocabulary(weights, cfg.vocab_size, seed=0)
        fsdp_parallelize(strategy, lambda m, device: materialise(m, device, grown))(model, mesh)
    gc.collect()
    peak, file_backed = _status_mb("VmHWM"), _status_mb("RssFile") - base_file  # mapped safetensors pages: page cache
    weights = grown = None  # hf-meta: the source's file handles close, its mapped pages leave this process
    gc.collect()
    after = _rss_mb()
    # the same work on both sides: the same initial weights (a sum over every rank's shards)
    total = torch.tensor([sum(p.to_local().double().sum().item() for p in model.parameters())], dtype=torch.float64)
    dist.all_reduce(total)
    result = {"rank": rank, "base_mb": base, "peak_add_mb": peak - base, "file_mb": file_backed, "after_add_mb": after - base,
              "weights_sum": total.item()}
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def measure(mode: str, model_cfg: dict, hf_dir: str, work: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [work / f"{mode}-{r}.json" for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, mode, model_cfg, hf_dir, str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"mode {mode}: a rank exited with {p.exitcode}")
    return [json.loads(o.read_text()) for o in outs]


def write_hf_checkpoint(model_cfg: dict, folder: Path, text_vocab: int) -> None:
    """A randomly initialised Llama of ``model_cfg``'s shape with ``text_vocab`` ids, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model_cfg
    hf = LlamaConfig(vocab_size=text_vocab, hidden_size=c["dim"], num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                     num_key_value_heads=c.get("n_kv_heads") or c["n_heads"], intermediate_size=4 * c["dim"],
                     tie_word_embeddings=bool(c.get("tie_embeddings", True)), rope_theta=c.get("rope_theta", 10000.0))  # fmt: skip
    LlamaForCausalLM(hf).save_pretrained(folder, safe_serialization=True)


def run(quick: bool = False, model: str = "150m", vocab: int = 32768, repeats: int = 1) -> list[dict]:
    model_cfg = {**yaml.safe_load((REPO / "recipes" / "model" / f"{model}.yaml").read_text()), "vocab_size": vocab}
    model_cfg["qk_norm"] = False  # the Hugging Face Llama has none: the same model on both sides
    if quick:
        model_cfg.update(dim=256, n_layers=4, n_heads=4, n_kv_heads=4)
    n_params = sum(p.numel() for p in Transformer(from_dict(ModelConfig, model_cfg), device="meta").parameters())
    print(f"bench_init_memory: model {model} (dim {model_cfg['dim']}, {model_cfg['n_layers']} layers, vocab {vocab}), "
          f"{n_params / 1e6:.1f}M params = {4 * n_params / 2**20:.0f} MB fp32; 2 gloo ranks, FSDP2; {repeats} repeat(s), "
          "modes in alternating order")  # fmt: skip
    rows: dict[str, list[list[dict]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir = work / "hf"
        write_hf_checkpoint(model_cfg, hf_dir, text_vocab=vocab - 1024)
        for i in range(repeats):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                rows[mode].append(measure(mode, model_cfg, str(hf_dir), work))
    out = []
    print(f"{'mode':<8} {'peak added per rank (MB)':>26} {'of it file-backed':>18} {'resident after (MB)':>20}")
    for mode in MODES:
        peak = statistics.median(max(r["peak_add_mb"] for r in rep) for rep in rows[mode])
        after = statistics.median(max(r["after_add_mb"] for r in rep) for rep in rows[mode])
        file_backed = statistics.median(max(r["file_mb"] for r in rep) for rep in rows[mode])
        sums = {round(rep[0]["weights_sum"], 6) for rep in rows[mode]}
        print(f"{mode:<8} {peak:>26.0f} {file_backed:>18.0f} {after:>20.0f}   weights sum {sums}")
        out.append({"metric": f"init peak RSS per rank, {mode}", "value": round(peak), "unit": "MB",
                    "baseline": None, "note": f"{model}, vocab {vocab}, 2 ranks FSDP2, added to the process's start"})  # fmt: skip
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="150m")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--measure", metavar="MODE", help="one mode only, for a ModelConfig given as --config JSON; prints JSON")
    parser.add_argument("--config", default="{}")
    a = parser.parse_args()
    if a.measure:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(a.measure, json.loads(a.config), "", Path(tmp))))
    else:
        run(a.quick, a.model, a.vocab, a.repeats)
