"""Caption extraction (``captions_getter`` / ``caption_key``) without ``eval``.

Known function names replace the official ``eval``-ed expressions:
``identity`` (the file's UTF-8 text) and ``captions_getter`` (the official json rule,
docs/OFFICIAL.md, Data). ``caption_key`` is the simpler spelling: ``'txt'`` or ``'json:caption'``.

Tag captions (``caption_tag_shuffle``, ``caption_keep_tags``, ``caption_tag_dropout``): the
caption is split at commas into tags; the first ``keep`` stay in place, each other tag is dropped
with probability ``dropout`` and the rest are shuffled. The draws come from the sample's caption
generator (seeded by the sample's identity), after the official rule's draw, so they repeat
exactly on resume and do not depend on the rank/worker layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import DataError

#: probability of the official rule returning the original caption instead of ``caption``
OG_CAPTION_P = 0.05


@dataclass(frozen=True)
class TagOptions:
    """Comma-separated tag handling of a caption (see the module docstring)."""

    shuffle: bool = False
    keep: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        """Whether captions are changed at all (``keep`` alone changes nothing)."""
        return self.shuffle or self.dropout > 0

    def apply(self, caption: str, rng: np.random.Generator) -> str:
        """The caption with its tags kept / dropped / shuffled, joined by ``', '``."""
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        head, tail = tags[:self.keep], tags[self.keep:]
        if self.dropout > 0 and tail:
            draws = rng.random(len(tail))
            tail = [t for t, d in zip(tail, draws) if d >= self.dropout]
        if self.shuffle and len(tail) > 1:
            tail = [tail[i] for i in rng.permutation(len(tail))]
        return ", ".join(head + tail)


def make_tag_options(shuffle: object = False, keep: object = 0, dropout: object = 0.0) -> TagOptions | None:
    """``TagOptions`` from the config keys (None when captions stay as read); DataError names the key."""
    if not isinstance(shuffle, bool):
        raise DataError(f"caption_tag_shuffle: expected true or false, got {shuffle!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise DataError(f"caption_keep_tags: expected an integer >= 0, got {keep!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise DataError(f"caption_tag_dropout: expected a probability in [0, 1), got {dropout!r}")
    opts = TagOptions(shuffle, keep, float(dropout))
    return opts if opts.active else None


class MissingCaption(Exception):
    """The sample has no usable caption (counted as bad data, not fatal unless strict)."""


@dataclass
class CaptionGetter:
    """Reads a caption from a sample's files.

    ``ext`` is the webdataset extension to read; ``field`` a json field (None = the text itself);
    ``official_json`` selects the official ``captions_getter`` rule; ``tags`` the tag handling
    applied to the caption read (None: unchanged).
    """

    ext: str = "txt"
    field: str | None = None
    official_json: bool = False
    tags: TagOptions | None = None

    def describe(self) -> str:
        if self.official_json:
            return "json (official captions_getter rule)"
        return f"{self.ext}:{self.field}" if self.field else self.ext

    def __call__(self, files: dict[str, bytes], meta: dict | None, rng: np.random.Generator) -> str:
        caption = self._read(files, meta, rng)
        return self.tags.apply(caption, rng) if self.tags is not None else caption

    def _read(self, files: dict[str, bytes], meta: dict | None, rng: np.random.Generator) -> str:
        if self.ext not in files:
            raise MissingCaption(f"no .{self.ext} file")
        if self.ext == "json" or self.field is not None or self.official_json:
            doc = meta if (self.ext == "json" and meta is not None) else _load_json(files[self.ext])
            if not isinstance(doc, dict):
                raise MissingCaption(f".{self.ext} is not a JSON object")
            if self.official_json:
                return _official(doc, rng)
            if self.field is None:
                raise MissingCaption("json caption needs a field")
            value = doc.get(self.field)
            if not isinstance(value, str):
                raise MissingCaption(f"json has no string field {self.field!r}")
            return value
        try:
            return files[self.ext].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise MissingCaption(f".{self.ext} is not UTF-8") from None


def _load_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MissingCaption("unreadable json") from None


def _official(doc: dict, rng: np.random.Generator) -> str:
    """``old_caption`` holds a JSON string with ``og_caption``; used 5 % of the time if non-empty."""
    og = ""
    old = doc.get("old_caption")
    if isinstance(old, str) and old:
        try:
            inner = json.loads(old)
            if isinstance(inner, dict) and isinstance(inner.get("og_caption"), str):
                og = inner["og_caption"]
        except ValueError:
            og = ""
    draw = rng.random()  # drawn always so the stream of draws does not depend on the data
    if og and draw < OG_CAPTION_P:
        return og
    caption = doc.get("caption")
    if not isinstance(caption, str):
        raise MissingCaption("json has no string 'caption'")
    return caption


_FUNCTIONS = {"identity", "captions_getter"}


def make_caption_getter(captions_getter: object = None, caption_key: str | None = None,
                        tags: TagOptions | None = None) -> CaptionGetter:
    """Build the getter from the config; DataError names the offending key."""
    getter = _make_getter(captions_getter, caption_key)
    getter.tags = tags
    return getter


def _make_getter(captions_getter: object, caption_key: str | None) -> CaptionGetter:
    if captions_getter is not None:
        cg = captions_getter
        if (not isinstance(cg, (list, tuple)) or len(cg) != 2
                or not all(isinstance(x, str) for x in cg)):
            raise DataError(f"captions_getter: expected [wds_key, function name] such as "
                            f"['txt', 'identity'] or ['json', 'captions_getter'], got {cg!r}")
        ext, name = cg[0].strip().lower(), cg[1].strip()
        if name not in _FUNCTIONS:
            raise DataError(f"captions_getter: unknown function {name!r}; known: "
                            f"{sorted(_FUNCTIONS)} (code in configs is never evaluated)")
        if name == "captions_getter":
            if ext != "json":
                raise DataError(f"captions_getter: the 'captions_getter' rule reads json, not {ext!r}")
            return CaptionGetter(ext="json", official_json=True)
        if ext == "json":
            raise DataError("captions_getter: ['json', 'identity'] has no caption field; "
                            "use caption_key: 'json:caption'")
        return CaptionGetter(ext=ext)
    if caption_key is not None:
        if not isinstance(caption_key, str) or not caption_key.strip():
            raise DataError(f"caption_key: expected 'txt' or 'json:field', got {caption_key!r}")
        ext, _, field = caption_key.strip().partition(":")
        ext = ext.lower()
        if ext == "json" and not field:
            raise DataError("caption_key: 'json' needs a field, e.g. 'json:caption'")
        return CaptionGetter(ext=ext, field=field or None)
    return CaptionGetter()
