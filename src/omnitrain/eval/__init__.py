"""Evaluation: the ``omnitrain eval`` harness, benchmark tasks (MMLU, HumanEval, DocVQA, speech WER),
metrics, the code-execution sandbox and reports."""
