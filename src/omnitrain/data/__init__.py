"""Shards and batches: the pipelines that turn sources into webdataset shards (``pipeline/``), the
shard format (``shards``), and the streaming loader with its mixture and packing (``loader``,
``packing``). Imports ``sources`` and ``tokenizer`` only."""
