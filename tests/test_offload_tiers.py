"""The offload tiers without a model: the option's grammar, the payload format, each tier's budget
and LRU, the write queues, the prefix lookup through the tiers, and a real redis-server."""

import logging
import os
import threading
import time

import pytest
import torch
from live_server import free_port
from redis_server import RedisServer

from kvcache.cache.block_pool import BlockPool, hash_block
from kvcache.cache.kv_manager import KVCacheManager
from kvcache.cache.offload_config import DEFAULT_REDIS_TTL, OffloadConfig, TierSpec, parse_kv_offload
from kvcache.cache.spec import KVCacheGroup, KVSpec
from kvcache.cache.storage import KVCache
from kvcache.cache.tiers import (HEADER, DiskTier, HostTier, PayloadError, RedisTier, TierBlock, TieredStore,
                                 block_key, decode_payload, encode_payload)

FP = bytes(range(16))
BODY = 1000


def body(seed: int, size: int = BODY) -> bytes:
    return bytes((seed * 31 + i) % 251 for i in range(size))


def payload(key: bytes, seed: int = 1) -> bytes:
    return encode_payload(FP, key, body(seed))


# --- the option ---------------------------------------------------------------------------------

def test_spec_lists_tiers_in_order(tmp_path):
    config = parse_kv_offload(f"host:4GB, disk:{tmp_path}/a:b:50GiB ,redis://127.0.0.1:6379/2?ttl=60")
    assert [t.kind for t in config.tiers] == ["host", "disk", "redis"]
    host, disk, redis = config.tiers
    assert host.budget == 4_000_000_000 and disk.budget == 50 << 30 and disk.path == f"{tmp_path}/a:b"
    assert redis.url == "redis://127.0.0.1:6379/2" and redis.ttl == 60
    assert parse_kv_offload("redis://h:1").tiers[0].ttl == DEFAULT_REDIS_TTL
    assert parse_kv_offload(None) is None and parse_kv_offload(config) is config


@pytest.mark.parametrize("spec, words", [
    ("", "kv_offload must be"),
    ("ssd:4GB", "Cannot read the KV offload tier 'ssd:4GB'"),
    ("host", "Cannot read '' as a tier's byte budget"),
    ("host:lots", "Cannot read 'lots' as a tier's byte budget"),
    ("host:0", "Cannot read '0' as a tier's byte budget"),
    ("disk:50GB", "disk:/path:50GB"),
    ("disk:/tmp/x", "disk tier is written disk:/path:50GB"),
    ("disk:/tmp:x", "Cannot read 'x' as a tier's byte budget"),
    ("host:1GB,host:2GB", "names a tier twice"),
    ("redis://:6379", "names no host"),
    ("redis://h:99999", "not a number from 1 to 65535"),
    ("redis://h:1?ttl=soon", "ttl must be a whole number"),
    ("redis://h:1?ttl=0", "TTL of at least 1 second"),
])
def test_bad_specs_are_one_sentence(spec, words):
    with pytest.raises(ValueError, match=words) as err:
        parse_kv_offload(spec)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_configs_are_frozen_and_validated():
    with pytest.raises(ValueError, match="positive byte budget"):
        TierSpec("host", budget=0)
    with pytest.raises(ValueError, match="no tier"):
        OffloadConfig(())
    with pytest.raises(AttributeError):
        parse_kv_offload("host:1GB").tiers[0].budget = 5


# --- payloads -------------------------------------------------------------------------------------

def test_payload_round_trip_and_every_kind_of_bad_entry():
    key = block_key(FP, 0, b"h" * 16)
    good = payload(key)
    assert bytes(decode_payload(good, FP, key, BODY)) == body(1)
    corrupt = bytearray(good)
    corrupt[HEADER.size + 500] ^= 1
    other_key = block_key(FP, 1, b"h" * 16)
    cases = {"truncated": [good[:-1], good[:10], b""],
             "corrupt": [bytes(corrupt)],
             "foreign": [payload(other_key), encode_payload(b"x" * 16, key, body(1)),
                         encode_payload(FP, key, body(1, BODY + 4)), b"GARBAGE!" + good[8:]]}
    for reason, entries in cases.items():
        for entry in entries:
            with pytest.raises(PayloadError) as err:
                decode_payload(entry, FP, key, BODY)
            assert err.value.reason == reason


