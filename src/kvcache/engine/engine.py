"""``LLMEngine`` (add_request / step / abort) and the ``LLM`` facade for offline use, as in vLLM."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from kvcache import kernels
from kvcache.cache.block_pool import BlockPool
from kvcache.cache.kv_manager import NULL_BLOCK, KVCacheManager
from kvcache.cache.offload_config import OffloadConfig, parse_kv_offload
from kvcache.cache.policies import KVPolicy, PolicyState
from kvcache.cache.spec import group_layers, layer_specs, num_blocks_for_budget, resolve_kv_cache_dtype
from kvcache.cache.storage import KVCache
from kvcache.config import (CacheConfig, SamplingParams, SchedulerConfig, SpeculativeConfig, is_text,
                            parse_model_dtype, parse_weights_dtype, speculative_config)
from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.draft_model import DraftModelDrafter, load_draft_model
from kvcache.engine.offload import EngineOffload, assumed_seconds_per_token, kv_fingerprint, weights_identity
from kvcache.engine.request import Request, RequestStatus
from kvcache.engine.scheduler import Scheduler
from kvcache.engine.spec_gate import SpeculationGate
from kvcache.engine.speculative import NgramDrafter, NgramProposer, SpecCounters, verify
from kvcache.models.families import CausalLM, model_class
from kvcache.models.loader import LoadedModel, load_model
from kvcache.models.packed import prepare_weights, weight_formats
from kvcache.runtime.plan import SchedulerOutput
from kvcache.runtime.runner import ModelRunner
from kvcache.runtime.sampler import logprobs_of, make_generator, sample
from kvcache.sizing import KVShape, kv_bytes, kv_dtype, parse_bytes

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB
log = logging.getLogger("kvcache.engine")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when this request alone failed inside a step; it is finished


@dataclass
class _Group:
    """The n samples of one request id; sample 0 prefills, the others fork from it."""

    request_id: str
    params: SamplingParams
    samples: list[Request]
    texts: list[str]
    detokenizers: list[IncrementalDetokenizer]
    error: str | None = None
    keep_kv: bool = False  # sample 0's blocks stay held when it finishes (see LLMEngine.add_request)
    # per sample, for output_kind "delta": characters and tokens handed out, finish reported
    sent_text: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    sent_finish: list[bool] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.error is not None or (len(self.samples) == self.params.n
                                          and all(r.is_finished for r in self.samples))


def build_model(loaded: LoadedModel, dtype: str, device: torch.device, weights_dtype: str = "auto") -> CausalLM:
    """The model of ``loaded``'s architecture with its weights, computing in ``dtype`` on ``device``
    (no throwaway random init), its projections and embeddings kept in ``weights_dtype`` (see
    :func:`kvcache.models.packed.weight_format`)."""
    dtype = resolve_dtype(dtype, device)
    cls = model_class(loaded.config)
    weights_dtype = parse_weights_dtype(weights_dtype)
    if getattr(cls, "packs_weights", False):
        weights = prepare_weights(loaded.weights, weights_dtype, dtype)
    elif weights_dtype in ("auto", dtype):
        weights = loaded.float_weights()
    else:
        raise ValueError(f"--weights-dtype {weights_dtype} is not available for {loaded.config.architecture} "
                         f"models yet; use auto (the model's dtype).")
    with torch.device("meta"):
        model = cls(loaded.config)
    # Module.to_empty's empty_like on meta tensors imports torch.fx (~1 s); torch.empty does not
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.reset_buffers()
    model.load_hf_weights(weights)
    return model.to(dtype=getattr(torch, dtype)).eval()


_warned_emulated_bf16 = False


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> str:
    """The model dtype to compute in. ``auto``: float32 on a CPU where kvcache's C kernels run
    (their fused decode step computes in float32 and reads the weights in their own format, so
    bfloat16 weights, not bfloat16 arithmetic, are what speed decode up there); elsewhere bfloat16
    where the device multiplies it natively (a GPU, a CPU with AVX-512 BF16 or AMX) and float32
    otherwise. bfloat16 asked for on a CPU that emulates it is granted with a warning (once), as it
    runs slower there than float32."""
    global _warned_emulated_bf16
    name = parse_model_dtype(dtype)
    cpu = torch.device(device).type == "cpu"
    native = not cpu or kernels.native_bf16()
    if name == "auto":
        return "float32" if cpu and kernels.library() is not None else "bfloat16" if native else "float32"
    if name == "bfloat16" and not native and not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        log.warning("This CPU has no native bfloat16 matmul (%s); PyTorch emulates it, so bfloat16 runs "
                    "slower here than float32. --weights-dtype bfloat16 halves the weights' bytes and still "
                    "computes in float32.", kernels.cpu_description())
    return name


def _decode_only(plan: SchedulerOutput) -> bool:
    """Whether every sequence in the step decodes (one token, or one plus its drafts), with no
    prefill chunk and no swap: the steps whose times the speculation gate fits."""
    return not plan.swap_out and not plan.swap_in and all(
        s.sample and len(s.token_ids) == s.num_spec_tokens + 1 for s in plan.sequences)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLMEngine:
    """One model, one KV pool, one scheduler. Single-threaded: call ``step()`` in a loop."""

    def __init__(self, model: str | None = None, dtype: str = "float32", block_size: int | None = None,
                 num_blocks: int | None = None, kv_cache_memory: int | str | None = None,
                 enable_prefix_caching: bool = True, scheduler_config: SchedulerConfig | None = None,
                 max_model_len: int | None = None, device: str | None = None,
                 loaded: LoadedModel | None = None, kv_cache_dtype: str = "auto",
                 speculative: str | SpeculativeConfig | None = None, num_speculative_tokens: int | None = None,
                 draft_model: str | None = None, adaptive_speculation: bool = True,
                 weights_dtype: str = "auto", kv_policy: str = "full",
                 kv_budget: int | float | None = None, kv_offload: str | OffloadConfig | None = None) -> None:
        offload_config = parse_kv_offload(kv_offload)
        if offload_config is not None and not enable_prefix_caching:
            raise ValueError("kv_offload finds blocks by their prefix hashes; it needs prefix caching on.")
        if isinstance(kv_cache_memory, str):
            kv_cache_memory = parse_bytes(kv_cache_memory)
        self.kv_policy = KVPolicy(kv_policy, kv_budget)  # the default of requests that name none
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.weights_dtype = parse_weights_dtype(weights_dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)  # fp32 ... int4
        block_size = kv_dtype(self.kv_cache_dtype).default_block_size if block_size is None else block_size
        self.cache_config = CacheConfig(block_size, num_blocks, kv_cache_memory, enable_prefix_caching)
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.speculative_config = speculative_config(speculative, num_speculative_tokens, draft_model,
                                                     adaptive_speculation)
        loaded = loaded or load_model(model)
        spec = self.speculative_config
        draft = load_draft_model(spec.draft_model, loaded.config) if spec and spec.method == "draft" else None
        self.model_config = loaded.config
        self.model_source = loaded.source
        self.tokenizer = loaded.tokenizer
        self.model = build_model(loaded, self.dtype, self.device, self.weights_dtype)
        self.weight_bytes = self.model.weight_bytes()
        self.weight_formats = weight_formats(self.model)
        self.max_model_len = min(max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.kv_shape = KVShape.from_model_config(loaded.config)
        self.kv_groups = group_layers(layer_specs(loaded.config, self.kv_cache_dtype))
        draft_groups = () if draft is None else (group_layers(layer_specs(draft.config, self.kv_cache_dtype)),)
        blocks = self.cache_config.num_blocks or num_blocks_for_budget(
            self.kv_groups, self.cache_config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY, block_size,
            *draft_groups)  # a draft model's pool gets as many blocks; the budget holds both
        self.storage = KVCache(self.kv_groups, blocks, block_size, self.device)
        self.pool = BlockPool(blocks, enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, block_size, tuple(g.spec.window for g in self.kv_groups))
        self.scheduler = Scheduler(self.scheduler_config, self.kv, self.max_model_len)
        self.runner = ModelRunner(self.model, self.storage)
        fused_step_tokens = getattr(self.model, "fused_step_tokens", None)
        self._fused_step_tokens = fused_step_tokens(self.storage.layers) if fused_step_tokens else 0
        self.offload = self._make_offload(offload_config, loaded)
        self.drafter = self._make_drafter(draft, draft_groups, blocks, enable_prefix_caching)
        self.spec = SpecCounters()
        self.spec_gate = SpeculationGate() if spec is not None and spec.adaptive else None
        self._groups: dict[str, _Group] = {}
        self._requests: dict[str, Request] = {}
        self._kept: dict[str, Request] = {}  # finished keep_kv requests still holding their blocks
        self._generators: dict[str, torch.Generator] = {}
        self._ids = itertools.count()
        if self.kv_policy.evicts:
            self._check_policy(self.kv_policy)

    # --- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not is_text(prompt):
                raise ValueError("The prompt is not valid Unicode text (it holds a lone surrogate).")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt) if isinstance(prompt, Sequence) else None
            if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("A prompt is a string or a list of integer token ids.")
            if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
                raise ValueError(f"Prompt token ids must lie in [0, {self.model_config.vocab_size}).")
        if not ids:
            raise ValueError("The prompt is empty; give at least one token.")
        return ids

    def add_request(self, request_id: str | None, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, keep_kv: bool = False,
                    continue_from: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id.

        ``keep_kv``: when this request (n = 1) finishes, its blocks stay held under its id, until a
        later request names it in ``continue_from`` (or :meth:`release_kept` lets them go). Such a
        request adopts the kept KV as far as its prompt agrees with the kept tokens, partial last
        block included, and computes only the rest (a chat's next turn). Everything that can fail
        is checked before the request touches the scheduler, so a ValueError (bad input) leaves
        nothing behind."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}.")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if not isinstance(request_id, str) or request_id in self._groups:
            raise ValueError(f"Request id {request_id!r} is already in use or is not a string.")
        ids = self.encode_prompt(prompt)
        if any(t >= self.model_config.vocab_size for t in params.stop_token_ids or ()):
            raise ValueError(f"stop_token_ids must lie in [0, {self.model_config.vocab_size}).")
        if keep_kv and params.n != 1:
            raise ValueError("keep_kv keeps one sequence's KV; it needs n = 1.")
        first = Request(f"{request_id}#0", ids, params, prompt if isinstance(prompt, str) else None,
                        eos_token_ids=self.tokenizer.eos_token_ids)
        first.kv_state = self._policy_state(params, min(first.max_total_tokens, self.max_model_len))
        self.scheduler.check_fits(first, params.n)
        generator = make_generator(params.sample_seed(0), self.device)
        kept = self._kept.pop(continue_from, None) if continue_from is not None else None
        if kept is not None and self._adopt(kept, first):
            self.scheduler.add_running(first)
        else:
            self.scheduler.add(first)
        self._groups[request_id] = _Group(request_id, params, [first], [""],
                                          [IncrementalDetokenizer(self.tokenizer)], keep_kv=keep_kv)
        self._register(first, generator)
        return request_id

    def _policy_state(self, params: SamplingParams, length: int) -> PolicyState | None:
        """The eviction state of a request of at most ``length`` tokens, or None when it keeps every
        token: policy full, a budget that holds the whole sequence (then it runs exactly as full), or
        no full-attention group to govern (sliding windows bound the cache already)."""
        policy = self.kv_policy.with_name(params.kv_policy, params.kv_budget)
        if params.kv_budget is not None and not policy.evicts:
            raise ValueError("kv_budget needs a kv_policy that evicts: streaming, h2o or snapkv.")
        budget = policy.tokens_for(length)
        governed = tuple(g for g, window in enumerate(self.kv.windows) if window is None)
        if budget is None or not governed:
            return None
        self._check_policy(policy)
        return PolicyState(policy, budget, governed)

    def _check_policy(self, policy: KVPolicy) -> None:
        """ValueError when this engine cannot run ``policy``: its cache format or model lacks what it needs."""
        if not self.storage.moves_slots:
            raise ValueError(f"kv_policy {policy.name} moves single tokens between cache slots, which the "
                             f"{self.kv_cache_dtype} cache cannot (its key scales cover whole blocks); use "
                             "--kv-cache-dtype float32, bfloat16, float16 or int8.")
        if policy.needs_scores and self.model_config.mla is not None:
            raise ValueError(f"kv_policy {policy.name} ranks tokens by attention weights, which this model's "
                             "latent (MLA) attention does not report; use kv_policy streaming.")

    def _adopt(self, kept: Request, request: Request) -> bool:
        """Give ``request`` the kept KV of the tokens its prompt shares with ``kept`` (at least one
        prompt token is left to compute) and drop ``kept``; True if any KV was adopted."""
        limit = min(kept.num_computed_tokens, request.num_prompt_tokens - 1)
        common = 0
        while common < limit and kept.all_token_ids[common] == request.all_token_ids[common]:
            common += 1
        if common and kept.cache_salt == request.cache_salt:
            self.kv.adopt(kept, request, common)
        self.kv.free(kept)
        request.num_cached_prompt_tokens = request.num_computed_tokens
        return request.num_computed_tokens > 0

    def release_kept(self, request_id: str) -> None:
        """Let go of the KV a finished ``keep_kv`` request kept (nothing if it kept none)."""
        kept = self._kept.pop(request_id, None)
        if kept is not None:
            self.kv.free(kept)

    def max_new_tokens(self, num_prompt_tokens: int, num_samples: int = 1) -> int:
        """The most tokens each of ``num_samples`` samples of this prompt may generate: what the
        context and an empty pool can both hold, the prompt's full blocks shared (0 if even one
        more token cannot fit)."""
        def fits(total: int) -> bool:
            return self.kv.worst_case_blocks(num_prompt_tokens, total, num_samples,
                                             self.scheduler_config.prefill_chunk) <= self.pool.num_blocks
        low, high = num_prompt_tokens, self.max_model_len  # fits(low) is assumed; find the last that fits
        if low >= high or not fits(low + 1):
            return 0
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low - num_prompt_tokens

    def _register(self, request: Request, generator: torch.Generator) -> None:
        self._requests[request.request_id] = request
        self._generators[request.request_id] = generator

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks return to the pool (or stay only in the prefix cache)."""
        self.release_kept(request_id)
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        self._finish_group(group, "abort")
        for request in group.samples:
            self._forget(request)

    def abort_all(self, reason: str) -> list[str]:
        """End every request now (after a failure that no single request can be blamed for);
        every block goes back to the pool. Returns the ids of the requests ended."""
        ended = list(self._groups)
        log.error("ending all %d requests: %s", len(ended), reason)
        for request_id in ended:
            self.abort(request_id)
        for request_id in list(self._kept):
            self.release_kept(request_id)
        self.scheduler.forget_step()
        return ended

    def _finish_group(self, group: _Group, reason: str) -> None:
        for request in group.samples:
            if not request.is_finished:
                self.scheduler.finish(request, reason)

    def _forget(self, request: Request) -> None:
        if self.drafter is not None:
            self.drafter.forget(request.request_id)
        if self.spec_gate is not None:
            self.spec_gate.forget(request.request_id)
        self._requests.pop(request.request_id, None)
        self._generators.pop(request.request_id, None)
        self.runner.drop_host_blocks(request.request_id)

    def _make_drafter(self, draft: LoadedModel | None, draft_groups: tuple, num_blocks: int,
                      enable_prefix_caching: bool) -> NgramDrafter | DraftModelDrafter | None:
        """The drafter the speculative config asks for: prompt lookup, a draft model with a KV pool of
        its own (``num_blocks`` blocks of ``draft_groups``, as many as the target's), or None (off)."""
        spec = self.speculative_config
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramDrafter(NgramProposer(spec.num_speculative_tokens, spec.ngram_max, spec.ngram_min))
        return DraftModelDrafter(build_model(draft, self.dtype, self.device, self.weights_dtype),
                                 KVCache(draft_groups[0], num_blocks, self.cache_config.block_size, self.device),
                                 spec.num_speculative_tokens, self.scheduler_config, enable_prefix_caching)

    def _make_offload(self, config: OffloadConfig | None, loaded: LoadedModel) -> EngineOffload | None:
        """The offload tiers under the pool, keyed by this engine's KV fingerprint (None: no tiers)."""
        if config is None:
            return None
        # the weights as this engine runs them: their storage format (float32, Q8_0...) changes the KV too
        weights_id = weights_identity(self.model.state_dict())
        fingerprint = kv_fingerprint(weights_id, loaded.config, f"{self.dtype}|{self.weight_formats}", self.storage)
        num_params = sum(math.prod(w.shape) for w in loaded.weights.values())  # tensors or packed weights
        offload = EngineOffload(config, fingerprint, self.storage, self.pool, self.kv,
                                assumed_seconds_per_token(num_params))
        self.runner.on_evicted = offload.save_evicted
        return offload

    def close(self) -> None:
        """Write the offload tiers' pending stores and release them (threads, memory, connections).
        Idempotent; also runs when the process exits normally."""
        if self.offload is not None:
            self.offload.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs for every request group that advanced or finished."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if self.drafter is not None:
            for request_id in plan.preempted:
                self.drafter.free_cache(request_id)
        if plan.is_empty:
            return []
        try:
            output = self.runner.execute(plan)
        except Exception:
            if self.offload is not None:
                self.offload.discard_step()
            raise
        forward_seconds = time.perf_counter() - started
        due = self.scheduler.step_done()
        if output.attention_scores:
            self._observe(plan, output.attention_scores)
        rows = output.rows()
        touched: dict[str, _Group] = {}
        to_draft: list[Request] = []
        now = time.monotonic()
        for request in due:
            logits, best = rows[request.request_id]  # [1 + drafts verified, vocab], each row's argmax
            group = self._groups[request.request_id.rsplit("#", 1)[0]]
            touched[group.request_id] = group
            if group.error is not None:
                continue
            try:
                for sample_request in self._fork_if_first(group, request):
                    if self._append_tokens(group, sample_request, logits, best, now):
                        to_draft.append(sample_request)
            except Exception as err:  # this request alone ends; the batch goes on
                log.exception("request %s failed in a step and was ended alone", group.request_id)
                group.error = f"The engine failed on this request ({type(err).__name__})."
                self._finish_group(group, "error")
        if self.offload is not None:  # after verification's rollbacks registered what they kept
            self.offload.after_step(plan, forward_seconds)
        self._propose(to_draft)
        if self.spec_gate is not None and _decode_only(plan):
            self.spec_gate.observe_step(plan.num_tokens, time.perf_counter() - started)
        outputs = (self._output(g) for g in touched.values())
        return [out for out in outputs if out is not None]

    def _observe(self, plan: SchedulerOutput, scores: dict[str, tuple]) -> None:
        """Hand each request's attention weights to its eviction policy (after step_done, so they
        cover every token it holds)."""
        for s in plan.sequences:
            request = self._requests.get(s.request_id)
            if s.request_id in scores and request is not None:
                self.kv.observe(request, scores[s.request_id], s.score_rows)

    def _fork_if_first(self, group: _Group, request: Request) -> list[Request]:
        """Sample 0's first token: fork the other n-1 samples off its prompt blocks, by reference."""
        if group.params.n == 1 or len(group.samples) > 1 or request.output_token_ids:
            return [request]
        for index in range(1, group.params.n):
            child = Request(f"{group.request_id}#{index}", request.prompt_token_ids, group.params,
                            request.prompt, eos_token_ids=request.eos_token_ids,
                            arrival_time=request.arrival_time, sample_index=index)
            generator = make_generator(group.params.sample_seed(index), self.device)
            # joins the group before it holds blocks, so a failure below still frees them
            group.samples.append(child)
            group.texts.append("")
            group.detokenizers.append(IncrementalDetokenizer(self.tokenizer))
            self._register(child, generator)
            self.kv.fork(request, child)
            self.scheduler.add_running(child)
        return group.samples

    def _propose(self, requests: list[Request]) -> None:
        """Draft the next step's tokens for every request that goes on, in one call to the drafter
        (a draft model batches them)."""
        requests = [r for r in requests if not r.is_finished and r.kv_state is None]  # no drafts while evicting
        if self.spec_gate is not None:
            pays = self.spec_gate.drafting([r.request_id for r in requests], len(self.scheduler.running))
            requests = [r for r, draft in zip(requests, pays) if draft]
        if self.drafter is None or not requests:
            return
        budget = self._draft_budget()
        if budget is not None:  # the likeliest to be accepted first, one request per draft token at most
            if self.spec_gate is not None:
                requests = sorted(requests, key=lambda r: -self.spec_gate.acceptance(r.request_id))
            requests = requests[:budget]
        for request, drafts in zip(requests, self.drafter.propose_all(requests)):
            if budget is not None:
                drafts = drafts[:budget]
                budget -= len(drafts)
            request.spec_token_ids = drafts

    def _draft_budget(self) -> int | None:
        """How many draft tokens the next step can carry and still run as one fused C step (None: no
        such bound, because the model has no fused step here or the decodes alone already exceed it).
        A step past the bound falls back to PyTorch's per-operator path, which costs more than the
        drafts save: 8 concurrent chats with 4 drafts each ran at 0.68x no speculation until this
        bound (BENCHMARKS.md, issue 10)."""
        if not self._fused_step_tokens:
            return None
        decoding = len(self.scheduler.running)
        return self._fused_step_tokens - decoding if decoding <= self._fused_step_tokens else None

    def _append_tokens(self, group: _Group, request: Request, logits: torch.Tensor, best: list[int],
                       now: float) -> bool:
        """Sample (logits [1, V]) or verify drafts (logits [k + 1, V]) and append what is kept, one
        token at a time, up to the first that finishes the request; ``best`` holds each row's argmax,
        what a greedy request takes. True when it goes on (and may draft the next step's tokens)."""
        params = group.params
        generator = self._generators[request.request_id]
        num_spec = logits.shape[0] - 1
        if num_spec:
            tokens = verify(logits, request.spec_token_ids[:num_spec], params, generator, best)
            self.spec.count(num_spec, len(tokens) - 1)
            if self.drafter is not None:
                self.drafter.observe(request.request_id, num_spec, len(tokens) - 1)
            if self.spec_gate is not None:
                self.spec_gate.observe_verification(request.request_id, num_spec, len(tokens) - 1)
        else:
            tokens = best[:1] if params.greedy else sample(logits, [params], [generator])
        request.first_token_time = request.first_token_time or now
        reason = None
        for row, token in enumerate(tokens):
            if params.logprobs is not None:
                request.output_logprobs.append(logprobs_of(logits[row], token, params.logprobs))
            request.all_token_ids.append(token)
            reason = self._stop_reason(group, request, token)
            if reason is not None:
                break
        if num_spec:
            self.scheduler.end_verification(request, num_spec)
        if reason is not None:
            request.finish_time = now
            self.scheduler.finish(request, reason, keep_blocks=group.keep_kv)
            if group.keep_kv:
                self._kept[group.request_id] = request
        return reason is None

    def _stop_reason(self, group: _Group, request: Request, token: int) -> str | None:
        params = group.params
        detok = group.detokenizers[request.sample_index]
        new = detok.add(token)
        text = detok.text
        if params.stop and new:
            # only a stop string overlapping the new text can be new
            hits = [i for i in (text.find(s, max(0, len(text) - len(new) - len(s) + 1)) for s in params.stop) if i >= 0]
            if hits:
                group.texts[request.sample_index] = text[:min(hits)]
                return "stop"
        reason = None
        if (not params.ignore_eos and token in request.eos_token_ids) or \
                (params.stop_token_ids and token in params.stop_token_ids):
            reason = "stop"
        elif request.num_tokens - request.num_prompt_tokens >= params.max_tokens or \
                request.num_tokens >= self.max_model_len:
            reason = "length"
        group.texts[request.sample_index] = detok.final_text() if reason else text
        return reason

    def _output(self, group: _Group) -> RequestOutput | None:
        """The group's output after a step, in its ``output_kind``: everything so far (cumulative),
        only what is new (delta), or nothing until it finishes (final)."""
        first = group.samples[0]
        finished = group.finished
        if group.params.output_kind == "final" and not finished:
            return None
        delta = group.params.output_kind == "delta"
        outputs = [c for c in (self._completion(group, r, delta) for r in group.samples) if c is not None]
        metrics = {
            "arrival_time": first.arrival_time,
            "first_token_time": first.first_token_time,
            "finish_time": max((r.finish_time or 0.0) for r in group.samples) if finished else None,
            "num_preemptions": sum(r.num_preemptions for r in group.samples),
            "num_kv_tokens": sum(r.num_computed_tokens for r in group.samples),
            # per cache group: the tokens whose KV the samples still hold (an eviction policy drops some)
            "num_kv_tokens_held": tuple(sum(r.num_computed_tokens - self.kv.num_evicted(r, g) for r in group.samples)
                                        for g in range(self.kv.num_groups)),
            "peak_kv_blocks": sum(r.peak_blocks for r in group.samples),
            "peak_kv_bytes": sum(r.peak_blocks for r in group.samples) * self.block_bytes,
            "num_cached_prompt_tokens": first.num_cached_prompt_tokens,
            "num_output_tokens": sum(r.num_tokens - r.num_prompt_tokens for r in group.samples),
            "num_output_tokens_longest": max(r.num_tokens - r.num_prompt_tokens for r in group.samples),
        }
        if finished:
            self._groups.pop(group.request_id, None)
            for r in group.samples:
                self._forget(r)
        return RequestOutput(group.request_id, first.prompt, list(first.prompt_token_ids), outputs,
                             finished, metrics, group.error)

    @staticmethod
    def _completion(group: _Group, request: Request, delta: bool) -> CompletionOutput | None:
        """One sample's output: all of it, or (``delta``) only what the last output did not carry,
        None when that is nothing. A delta holds back text that may still become a stop string.

            output tokens: [ sent .......... | new ]     text: [ sent ....... | new | held ]
                                              ^ sent_tokens[i]                 ^ sent_text[i]
        """
        i = request.sample_index
        tokens, text = request.output_token_ids, group.texts[i]
        logprobs = request.output_logprobs if group.params.logprobs is not None else None
        if not delta:
            return CompletionOutput(i, text, list(tokens), request.finish_reason,
                                    None if logprobs is None else list(logprobs))
        while len(group.sent_tokens) <= i:
            group.sent_tokens.append(0)
            group.sent_text.append(0)
            group.sent_finish.append(False)
        start_token, start_text = group.sent_tokens[i], group.sent_text[i]
        end_text = len(text)
        if group.params.stop and not request.is_finished:
            end_text -= max(len(s) for s in group.params.stop) - 1
        end_text = max(start_text, end_text)
        if start_token == len(tokens) and start_text == end_text and \
                (group.sent_finish[i] or not request.is_finished):
            return None
        group.sent_tokens[i], group.sent_text[i] = len(tokens), end_text
        group.sent_finish[i] = request.is_finished
        return CompletionOutput(i, text[start_text:end_text], tokens[start_token:], request.finish_reason,
                                None if logprobs is None else logprobs[start_token:])

    # --- introspection ------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one block id (a page: one group's layers for block_size tokens)."""
        return self.storage.block_nbytes

    def kv_bytes_for_tokens(self, num_tokens: int) -> int:
        """What the planner says ``num_tokens`` tokens of this model's KV cost in the cache's format."""
        return kv_bytes(self.kv_shape, num_tokens, 1, self.kv_cache_dtype,
                        block_size=self.cache_config.block_size).total_bytes

    def cache_snapshot(self) -> dict[str, Any]:
        """Who holds which block, as plain data (for the live page): owner index per block, or
        -1 (free) / -2 (free, still holding a cached prefix); blocks held by several requests."""
        owners = [-2 if b.block_hash is not None and b.ref_count == 0 else -1 for b in self.pool.blocks]
        requests = []
        for index, request in enumerate(self.scheduler.running):
            group, sample = request.request_id.rsplit("#", 1)
            requests.append({"id": group, "sample": int(sample), "tokens": request.num_computed_tokens,
                             "blocks": self.kv.num_blocks_held(request), "evicted": self._evicted(request)})
            for block_id in (b for table in request.block_tables for b in table if b != NULL_BLOCK):
                if owners[block_id] < 0:
                    owners[block_id] = index
        shared = [b.block_id for b in self.pool.blocks if b.ref_count > 1]
        origins = self.offload.block_origins() if self.offload is not None else {}
        return {"num_blocks": self.pool.num_blocks, "block_size": self.cache_config.block_size,
                "owners": owners, "shared": shared, "requests": requests, "stats": self.stats(),
                "tier_blocks": {str(b): tier for b, tier in sorted(origins.items())}}

    def stats(self) -> dict[str, Any]:
        pool = self.pool
        running = self.scheduler.running
        bs = self.cache_config.block_size
        allocated_slots = sum(self.kv.num_blocks_held(r) for r in running) * bs
        filled = sum(self._slots_filled(r) for r in running)
        draft = self.drafter.stats() if self.drafter is not None else {}  # a draft model's own pool
        return {
            "kv_cache_usage": pool.num_used / pool.num_blocks,
            "num_blocks_total": pool.num_blocks,
            "num_blocks_free": pool.num_free,
            "num_blocks_used": pool.num_used,
            "num_blocks_cached_free": pool.num_cached_free,
            "block_size": self.cache_config.block_size,
            "kv_cache_bytes": self.storage.nbytes + draft.get("draft_kv_cache_bytes", 0),
            "kv_bytes_used": pool.num_used * self.block_bytes + draft.get("draft_kv_bytes_used", 0),
            "groups": self._group_stats(),
            "kv_cache_dtype": self.storage.kv_format,
            "dtype": self.dtype, "weights_dtype": self.weight_formats, "weight_bytes": self.weight_bytes,
            "num_requests_running": len(running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_requests_kept": len(self._kept),
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,  # tokens, tier hits included
            "kv_offload": self.offload.stats() if self.offload is not None else {},
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_policy": self.kv_policy.name,
            "kv_budget": self.kv_policy.budget,
            "num_requests_evicting": sum(1 for r in running if r.kv_state is not None),
            "num_tokens_evicted": self.kv.num_tokens_evicted,  # since the start, every group together
            "num_blocks_evicted": self.kv.num_blocks_evicted,  # blocks given back by evictions
            "kv_tokens_evicted_now": sum(self._evicted(r) for r in running),
            "fragmentation": (allocated_slots - filled) / allocated_slots if allocated_slots else 0.0,
            **self.spec.stats(),
            **(self.spec_gate.stats() if self.spec_gate is not None else {}),
            **draft,
        }


    def _slots_filled(self, request: Request) -> int:
        """Token slots of the request's real blocks that hold computed KV, every group together."""
        bs = self.cache_config.block_size
        total = 0
        for g, table in enumerate(request.block_tables):
            stored = request.num_computed_tokens - self.kv.num_evicted(request, g)
            total += sum(min(stored, (i + 1) * bs) - i * bs for i, b in enumerate(table)
                         if b != NULL_BLOCK and i * bs < stored)
        return total

    def _evicted(self, request: Request) -> int:
        """Tokens the request's policy has dropped and not recomputed, every group together."""
        return sum(self.kv.num_evicted(request, g) for g in range(self.kv.num_groups))

    def _group_stats(self) -> list[dict[str, Any]]:
        """Per cache group: its layers, window, the blocks its tables hold now and their bytes.

        A block shared by several requests (prefix, fork) counts once."""
        held: list[set[int]] = [set() for _ in self.kv_groups]
        for request in self.scheduler.running:
            for group, table in enumerate(request.block_tables):
                held[group].update(b for b in table if b != NULL_BLOCK)
        return [{"group": g.group_id, "layers": list(g.layers), "window": g.spec.window,
                 "kv_format": g.spec.kv_format, "blocks_used": len(held[g.group_id]),
                 "blocks_total": self.pool.num_blocks, "bytes_used": len(held[g.group_id]) * self.block_bytes}
                for g in self.kv_groups]


class LLM:
    """Offline generation in vLLM's convention: ``LLM(model=None).generate(prompts, SamplingParams())``."""

    def __init__(self, model: str | None = None, dtype: str = "float32", **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(model=model, dtype=dtype, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt in one continuous batch; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("Give one SamplingParams, or one per prompt.")
        # nothing but the last output of each request is returned, so none other is built
        params = [replace(p or SamplingParams(), output_kind="final") for p in params]
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p))
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):  # only finished outputs are used: see generate's output_kind
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(self, messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or several) and generate."""
        conversations: Iterable = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True),
                                         add_special_tokens=False)  # the template places BOS itself
                   for c in conversations]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def close(self) -> None:
        """Write the offload tiers' pending stores and release them (see :meth:`LLMEngine.close`)."""
        self.engine.close()
