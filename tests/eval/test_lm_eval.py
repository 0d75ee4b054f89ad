"""lm-evaluation-harness on omnitrain models (issue 21, item 2): the ``omnitrain`` model of lm-eval, its CLI
wrapper, the same scores from an export under lm-eval's own ``hf`` model, results in lm-eval's schema.

Every dataset is local: lm-eval's shipped ``arc_easy`` task (its prompt, choices and metrics) over a jsonl copy
in ARC's format, plus two small tasks of our own for the rolling log-likelihood and generation paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnitrain.model.io import save_model
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.layout import TokenLayout

lm_eval = pytest.importorskip("lm_eval")
ARC_YAML = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
QUESTIONS = [("What do plants need to make food?", ["sunlight", "sand", "plastic", "noise"], "A"),
             ("Which is a liquid at room temperature?", ["iron", "water", "salt", "wood"], "B"),
             ("What does a thermometer measure?", ["mass", "length", "temperature", "speed"], "C"),
             ("Which planet is closest to the Sun?", ["Earth", "Mars", "Jupiter", "Mercury"], "D"),
             ("What gas do animals breathe in?", ["oxygen", "helium", "neon", "argon"], "A"),
             ("Ice melting is an example of a", ["chemical change", "physical change", "reaction", "fusion"], "B")]  # fmt: skip


def _tasks(folder: Path) -> Path:
    """A task folder for lm-eval's include_path: arc_easy over a local jsonl, a rolling and a generation task."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
            for i, (q, c, a) in enumerate(QUESTIONS)]  # fmt: skip
    (folder / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = {"data_files": {s: str(folder / "arc.jsonl") for s in ("train", "validation", "test")}}
    (folder / "arc_easy_local.yaml").write_text(
        f"include: {ARC_YAML}\ntask: arc_easy_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {json.dumps(local)}\n"
    )
    texts = [{"text": "Debian is a free operating system. " * 3}, {"text": "def add(a, b):\n    return a + b\n"}]
    (folder / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    data = json.dumps({"data_files": {"test": str(folder / "texts.jsonl")}})
    (folder / "rolling.yaml").write_text(
        f"task: omni_rolling\ndataset_path: json\ndataset_kwargs: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: omni_gen\ndataset_path: json\ndataset_kwargs: {data}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{text[:12]}}'\ndoc_to_target: '{{text[12:20]}}'\ngeneration_kwargs:\n  until: ['\\n\\n']\n"
        "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, text_tokenizer_dir):
    from omnitrain.tokenizer.text import TextTokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("lm_eval")
    layout = TokenLayout.from_tokenizers(TextTokenizer.load(text_tokenizer_dir))
    layout.save(root / "layout")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True))
    save_model(model, root / "model", root / "layout", {"step": 5})
    return root, _tasks(root / "tasks"), text_tokenizer_dir


def _evaluate(model: str, model_args: str, tasks: list[str], task_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    import omnitrain.eval.lm_eval_adapter  # noqa: F401  (registers "omnitrain")

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                                   batch_size=4, log_samples=True, bootstrap_iters=0)  # fmt: skip


@pytest.mark.slow
def test_the_omnitrain_model_runs_lm_eval_tasks_with_our_scoring(world):
    from omnitrain.eval.harness import ModelSpec, load_system
    from omnitrain.tokenizer.bundle import TokenizerPaths

    root, task_dir, tok_dir = world
    res = _evaluate("omnitrain", f"path={root / 'model'},tokenizer={tok_dir}", ["arc_easy_local", "omni_rolling", "omni_gen"], task_dir)
    ours = load_system(ModelSpec(path=str(root / "model"), tokenizers=TokenizerPaths(text=str(tok_dir))), 4)
    arc = res["samples"]["arc_easy_local"]
    assert len(arc) == len(QUESTIONS) and res["results"]["arc_easy_local"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in arc) / len(arc))  # fmt: skip
    for s in arc:  # lm-eval's prompt and choices, our log-likelihoods
        doc = s["doc"]
        want = ours.loglikelihood([(f"Question: {doc['question']}\nAnswer:", f" {c}") for c in doc["choices"]["text"]], progress=False)
        assert [r[0][0] for r in s["resps"]] == pytest.approx([w[0] for w in want], abs=1e-5)
    for s in res["samples"]["omni_rolling"]:  # the whole text, teacher-forced after <bos>
        ids = [ours.prefix[0], *ours.encode(s["doc"]["text"])]
        with torch.no_grad():
            logp = ours.model(torch.tensor([ids])).log_softmax(-1)[0, :-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()
        assert s["resps"][0][0] == pytest.approx(float(logp), abs=1e-3)
    assert math.isfinite(res["results"]["omni_rolling"]["bits_per_byte,none"])
    gen = res["samples"]["omni_gen"]
    want = ours.generate([s["doc"]["text"][:12] for s in gen], 6, ["\n\n"], progress=False)
    assert [s["resps"][0][0] for s in gen] == [w[0] for w in want]


@pytest.mark.slow
def test_the_export_scores_the_same_under_lm_evals_hf_model(world, tmp_path):
    from omnitrain.model.export import ExportConfig, export
    from omnitrain.tokenizer.bundle import TokenizerPaths

    root, task_dir, tok_dir = world
    out = export(ExportConfig(run=str(root / "model"), out=str(tmp_path / "hf"), tokenizers=TokenizerPaths(text=str(tok_dir))))
    ours = _evaluate("omnitrain", f"path={root / 'model'},tokenizer={tok_dir}", ["arc_easy_local"], task_dir)
    theirs = _evaluate("hf", f"pretrained={out},add_bos_token=True,dtype=float32,device=cpu", ["arc_easy_local"], task_dir)
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["arc_easy_local"][metric] == ours["results"]["arc_easy_local"][metric], metric
    for a, b in zip(ours["samples"]["arc_easy_local"], theirs["samples"]["arc_easy_local"], strict=True):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)


