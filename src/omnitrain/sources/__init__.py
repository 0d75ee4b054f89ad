"""Raw sources, the first stage: text from files and Hugging Face datasets (``text``) and the text
shipped in Debian packages (``corpora``). Imports nothing else of omnitrain."""
