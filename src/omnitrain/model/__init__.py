"""The network: the transformer and its one forward body (``transformer``), the fused loss (``loss``),
the model folder (``io``), Hugging Face interop (``hf``), generation (``generate``) and the
``omnitrain generate`` command (``generate_command``). Imports ``tokenizer`` and ``data`` only."""