def test_keys_differ_by_fingerprint_group_and_hash():
    h = hash_block(None, [1, 2, 3], None)
    keys = {block_key(FP, 0, h), block_key(FP, 1, h), block_key(b"y" * 16, 0, h),
            block_key(FP, 0, hash_block(None, [1, 2, 3], "tenant"))}
    assert len(keys) == 4


# --- host and disk ----------------------------------------------------------------------------------

def test_host_tier_is_lru_within_its_budget():
    size = len(payload(b"k" * 16))
    host = HostTier(budget=3 * size)
    keys = [bytes([i]) * 16 for i in range(4)]
    for k in keys[:3]:
        host.put(k, payload(k))
    host.get_many([keys[0]])  # now the most recently used
    host.put(keys[3], payload(keys[3]))
    assert host.get_many(keys) == [payload(keys[0]), None, payload(keys[2]), payload(keys[3])]
    assert host.counts.evictions == 1 and host.counts.bytes == 3 * size
    host.close()
    assert host.counts.bytes == 0 and host.get_many(keys) == [None] * 4


def test_full_disk_tier_evicts_oldest_and_a_restart_finds_the_rest(tmp_path):
    size = len(payload(b"k" * 16))
    keys = [bytes([i]) * 16 for i in range(5)]
    disk = DiskTier(tmp_path, budget=3 * size)
    for k in keys[:3]:
        disk.put(k, payload(k))
    disk.get_many([keys[0]])  # touched: survives the next eviction
    for k in keys[3:]:
        disk.put(k, payload(k))
    assert disk.counts.evictions == 2 and disk.counts.bytes == 3 * size
    assert len(list(tmp_path.glob("*.kvb"))) == 3
    assert [p is not None for p in disk.get_many(keys)] == [True, False, False, True, True]
    (tmp_path / ".leftover.tmp").write_bytes(b"half a file")
    again = DiskTier(tmp_path, budget=2 * size)  # a restart with a smaller budget: the oldest goes
    assert again.counts.bytes == 2 * size and not (tmp_path / ".leftover.tmp").exists()
    assert sum(p is not None for p in again.get_many(keys)) == 2


def test_disk_tier_in_an_unusable_place_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"^The disk tier cannot use .*file/sub.*\)\.$"):
        DiskTier(blocker / "sub", budget=1000)


def test_disk_tier_that_runs_out_of_space_evicts_instead_of_failing(tmp_path):
    """The budget says yes but the file system says no (ENOSPC): old entries make room, no exception."""
    class FullFileSystem(DiskTier):
        room = 2

        def _write(self, name, data):
            if len(self._index) >= self.room:
                raise OSError(28, "No space left on device")
            super()._write(name, data)

    disk = FullFileSystem(tmp_path, budget=1 << 30)
    keys = [bytes([i]) * 16 for i in range(4)]
    for k in keys:
        disk.put(k, payload(k))
    assert disk.counts.errors >= 1 and disk.counts.evictions >= 1
    assert disk.get_many([keys[-1]])[0] == payload(keys[-1])


# --- the store: lookups in order, bad entries, write queues ---------------------------------------------

def _store(tiers, body_nbytes=BODY, queue_bytes=1 << 20):
    return TieredStore(tiers, FP, body_nbytes, queue_bytes)


