"""Reading samples out of tar shards: every sample once (``iter_raw_samples``), a shard's samples from an
ordinal or a byte offset on (``tar_samples``, what an exact resume needs), and the bad-data report.

Unreadable and empty shards are reported (``Reporter``: "shard url, key, reason" lines) and passed over,
never fatal.
"""

from __future__ import annotations

import gzip
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator

import webdataset as wds

from foundation.data.manifest import is_remote, resolve_shards

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name into key and extension
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def iter_raw_samples(spec: str, split: str = "val") -> Iterator[dict]:
    """Every sample of every source of ``spec`` once, in shard order, undecoded:
    ``{"__key__", "__url__", ext: bytes, ...}``. Unreadable shards are logged and skipped."""
    for urls in resolve_shards(spec, split):
        for url in urls:
            yield from wds.tarfile_to_samples(handler=_log_and_continue)(iter([{"url": url}]))


def _log_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


class Reporter:
    """Collects "shard url, key, reason" lines in one worker; also the webdataset error handler."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.report_shards = True
        self.url = ""
        self._bad_urls: set[str] = set()

    def sample(self, sample: dict, reason: str) -> None:
        self.lines.append(f"{sample.get('__url__', self.url)}, {sample.get('__key__', '-')}, {reason}")

    def shard(self, url: str, reason: str) -> None:
        if url not in self._bad_urls:  # once per shard: resampling revisits it
            self._bad_urls.add(url)
            if self.report_shards:
                self.lines.append(f"{url}, -, {reason}")

    def handler(self, exn: Exception) -> bool:
        self.shard(self.url, f"unreadable shard: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def pop(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def shard_samples(urls: Iterable[str], reporter: Reporter) -> Iterator[dict]:
    """Samples of the shards ``urls``: unreadable and empty shards are reported and passed over."""
    state = {"url_samples": 0, "url": None}

    def check_empty() -> None:
        if state["url"] is not None and state["url_samples"] == 0 and state["url"] not in reporter._bad_urls:
            reporter.shard(state["url"], "empty shard")

    def opened() -> Iterator[dict]:
        for url in urls:
            check_empty()
            state.update(url_samples=0, url=url)
            reporter.url = url
            yield {"url": url}

    for sample in wds.tarfile_to_samples(handler=reporter.handler)(opened()):
        state["url_samples"] += 1
        yield sample
    check_empty()


def first_samples(urls: list[str], reporter: Reporter, n: int) -> Iterator[dict]:
    for i, sample in enumerate(shard_samples(urls, reporter)):
        if i >= n:
            return
        yield sample


class _TarMembers:
    """The regular members of a tar stream, read sequentially: ustar, GNU long names and pax paths.

    ``tarfile`` parses every header into a ``TarInfo`` (~25 us a member), more than decoding a small
    image costs; this reads the three fields the reader needs. Iterating gives ``(name, size)``; call
    ``read()`` for the member's bytes, otherwise they are passed over (a seek when the file allows it).
    Damaged archives raise ``tarfile.ReadError``. ``start``: the byte offset the file is at (a header);
    ``start_of_member`` is where the headers of the member last yielded begin.
    """

    def __init__(self, f, seekable: bool, start: int = 0):
        self.f, self.seekable = f, seekable
        self._pending = 0  # bytes of the current member (and its padding) not consumed yet
        self._size = 0
        self.pos = self.start_of_member = start

    def read(self) -> bytes:
        data = self._exact(self._size)
        self._pending -= self._size
        self._size = 0
        return data

    def __iter__(self) -> Iterator[tuple[str, int]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        chain = self.pos
        while True:
            self._skip(self._pending)
            self._pending = self._size = 0
            if long_name is None and not pax:
                chain = self.pos
            hdr = self.f.read(512)
            if len(hdr) < 512 or not hdr.strip(b"\0"):
                if hdr.strip(b"\0"):
                    raise tarfile.ReadError("unexpected end of data in a tar header")
                return
            self.pos += 512
            try:
                checksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                checksum = -1
            if checksum != sum(hdr) - sum(hdr[148:156]) + 256:
                raise tarfile.ReadError("invalid tar header (bad checksum): not a tar file, or damaged")
            size, kind = _tar_number(hdr[124:136]), hdr[156:157]
            if "size" in pax:
                size = int(pax["size"])
            padded = (size + 511) & ~511
            if kind in (b"x", b"L", b"g", b"K"):  # pax / GNU headers describing the next member
                data = self._exact(size)
                self._skip(padded - size)
                if kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = pax.get("path") or long_name or _ustar_name(hdr)
            long_name, pax = None, {}
            self._pending = padded
            if kind in (b"0", b"\0", b"7"):
                self._size = size
                self.start_of_member = chain
                yield name, size

    def _exact(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        self.pos += n
        if n and self.seekable:
            self.f.seek(n, 1)
        while n > 0 and not self.seekable:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            n -= len(chunk)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU, for sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _ustar_name(hdr: bytes) -> str:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\0":  # POSIX ustar: a prefix field may hold the leading directories
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        length_end = data.index(b" ", pos)
        length = int(data[pos:length_end])
        key, _, value = data[length_end + 1: pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _open_shard(url: str):
    """(file, seekable) of a local or remote shard; gzip-compressed local shards are detected by their
    first bytes, remote ones by a ``.gz`` / ``.tgz`` name."""
    if is_remote(url):
        f = wds.gopen(url)
        return (gzip.GzipFile(fileobj=f), False) if url.endswith((".gz", ".tgz")) else (f, False)
    f = open(url, "rb")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f), False
    f.seek(0)
    return f, True


def tar_samples(url: str, start: int = 0, wanted: set[int] | None = None, at: int = 0,
                 at_ordinal: int = 0) -> Iterator[tuple[int, int, dict]]:
    """``(ordinal, byte offset, sample)`` for the samples of one shard from ordinal ``start`` on (or only
    those in ``wanted``), grouped by key as webdataset groups them. ``at``: the byte offset where sample
    ``at_ordinal`` begins (from an earlier read of a local, uncompressed shard: a seek goes there). Members
    of other earlier samples are passed over by their headers: a seek in a local file, a read without
    decoding in a stream. The byte offset is -1 where it cannot be sought to. Unreadable data raises;
    the sample it interrupted is dropped."""
    last = max(wanted) if wanted else None
    f, seekable = _open_shard(url)
    with f:
        if not seekable or at <= 0:
            at, at_ordinal = 0, 0
        if at:
            f.seek(at)
        members = _TarMembers(f, seekable, at)
        ordinal, key, sample, sample_at = at_ordinal - 1, None, None, -1
        for name, _ in members:
            match = _MEMBER.match(name)
            if match is None or _META_MEMBER.match(name):
                continue
            prefix, ext = match.groups()
            if prefix != key:
                if sample is not None:
                    yield ordinal, sample_at, sample
                key, ordinal = prefix, ordinal + 1
                if last is not None and ordinal > last:
                    return
                keep = ordinal >= start if wanted is None else ordinal in wanted
                sample = {"__key__": prefix, "__url__": url} if keep else None
                sample_at = members.start_of_member if seekable else -1
            if sample is not None:
                sample[ext.lower()] = members.read()
        if sample is not None:
            yield ordinal, sample_at, sample


__all__ = ["Reporter", "first_samples", "iter_raw_samples", "shard_samples", "tar_samples"]
