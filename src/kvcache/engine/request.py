"""Requests and their sampling parameters: plain data the scheduler plans with."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvcache.cache.block_pool import BlockHash
from kvcache.cache.policies import PolicyState
from kvcache.config import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated. It carries its block tables (one per cache group); only the
    kv manager writes them.

        all_token_ids: [ prompt ............ | output ...... ]
        num_computed_tokens:  ---------------------------^      (tokens whose KV is in the cache)
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)  # [group][block index] -> block id
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    sample_index: int = 0  # which of the n samples this is
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    peak_blocks: int = 0  # the most blocks it held at once, every group together
    output_logprobs: list[dict] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify next step, not yet output
    kv_state: PolicyState | None = None  # its eviction policy's live tokens (None: it keeps every token)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def block_ids(self) -> list[int]:
        """Cache group 0's table: the only one of a model whose layers all cache the same thing."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def cache_salt(self) -> str | None:
        return self.params.cache_salt

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens
