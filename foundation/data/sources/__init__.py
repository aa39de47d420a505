"""Converters into shards, one file per input format; ``CONVERTERS`` maps ``--format`` names to them.

Each converter is ``plan(src: Path, opts: BuildOptions) -> Plan``; ``run_plan`` (in ``base``) encodes the
plan in parallel and writes the shards and the manifest. Adding a format: one file + one line here.
"""

from foundation.data.sources import captions, existing, idx, imagefolder, table
from foundation.data.sources.base import BuildOptions, Plan, Skip, run_plan

CONVERTERS = {
    "imagefolder": imagefolder.plan,
    "captions": captions.plan,
    "table": table.plan,
    "idx": idx.plan,
    "shards": existing.plan,
}

__all__ = ["CONVERTERS", "BuildOptions", "Plan", "Skip", "run_plan"]
