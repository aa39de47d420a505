"""``foundation data``: build shards from a source format, fetch Fashion-MNIST, inspect shards.

    foundation data build SRC --format imagefolder|captions|table|idx|shards --out DIR [options]
    foundation data fashion-mnist --out DIR [--src DIR] [--captions [simple|ensemble]] [--overwrite]
    foundation data inspect PATH [--split NAME] [--samples N] [--draw DIR]
    foundation data synthetic-humans --out DIR --n N [--seed S] [--views V] [--size PX]

Each command returns an exit code; mistakes the user can fix raise ``DataError`` (exit 2 in the main CLI).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
from collections import Counter
from itertools import islice
from pathlib import Path

from PIL import Image

from foundation.data import DataError
from foundation.data.captions import TEMPLATE_SETS


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` and its subcommands on the main parser's subparsers."""
    data = sub.add_parser("data", help="build, fetch and inspect webdataset shards",
                          description="Build webdataset shards with a manifest, fetch Fashion-MNIST, inspect shards.")
    data.set_defaults(func=lambda args: _usage(data))
    dsub = data.add_subparsers(dest="data_command", metavar="{build,fashion-mnist,dataset,inspect,synthetic-humans}")

    from foundation.data.sources import CONVERTERS

    b = dsub.add_parser("build", help="convert a source into {split}-NNNNNN.tar shards + manifest.json",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("src", help="the source: a folder, a table file, or shards (directory / brace pattern / manifest)")
    b.add_argument("--format", required=True, choices=sorted(CONVERTERS), help="what SRC is (see docs/data.md)")
    _common(b, per_shard=10_000)
    b.add_argument("--split", default="train", help="split name for a source that is one split")
    b.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction (per class) as 'val'")
    b.add_argument("--seed", type=int, default=0, help="seed of the val hold-out and of the write order")
    b.add_argument("--no-shuffle", action="store_true", help="keep source order (default: seeded shuffle)")
    b.add_argument("--class-names", help="comma-separated class names, or @FILE with one per line")
    b.add_argument("--image-column", help="table: image path column (default: image, filepath, path, ...)")
    b.add_argument("--caption-column", help="table: caption column (default: caption, text, title)")
    b.add_argument("--label-column", help="table: label column (default: label, class, category)")
    b.add_argument("--image-root", help="table: folder the image paths are relative to (default: the table's)")
    b.add_argument("--pose-context", type=float, default=0.0,
                   help="coco_keypoints: 0 stores the padded top-down box; F > 0 the square around it that a box "
                        "scaled by up to F and rotated reads (data.pose_crop top_down trains with F = 1.5)")
    b.set_defaults(func=_build)

    f = dsub.add_parser("fashion-mnist", help="Fashion-MNIST → train (60,000) / val (10,000) shards",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--src", help="folder with the four IDX .gz files (default: the Debian package's, else download)")
    f.add_argument("--cache", help="download folder (default: ~/.cache/foundation/fashion-mnist)")
    _common(f, per_shard=5_000)
    f.set_defaults(func=_fashion_mnist)

    from foundation.data.sources import DATASETS

    d = dsub.add_parser("dataset", help="a real downstream set reachable offline -> train / val shards "
                        "(docs/adaptation.md)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("--src", help="the source folder (default: the Debian package's)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="held out of each class as 'val'")
    d.add_argument("--seed", type=int, default=0, help="seed of the val hold-out, class caps and write order")
    _common(d, per_shard=2_000)
    d.set_defaults(func=_dataset)

    i = dsub.add_parser("inspect", help="print counts, keys and a few samples of shards")
    i.add_argument("path", help="a dataset directory, manifest.json or brace pattern")
    i.add_argument("--split", default=None, help="only this split")
    i.add_argument("--samples", type=int, default=3, help="samples to print per split")
    i.add_argument("--draw", metavar="DIR", help="human-centric shards: write those samples as PNGs with labels drawn")
    i.set_defaults(func=_inspect)

    h = dsub.add_parser("synthetic-humans", help="drawn people with exact labels for pose, parsing, attributes, "
                        "ReID and detection → OUT/<task>/ shards (synthetic: for tests and demos)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h.add_argument("--out", required=True, help="output directory (one shard set per task below it)")
    h.add_argument("--n", type=int, required=True, help="identities")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--views", type=int, default=3, help="cameras each identity is seen by")
    h.add_argument("--size", type=int, default=128, help="person image height in pixels (width: half)")
    h.add_argument("--overwrite", action="store_true", help="replace the shard sets that already exist in --out")
    h.set_defaults(func=_synthetic_humans)


def _common(p: argparse.ArgumentParser, per_shard: int) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace splits that already exist in --out")
    p.add_argument("--captions", nargs="?", const="simple", choices=sorted(TEMPLATE_SETS),
                   help="also write txt from class names: 'simple' ('a photo of a {}.') or 'ensemble' (80 templates)")
    p.add_argument("--max-samples-per-shard", type=int, default=per_shard)
    p.add_argument("--max-bytes-per-shard", type=_size, default=10**9, help="e.g. 1e9 or 500MB")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1e9, 500MB)") from None


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this build (every option spelled out, defaults included)."""
    words = ["foundation", "data", args.data_command]
    for name, value in vars(args).items():
        if name in ("func", "data_command", "command") or value is None or value is False:
            continue
        if name == "src":
            words.insert(3, str(value))
        else:
            words += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(words)


def _options(args: argparse.Namespace):
    from foundation.data.sources import BuildOptions

    if args.max_samples_per_shard < 1 or args.max_bytes_per_shard < 1:
        raise DataError("--max-samples-per-shard and --max-bytes-per-shard must be positive")
    if getattr(args, "pose_context", 0.0) < 0:
        raise DataError("--pose-context must be 0 (the padded box) or positive")
    return BuildOptions(
        split=getattr(args, "split", "train"), val_fraction=getattr(args, "val_fraction", 0.0),
        seed=getattr(args, "seed", 0), shuffle=not getattr(args, "no_shuffle", False), captions=args.captions,
        class_names=_class_names(getattr(args, "class_names", None)), image_column=getattr(args, "image_column", None),
        caption_column=getattr(args, "caption_column", None), label_column=getattr(args, "label_column", None),
        image_root=getattr(args, "image_root", None), pose_context=getattr(args, "pose_context", 0.0),
        workers=args.workers, max_count=args.max_samples_per_shard,
        max_bytes=args.max_bytes_per_shard, overwrite=args.overwrite, command=_command(args),
    )


def _class_names(text: str | None) -> list[str] | None:
    if not text:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise DataError(f"--class-names {text}: file {path} not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"--class-names has duplicates: {sorted(n for n, c in Counter(names).items() if c > 1)}")
    return names


def _build(args: argparse.Namespace) -> int:
    from foundation.data.shards import read_manifest
    from foundation.data.sources import CONVERTERS, run_plan

    _logging()
    opts = _options(args)
    src = Path(args.src).expanduser()
    if not src.exists() and "{" not in args.src:
        raise DataError(f"source not found: {src}")
    if opts.class_names is None and not opts.overwrite:
        existing = read_manifest(args.out) if Path(args.out).is_dir() else None
        opts.class_names = (existing or {}).get("class_names")  # a split added later keeps the same indices
    plan = CONVERTERS[args.format](src, opts)
    manifest = run_plan(plan, args.out, opts)
    _summary(args.out, manifest)
    return 0


def _fashion_mnist(args: argparse.Namespace) -> int:
    from foundation.data.sources.idx import fashion_mnist

    _logging()
    cache = Path(args.cache) if args.cache else None
    manifest = fashion_mnist(Path(args.out), _options(args), src=args.src, cache=cache)
    _summary(args.out, manifest)
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from foundation.data.sources import DATASETS

    _logging()
    manifest = DATASETS[args.name](Path(args.out), _options(args), src=args.src)
    _summary(args.out, manifest)
    return 0


def _summary(out: str, manifest: dict) -> None:
    for name, s in manifest["splits"].items():
        skipped = f", {s.get('skipped', 0)} skipped" if s.get("skipped") else ""
        print(f"{out}: {name} {s['samples']:,} samples in {len(s['shards'])} shards{skipped}")
    print(f"{Path(out) / 'manifest.json'}")


def _inspect(args: argparse.Namespace) -> int:
    from foundation.data.shards import _OUR_SHARD, iter_raw_samples, read_manifest, resolve_shards, shard_members

    path = Path(args.path).expanduser()
    manifest = read_manifest(path) if path.is_dir() or path.name == "manifest.json" else None
    if manifest:
        print(f"{args.path}: {manifest.get('format')} built {manifest.get('created')}")
        print(f"  source: {manifest.get('source')}")
        print(f"  command: {manifest.get('command')}")
        names = manifest.get("class_names")
        if names:
            print(f"  {len(names)} classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        human = manifest.get("human_task")
        if human:
            vocab = next((human[k] for k in ("keypoint_names", "class_names", "attribute_names") if human.get(k)), [])
            print(f"  human-centric task: {human.get('kind')}" + (f" ({len(vocab)}: {', '.join(vocab[:12])}"
                                                                  f"{' ...' if len(vocab) > 12 else ''})" if vocab else ""))
        splits = sorted(manifest["splits"])
    elif path.is_dir():
        splits = sorted({p.name.rsplit("-", 1)[0] for p in path.glob("*.tar") if _OUR_SHARD.match(p.name)}) or ["train"]
    else:
        splits = [args.split or "train"]
    if args.split:
        splits = [args.split]
    status = 0
    for split in splits:
        urls = [u for source in resolve_shards(str(path), split) for u in source]
        total, keys, bad = 0, Counter(), []
        for url in urls:
            try:
                n, k = shard_members(url)
            except Exception as e:  # a shard that is not a tar file
                bad.append(f"{url}: {type(e).__name__}: {e}")
                continue
            total += n
            keys.update(k)
        size = sum(Path(u).stat().st_size for u in urls if Path(u).is_file())
        label = f"split {split}" if manifest or path.is_dir() else str(path)
        print(f"{label}: {total:,} samples in {len(urls)} shards ({size / 1e6:.1f} MB)")
        print("  keys: " + ", ".join(f"{k} {v:,}" for k, v in keys.most_common()))
        entry = (manifest or {}).get("splits", {}).get(split, {})
        if entry.get("class_counts"):
            print("  per class: " + ", ".join(f"{k}:{v}" for k, v in entry["class_counts"].items()))
        if entry and entry.get("samples") != total:
            print(f"  WARNING: the manifest says {entry.get('samples')} samples")
            status = 1
        for line in bad:
            print(f"  UNREADABLE {line}")
            status = 1
        for sample in islice(iter_raw_samples(str(path), split), args.samples):
            print("  " + describe_sample(sample))
        if args.draw:
            from foundation.data.humans import task_info
            from foundation.data.humans_draw import draw_samples

            drawn = draw_samples(islice(iter_raw_samples(str(path), split), args.samples), task_info(manifest or {}),
                                 args.draw, prefix=f"{split}_")
            print(f"  drew {len(drawn)} samples into {args.draw}")
    return status


def _synthetic_humans(args: argparse.Namespace) -> int:
    from foundation.data.synthetic_humans import generate

    manifests = generate(args.out, args.n, seed=args.seed, views=args.views, size=args.size, command=_command(args),
                         overwrite=args.overwrite)
    for task, manifest in manifests.items():
        _summary(str(Path(args.out) / task), manifest)
    return 0


def describe_sample(sample: dict) -> str:
    """One line about a raw sample: key, its entries and sizes, image size and mode, label, first caption."""
    parts = [f"{sample['__key__']}:"]
    for k, v in sorted(sample.items()):
        if k.startswith("__"):
            continue
        text = f"{k}({len(v)} B)"
        if k in ("jpg", "jpeg", "png", "webp"):
            try:
                with Image.open(io.BytesIO(v)) as img:
                    img.load()
                    text = f"{k}({img.width}x{img.height} {img.format} {img.mode}, {len(v)} B)"
            except Exception as e:
                text = f"{k}(UNREADABLE: {e})"
        elif k in ("cls", "txt"):
            lines = v.decode("utf-8", "replace").splitlines() or [""]
            more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
            text = f"{k}={lines[0][:60]!r}{more}"
        parts.append(text)
    return " ".join(parts)


__all__ = ["add_cli"]