def test_fetch_asks_tiers_in_order_and_stops_at_the_first_missing_block(tmp_path):
    hashes = [bytes([i]) * 16 for i in range(5)]
    host, disk = HostTier(1 << 20), DiskTier(tmp_path, 1 << 20)
    store = _store([host, disk])
    keys = [store.key(0, h) for h in hashes]
    host.put(keys[0], payload(keys[0], 10))
    disk.put(keys[0], payload(keys[0], 20))
    disk.put(keys[1], payload(keys[1], 21))
    disk.put(keys[3], payload(keys[3], 23))  # after a gap: unusable
    found = store.fetch([(0, h) for h in hashes], num_tokens=80)
    assert [(b.tier, bytes(b.body)) for b in found] == [("host", body(10)), ("disk", body(21))]
    store.record_loads(found)
    stats = store.stats()
    assert stats["host"]["hits"] == 1 and stats["disk"]["hits"] == 1 and stats["disk"]["hit_bytes"] == BODY
    store.close()


def test_a_slow_tier_is_asked_no_longer_than_recomputing_would_take(tmp_path):
    """64 blocks on a disk that takes 0.2 s per read: recomputing their 1,024 tokens would take 0.1 s
    at 0.1 ms a token, so the lookup stops after its first batch of 16 and the rest is recomputed."""
    class SlowDisk(DiskTier):
        def get_many(self, keys):
            time.sleep(0.2)
            return super().get_many(keys)

    disk = SlowDisk(tmp_path, 1 << 30)
    store = _store([disk])
    blocks = [(0, i.to_bytes(16, "little")) for i in range(64)]
    for g, h in blocks:
        disk.put(store.key(g, h), payload(store.key(g, h)))
    store.seconds_per_token = 1e-4
    start = time.perf_counter()
    assert len(store.fetch(blocks, num_tokens=64 * 16)) == 16
    assert time.perf_counter() - start < 0.4
    store.seconds_per_token = 1.0  # a slow model: waiting for the disk pays
    assert len(store.fetch(blocks, num_tokens=64 * 16)) == 64
    store.close()


def test_corrupt_and_foreign_entries_are_misses_logged_once_and_removed(tmp_path, caplog):
    hashes = [bytes([i]) * 16 for i in range(3)]
    disk = DiskTier(tmp_path, 1 << 20)
    store = _store([disk])
    keys = [store.key(0, h) for h in hashes]
    for k in keys:
        disk.put(k, payload(k))
    files = {k: tmp_path / (k.hex() + ".kvb") for k in keys}
    data = bytearray(files[keys[0]].read_bytes())
    data[-1] ^= 0xFF
    files[keys[0]].write_bytes(bytes(data))  # corrupt
    files[keys[1]].write_bytes(files[keys[2]].read_bytes())  # another block's entry under this key: foreign
    with caplog.at_level(logging.WARNING, logger="kvcache.offload"):
        assert store.fetch([(0, hashes[0])], 16) == []
        assert store.fetch([(0, hashes[1])], 16) == []
        files[keys[2]].write_bytes(files[keys[2]].read_bytes()[:-7])  # truncated
        assert store.fetch([(0, hashes[2])], 16) == []
        for k in keys:  # the same kinds again: counted, not logged again
            disk.put(k, payload(k))
        files[keys[0]].write_bytes(bytes(data))
        assert store.fetch([(0, hashes[0])], 16) == []
    warnings = [r.getMessage() for r in caplog.records]
    assert [("corrupt" in w, "foreign" in w, "truncated" in w) for w in warnings] == \
        [(True, False, False), (False, True, False), (False, False, True)]
    assert store.stats()["disk"]["rejected"] == 4 and not files[keys[0]].exists()
    store.close()


