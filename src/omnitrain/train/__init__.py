"""Training: the loop (``loop``), the strategy adapter (``strategy``), objectives and validation
(``objectives``, ``dpo``), optimizer and schedules (``optim``), checkpoints, the run log and Slurm.
Imports ``tokenizer``, ``data`` and ``model``; nothing below it imports it."""
