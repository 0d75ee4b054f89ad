"""The ``omnitrain`` command: one entry point, a subcommand per job, configs composed by Hydra.

    omnitrain tokenizer train-text tokenizer.vocab_size=16000 corpus=files corpus.files=[data/*.jsonl]
    omnitrain tokenizer report tokenizer=runs/tokenizer/text
    omnitrain demo
    omnitrain <command> --cfg        # print the composed config and exit

Each command composes ``recipes/<recipe>.yaml`` (Hydra: config groups, ``key=value``, ``+key``,
``group=choice``) and validates the result against the command's config dataclass *before any
work*: an unknown key, a wrong type or an unknown choice stops with a message naming the key and
what is valid. Hydra and OmegaConf are imported here only; the library takes dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omnitrain.config import ConfigError, from_dict, suggest


@dataclass
class Command:
    name: str  # "tokenizer train-text"
    help: str
    recipe: str  # config name under recipes/
    schema: Callable[[], type]  # lazy: importing torch-heavy modules costs seconds
    run: Callable[[Any], Any]


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    def get(*args: Any) -> Any:
        import importlib

        obj = getattr(importlib.import_module(module), attr)
        return obj(*args) if args else obj

    return get


COMMANDS = [
    Command("tokenizer train-text", "Train the SentencePiece BPE text tokenizer (exact round trip, byte fallback).",
            "tokenizer_text", _lazy("omnitrain.tokenizer.text", "TrainTextTokenizerConfig"),
            _lazy("omnitrain.tokenizer.text", "train_text_tokenizer")),
    Command("tokenizer report", "Compression report: tokens/char of our tokenizer vs o200k_base and cl100k_base, 20 languages.",
            "tokenizer_report", _lazy("omnitrain.tokenizer.report", "TokenizerReportConfig"),
            _lazy("omnitrain.tokenizer.report", "write_report")),
    Command("tokenizer train-image", "Train the VQ image tokenizer; reports PSNR and codebook usage on held-out images.",
            "tokenizer_image", _lazy("omnitrain.tokenizer.image_train", "ImageTrainConfig"),
            _lazy("omnitrain.tokenizer.image_train", "train_image_tokenizer")),
    Command("tokenizer train-audio", "Train the RVQ audio codec; reports SI-SNR, mel distance and per-level codebook usage.",
            "tokenizer_audio", _lazy("omnitrain.tokenizer.audio_train", "AudioTrainConfig"),
            _lazy("omnitrain.tokenizer.audio_train", "train_audio_codec")),
    Command("tokenizer layout", "Build layout.json (the unified id space) from the text, image and audio tokenizers.",
            "tokenizer_layout", _lazy("omnitrain.tokenizer.build", "LayoutConfig"),
            _lazy("omnitrain.tokenizer.build", "build_layout")),
    Command("data build", "Turn one source (data_pipelines/pipeline/) into webdataset token shards + manifest.json.",
            "data_build", _lazy("omnitrain.data.pipeline.build", "BuildConfig"), _lazy("omnitrain.data.pipeline.build", "build_shards")),
    Command("data inspect", "Decode shard samples back to text, PNG and WAV; print a manifest's statistics.",
            "data_inspect", _lazy("omnitrain.data.pipeline.inspect", "InspectConfig"), _lazy("omnitrain.data.pipeline.inspect", "inspect_shards")),
    Command("train", "Train the model: a Fabric loop (single, DDP, FSDP, DeepSpeed ZeRO), exact resume, preemption-safe.",
            "train", _lazy("omnitrain.train.loop", "TrainConfig"), _lazy("omnitrain.cli", "train")),
    Command("slurm submit", "Check the job (omnitrain plan), snapshot the code and config into the run directory, sbatch slurm/train.sbatch.",
            "slurm_submit", _lazy("omnitrain.train.slurm", "SubmitConfig"), _lazy("omnitrain.train.slurm", "submit")),
    Command("plan", "Will a training job start and fit? Memory per GPU, FLOPs, step time, tokens/s, data readiness.",
            "plan", _lazy("omnitrain.train.plan", "PlanConfig"), _lazy("omnitrain.train.plan", "plan")),
    Command("generate", "Generate text, images (PNG) or speech (WAV) from a prompt of text, image and audio files.",
            "generate", _lazy("omnitrain.model.generate_command", "GenerateConfig"), _lazy("omnitrain.model.generate_command", "run_generate")),
    Command("export", "Write a run as a Hugging Face folder (model, tokenizer, layout.json, model card); push_to_hub=org/name uploads it.",
            "export", _lazy("omnitrain.model.export", "ExportConfig"), _lazy("omnitrain.model.export", "export")),
    Command("eval run", "Evaluate a model (omnitrain run, HF/GGUF Llama, or a baseline) on MMLU, HumanEval, DocVQA, speech WER.",
            "eval", _lazy("omnitrain.eval.harness", "EvalConfig"), _lazy("omnitrain.eval.harness", "run_eval")),
    Command("eval compare", "Put several eval results side by side (e.g. across the checkpoints of a run): table + chart.",
            "eval/compare", _lazy("omnitrain.eval.report", "CompareConfig"), _lazy("omnitrain.eval.report", "compare")),
    Command("eval list", "List the eval tasks: what each measures and what it needs (lm-eval's tasks: python -m omnitrain.lm_eval ls tasks).",
            "eval/list", _lazy("omnitrain.eval.lm_eval_format", "ListTasksConfig"), _lazy("omnitrain.eval.lm_eval_format", "list_tasks")),
    Command("eval to-lm-eval", "Convert an eval's results.json to lm-evaluation-harness's schema (omnitrain eval writes both).",
            "eval/to_lm_eval", _lazy("omnitrain.eval.lm_eval_format", "ToLmEvalConfig"), _lazy("omnitrain.eval.lm_eval_format", "convert")),
    Command("eval make-docqa", "Render a synthetic DocVQA-style set (invoices, forms, tables; noise, blur, rotation) for the docvqa task.",
            "eval/make_docqa", _lazy("omnitrain.eval.docqa", "MakeDocQAConfig"), _lazy("omnitrain.eval.docqa", "make_docqa")),
    Command("demo", "Run the embedded demo end to end on data made from local packages (CPU, minutes).",
            "demo", _lazy("omnitrain.demo.run", "DemoConfig"), _lazy("omnitrain.demo.run", "run_demo")),
]  # fmt: skip


def train(cfg: Any, plain: dict[str, Any] | None = None) -> dict[str, Any]:
    """``omnitrain train``: the training loop, handed the in-training evaluator of ``eval_in_training`` (built by
    the eval stage here, since the trainer never imports it: ``omnitrain.train.evaluation``)."""
    from omnitrain.eval.in_training import build_evaluator
    from omnitrain.train.loop import train as train_loop

    return train_loop(cfg, plain, evaluator=build_evaluator(cfg))


def recipes_dir(explicit: str | None = None) -> Path:
    """--recipes, else $OMNITRAIN_RECIPES, else ./recipes, else the checkout's recipes/."""
    for cand in (explicit, os.environ.get("OMNITRAIN_RECIPES"), "recipes"):
        if cand and (Path(cand) / "demo.yaml").is_file():
            return Path(cand).resolve()
        if cand and cand != "recipes":
            raise ConfigError(f"recipes folder {cand} has no demo.yaml; point --recipes at an omnitrain recipes/ tree")
    here = Path(__file__).resolve().parents[2] / "recipes"
    if here.is_dir():
        return here
    raise ConfigError("cannot find the recipes/ folder: run from an omnitrain checkout or pass --recipes DIR")


