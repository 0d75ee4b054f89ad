"""Output a person can read (issue 21, item 7): commands that write files say where, and a number
given where text was wanted says how to quote it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from omnitrain.cli import main
from omnitrain.config import ConfigError, from_dict
from tests.conftest import needs_gettext


@dataclass
class _Prompt:
    text: str = ""


def test_a_number_for_a_string_suggests_quoting(capsys):
    with pytest.raises(ConfigError, match=r"text=123 has the wrong type: expected a string; to pass 123 as text, quote it: 'text=\"123\"'"):
        from_dict(_Prompt, {"text": 123})
    assert main(["generate", "text=123"]) == 2
    assert """quote it: 'text="123"'""" in capsys.readouterr().err
    assert main(["generate", 'text="123"', "--cfg"]) == 0  # the quoted form composes
    assert "text: '123'" in capsys.readouterr().out


@needs_gettext
def test_tokenizer_report_says_where_it_wrote(text_tokenizer_dir, tmp_path, capsys):
    from omnitrain.tokenizer.report import TokenizerReportConfig, write_report

    write_report(TokenizerReportConfig(tokenizer=text_tokenizer_dir, languages=["en", "de"], out_dir=tmp_path / "rep"))
    out = capsys.readouterr().out
    assert "tokenizer report: 2 languages, mean tokens/char ours " in out
    assert str(tmp_path / "rep" / "report.md") in out and str(tmp_path / "rep" / "compression.png") in out


def test_make_docqa_says_where_it_wrote(tmp_path, capsys):
    from omnitrain.eval.docqa import MakeDocQAConfig, make_docqa

    make_docqa(MakeDocQAConfig(out_dir=tmp_path / "dq", n=1, width=320, height=400))
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'dq' / 'docqa.jsonl'}" in out and str(tmp_path / "dq" / "images") in out
    assert f"docvqa.path={tmp_path / 'dq' / 'docqa.jsonl'}" in out


def test_engine_warnings_are_filtered_by_message_and_module_only():
    import warnings

    from omnitrain.cli import quiet_engine_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_engine_warnings()
        srun = "The `srun` command is available on your system but is not used. HINT: If your intention is to run Lightning on SLURM"
        warnings.warn_explicit(srun, UserWarning, "slurm.py", 205, module="lightning.fabric.plugins.environments.slurm")
        amp = "`torch.cuda.amp.custom_fwd(args...)` is deprecated. Please use `torch.amp.custom_fwd(args..., device_type='cuda')` instead."
        warnings.warn_explicit(amp, FutureWarning, "linear.py", 48, module="deepspeed.runtime.zero.linear")
        assert not seen
        warnings.warn_explicit("our own deprecation", FutureWarning, "x.py", 1, module="omnitrain.train.loop")  # others stay
        warnings.warn_explicit("The `srun` thing, reworded", UserWarning, "slurm.py", 1, module="lightning.fabric")
    assert [str(w.message) for w in seen] == ["our own deprecation", "The `srun` thing, reworded"]
