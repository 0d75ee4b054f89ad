"""``python -m omnitrain.lm_eval <lm_eval's own arguments>``: lm-evaluation-harness's CLI with ``--model omnitrain``.

    python -m omnitrain.lm_eval --model omnitrain --model_args path=runs/x --tasks arc_easy --output_path runs/x/lm_eval

lm-eval 0.4 finds outside models only once their module is imported; this imports the adapter
(``omnitrain.eval.lm_eval_adapter``, which registers ``omnitrain``) and hands the arguments to lm-eval.
"""

from __future__ import annotations


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import omnitrain.eval.lm_eval_adapter  # noqa: F401  (registers the model name "omnitrain")
    except ImportError as e:  # pragma: no cover - the eval extra is installed by setup.sh
        raise SystemExit(f"lm-evaluation-harness is missing: pip install 'omnitrain[eval]' ({e})") from e
    cli_evaluate()


if __name__ == "__main__":
    main()
