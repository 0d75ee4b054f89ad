"""``omnitrain eval`` tasks on the training model itself, every N steps of a run (``eval_in_training``).

``omnitrain train`` (``omnitrain.cli.train``) builds an :class:`InTrainingEvaluator` with :func:`build_evaluator`
and hands it to ``omnitrain.train.loop.train(cfg, plain, evaluator=...)``: the trainer never imports this stage, and
this stage never imports the trainer (``omnitrain.train.evaluation.Evaluator`` is the protocol it meets, by
shape; the run it gets is ``omnitrain.train.build.Run``). There is no second copy of the model: :class:`TrainingModel` is the eval harness's model adapter
(``OmniModel``: prompts, media tokenizers, scoring) around the model *as the strategy wrapped it*:

* scoring (``mmlu``, ``perplexity``) goes through the wrapper's forward, so DDP, FSDP2 (which unshards each
  unit in its forward) and DeepSpeed ZeRO-3 (which gathers) run as in training, in the training precision;
* with several ranks, the distinct model inputs are dealt out round-robin, each rank scores its own, and the
  per-request scores are summed over the ranks (an all-reduce of a tensor holding zeros where a rank has none):
  every rank then holds every score and computes the same metrics. The ranks stay in lockstep, as FSDP needs
  every rank in every forward: a rank with fewer batches runs one-token forwards until it has made as many calls
  as the busiest rank;
* generation (``speech_wer``, ``docvqa``, ``reading``): prompts dealt out the same way; one process, or DDP (every
  rank holds the whole model), generates with the KV cache on the unwrapped model; a sharded model (FSDP2,
  DeepSpeed) generates one prompt at a time through the wrapper's forward for exactly ``max_new_tokens`` steps
  (the answer is cut at its end token afterwards), prompt lists padded to the same length on every rank, so
  every rank makes the same number of forward calls. The texts are gathered to every rank.

Results: ``<run_dir>/eval/step_N/results.json`` (+ samples.jsonl, results_lm_eval.json), in ``omnitrain eval``'s
format with ``model.checkpoint_step = N``, so ``omnitrain eval compare results=[.../eval/step_0,.../eval/step_40]``
and the reports read them; and ``eval/<task>/<metric>`` in metrics.jsonl.
"""

from __future__ import annotations

import math
import shutil
import time
import typing
from pathlib import Path
from typing import Any

import torch

from omnitrain.config import from_dict, to_dict
from omnitrain.eval import results as R
from omnitrain.eval.harness import EvalConfig, ModelSpec, OmniModel, TextLM
from omnitrain.eval.lm_eval_format import write_lm_eval
from omnitrain.eval.tasks import TASKS
from omnitrain.model import generate as gen
from omnitrain.model.io import resolve_path
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.hf_text import load_text_tokenizer

# humaneval runs generated programs in a sandbox, minutes per model: evaluate its checkpoints with `omnitrain eval`
IN_TRAINING = ("mmlu", "perplexity", "speech_wer", "docvqa", "reading", "tts", "s2s")  # tts / s2s: one process or ddp


def build_evaluator(cfg: Any) -> InTrainingEvaluator | None:
    """The evaluator of a ``TrainConfig``'s ``eval_in_training`` (None when off); task configs are checked here,
    before any work."""
    if not cfg.eval_in_training.every:
        return None
    paths = cfg.eval_in_training.tokenizers
    if not paths.text:
        paths = recorded_tokenizers(cfg.data.sources, text_tokenizer_default(cfg))
    return InTrainingEvaluator(cfg.eval_in_training, Path(cfg.run_dir), paths)


def text_tokenizer_default(cfg: Any) -> str | None:
    """With ``hf_init``, the imported model's own tokenizer (its folder, or its GGUF file)."""
    if not cfg.hf_init.path:
        return None
    folder = Path(resolve_path(cfg.hf_init.path))
    return str(folder / cfg.hf_init.gguf_file) if cfg.hf_init.gguf_file else str(folder)


