"""Offload tiers beneath the block pool: host memory, a local directory, a Redis server.

    prefix lookup:   pool --miss--> host --> disk --> redis        (in the order the option lists them)
    pool evicts a block that still holds a cached prefix --> host  (write-back)
    a block fills with committed tokens --> disk, redis             (write-through, a bounded queue each)

Tiers see blocks by key, never by request: key = blake2b(fingerprint | cache group | chain hash), where
the chain hash covers the block's tokens, every token before them and the tenant's ``cache_salt``, and
the fingerprint covers everything else that makes KV differ (the engine builds it: weights, dtype,
KV format, block size, the groups' specs and the page layout). A stored block is a payload:

    offset  0   8 B  magic "KVCBLK01"
            8  16 B  fingerprint
           24  16 B  key
           40   8 B  body length (little-endian)
           48   4 B  CRC-32 of the body
           52   ...  body: the block's page, every region in the group's own format, bytes exactly

A missing, truncated, corrupt or foreign payload is a miss (each kind logged once per tier), never
wrong KV and never an exception. Nothing here imports torch: bodies are bytes the storage exports.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from kvcache.cache.offload_config import OffloadConfig, TierSpec

log = logging.getLogger("kvcache.offload")

MAGIC = b"KVCBLK01"
HEADER = struct.Struct("<8s16s16sQI")  # magic, fingerprint, key, body length, crc32
FETCH_BATCH = 16  # keys asked of a tier at once (one Redis round trip)
MIN_FETCH_SECONDS = 0.05  # a lookup may always take this long, however few tokens it would save
DEFAULT_SECONDS_PER_TOKEN = 5e-4  # recompute cost assumed until the engine has measured its own
SUFFIX = ".kvb"


def block_key(fingerprint: bytes, group: int, block_hash: bytes) -> bytes:
    """The 16-byte key of cache group ``group``'s block with this chain hash, in this fingerprint's world."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint)
    h.update(group.to_bytes(4, "little"))
    h.update(block_hash)
    return h.digest()


class PayloadError(Exception):
    """A stored entry that must not be used; ``reason`` is truncated, corrupt or foreign."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_payload(fingerprint: bytes, key: bytes, body: bytes | memoryview) -> bytes:
    """Header + body, ready to store (one copy of the body)."""
    return b"".join((HEADER.pack(MAGIC, fingerprint, key, len(body), zlib.crc32(body)), body))


def decode_payload(payload: bytes, fingerprint: bytes, key: bytes, body_nbytes: int) -> memoryview:
    """The body of a payload stored under ``key`` (a view, no copy), or PayloadError when it is
    truncated, fails its checksum, or belongs to another key, fingerprint or block size."""
    if len(payload) < HEADER.size:
        raise PayloadError("truncated")
    magic, fp, stored_key, length, crc = HEADER.unpack_from(payload)
    if magic != MAGIC or fp != fingerprint or stored_key != key or length != body_nbytes:
        raise PayloadError("foreign")
    if len(payload) != HEADER.size + length:
        raise PayloadError("truncated")
    body = memoryview(payload)[HEADER.size:]
    if zlib.crc32(body) != crc:
        raise PayloadError("corrupt")
    return body


@dataclass(frozen=True)
class TierBlock:
    """A full block found in a tier, not in the pool: its verified bytes, copied into a fresh block
    before the forward of the step that admits it."""

    tier: str
    body: memoryview

    def __repr__(self) -> str:  # bodies are large
        return f"TierBlock({self.tier}, {len(self.body)} B)"


@dataclass
class TierCounts:
    """Blocks found (hits), asked and not found (misses), stored, evicted (Redis: the server's evicted
    and expired keys), found but refused (rejected), I/O errors, stores dropped by a full write queue;
    bytes held (Redis: stored by this engine) and bytes read back (hit_bytes)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    rejected: int = 0
    errors: int = 0
    dropped: int = 0
    bytes: int = 0
    hit_bytes: int = 0


class Tier:
    """A key -> payload store. ``get_many`` never raises: a failure is a miss and counts an error."""

    name = "tier"
    write_through = False

    def __init__(self) -> None:
        self.counts = TierCounts()
        self.enabled = True
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def put(self, key: bytes, payload: bytes) -> None:
        raise NotImplementedError

    def discard(self, key: bytes) -> None:
        """Forget an entry that turned out unusable."""

    def close(self) -> None:
        """Release what the tier holds (memory, connections); files on disk stay."""


