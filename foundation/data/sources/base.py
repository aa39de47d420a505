"""What every converter shares: options, the plan a converter returns, and running a plan into shards.

A converter (one file per input format) looks at its source and returns a ``Plan``: per split, a list
(or stream) of small picklable task dicts ``{"key", "label"?, ...}`` and a module-level ``encode(task)``
that turns one task into tar entries (``{"png": bytes, "txt": bytes, ...}``) or raises ``Skip``.
``run_plan`` splits off a validation fraction, shuffles, encodes in a process pool (ordered, with a
progress bar), adds ``cls`` and class-name captions, writes shards and the manifest.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from foundation.data import DataError
from foundation.data.captions import TEMPLATE_SETS, captions_for
from foundation.data.shards import prepare_output, split_entry, write_manifest, write_parts

log = logging.getLogger(__name__)

# Formats whose bytes go into shards unchanged; anything else PIL reads is re-encoded as PNG (lossless).
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


class Skip(Exception):
    """Bad input met while converting: the sample is left out, counted and reported in the manifest."""


@dataclass
class BuildOptions:
    """Options of ``foundation data build`` that converters read (flags of the same names)."""

    split: str = "train"  # the split a single-split source becomes
    val_fraction: float = 0.0  # hold out this fraction (stratified by label) as the val split
    seed: int = 0  # for the val hold-out and the shuffle
    shuffle: bool = True  # write samples in a seeded random order (class-sorted shards mix badly)
    captions: str | None = None  # "simple" | "ensemble": write txt from class names
    class_names: list[str] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    image_root: str | None = None
    # coco_keypoints: 0 keeps the padded top-down box; F > 0 the square that box reads when scaled up to F and
    # rotated by any angle (data.pose_crop: top_down's training jitter; the release's largest scale is 1.5)
    pose_context: float = 0.0
    workers: int = 2
    max_count: int = 10_000
    max_bytes: int = 10**9
    overwrite: bool = False
    command: str = ""


@dataclass
class Plan:
    """What a converter found: per split, the tasks (shuffled and split here) or, with ``expand``, payloads."""

    splits: dict[str, list]
    encode: Callable[[dict], dict]
    class_names: list[str] | None
    source: dict
    # streamed plans: ``splits`` values are payloads (e.g. shard paths) that ``expand`` turns into tasks
    # inside the pool worker; ``totals`` are the splits' sample counts when known (progress bar)
    expand: Callable[[object], Iterable[dict]] | None = None
    totals: dict[str, int | None] = field(default_factory=dict)
    # further top-level manifest fields (human-centric sources: ``human_task``, see foundation/data/humans.py)
    manifest_extra: dict = field(default_factory=dict)


def sanitize_key(text: str) -> str:
    """A tar key: no dots (webdataset splits key and extension at the first dot), no odd characters."""
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text)[-80:].strip("_") or "x"


def image_entry(data: bytes, name: str = "") -> tuple[str, bytes]:
    """(extension, bytes) of an encoded image: JPEG/PNG/WebP kept as they are, others re-encoded as PNG.

    The image is fully decoded to check it; raises ``Skip`` when it cannot be.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format in KEEP_FORMATS:
                return KEEP_FORMATS[img.format], data
            if img.mode not in ("1", "L", "LA", "I", "I;16", "RGB", "RGBA"):
                img = img.convert("RGBA" if "transparency" in img.info or "A" in img.mode else "RGB")
            buf = io.BytesIO()
            img.save(buf, "PNG")
            return "png", buf.getvalue()
    except Exception as e:  # PIL raises many types for bad files
        raise Skip(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def read_image(task: dict, path_key: str = "path") -> tuple[str, bytes]:
    """A planned task's image as a shard entry (extension, bytes), for a converter's ``encode``. A task its plan
    marked with an ``error``, or whose image is missing or unreadable, raises ``Skip`` naming where it came from
    (``task["where"]`` when the plan gives one)."""
    if "error" in task:
        raise Skip(task["error"])
    path = task[path_key]
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Skip(f"{task['where']}: missing image {path} ({e.strerror})" if "where" in task
                   else f"{path}: missing image ({e.strerror})") from None
    return image_entry(data, path)


def read_captions(path: Path) -> bytes:
    """Caption file bytes (one caption per line, blank lines dropped); ``Skip`` when missing or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Skip(f"{path}: missing caption file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"{path}: unreadable caption file ({e})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise Skip(f"{path}: empty caption file")
    return "\n".join(lines).encode()


def hold_out(tasks: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): ``fraction`` of each label's tasks (of all, when unlabelled) go to val, chosen by seed."""
    rng = random.Random(seed)
    groups: dict = {}
    for t in tasks:
        groups.setdefault(t.get("label"), []).append(t)
    train, val = [], []
    for label in sorted(groups, key=lambda x: (x is None, x)):
        group = groups[label]
        picked = set(rng.sample(range(len(group)), round(fraction * len(group))))
        for i, t in enumerate(group):
            (val if i in picked else train).append(t)
    return train, val


def _write_job(job: dict) -> tuple[list[dict], list[str], int]:
    """Encode one unit of tasks and write it as one or more temporary shard files (in a pool worker)."""
    tasks = job["expand"](job["payload"]) if job["expand"] else job["payload"]
    skipped: list[str] = []
    counted = [0]

    def samples() -> Iterator[dict]:
        for task in tasks:
            counted[0] += 1
            try:
                entries = job["encode"](task)
            except Skip as e:
                skipped.append(str(e))
                continue
            sample = {"__key__": task["key"], **entries}
            label = task.get("label")
            if label is not None:
                if job["num_classes"] is not None and not 0 <= label < job["num_classes"]:
                    skipped.append(f"{task['key']}: label {label} outside the {job['num_classes']} class names")
                    continue
                sample["cls"] = str(label).encode()
                if job["captions"] is not None and "txt" not in sample:
                    sample["txt"] = job["captions"][label]
            yield sample

    out = Path(job["dir"])
    parts = write_parts(samples(), lambda i: out / f"{job['stem']}-{i:03d}.tar.tmp",
                        max_count=job["max_count"], max_bytes=job["max_bytes"])
    return parts, skipped, counted[0]


def run_plan(plan: Plan, out_dir: str | Path, opts: BuildOptions) -> dict:
    """Encode and write every split of ``plan`` into ``out_dir``; returns the manifest written.

    Work is cut into units (``max_count`` tasks, or one payload of a streamed plan); each pool worker
    encodes a unit and writes its shard files, which are renamed into ``{split}-%06d.tar`` in order, so
    the output does not depend on the number of workers.
    """
    splits = dict(plan.splits)
    if opts.val_fraction:
        if not 0 < opts.val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1, got {opts.val_fraction}")
        if len(splits) != 1 or plan.expand is not None:
            raise DataError(f"--val-fraction needs one split of files to split; this source has {sorted(splits)}")
        (name, tasks), = splits.items()
        splits = dict(zip((name, "val"), hold_out(tasks, opts.val_fraction, opts.seed), strict=True))
    for name, tasks in splits.items():
        if not tasks:
            raise DataError(f"no samples found for split {name!r} in {plan.source.get('path')}")
        if opts.shuffle and plan.expand is None:
            random.Random(f"{opts.seed}-{name}").shuffle(tasks)
    manifest = prepare_output(out_dir, splits, opts.overwrite)
    if manifest and manifest["splits"] and manifest.get("class_names") != plan.class_names:
        raise DataError(
            f"{out_dir} keeps split(s) {sorted(manifest['splits'])} with other class names; rebuild all splits "
            "together (--overwrite), give the same --class-names, or choose another --out"
        )
    captions = None
    if opts.captions:
        if not plan.class_names:
            raise DataError("--captions needs class names: this source has none (give --class-names)")
        templates = TEMPLATE_SETS[opts.captions]
        captions = ["\n".join(captions_for(n, templates)).encode() for n in plan.class_names]

    out = Path(out_dir)
    entries = {}
    pool = get_context("fork").Pool(opts.workers) if opts.workers > 1 else None
    try:
        for name, tasks in splits.items():
            step = opts.max_count
            units = tasks if plan.expand else [tasks[i: i + step] for i in range(0, len(tasks), step)]
            jobs = [{"encode": plan.encode, "expand": plan.expand, "payload": unit, "dir": str(out),
                     "stem": f".{name}-{j:06d}", "max_count": opts.max_count, "max_bytes": opts.max_bytes,
                     "captions": captions, "num_classes": len(plan.class_names) if plan.class_names else None}
                    for j, unit in enumerate(units)]
            total = plan.totals.get(name) if plan.expand else len(tasks)
            parts: list[dict] = []
            skipped: list[str] = []
            results = pool.imap(_write_job, jobs) if pool else map(_write_job, jobs)
            with tqdm(total=total, desc=name, unit="img", mininterval=1.0, dynamic_ncols=True) as bar:
                for job_parts, job_skipped, n in results:
                    parts += job_parts
                    skipped += job_skipped
                    bar.update(n)
            for i, part in enumerate(parts):
                final = out / f"{name}-{i:06d}.tar"
                Path(part["path"]).replace(final)
                part["path"] = final
            entry = split_entry(parts)
            if not entry["samples"]:
                raise DataError(f"every sample of split {name!r} was unusable, e.g. {skipped[:3]}")
            entry.update(skipped=len(skipped), skip_examples=skipped[:20])
            for line in skipped[:20]:
                log.warning("skipped: %s", line)
            if len(skipped) > 20:
                log.warning("... %d more skipped samples in split %s", len(skipped) - 20, name)
            entries[name] = entry
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return write_manifest(out_dir, manifest, entries, class_names=plan.class_names, source=plan.source,
                          command=opts.command, extra=plan.manifest_extra)


__all__ = ["BuildOptions", "IMAGE_SUFFIXES", "Plan", "Skip", "hold_out", "image_entry", "read_captions", "run_plan",
           "sanitize_key"]