class InTrainingEvaluator:
    """``omnitrain.train.evaluation.Evaluator``: the configured tasks, each with its limit, on the training model."""

    def __init__(self, cfg: Any, run_dir: Path, paths: TokenizerPaths) -> None:
        """``cfg``: an ``omnitrain.train.evaluation.EvalInTrainingConfig``; ``paths``: the tokenizers of the shards."""
        self.cfg, self.run_dir, self.paths = cfg, Path(run_dir), paths
        self.text_tok = load_text_tokenizer(paths.text)  # (a bad path fails here, before training starts)
        hints = typing.get_type_hints(EvalConfig)
        self.tasks: list[tuple[Any, int | None, dict[str, Any]]] = []
        for name, given in cfg.tasks.items():
            if name not in IN_TRAINING:
                raise ValueError(f"eval_in_training.tasks.{name}: not a task that runs inside training; choose from "
                                 f"{list(IN_TRAINING)} (humaneval: `omnitrain eval` on a checkpoint)")  # fmt: skip
            given = dict(given or {})
            limit = given.pop("limit", None)
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise ValueError(f"eval_in_training.tasks.{name}.limit={limit!r} must be an integer >= 1 (or null: every item)")
            task_cfg = from_dict(hints[name], given, prefix=f"eval_in_training.tasks.{name}")
            self.tasks.append((TASKS[name](task_cfg), limit, to_dict(task_cfg)))
        self.system: TrainingModel | None = None

    def _system(self, run: Any) -> TrainingModel:
        if self.system is None:
            self.system = TrainingModel(run, self.paths, self.text_tok, self.cfg.batch_size)
        return self.system

    @torch.no_grad()
    def evaluate(self, run: Any, step: int) -> dict[str, float]:
        """Every task on the model as it is at ``step`` (a collective: every rank calls it)."""
        system, model = self._system(run), run.model
        system.info["checkpoint_step"] = step
        res = R.new_results(dict(system.info), {"eval_in_training": to_dict(self.cfg), "step": step})
        row: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        model.eval()
        try:
            for task, limit, task_cfg in self.tasks:
                t0 = time.perf_counter()
                o = task.run(system, limit, progress=False)
                dt = time.perf_counter() - t0
                res["tasks"][task.name] = {"metrics": o.metrics, "groups": o.groups, "items": o.items, "seconds": dt,
                                           "items_per_s": o.items / dt if dt > 0 else None, "config": task_cfg, "limit": limit}  # fmt: skip
                if o.info:  # e.g. tts / s2s: the model size, layout and device their latency was measured on
                    res["tasks"][task.name]["info"] = o.info
                row.update({f"eval/{task.name}/{m}": v["value"] for m, v in o.metrics.items() if _number(v["value"])})
                samples += [{**s, "step": step} for s in o.samples]
        finally:
            model.train()
        if run.fabric.global_rank == 0:
            self._write(step, res, samples)
        return row

    def _write(self, step: int, res: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        """``eval/step_N`` whole or not at all: written beside it, then moved in place (replacing a killed attempt's)."""
        final = self.run_dir / "eval" / f"step_{step}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        R.write_results(tmp, res)
        R.write_samples(tmp, samples)
        write_lm_eval(tmp, res)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)

    def forget_after(self, step: int, rank: int) -> None:
        if rank != 0:
            return
        for folder in (self.run_dir / "eval").glob("step_*"):
            tail = folder.name.removeprefix("step_").removesuffix(".tmp")
            if folder.name.endswith(".tmp") or (tail.isdigit() and int(tail) > step):
                shutil.rmtree(folder, ignore_errors=True)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))


def recorded_tokenizers(sources: dict[str, Any], text_default: str | None) -> TokenizerPaths:
    """The tokenizers the training shards were built with (their manifest), else ``text_default`` for text."""
    import json

    for spec in sources.values():
        manifest = Path(spec.path) / "manifest.json"
        recorded = json.loads(manifest.read_text()).get("config", {}).get("tokenizers") if manifest.is_file() else None
        if recorded and recorded.get("text"):
            return TokenizerPaths(**recorded)
    if text_default:
        return TokenizerPaths(text=text_default)
    raise ValueError("eval_in_training needs the text tokenizer the shards were built with, and their manifest does not "
                     "name it: set eval_in_training.tokenizers.text=<its folder or file>")  # fmt: skip


class _Forward:
    """The training model seen through its strategy's wrapper: ``hidden(ids)`` is the wrapper's forward, the
    logits [B, T, V], and norm / output are identities, so that ``TextLM.loglikelihood_tokens`` scores with it
    unchanged (it gathers the scored positions, then applies ``output(norm(h))``). Counts its forward calls."""

    def __init__(self, wrapped: Any, inner: Any) -> None:
        self.wrapped, self.inner, self.calls = wrapped, inner, 0

    def parameters(self) -> Any:
        return self.inner.parameters()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.wrapped(ids)  # [B, T, V]

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    output = norm

    def eval(self) -> _Forward:
        return self

    def forward_cached(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cache: Any) -> torch.Tensor:
        """Generation without a cache, one prompt at a time (no padding: positions are 0..T-1, every key valid)."""
        assert cache is None and ids.shape[0] == 1 and bool(valid.all()), "lockstep generation runs one unpadded prompt"
        return self.hidden(ids)


