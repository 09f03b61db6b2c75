"""The one exception type of the data layer."""


class DataError(Exception):
    """A user-fixable data problem.

    The message always names where the problem is (config key, shard URL, sample key) so that a
    training script can print it as a single line and exit.
    """


class ShardMissing(DataError):
    """A shard (local file or S3 key) does not exist; skipped and reported unless ``strict``."""


def for_key(exc: DataError, key: str) -> DataError:
    """``exc`` re-worded for the config key that named the data (``validation_webdataset_path``,
    ``regularization_webdataset_path``, ...): the source layer only knows it reads "webdataset_path"."""
    if key == "webdataset_path":
        return exc
    text = str(exc).replace("webdataset_path", key)
    if not text.startswith(key):
        text = f"{key}: {text}"
    return type(exc)(text) if type(exc) in (DataError, ShardMissing) else DataError(text)
