"""The demo report's benchmark curves over training steps (issue 24, item 4)."""

from __future__ import annotations

from omnitrain.demo.report import plot_eval_curves


def test_the_in_training_eval_is_drawn_over_the_steps_and_skipped_without_it(tmp_path):
    rows = [{"step": 0, "eval/perplexity/perplexity": 900.0, "eval/reading/char_accuracy": 0.1}, {"step": 1, "loss": 5.0},
            {"step": 100, "loss": 3.0, "eval/perplexity/perplexity": 80.0, "eval/reading/char_accuracy": 0.6}]  # fmt: skip
    out = plot_eval_curves(rows, tmp_path / "eval_curves.png")
    assert out is not None and out.stat().st_size > 5000
    assert plot_eval_curves([{"step": 1, "loss": 5.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
