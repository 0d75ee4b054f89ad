"""omnitrain: train one decoder-only network over text, image and audio tokens.

Importing this package does nothing on purpose (no logging set-up, no device probing, no
downloads); the parts live in submodules: ``omnitrain.tokenizer``, ``omnitrain.cli``, ...
"""

__version__ = "0.1.0"
