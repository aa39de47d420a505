"""Converters into shards, one file per input format; ``CONVERTERS`` maps ``--format`` names to them.

Each converter is ``plan(src: Path, opts: BuildOptions) -> Plan``; ``run_plan`` (in ``base``) encodes the
plan in parallel and writes the shards and the manifest. Adding a format: one file + one line here.
"""

from foundation.data.sources import captions, existing, idx, imagefolder, table
from foundation.data.sources import attributes, coco_keypoints, crowdhuman, human_parsing, market1501
from foundation.data.sources import clipart, digits
from foundation.data.sources.base import BuildOptions, Plan, Skip, run_plan

CONVERTERS = {
    "imagefolder": imagefolder.plan,
    "captions": captions.plan,
    "table": table.plan,
    "idx": idx.plan,
    "shards": existing.plan,
    "coco_keypoints": coco_keypoints.plan,
    "human_parsing": human_parsing.plan,
    "pa100k": attributes.pa100k,
    "attribute_table": attributes.table,
    "market1501": market1501.plan,
    "crowdhuman": crowdhuman.plan,
    "clipart": clipart.plan,
}

# real downstream sets reachable offline: `foundation data dataset NAME --out DIR` (docs/adaptation.md)
DATASETS = {"digits": digits.digits, "openclipart": clipart.openclipart, "oxygen-icons": clipart.oxygen_icons}

__all__ = ["CONVERTERS", "DATASETS", "BuildOptions", "Plan", "Skip", "run_plan"]
