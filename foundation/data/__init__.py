"""Data: converters into webdataset shards, the shard reader, image transforms and caption templates.

``foundation.data.shards`` writes and reads shards, ``foundation.data.sources`` holds one converter per
input format, ``foundation.data.transforms`` builds timm transforms, ``foundation.data.captions`` turns
class names into captions. See docs/data.md.
"""


import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")  # pipe:, file:, http:, s3:, ... (webdataset's openers)


class DataError(ValueError):
    """A data problem the user can fix (missing shards, bad options, existing output); the message says how."""


def local_spec(spec: str, where: str) -> str:
    """``spec`` if each of its ``::``-joined sources is a plain local path, else ``DataError``.

    For data paths read from a file someone else may have written (a checkpoint's ``recipe.yaml``):
    webdataset runs ``pipe:`` sources as shell commands and fetches URLs, so those are taken only from
    the command line (``--data``), never from a loaded checkpoint.
    """
    for part in spec.split("::"):
        if _SCHEME.match(part.strip()):
            raise DataError(f"{where} is {part.strip()[:60]!r}: a command or URL, which is not taken from a checkpoint "
                            "(it could run anything); pass the data on the command line with --data")
    return spec


__all__ = ["DataError", "local_spec"]