def pipelines_dir(recipes: Path) -> Path | None:
    """data_pipelines/ beside recipes/ (or $OMNITRAIN_DATA_PIPELINES): Hydra's second search path."""
    cand = Path(os.environ.get("OMNITRAIN_DATA_PIPELINES", recipes.parent / "data_pipelines"))
    return cand.resolve() if cand.is_dir() else None


def _groups(recipes: Path) -> dict[str, list[str]]:
    """Config group -> its choices (sub-folders of recipes/ and data_pipelines/ holding yaml files)."""
    out: dict[str, list[str]] = {}
    for root in (recipes, pipelines_dir(recipes)):
        for d in sorted(p for p in root.rglob("*") if p.is_dir()) if root else []:
            choices = sorted(f.stem for f in d.glob("*.yaml"))
            if choices:
                out.setdefault(d.relative_to(root).as_posix().replace("/", "."), []).extend(choices)
    return out


def _check_key(schema: type, dotted: str) -> None:
    """Raise ConfigError if ``dotted`` is not a path of fields in the dataclass ``schema``."""
    tp: Any = schema
    walked = []
    for part in dotted.split("."):
        while get_origin(tp) is not None and type(None) in get_args(tp):  # Optional[X] -> X
            tp = next(a for a in get_args(tp) if a is not type(None))
        if get_origin(tp) is dict or tp is Any:
            return  # free-form mapping below this point
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{'.'.join(walked)}' is a value, it has no sub-key '{part}'")
        hints = get_type_hints(tp)
        if part not in hints:
            where = ".".join(walked + [part])
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{where}'.{suggest(part, hints)} Valid keys here: {valid}")
        tp = hints[part]
        walked.append(part)