class HostTier(Tier):
    """Payloads in this process's memory, least recently used evicted past ``budget`` bytes."""

    name = "host"

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            out = []
            for key in keys:
                payload = self._entries.get(key)
                if payload is not None:
                    self._entries.move_to_end(key)
                out.append(payload)
            return out

    def put(self, key: bytes, payload: bytes) -> None:
        if len(payload) > self.budget:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = payload
            self.counts.stores += 1
            self.counts.bytes += len(payload)
            while self.counts.bytes > self.budget:
                _, old = self._entries.popitem(last=False)
                self.counts.bytes -= len(old)
                self.counts.evictions += 1

    def discard(self, key: bytes) -> None:
        with self._lock:
            payload = self._entries.pop(key, None)
            if payload is not None:
                self.counts.bytes -= len(payload)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self.counts.bytes = 0


class DiskTier(Tier):
    """One file per block in a directory, least recently used (by mtime, so across restarts too)
    deleted past ``budget`` bytes. Files are written to a temporary name and renamed, so a reader
    never sees half a file; one engine process per directory (the index lives in memory)."""

    name = "disk"
    write_through = True

    def __init__(self, path: str | Path, budget: int) -> None:
        super().__init__()
        self.root = Path(path).expanduser()
        self.budget = budget
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"The disk tier cannot use {str(self.root)!r} ({err.strerror or err}).") from None
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, oldest first
        self._scan()

    def _scan(self) -> None:
        """Index the files a previous run left, oldest first; delete its unfinished temporary files."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(".tmp"):
                _unlink(entry.path)
            elif entry.name.endswith(SUFFIX) and entry.is_file():
                stat = entry.stat()
                found.append((stat.st_mtime_ns, entry.name, stat.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self.counts.bytes += size
        self._evict_over(self.budget)

    def _name(self, key: bytes) -> str:
        return key.hex() + SUFFIX

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: bytes) -> bytes | None:
        name = self._name(key)
        with self._lock:
            if name not in self._index:
                return None
        path = self.root / name
        try:
            payload = path.read_bytes()
            os.utime(path)  # most recently used, for this run's index and the next run's scan
        except FileNotFoundError:
            self._drop(name)
            return None
        except OSError as err:
            self.counts.errors += 1
            log.warning("disk tier: cannot read %s (%s); treated as a miss", path, err)
            return None
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
        return payload

    def put(self, key: bytes, payload: bytes) -> None:
        name = self._name(key)
        if len(payload) > self.budget:
            return
        with self._lock:
            if name in self._index:
                return
            self._evict_over(self.budget - len(payload))
        for attempt in range(2):
            try:
                self._write(name, payload)
                break
            except OSError as err:  # the file system is full before the budget is: make room, retry once
                self.counts.errors += 1
                if attempt:
                    log.warning("disk tier: cannot write to %s (%s); store dropped", self.root, err)
                    return
                with self._lock:
                    self._evict_over(self.counts.bytes // 2)
        with self._lock:
            self._index[name] = len(payload)
            self.counts.bytes += len(payload)
            self.counts.stores += 1
            self._evict_over(self.budget)

    def _write(self, name: str, payload: bytes) -> None:
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, self.root / name)
        except OSError:
            _unlink(tmp)
            raise

    def _evict_over(self, limit: int) -> None:
        """Delete the least recently used files until at most ``limit`` bytes are held (lock held)."""
        while self._index and self.counts.bytes > limit:
            name, size = self._index.popitem(last=False)
            _unlink(self.root / name)
            self.counts.bytes -= size
            self.counts.evictions += 1

    def _drop(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self.counts.bytes -= size

    def discard(self, key: bytes) -> None:
        self._drop(self._name(key))
        _unlink(self.root / self._name(key))


class RedisTier(Tier):
    """Payloads in a Redis server shared by every engine that points at it. Each entry expires
    ``ttl`` seconds after its last store or hit (a hit renews it: GETEX); past the server's
    ``maxmemory``, its ``maxmemory-policy`` decides (allkeys-lru recommended). The first failure
    turns the tier off for the rest of the run, with one warning; serving goes on without it."""

    name = "redis"
    write_through = True
    PREFIX = b"kvcache:"
    SERVER_COUNTS_EVERY = 5.0  # seconds between reads of the server's evicted/expired key counts

    def __init__(self, url: str, ttl: int, timeout: float = 1.0) -> None:
        import redis  # only a configured redis tier needs the client

        super().__init__()
        self.url = url
        self.ttl = ttl
        self._errors = redis.RedisError
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            self.client.ping()
        except (redis.RedisError, ValueError) as err:
            raise ValueError(f"Cannot reach Redis at {url} ({err}); start the server or fix the URL.") from None
        self._server_counts_at = 0.0

    def _redis_key(self, key: bytes) -> bytes:
        return self.PREFIX + key.hex().encode()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not self.enabled or not keys:
            return [None] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.getex(self._redis_key(key), ex=self.ttl)
            return pipe.execute()
        except self._errors as err:
            self._fail(err)
            return [None] * len(keys)

    def put(self, key: bytes, payload: bytes) -> None:
        if not self.enabled:
            return
        try:
            self.client.set(self._redis_key(key), payload, ex=self.ttl)
            self._read_server_counts()
        except self._errors as err:
            self._fail(err)
            return
        self.counts.stores += 1
        self.counts.bytes += len(payload)

    def _read_server_counts(self) -> None:
        now = time.monotonic()
        if now - self._server_counts_at >= self.SERVER_COUNTS_EVERY:
            self._server_counts_at = now
            info = self.client.info("stats")
            self.counts.evictions = int(info.get("evicted_keys", 0)) + int(info.get("expired_keys", 0))

    def discard(self, key: bytes) -> None:
        if self.enabled:
            try:
                self.client.delete(self._redis_key(key))
            except self._errors as err:
                self._fail(err)

    def _fail(self, err: Exception) -> None:
        self.counts.errors += 1
        if self.enabled:
            self.enabled = False
            log.warning("the Redis tier at %s failed (%s: %s); it is off for the rest of this run and "
                        "serving goes on without it", self.url, type(err).__name__, err)

    def close(self) -> None:
        self.enabled = False
        self.client.close()


def make_tier(spec: TierSpec) -> Tier:
    """The tier a spec describes (ValueError, in one sentence, when it cannot be used)."""
    if spec.kind == "host":
        return HostTier(spec.budget)
    if spec.kind == "disk":
        return DiskTier(spec.path, spec.budget)
    return RedisTier(spec.url, spec.ttl)


class WriteQueue:
    """Write-through stores for one tier, written by a thread of its own in arrival order.

    A store that would push the waiting bytes past ``max_bytes`` is dropped and counted, so a step
    never waits for a slow tier. :meth:`flush` waits until everything queued is written.
    """

    def __init__(self, tier: Tier, fingerprint: bytes, max_bytes: int) -> None:
        self.tier = tier
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self._items: deque[tuple[bytes, memoryview]] = deque()
        self._pending = 0  # bytes queued or being written
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvcache-offload-{tier.name}", daemon=True)
        self._thread.start()

    def offer(self, key: bytes, body: memoryview) -> bool:
        """Queue one block's body for storing; False (dropped) when the queue is full or closed."""
        with self._cond:
            if self._closed or not self.tier.enabled or self._pending + len(body) > self.max_bytes:
                self.tier.counts.dropped += 1
                return False
            self._items.append((key, body))
            self._pending += len(body)
            self._cond.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                key, body = self._items.popleft()
            try:
                self.tier.put(key, encode_payload(self.fingerprint, key, body))
            except Exception:  # noqa: BLE001 - a store must never take the writer down
                self.tier.counts.errors += 1
                log.exception("%s tier: a store failed", self.tier.name)
            with self._cond:
                self._pending -= len(body)
                self._cond.notify_all()

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued store is written; False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class TieredStore:
    """The tiers in lookup order, what the kv manager asks on a pool miss (:meth:`fetch`) and what
    the engine feeds: blocks the pool evicts (:meth:`save_evicted`, host) and blocks that filled
    (:meth:`store`, write-through tiers). ``body_nbytes`` is one block's size in the group's format."""

    def __init__(self, tiers: Sequence[Tier], fingerprint: bytes, body_nbytes: int,
                 write_queue_bytes: int) -> None:
        self.tiers = list(tiers)
        self.fingerprint = fingerprint
        self.body_nbytes = body_nbytes
        self.host = next((t for t in self.tiers if isinstance(t, HostTier)), None)
        self.queues = [WriteQueue(t, fingerprint, write_queue_bytes) for t in self.tiers if t.write_through]
        self.seconds_per_token = DEFAULT_SECONDS_PER_TOKEN
        self._warned: set[tuple[str, str]] = set()
        self._memo: dict[bytes, TierBlock] = {}  # the last fetch's blocks: a retried admission reuses them
        self.closed = False

    @classmethod
    def from_config(cls, config: OffloadConfig, fingerprint: bytes, body_nbytes: int) -> "TieredStore":
        tiers: list[Tier] = []
        try:
            for spec in config.tiers:
                tiers.append(make_tier(spec))
        except ValueError:
            for tier in tiers:
                tier.close()
            raise
        return cls(tiers, fingerprint, body_nbytes, config.write_queue_bytes)

    def key(self, group: int, block_hash: bytes) -> bytes:
        return block_key(self.fingerprint, group, block_hash)

    # --- lookups ------------------------------------------------------------------------------

    def budget_seconds(self, num_tokens: int) -> float:
        """How long a lookup that would save ``num_tokens`` tokens of prefill may take: what
        computing them would (as the engine last measured), and at least MIN_FETCH_SECONDS."""
        return max(MIN_FETCH_SECONDS, num_tokens * self.seconds_per_token)

    def fetch(self, blocks: Sequence[tuple[int, bytes]], num_tokens: int) -> list[TierBlock]:
        """The leading run of ``blocks`` ((group, chain hash), in the order a prefix needs them) that
        some tier holds intact, each from the first tier in order that has it. Stops at the first
        block no tier has, or once the lookup has taken as long as computing ``num_tokens`` would."""
        deadline = time.perf_counter() + self.budget_seconds(num_tokens)
        memo, self._memo = self._memo, {}
        found: list[TierBlock] = []
        for start in range(0, len(blocks), FETCH_BATCH):
            keys = [self.key(g, h) for g, h in blocks[start:start + FETCH_BATCH]]
            got = self._fetch_batch(keys, memo)
            run = next((i for i, b in enumerate(got) if b is None), len(got))
            found.extend(got[:run])
            self._memo.update(zip(keys[:run], got[:run]))
            if run < len(keys) or time.perf_counter() > deadline:
                break
        return found

    def _fetch_batch(self, keys: list[bytes], memo: dict[bytes, TierBlock]) -> list[TierBlock | None]:
        found: list[TierBlock | None] = [memo.get(k) for k in keys]
        for tier in self.tiers:
            missing = [i for i, b in enumerate(found) if b is None]
            if not missing or not tier.enabled:
                continue
            payloads = tier.get_many([keys[i] for i in missing])
            for i, payload in zip(missing, payloads):
                if payload is None:
                    tier.counts.misses += 1
                    continue
                try:
                    found[i] = TierBlock(tier.name, decode_payload(payload, self.fingerprint, keys[i],
                                                                   self.body_nbytes))
                except PayloadError as err:
                    self._reject(tier, keys[i], err.reason)
        return found

    def _reject(self, tier: Tier, key: bytes, reason: str) -> None:
        tier.counts.rejected += 1
        tier.discard(key)
        if (tier.name, reason) not in self._warned:
            self._warned.add((tier.name, reason))
            log.warning("%s tier: a %s entry (key %s) was treated as a miss and removed; further %s "
                        "entries are counted in stats()['kv_offload'] but not logged", tier.name, reason,
                        key.hex(), reason)

    def record_loads(self, blocks: Sequence[TierBlock]) -> None:
        """Count blocks a step copied back into the pool as hits of the tier they came from."""
        by_name = {t.name: t for t in self.tiers}
        for block in blocks:
            counts = by_name[block.tier].counts
            counts.hits += 1
            counts.hit_bytes += len(block.body)

    def observe_compute(self, num_tokens: int, seconds: float) -> None:
        """A step computed ``num_tokens`` tokens in ``seconds``: the recompute cost lookups are held to."""
        if num_tokens >= 32 and seconds > 0:
            self.seconds_per_token = 0.7 * self.seconds_per_token + 0.3 * seconds / num_tokens

    # --- stores -------------------------------------------------------------------------------

    @property
    def wants_evicted(self) -> bool:
        return self.host is not None

    @property
    def wants_filled(self) -> bool:
        return bool(self.queues)

    def save_evicted(self, blocks: Sequence[tuple[int, bytes]], bodies: Sequence[memoryview]) -> None:
        """Write back blocks the pool is about to reuse ((group, chain hash) and their bodies) to host memory."""
        if self.host is None:
            return
        for (group, block_hash), body in zip(blocks, bodies):
            key = self.key(group, block_hash)
            self.host.put(key, encode_payload(self.fingerprint, key, body))

    def store(self, blocks: Sequence[tuple[int, bytes]], bodies: Sequence[memoryview]) -> None:
        """Queue blocks that filled ((group, chain hash) and their bodies) for every write-through tier."""
        for (group, block_hash), body in zip(blocks, bodies):
            key = self.key(group, block_hash)
            for queue in self.queues:
                queue.offer(key, body)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued store is written (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(q.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for q in self.queues)

    def close(self) -> None:
        """Write every pending store, stop the writer threads, release memory and connections."""
        if self.closed:
            return
        self.closed = True
        for queue in self.queues:
            queue.close()
        for tier in self.tiers:
            tier.close()
        self._memo.clear()

    def stats(self) -> dict[str, dict[str, int | bool]]:
        """Per tier name: its counts, whether it is on, and the bytes waiting in its write queue."""
        pending = {q.tier.name: q.pending_bytes for q in self.queues}
        return {t.name: asdict(t.counts) | {"enabled": t.enabled, "pending_bytes": pending.get(t.name, 0)}
                for t in self.tiers}


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
