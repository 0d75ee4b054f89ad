"""omnitrain models under lm-evaluation-harness: ``lm_eval.simple_evaluate(model="omnitrain", ...)``.

Importing this module registers the model name ``omnitrain`` in lm-eval (0.4 has no plugin entry points:
an outside model exists once its module is imported)::

    import omnitrain.eval.lm_eval_adapter  # noqa: F401  (registers "omnitrain")
    lm_eval.simple_evaluate(model="omnitrain", model_args="path=runs/x", tasks=["arc_easy"])

    python -m omnitrain.lm_eval --model omnitrain --model_args path=runs/x --tasks arc_easy   # the CLI, same

``model_args``: ``path`` (an omnitrain run / model folder, or a Hugging Face Llama / Qwen3 folder, as
``omnitrain eval``'s model.path), ``tokenizer`` (the text tokenizer, when the run's shards do not say it),
``max_length`` (4096), ``batch_size`` (16), ``device`` (cpu), ``chat_template`` (false).

The scoring is ``omnitrain eval``'s (``omnitrain.eval.harness.TextLM``): requests whose model input is the
same share one forward pass and only the scored positions go through the output matrix; generation is
``omnitrain.model.generate`` with a KV cache. An omnitrain model starts every input with ``<bos>``, as in
training; to get the same numbers from its export (``omnitrain export``) under lm-eval's own ``hf`` model,
pass ``add_bos_token=True`` there.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own model names: its registry fills them only while it is empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from omnitrain.eval.harness import ModelSpec, load_system
from omnitrain.tokenizer.bundle import TokenizerPaths


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _batch_size(value: Any) -> int:
    """lm-eval's ``--batch_size``: a number, or ``auto`` / ``auto:N`` (we take 16: no memory probing on CPU)."""
    if value is None or str(value).startswith("auto"):
        return 16
    return int(value)


@register_model("omnitrain")
class OmnitrainLM(LM):
    """lm-eval's ``LM`` over ``omnitrain.eval.harness``'s text models (an omnitrain run, or a HF Llama / Qwen3)."""

    def __init__(self, path: str | None = None, tokenizer: str | None = None, max_length: int = 4096, batch_size: Any = 16,
                 device: str | None = "cpu", chat_template: Any = False, kind: str = "auto", max_batch_size: Any = None,
                 **unused: Any) -> None:  # fmt: skip
        super().__init__()
        if not path:
            raise ValueError("model_args needs path=<omnitrain run dir or model folder> (e.g. --model_args path=runs/x)")
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI passes --device cuda by default
            print(f"omnitrain lm-eval model: device {device} is not available, using cpu", flush=True)
            device = "cpu"
        spec = ModelSpec(kind=kind, path=str(path), tokenizers=TokenizerPaths(text=tokenizer), max_length=int(max_length),
                         device=device, chat_template=_flag(chat_template))  # fmt: skip
        self.lm = load_system(spec, _batch_size(batch_size))
        if getattr(self.lm, "kind", None) != "text":
            raise ValueError(f"path={path} is not a text model that lm-eval can score")
        self.progress = True

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.info.get("name", "omnitrain")).replace("/", "__")

    def _prefix_token(self) -> int:
        return self.lm.prefix[0] if self.lm.prefix else self.lm.empty_context()[0]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self.lm.loglikelihood([tuple(r.args) for r in requests], progress=not disable_tqdm)
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood, in disjoint windows of at most ``max_length`` tokens (lm-eval's rule)."""
        pairs, owner = [], []
        for k, r in enumerate(requests):
            ids = list(self.lm.encode(r.args[0]))
            windows = get_rolling_token_windows(token_list=ids, prefix_token=self._prefix_token(),
                                                max_seq_len=self.lm.spec.max_length, context_len=1)  # fmt: skip
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(k)
        scores = self.lm.loglikelihood_tokens(pairs, progress=not disable_tqdm)
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores, strict=True):
            out[k] += ll
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample`` / ``temperature``) continuations cut at the ``until`` strings;
        requests with the same generation settings are batched together."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, r in enumerate(requests):
            kw = dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if _flag(kw.get("do_sample", False)) else 0.0
            key = (tuple(until), int(kw.get("max_gen_toks", 256)), temperature, float(kw.get("top_p", 1.0)))
            groups.setdefault(key, []).append(k)
        out = [""] * len(requests)
        for (until, max_new, temperature, top_p), idx in groups.items():
            texts = self.lm.generate([requests[k].args[0] for k in idx], max_new, list(until), temperature, top_p=top_p,
                                     progress=not disable_tqdm)  # fmt: skip
            for k, t in zip(idx, texts, strict=True):
                out[k] = t[0]
                self.cache_hook.add_partial("generate_until", requests[k].args, t[0])
        return out