def compose(cmd: Command, overrides: list[str], recipes: Path) -> tuple[Any, dict[str, Any]]:
    """Compose the command's recipe with overrides; validate; return (dataclass, plain dict)."""
    # hydra / omegaconf (~0.1 s): here, so `omnitrain --help` stays ~0.05 s
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = cmd.schema()
    groups = _groups(recipes)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}. The syntax is key=value, +key=value, group=choice") from e
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if key in groups:
            value = o.value()
            if isinstance(value, str) and value not in groups[key]:
                raise ConfigError(f"unknown choice {key}={value}; valid choices: {', '.join(groups[key])}.{suggest(value, groups[key])}")
            continue
        _check_key(schema, key)
    try:
        with initialize_config_dir(config_dir=str(recipes), version_base="1.3", job_name="omnitrain"):
            extra = [f"hydra.searchpath=['file://{pipelines_dir(recipes)}']"] if pipelines_dir(recipes) else []
            composed = hydra_compose(config_name=cmd.recipe, overrides=extra + overrides)
        plain = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot compose recipe '{cmd.recipe}' with {overrides}: {e}") from e
    plain.pop("hydra", None)
    return from_dict(schema, plain), plain


def _describe(cmd: Command, recipes: Path) -> str:
    hints = get_type_hints(cmd.schema())
    groups = _groups(recipes)
    lines = [f"recipe: {recipes / cmd.recipe}.yaml (print it composed with --cfg)", f"top-level keys: {', '.join(hints)}"]
    lines += [f"group {g}: {' | '.join(c)}" for g, c in groups.items() if g.split(".")[0] in hints]
    return "\n  ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnitrain", description="Train one decoder over text, image and audio tokens.",
        epilog="Each command takes Hydra overrides (key=value, group=choice, +key=value) and --cfg.",
    )  # fmt: skip
    parser.add_argument("--recipes", help="recipes/ folder to compose from (default: ./recipes or the checkout's)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        head, _, tail = cmd.name.partition(" ")
        if tail:
            if head not in nested:
                group = sub.add_parser(head, help=f"{head} commands", description=f"omnitrain {head} <action>")
                nested[head] = group.add_subparsers(dest="action", metavar="ACTION")
            p = nested[head].add_parser(tail, help=cmd.help, description=cmd.help)
        else:
            p = sub.add_parser(head, help=cmd.help, description=cmd.help)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = f"config: recipes/{cmd.recipe}.yaml (see it composed with --cfg)"
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. key=value group=choice +new.key=value")
        p.add_argument("--cfg", action="store_true", help="print the composed, validated config and exit")
        p.add_argument("-m", "--multirun", action="store_true",
                       help="Hydra sweep: a=1,2 b=x,y runs every combination (hydra/launcher=joblib: in parallel; "
                            "submitit_slurm: a Slurm array), each in <run_dir>/<index>-<hash>, summary in sweep.md")
        p.set_defaults(_cmd=cmd)
    return parser


def run_command(name: str, plain: dict[str, Any]) -> Any:
    """Run command ``name`` on a composed config: one run of a sweep (omnitrain.sweep), maybe in a joblib worker
    or on a Slurm node, where cli.main has not run."""
    quiet_engine_warnings()
    cmd = next(c for c in COMMANDS if c.name == name)
    return cmd.run(from_dict(cmd.schema(), plain))


def default_action(argv: list[str]) -> list[str]:
    """``omnitrain eval ...`` is ``omnitrain eval run ...``: a group with a ``<group> run`` command runs
    it when the next word is none of the group's actions (nor --help)."""
    i = 0
    while i < len(argv) and argv[i].startswith("--recipes"):  # the one global option
        i += 1 if "=" in argv[i] else 2
    if i >= len(argv):
        return argv
    actions = [c.name.split(" ", 1)[1] for c in COMMANDS if c.name.startswith(argv[i] + " ")]
    if "run" in actions and (len(argv) == i + 1 or argv[i + 1] not in [*actions, "-h", "--help"]):
        return [*argv[: i + 1], "run", *argv[i + 1 :]]
    return argv


def quiet_engine_warnings() -> None:
    """Drop two warnings that tell an omnitrain user nothing they can act on (issue 21, item 7), by
    exact message or module, never by category alone: Lightning's "`srun` is available but not used"
    (omnitrain launches itself: `omnitrain train` outside Slurm, `srun omnitrain train` inside), and
    the FutureWarnings DeepSpeed's own modules raise (deprecated torch.*.amp calls inside DeepSpeed)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")


def main(argv: list[str] | None = None) -> int:
    quiet_engine_warnings()
    parser = build_parser()
    argv = default_action(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    cmd: Command | None = getattr(args, "_cmd", None)
    if cmd is None:
        parser.print_help()
        return 2
    if cmd.name == "train":  # before torch is imported: a Slurm USR1 during start-up is kept, not fatal (issue 20)
        from omnitrain.train.preemption import Preemption

        Preemption.install()
    try:
        recipes = recipes_dir(args.recipes)
        from omnitrain import sweep

        jobs = sweep.expand(args.overrides) if args.multirun else [args.overrides]
        composed = [compose(cmd, job, recipes) for job in jobs]  # every job is validated before any runs
    except ConfigError as e:
        print(f"omnitrain {cmd.name}: config error: {e}", file=sys.stderr)
        if "recipes" in locals():
            print(f"nothing was run. {_describe(cmd, recipes)}", file=sys.stderr)
        return 2
    if args.multirun and cmd.name != "demo" and all(hasattr(c, "run_dir") for c, _ in composed):
        # one folder per run in the sweep dir (the run_dir), named <index>-<hash of its overrides> (omnitrain.sweep)
        sweep_dir = Path(composed[0][0].run_dir)
        if not args.cfg:
            failed = sweep.launch(cmd.name, run_command, cmd.recipe, recipes, pipelines_dir(recipes), args.overrides, sweep_dir)
            return 1 if failed else 0
        for i, (job, (cfg, plain)) in enumerate(zip(jobs, composed, strict=True)):
            cfg.run_dir = sweep_dir / sweep.run_name(i, sweep.task_overrides(job))
            plain["run_dir"] = str(cfg.run_dir)
    for i, (job, (cfg, plain)) in enumerate(zip(jobs, composed, strict=True)):
        if args.cfg:
            import yaml

            print(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), end="")
            continue
        if len(jobs) > 1:
            print(f"[multirun {i + 1}/{len(jobs)}] {' '.join(job)}", flush=True)
        try:
            if cmd.name == "slurm submit":
                cmd.run(cfg, job)
            elif cmd.name == "demo":  # the demo composes the train and eval recipes as these commands do
                cmd.run(cfg, lambda name, overrides: compose(next(c for c in COMMANDS if c.name == name), overrides, recipes))
            else:
                cmd.run(cfg)
        except Exception as e:  # user-fixable problems: one clear line, no traceback
            from omnitrain.data.reading import ShardReadError  # (imports torch: not before the command has)

            if not isinstance(e, (ValueError, FileNotFoundError, ShardReadError)) or os.environ.get("OMNITRAIN_DEBUG"):
                raise
            print(f"omnitrain {cmd.name}: error: {e}  (OMNITRAIN_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
