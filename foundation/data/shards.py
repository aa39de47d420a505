"""Webdataset shards in one import: the public names of the modules that write and read them.

Each question has its own module (read it there):

- ``foundation.data.manifest``: where a dataset's shards are, its manifest, writing both;
- ``foundation.data.tars``: samples out of tar shards (every sample once; from a saved offset on);
- ``foundation.data.decode``: one raw sample → what a task reads, a batch, which targets shards carry
  (human-centric shards through ``foundation.data.human_transforms``);
- ``foundation.data.train_stream``: the training stream of one rank and its exact, resumable position;
- ``foundation.data.eval_stream``: the evaluation stream, every sample once across ranks and workers.
"""

from __future__ import annotations

from foundation.data.decode import BadSample
from foundation.data.eval_stream import EvalLoader, build_eval_loader
from foundation.data.manifest import (
    MANIFEST, OUR_SHARD, class_names, prepare_output, read_manifest, resolve_shards, shard_members, split_entry,
    write_manifest, write_parts, write_split,
)
from foundation.data.tars import iter_raw_samples
from foundation.data.train_stream import TrainLoader, build_train_loader

_OUR_SHARD = OUR_SHARD  # the name foundation/data/cli.py and sources/existing.py import

__all__ = [
    "BadSample", "EvalLoader", "MANIFEST", "TrainLoader", "build_eval_loader", "build_train_loader", "class_names",
    "iter_raw_samples", "prepare_output", "read_manifest", "resolve_shards", "shard_members",
    "split_entry", "write_manifest", "write_parts", "write_split",
]
