"""Data: converters into webdataset shards, the shard reader, image transforms and caption templates.

``foundation.data.shards`` writes and reads shards, ``foundation.data.sources`` holds one converter per
input format, ``foundation.data.transforms`` builds timm transforms, ``foundation.data.captions`` turns
class names into captions. See docs/data.md.
"""


class DataError(ValueError):
    """A data problem the user can fix (missing shards, bad options, existing output); the message says how."""


__all__ = ["DataError"]
