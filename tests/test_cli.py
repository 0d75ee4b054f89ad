"""The omnitrain command: subcommands, --help, --cfg, and config errors that stop before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omnitrain.cli import COMMANDS, main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_command_has_help_and_composes_its_recipe(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*cmd.name.split(), "--help"])
    assert exit_.value.code == 0
    assert cmd.help in " ".join(capsys.readouterr().out.split())
    code, out, err = run_cli([*cmd.name.split(), "--cfg"], capsys)
    assert code == 0, err
    assert out.strip()  # the composed config, as YAML
    # every field of the config dataclass is in the recipe, so that `key=value` overrides it (Hydra
    # refuses to override a key the recipe lacks)
    import dataclasses
    import typing

    import yaml

    def missing(schema: type, plain: dict, prefix: str = "") -> list[str]:
        out = []
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if f.name not in plain:
                out.append(prefix + f.name)
            elif dataclasses.is_dataclass(hints[f.name]) and isinstance(plain[f.name], dict):
                out += missing(hints[f.name], plain[f.name], f"{prefix}{f.name}.")
        return out

    # except the model's vocabulary size, which no recipe states: training takes it from the token layout
    assert missing(cmd.schema(), yaml.safe_load(out)) == (["model.vocab_size"] if cmd.recipe in ("train", "plan", "slurm_submit") else [])


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["tokenizer.vocab_sise=100"], ["unknown config key 'tokenizer.vocab_sise'", "Did you mean 'vocab_size'?"]),
        (["+tokenizer.extra=1"], ["unknown config key 'tokenizer.extra'", "Valid keys here:"]),
        (["tokenizer.model_type=wordpiece"], ["tokenizer.model_type='wordpiece' is not a valid choice", "'bpe', 'unigram'"]),
        (["tokenizer.vocab_size=lots"], ["tokenizer.vocab_size='lots' has the wrong type: expected an integer"]),
        (["corpus=webtext"], ["unknown choice corpus=webtext", "valid choices: debian, files, hf"]),
        (["corpus=files"], ["corpus.files must be set"]),
        (["tokenizer.vocab_size=10"], ["vocab_size=10 is too small"]),
        (["tokenizer.vocab_size"], ["cannot parse overrides"]),
    ],
)
def test_bad_overrides_fail_before_any_work(overrides, fragments, capsys, tmp_path):
    run_dir = tmp_path / "never"
    code, out, err = run_cli(["tokenizer", "train-text", f"run_dir={run_dir}", *overrides], capsys)
    assert code == 2
    for fragment in fragments:
        assert fragment in err
    assert "nothing was run" in err
    assert not run_dir.exists()


def test_runtime_errors_are_one_line_with_a_hint(capsys, tmp_path):
    code, _, err = run_cli(["tokenizer", "report", f"tokenizer={tmp_path}", f"out_dir={tmp_path / 'r'}"], capsys)
    assert code == 1
    assert "no text tokenizer at" in err and "omnitrain tokenizer train-text" in err
    assert "Traceback" not in err


def test_train_text_then_layout_through_the_cli(capsys, tmp_path):
    src = tmp_path / "code.txt"
    src.write_text(Path(__file__).read_text() * 3)
    code, out, err = run_cli(
        ["tokenizer", "train-text", f"run_dir={tmp_path / 'tok'}", "corpus=files", f"corpus.files=[{src}]", "tokenizer.vocab_size=500"],
        capsys,
    )
    assert code == 0, err
    assert "exact round trip" in out
    code, out, err = run_cli(["tokenizer", "layout", f"text={tmp_path / 'tok'}", f"out={tmp_path / 'layout.json'}"], capsys)
    assert code == 0, err
    from omnitrain.tokenizer.layout import TokenLayout

    layout = TokenLayout.load(tmp_path / "layout.json")
    assert layout.text_vocab_size == 500 and layout.hash in out


def test_import_omnitrain_is_free_of_side_effects():
    code = "import sys, omnitrain; heavy = [m for m in ('torch', 'hydra', 'lightning', 'sentencepiece') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
