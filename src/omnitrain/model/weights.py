"""Where a model's starting weights come from, read one parameter at a time (issue 19, item 5).

A model to be trained is first built on the meta device (``Transformer(cfg, device="meta")``: shapes, no
memory), then ``materialise``d: its storage allocated where it will live and every parameter written
from a weight source, in ``named_parameters`` order, one full tensor at a time. On one process that is
the whole model on CPU, as before. Under FSDP2 the training loop materialises after ``fully_shard``, so
each rank allocates only its shards and cuts its shard out of each full tensor (``set_full_``): the
peak host memory of a rank is its shards plus one full parameter, not the whole fp32 model (about
30 GB per rank at 7B). torchtitan does the same (meta init, shard, ``to_empty``, ``init_weights``).

Sources (``tensor(name)`` -> the full value of our parameter ``name``):

* ``None``: a fresh model, ``Transformer.init_weights`` (the same values on every rank, sharded or not);
* :class:`SafetensorsWeights`: safetensors files read lazily, tensor by tensor (``safe_open``): an
  omnitrain model folder (``init_from``, :func:`omnitrain_weights`) or a Hugging Face Llama folder
  (``hf_init``, :func:`hf_weights`), no full copy held;
* :class:`StateDictWeights`: tensors already in memory (a GGUF checkpoint, which transformers de-quantises
  as a whole, or a Hugging Face checkpoint stored as ``.bin``);
* :class:`GrownVocabulary` around either: the embedding / output rows the token layout adds
  (``omnitrain.model.hf.extend_vocabulary``'s rule and values).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from omnitrain.model.hf import config_from_hf, grow_rows, hf_name, load_hf_llama
from omnitrain.model.io import model_folder, read_model_config
from omnitrain.model.transformer import ModelConfig, Transformer, set_full_

VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


class WeightSource(Protocol):
    def tensor(self, name: str) -> torch.Tensor:
        """The full value of the model's parameter ``name``."""
        ...


@torch.no_grad()
def materialise(model: Transformer, device: torch.device | str, source: WeightSource | None = None) -> Transformer:
    """Give a meta-device (maybe FSDP2-sharded) ``model`` its storage on ``device`` and its weights from
    ``source`` (None: ``init_weights``), one parameter at a time. The modality table is zeros: set it after."""
    model.to_empty(device=device)
    if source is None:
        model.init_weights()
        return model
    for name, p in model.named_parameters():
        t = source.tensor(name)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"weights for {name} have shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
        set_full_(p, t.to(p.dtype))
    model.modality_table.zero_()
    return model


class SafetensorsWeights:
    """Parameters read lazily from safetensors files; ``rename`` maps our names to the files' names."""

    def __init__(self, files: Iterable[Path], rename: Any = None) -> None:
        from safetensors import (
            safe_open,  # safetensors: with transformers (see omnitrain.model.io.save_model)
        )

        self.rename = rename or (lambda name: name)
        self.handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self.where = {key: h for h in self.handles for key in h.keys()}

    def tensor(self, name: str) -> torch.Tensor:
        key = self.rename(name)
        if key not in self.where:
            raise ValueError(f"the checkpoint has no tensor {key} (for the model's {name})")
        return self.where[key].get_tensor(key)


class StateDictWeights:
    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def tensor(self, name: str) -> torch.Tensor:
        return self.state_dict[name]


class GrownVocabulary:
    """``source`` with the embedding / output matrices grown to ``vocab_size`` rows (``grow_rows``; the rows are
    drawn from one generator seeded with ``seed``, embedding first, as ``extend_vocabulary`` does)."""

    def __init__(self, source: WeightSource, vocab_size: int, seed: int) -> None:
        self.source, self.vocab_size, self.gen = source, vocab_size, torch.Generator().manual_seed(seed)

    def tensor(self, name: str) -> torch.Tensor:
        t = self.source.tensor(name)
        if name in VOCAB_ROWS and t.shape[0] < self.vocab_size:
            t = grow_rows(t.float(), self.vocab_size, self.gen)
        return t


def omnitrain_weights(path: str | Path) -> tuple[ModelConfig, WeightSource]:
    """(ModelConfig, lazy weights) of a consolidated omnitrain model (a ``model/`` folder or its run directory)."""
    folder = model_folder(path)
    return read_model_config(folder), SafetensorsWeights([folder / "model.safetensors"])


def hf_weights(path: str, gguf_file: str | None = None) -> tuple[ModelConfig, WeightSource]:
    """(ModelConfig, weights) of a Hugging Face Llama checkpoint: a local folder of safetensors files (read lazily),
    a hub id (its config and safetensors files downloaded first), or anything else transformers loads whole
    (a GGUF file in ``path``, ``.bin`` weights)."""
    folder = Path(path)
    if gguf_file is None and not folder.is_dir() and "/" in path and not path.startswith((".", "/")):
        folder = _hub_snapshot(path)
    files = sorted(folder.glob("*.safetensors")) if gguf_file is None and folder.is_dir() else []
    if not files:  # transformers reads it whole: GGUF is de-quantised as one model
        model, _ = load_hf_llama(path, gguf_file=gguf_file)
        return model.cfg, StateDictWeights(model.state_dict())
    from transformers import AutoConfig  # transformers: optional (the hf extra), ~0.6 s

    hf = AutoConfig.from_pretrained(folder)  # config_from_hf refuses the model types it does not read
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: only the files its index names (no stray copies)
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return config_from_hf(hf), SafetensorsWeights(files, rename=hf_name)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model's config and safetensors files (downloaded when missing)."""
    from huggingface_hub import snapshot_download  # with transformers

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated: the hub client's own message says which
        raise ValueError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); without network, "
                         "download it elsewhere and pass its local folder") from e  # fmt: skip
