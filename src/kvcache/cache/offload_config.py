"""The ``kv_offload`` option: which tiers sit below the block pool, in lookup order (no torch here).

    "host:4GB,disk:/var/cache/kv:50GB,redis://127.0.0.1:6379/0?ttl=86400"
      host  -> pinned/host memory, a byte budget, LRU, write-back (blocks the pool evicts)
      disk  -> a directory, a byte budget, LRU, write-through (blocks as they fill), survives restarts
      redis -> a URL, write-through, shared by every engine pointing at it; keys expire after ``ttl``

Each kind may appear once; a mistake raises a ValueError whose message is one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvcache.sizing import parse_bytes

DEFAULT_REDIS_TTL = 24 * 3600  # seconds a Redis entry lives after its last store or hit
DEFAULT_WRITE_QUEUE_BYTES = 512 << 20  # write-through stores waiting per tier before new ones are dropped
SPEC_HELP = ("a comma-separated list such as host:4GB,disk:/path:50GB,redis://127.0.0.1:6379 "
             "(each tier at most once, looked up in that order)")


@dataclass(frozen=True)
class TierSpec:
    """One tier: ``kind`` host | disk | redis; ``budget`` bytes (host, disk); ``path`` (disk);
    ``url`` without kvcache's own query options and ``ttl`` seconds (redis)."""

    kind: str
    budget: int | None = None
    path: str | None = None
    url: str | None = None
    ttl: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("host", "disk", "redis"):
            raise ValueError(f"Unknown KV offload tier {self.kind!r}; use host, disk or redis.")
        if self.kind in ("host", "disk") and (self.budget is None or self.budget < 1):
            raise ValueError(f"The {self.kind} tier needs a positive byte budget, e.g. {self.kind}:"
                             f"{'/path:' if self.kind == 'disk' else ''}4GB.")
        if self.kind == "disk" and not self.path:
            raise ValueError("The disk tier needs a directory: disk:/path:50GB.")
        if self.kind == "redis" and (not self.url or self.ttl is None or self.ttl < 1):
            raise ValueError("The redis tier needs a URL (redis://host:port) and a TTL of at least 1 second.")

    @property
    def name(self) -> str:
        return self.kind


@dataclass(frozen=True)
class OffloadConfig:
    """The tiers below the pool, in lookup order, and how many bytes of write-through stores may wait."""

    tiers: tuple[TierSpec, ...]
    write_queue_bytes: int = DEFAULT_WRITE_QUEUE_BYTES

    def __post_init__(self) -> None:
        kinds = [t.kind for t in self.tiers]
        if not kinds:
            raise ValueError(f"kv_offload names no tier; give {SPEC_HELP}.")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"kv_offload names a tier twice ({', '.join(kinds)}); give each at most once.")
        if self.write_queue_bytes < 1:
            raise ValueError("The write queue needs a positive byte budget.")


def parse_kv_offload(spec: str | OffloadConfig | None) -> OffloadConfig | None:
    """The offload config a ``kv_offload`` string describes (None: no tiers); ValueError on a mistake."""
    if spec is None or isinstance(spec, OffloadConfig):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"kv_offload must be {SPEC_HELP}, got {spec!r}.")
    return OffloadConfig(tuple(_parse_tier(part.strip()) for part in spec.split(",")))


def _parse_tier(text: str) -> TierSpec:
    if text.startswith(("redis://", "rediss://", "unix://")):
        return _parse_redis(text)
    kind, _, rest = text.partition(":")
    if kind == "host":
        return TierSpec("host", budget=_budget(rest, "host:4GB"))
    if kind == "disk":
        path, _, size = rest.rpartition(":")
        if not path:
            raise ValueError(f"The disk tier is written disk:/path:50GB, got {text!r}.")
        return TierSpec("disk", budget=_budget(size, "disk:/path:50GB"), path=path)
    raise ValueError(f"Cannot read the KV offload tier {text!r}; write {SPEC_HELP}.")


def _budget(text: str, example: str) -> int:
    try:
        budget = parse_bytes(text) if text else 0
    except ValueError:
        budget = 0
    if budget < 1:
        raise ValueError(f"Cannot read {text!r} as a tier's byte budget; write e.g. {example}.")
    return budget


def _parse_redis(text: str) -> TierSpec:
    """redis://[user:password@]host[:port][/db][?ttl=SECONDS&...]: ``ttl`` is kvcache's; the rest is redis-py's."""
    parts = urlsplit(text)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ttl_values = [v for k, v in query if k == "ttl"]
    try:
        ttl = int(ttl_values[-1]) if ttl_values else DEFAULT_REDIS_TTL
    except ValueError:
        raise ValueError(f"The redis tier's ttl must be a whole number of seconds, got {ttl_values[-1]!r}.") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"The redis URL {text!r} names no host; write e.g. redis://127.0.0.1:6379.")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValueError(f"The redis URL {text!r} has a port that is not a number from 1 to 65535.") from None
    rest = urlencode([(k, v) for k, v in query if k != "ttl"])
    return TierSpec("redis", url=urlunsplit(parts._replace(query=rest)), ttl=ttl)