class GatedDisk(DiskTier):
    """A real disk tier whose writes wait for ``gate``: a tier slower than the engine."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gate = threading.Event()

    def put(self, key, data):
        self.gate.wait(timeout=30)
        super().put(key, data)


def test_write_queue_drops_stores_instead_of_waiting_and_close_flushes(tmp_path):
    disk = GatedDisk(tmp_path, 1 << 20)
    store = _store([disk], queue_bytes=3 * BODY)
    blocks = [(0, bytes([i]) * 16) for i in range(5)]
    store.store(blocks, [memoryview(body(i)) for i in range(5)])  # returns at once: the writer is stuck
    assert store.stats()["disk"]["dropped"] == 2 and store.stats()["disk"]["pending_bytes"] == 3 * BODY
    assert not store.flush(timeout=0.2)
    disk.gate.set()
    store.close()  # writes what was queued, then stops the writer
    assert disk.counts.stores == 3 and len(list(tmp_path.glob("*.kvb"))) == 3
    assert not any(q.alive for q in store.queues)
    assert not any(t.name.startswith("kvcache-offload") for t in threading.enumerate())


# --- the prefix lookup through the tiers ------------------------------------------------------------------

def _manager(num_blocks=8, windows=(None,), block_size=4):
    pool = BlockPool(num_blocks)
    pool.record_evictions = pool.record_fills = True
    return pool, KVCacheManager(pool, block_size, windows)


class Seq:
    def __init__(self, rid, tokens, salt=None):
        self.request_id, self.all_token_ids, self.cache_salt = rid, list(tokens), salt
        self.num_computed_tokens, self.block_tables, self.block_hashes = 0, [], []


def _hashes(tokens, block_size=4, salt=None):
    out = []
    for i in range(len(tokens) // block_size):
        out.append(hash_block(out[-1] if out else None, tokens[i * block_size:(i + 1) * block_size], salt))
    return out


def _tiered(kv, tokens):
    """A host tier under ``kv`` holding every full block of ``tokens`` (block i's body: body(i))."""
    host = HostTier(1 << 20)
    kv.tiers = store = _store([host])
    for i, h in enumerate(_hashes(tokens)):
        key = store.key(0, h)
        host.put(key, payload(key, i))
    return store


def test_a_pool_miss_is_served_from_a_tier_into_fresh_registered_blocks():
    pool, kv = _manager()
    tokens = list(range(13))
    store = _tiered(kv, tokens)  # all three full blocks are in host memory
    seq = Seq("a", tokens)
    (b0,) = pool.allocate(1)  # block 0 in the pool as well: only blocks 1 and 2 come from the tier
    pool.register(b0, _hashes(tokens)[0])
    pool.release([b0])
    pool.take_filled()
    hit = kv.find_cached_prefix(seq)
    assert hit.num_blocks == 3 and hit.tables[0][0] == b0
    assert [type(b) for b in hit.tables[0][1:]] == [TierBlock, TierBlock]
    assert kv.allocate_slots(seq, 1, hit) and seq.num_computed_tokens == 12
    loads = kv.take_pending_loads()
    assert [block_id for block_id, _ in loads] == seq.block_tables[0][1:3]
    assert [bytes(b.body) for _, b in loads] == [body(1), body(2)]
    for block_id, h in zip(seq.block_tables[0], _hashes(tokens)):
        assert pool.lookup(h) == block_id  # findable at once: a second request shares, not reloads
    store.close()


def test_a_sliding_group_asks_the_tiers_only_for_what_its_window_sees():
    """Two groups, one full and one with a window of 5 tokens, blocks of 4: a run of 3 blocks needs
    all 3 of the full group's but only the sliding group's last (a query at 12 sees tokens 8..12);
    without that block the run is 2 blocks, which needs the sliding group's block 1 instead."""
    tokens = list(range(13))
    hashes = _hashes(tokens)

    def lookup(entries):
        pool, kv = _manager(num_blocks=16, windows=(None, 5))
        host = HostTier(1 << 20)
        kv.tiers = store = _store([host])
        for g, i in entries:
            key = store.key(g, hashes[i])
            host.put(key, payload(key, 10 * g + i))
        hit = kv.find_cached_prefix(Seq("a", tokens))
        store.close()
        return hit.num_blocks, [b if b == -1 else bytes(b.body) for b in hit.tables[1]]

    full = [(0, 0), (0, 1), (0, 2)]
    assert lookup(full + [(1, 2)]) == (3, [-1, -1, body(12)])
    assert lookup(full + [(1, 1)]) == (2, [-1, body(11)])
    assert lookup(full) == (0, [])


def test_freeing_before_the_step_runs_forgets_the_load_and_its_hash():
    pool, kv = _manager()
    tokens = list(range(9))
    store = _tiered(kv, tokens)
    seq = Seq("a", tokens)
    assert kv.allocate_slots(seq, 1, kv.find_cached_prefix(seq))
    kv.free(seq)
    assert kv.take_pending_loads() == [] and all(pool.lookup(h) is None for h in _hashes(tokens))
    assert pool.num_free == pool.num_blocks
    store.close()


def test_pool_notes_evictions_and_fills():
    pool, _ = _manager(num_blocks=2)
    a, b = pool.allocate(2)
    pool.register(a, b"a" * 16)
    assert pool.take_filled() == [(a, 0, b"a" * 16)] and pool.take_filled() == []
    pool.release([a, b])
    pool.allocate(2)
    assert pool.take_evicted() == [(a, 0, b"a" * 16)]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "fp8", "int8", "int4"])
