"""Tokenizers: the token layout (one id space), the text BPE, and image / audio tokenizers."""