@pytest.mark.slow
def test_python_m_omnitrain_lm_eval_hands_lm_evals_own_arguments_over(world, tmp_path):
    root, task_dir, tok_dir = world
    cmd = [sys.executable, "-m", "omnitrain.lm_eval", "--model", "omnitrain", "--model_args", f"path={root / 'model'},tokenizer={tok_dir}",
           "--tasks", "arc_easy_local", "--include_path", str(task_dir), "--limit", "3", "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy_local" in proc.stdout and "acc" in proc.stdout
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and json.loads(written[0].read_text())["n-samples"]["arc_easy_local"]["effective"] == 3


def test_omnitrain_eval_writes_results_in_lm_evals_schema_and_to_lm_eval_converts(world, tmp_path, capsys):
    from lm_eval.utils import make_table

    from omnitrain.cli import main
    from omnitrain.eval import results as R

    root, task_dir, tok_dir = world
    out = tmp_path / "ev"
    text = tmp_path / "held_out.txt"  # two windows of 40 words
    text.write_text(" ".join(f"word{i % 7} and more text" for i in range(20)))
    argv = ["eval", "tasks=[perplexity]", f"model.path={root / 'model'}", f"model.tokenizers.text={tok_dir}",
            f"perplexity.paths=[{text}]", "perplexity.chunk_chars=200", f"out_dir={out}", "progress=false", "report=false"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    ours, theirs = R.read_results(out), json.loads((out / "results_lm_eval.json").read_text())
    ppl = ours["tasks"]["perplexity"]
    row = theirs["results"]["perplexity"]
    assert row["perplexity,none"] == ppl["metrics"]["perplexity"]["value"] and row["perplexity_stderr,none"] == "N/A"
    assert row["nll_per_token_stderr,none"] == ppl["metrics"]["nll_per_token"]["stderr"]
    assert theirs["n-samples"]["perplexity"] == {"original": 2, "effective": 2} and theirs["versions"]["perplexity"] == 1
    assert theirs["configs"]["perplexity"]["task"] == "perplexity" and theirs["higher_is_better"]["perplexity"]["bits_per_byte"] is False
    assert theirs["config"]["model_args"] == f"path={root / 'model'}" and theirs["model_name"] == ours["model"]["name"]
    assert "perplexity" in make_table(theirs)  # lm-eval's own table reads it
    (out / "results_lm_eval.json").unlink()
    assert main(["eval", "to-lm-eval", f"results={out / 'results.json'}"]) == 0
    assert json.loads((out / "results_lm_eval.json").read_text()) == theirs
    assert main(["eval", "list"]) == 0
    listed = capsys.readouterr().out
    assert "mmlu" in listed and "speech_wer" in listed and "python -m omnitrain.lm_eval" in listed