def test_block_bodies_are_the_formats_bytes_exactly(fmt):
    cache = KVCache((KVCacheGroup(0, KVSpec(3, 64, fmt), (0, 1)),), num_blocks=6, block_size=16)
    torch.manual_seed(0)
    cache.pages.buffer.copy_(torch.randint(0, 256, cache.pages.buffer.shape, dtype=torch.uint8))
    bodies = [bytes(b) for b in cache.export_blocks([4, 1])]
    assert all(len(b) == cache.block_nbytes for b in bodies)
    cache.import_blocks([0, 2], bodies)
    for region in cache.pages.regions.values():
        raw = region.view(torch.uint8) if region.element_size() == 1 else region
        assert torch.equal(raw[:, :, 0].contiguous().view(torch.uint8), raw[:, :, 4].contiguous().view(torch.uint8))
        assert torch.equal(raw[:, :, 2].contiguous().view(torch.uint8), raw[:, :, 1].contiguous().view(torch.uint8))


# --- a real redis-server ---------------------------------------------------------------------------------------

@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.kill()


def test_redis_tier_stores_with_a_ttl_and_a_hit_renews_it(redis_server):
    tier = RedisTier(redis_server.url, ttl=100)
    key = bytes(range(16))
    tier.put(key, payload(key))
    (name,) = redis_server.keys()
    assert name == b"kvcache:" + key.hex().encode() and 0 < redis_server.client.ttl(name) <= 100
    redis_server.client.expire(name, 5)
    assert tier.get_many([key, b"\x00" * 16]) == [payload(key), None]
    assert redis_server.client.ttl(name) > 5
    tier.close()


def test_unreachable_redis_at_start_is_one_sentence():
    with pytest.raises(ValueError, match=r"^Cannot reach Redis at redis://127\.0\.0\.1:\d+ .*fix the URL\.$"):
        RedisTier(f"redis://127.0.0.1:{free_port()}", ttl=10)


def test_redis_that_goes_away_turns_the_tier_off_with_one_warning(redis_server, caplog):
    tier = RedisTier(redis_server.url, ttl=100)
    store = _store([tier])
    key = store.key(0, b"h" * 16)
    tier.put(key, payload(key))
    assert len(store.fetch([(0, b"h" * 16)], 16)) == 1
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="kvcache.offload"):
        assert store.fetch([(0, b"j" * 16)], 16) == []
        store.store([(0, b"i" * 16)], [memoryview(body(2))])
        assert store.flush(timeout=10)
        assert store.fetch([(0, b"h" * 16)], 16) == []
    assert [r.getMessage().count("off for the rest of this run") for r in caplog.records] == [1]
    stats = store.stats()["redis"]
    assert stats["enabled"] is False and stats["errors"] == 1
    store.close()


def test_two_stores_share_one_redis(redis_server):
    writer, reader = (_store([RedisTier(redis_server.url, ttl=100)]) for _ in range(2))
    writer.store([(0, b"h" * 16)], [memoryview(body(7))])
    writer.close()
    (found,) = reader.fetch([(0, b"h" * 16)], 16)
    assert found.tier == "redis" and bytes(found.body) == body(7)
    reader.close()
    assert os.path.isdir(redis_server.dir)