class TrainingModel(OmniModel):
    """``OmniModel`` (the harness's omnitrain adapter) on the model being trained, split over the ranks."""

    def __init__(self, run: Any, paths: TokenizerPaths, text_tok: Any, batch_size: int) -> None:
        self.fabric, self.inner = run.fabric, run.strategy.unwrap()
        self.rank, self.world = run.fabric.global_rank, run.fabric.world_size
        # a sharded model needs every rank in every forward (FSDP2 unshards, ZeRO-3 gathers); DDP ranks hold it whole
        self.lockstep = self.world > 1 and run.cfg.strategy.name != "ddp"
        self.forward = _Forward(run.model, self.inner)
        self.tok_paths, self.text_tok, self._media = paths, text_tok, None
        layout, sp = run.layout, run.layout.specials
        spec = ModelSpec(kind="omnitrain", path=str(run.cfg.run_dir), tokenizers=paths, device=str(run.fabric.device))
        TextLM.__init__(self, self.forward, self.text_tok.encode, self.text_tok.decode, [sp["bos"]], [sp["eos"]], spec,
                        batch_size, layout)  # fmt: skip
        self.info = {"kind": "omnitrain", "path": str(run.cfg.run_dir), "checkpoint_step": None, "layout_hash": layout.hash,
                     "audio_layout": self.inner.cfg.audio_layout, "name": f"{Path(run.cfg.run_dir).name} (in training)", "in_training": True}  # fmt: skip

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(t, reduce_op="sum") if self.world > 1 else t

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]], progress: bool = True) -> list[tuple[float, bool]]:
        """Each rank scores the requests of its share of the distinct model inputs; the scores summed over the ranks."""
        keys = [tuple((list(c) + list(k))[-(self.spec.max_length + 1) :][:-1]) for c, k in pairs]  # as TextLM groups them
        rows = list(dict.fromkeys(keys))
        mine_rows = set(rows[self.rank :: self.world])
        mine = [i for i, key in enumerate(keys) if key in mine_rows]
        self.forward.calls = 0
        got = super().loglikelihood_tokens([pairs[i] for i in mine], progress)
        busiest = math.ceil(math.ceil(len(rows) / self.world) / self.batch_size)  # forward calls of the busiest rank
        self._pad_calls(busiest)
        scores = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.fabric.device)  # [requests, (logprob, greedy)]
        for i, (lp, greedy) in zip(mine, got, strict=True):
            scores[i, 0], scores[i, 1] = lp, float(greedy)
        return [(lp, g > 0.5) for lp, g in self._reduce(scores).tolist()]

    def _pad_calls(self, calls: int) -> None:
        """One-token forwards until this rank has made ``calls`` (FSDP2 / ZeRO-3 / DDP buffers: a collective each)."""
        if self.world > 1:
            ids = torch.ones(1, 1, dtype=torch.long, device=self.fabric.device)  # [1, 1]: one text position
            if (g := self._grouping()) is not None:  # delay / depth: [1, 1, K], the text token in channel 0, no levels
                ids = torch.cat([ids[..., None], torch.full((1, 1, g.K - 1), -1, dtype=torch.long, device=ids.device)], -1)
            while self.forward.calls < calls:
                self.forward.hidden(ids)

    @torch.no_grad()
    def generate_multimodal(self, prompts: list[dict[str, Any]], max_new_tokens: int, progress: bool = True,
                            image_size: int | None = None) -> list[str]:  # fmt: skip
        import torch.distributed as dist

        idx = list(range(len(prompts)))[self.rank :: self.world]
        width = math.ceil(len(prompts) / self.world)
        if self.lockstep:
            padded = [prompts[i] for i in idx] + [prompts[0]] * (width - len(idx))  # same calls on every rank
            texts = self._generate_lockstep(padded, max_new_tokens, image_size)[: len(idx)]
        else:
            self.model = self.inner  # whole on this rank: the KV-cache path of OmniModel
            try:
                texts = super().generate_multimodal([prompts[i] for i in idx], max_new_tokens, False, image_size) if idx else []
            finally:
                self.model = self.forward
        if self.world == 1:
            return texts
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, texts)
        out = [""] * len(prompts)
        for r, part in enumerate(parts):
            for i, text in zip(list(range(len(prompts)))[r :: self.world], part, strict=True):
                out[i] = text
        return out

    def _generate_lockstep(self, prompts: list[dict[str, Any]], max_new_tokens: int, image_size: int | None) -> list[str]:
        """One prompt at a time through the wrapper's forward, always ``max_new_tokens`` steps (no early stop)."""
        from omnitrain.model.generate_command import GenerateConfig, build_prompt

        media = self.media()
        if media is not None and image_size is not None:
            import copy
            import dataclasses

            media = copy.copy(media)
            media.cfg = dataclasses.replace(media.cfg, image_size=image_size)
        out = []
        for p in prompts:
            ids = build_prompt(GenerateConfig(text=p.get("text"), images=list(p.get("images", [])), audios=list(p.get("audios", []))),
                               self.layout, self.text_tok, media)  # fmt: skip
            cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, stop=[], constrain=True)
            res = gen.generate(self.forward, self.layout, [ids], cfg, use_cache=False)
            out.append(self.decode(self._text_ids(res.tokens[0])).strip())
        return out
