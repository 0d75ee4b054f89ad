"""Meta-device initialisation (issue 19, item 5): a model built on the meta device and materialised after FSDP2 has
sharded it starts from exactly the weights a single process builds, fresh or imported, and no rank holds the whole
model while building it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from omnitrain.model.transformer import ModelConfig, Transformer

CFG = {"vocab_size": 97, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}  # 97 rows: uneven shards over 2 ranks


def write_llama(folder: Path, vocab: int, tie: bool) -> None:
    """A small randomly initialised Hugging Face Llama, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    hf = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, tie_word_embeddings=tie)  # fmt: skip
    LlamaForCausalLM(hf).save_pretrained(folder, safe_serialization=True)


def _rank(rank: int, port: int, out: str, tie: bool, hf_dir: str, hsdp: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from omnitrain.model.hf import extend_vocabulary, load_hf_llama
    from omnitrain.model.weights import GrownVocabulary, hf_weights, materialise
    from omnitrain.train.strategy import StrategyConfig, fsdp_parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    strategy = StrategyConfig(name="fsdp", devices=2, hsdp_replicas=hsdp)
    cfg = ModelConfig(**CFG, tie_embeddings=tie)
    result: dict = {}

    torch.manual_seed(0)
    reference = Transformer(cfg).state_dict()  # what one process starts from
    torch.manual_seed(0)
    model = Transformer(cfg, device="meta")
    fsdp_parallelize(strategy, lambda m, device: materialise(m, device))(model, mesh)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    result["fresh"] = max((full[k] - reference[k]).abs().max().item() for k in reference)
    result["sharded"] = all(hasattr(p, "device_mesh") for p in model.parameters())
    result["tied"] = model.output.weight is model.tok_embeddings.weight

    imported, weights = hf_weights(hf_dir)
    grown_cfg = ModelConfig(**{**imported.__dict__, "vocab_size": 97})
    hf_model = Transformer(grown_cfg, device="meta")
    fsdp_parallelize(strategy, lambda m, device: materialise(m, device, GrownVocabulary(weights, 97, seed=0)))(hf_model, mesh)
    reference = extend_vocabulary(load_hf_llama(hf_dir)[0], 97, seed=0).state_dict()
    full = {k: v.full_tensor() for k, v in hf_model.state_dict().items()}
    result["hf"] = max((full[k] - reference[k]).abs().max().item() for k in reference)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.parametrize(("tie", "hsdp"), [(True, 1), (False, 1), (False, 2)], ids=["tied", "untied", "untied-hsdp"])
def test_a_meta_model_sharded_then_materialised_starts_from_the_weights_of_one_process(tie, hsdp, tmp_path):
    """Fresh (init_weights on the full shape, each rank keeping its shard) and imported (a Hugging Face Llama read
    tensor by tensor, vocabulary grown): bit for bit what one process builds; tied weights stay one parameter."""
    write_llama(tmp_path / "hf", vocab=80, tie=tie)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(_rank, args=(port, str(out), tie, str(tmp_path / "hf"), hsdp), nprocs=2)
    got = json.loads(out.read_text())
    assert got["sharded"] and got["tied"] == tie
    assert got["fresh"] == 0.0
    assert got["hf"] == 0.0


def test_the_fresh_model_does_not_depend_on_where_it_is_built():
    """``Transformer(cfg)`` draws its weights in init_weights only (the submodules are built on the meta device), so a
    meta model materialised later with the same seed has the same weights; ``with torch.device('meta')`` is honoured."""
    from omnitrain.model.weights import materialise

    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    direct = Transformer(cfg)
    torch.manual_seed(0)
    later = materialise(Transformer(cfg, device="meta"), "cpu")
    for k, v in direct.state_dict().items():
        assert torch.equal(v, later.state_dict()[k]), k
    with torch.device("meta"):
        assert Transformer(cfg).tok_embeddings.weight.is_meta
    assert direct.output.weight is direct.tok_embeddings.weight  # tied after to_empty too


def test_weights_read_lazily_from_an_omnitrain_model_folder_and_refused_when_the_shape_differs(tmp_path):
    from omnitrain.model.io import load_model, save_model
    from omnitrain.model.weights import materialise, omnitrain_weights

    torch.manual_seed(1)
    model = Transformer(ModelConfig(**CFG, tie_embeddings=False))
    save_model(model, tmp_path / "model")
    cfg, weights = omnitrain_weights(tmp_path / "model")
    built = materialise(Transformer(cfg, device="meta"), "cpu", weights)
    loaded = load_model(tmp_path / "model")[0]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, built.state_dict()[k]), k
    wider = Transformer(ModelConfig(**{**CFG, "dim": 32, "n_heads": 2, "n_kv_heads": 1}, tie_embeddings=False), device="meta")
    with pytest.raises(ValueError, match="weights for tok_embeddings.weight have shape"):
        materialise(wider, "cpu", weights)


def test_init_device_meta_needs_fsdp_and_the_lm_objective():
    from omnitrain.train.loop import TrainConfig, sharded_init
    from omnitrain.train.strategy import StrategyConfig

    with pytest.raises(ValueError, match="init_device=meta .* needs strategy=fsdp"):
        TrainConfig(init_device="meta", strategy=StrategyConfig(name="ddp", devices=2))
    assert sharded_init(TrainConfig(strategy=StrategyConfig(name="fsdp", devices=2)))
    assert not sharded_init(TrainConfig(strategy=StrategyConfig(name="fsdp", devices=2), init_device="cpu"))
    assert not sharded_init(TrainConfig(strategy=StrategyConfig(name="ddp", devices=2)))
    assert not sharded_init(TrainConfig(strategy=StrategyConfig(name="fsdp", devices=2), objective="dpo"))


@pytest.mark.slow
def test_a_rank_building_its_shards_from_meta_never_holds_the_whole_model(tmp_path):
    """Peak resident memory a rank adds while building a ~50M-parameter model (200 MB fp32) on 2 FSDP2 ranks
    (benchmarks/bench_init_memory.py): the full build holds the whole model and then its shard; the meta build about
    its shard plus one parameter. Asserted with a wide margin: meta adds less than 3/4 of the full build."""
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg = {**CFG, "vocab_size": 16384, "dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8}

    def peak(mode: str) -> float:
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_init_memory.py"), "--measure", mode, "--config", json.dumps(cfg)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
        return max(r["peak_add_mb"] for r in json.loads(out.strip().splitlines()[-1]))

    full, meta = peak("full"), peak("meta")
    n_mb = 4 * sum(p.numel() for p in Transformer(ModelConfig(**cfg), device="meta").parameters()) / 2**20
    assert full > 0.9 * n_mb  # the full build holds the whole model: the measurement sees it
    assert meta < 0.75 * full, f"meta init added {meta:.0f} MB per rank, the full build {full:.0f} MB (model {n_mb:.0f} MB)"
