"""The one exception type of the data layer."""


class DataError(Exception):
    """A user-fixable data problem.

    The message always names where the problem is (config key, shard URL, sample key) so that a
    training script can print it as a single line and exit.
    """


class ShardMissing(DataError):
    """A shard (local file or S3 key) does not exist; skipped and reported unless ``strict``."""
