"""When speculation stops paying: the engine's own step times decide whose drafts to verify.

A decode step of T tokens takes about ``a + b * T`` seconds: ``a`` is what every step pays whatever
its size (reading the weights once, Python, the launch of every op), ``b`` what each token adds.
At batch 1 on a CPU ``a`` dominates and verifying k drafts is almost free; at a large batch the
step is compute-bound and every draft costs nearly as much as a token decoded for real.

Verifying ``d`` drafts costs ``b * d`` seconds. In that time the batch, decoding plainly at its rate
``B / (a + b * B)`` tokens per second, would have made ``b * d * B / (a + b * B)`` tokens; the drafts
bring ``alpha * d``, ``alpha`` being the share of a request's drafts the target accepts. So drafts
pay while

    alpha > b * B / (a + b * B)          (the per-token share of a B-sequence step's time)

``a`` and ``b`` are fitted by least squares over recent decode-only steps (older steps weigh less,
so the fit follows the machine's load); steps with a prefill chunk are left out, their attention
over long prompts would tilt the slope. ``alpha`` is each request's own acceptance, blended with the
engine's so a request with few verifications starts from what others saw. vLLM disables drafts
above a fixed batch size (``speculative_disable_by_batch_size``); this finds the size by itself,
and keeps drafting for requests whose drafts are accepted often enough even in a large batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepTimeFit:
    """Exponentially weighted least squares of step seconds on step tokens."""

    decay: float = 0.98
    _w: float = 0.0
    _t: float = 0.0
    _tt: float = 0.0
    _s: float = 0.0
    _ts: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._t = d * self._t + tokens
        self._tt = d * self._tt + tokens * tokens
        self._s = d * self._s + seconds
        self._ts = d * self._ts + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) with seconds ~ a + b * tokens, both >= 0; None until the steps seen differ in size."""
        if self._w < 4.0:
            return None
        mean_t, mean_s = self._t / self._w, self._s / self._w
        var_t = self._tt / self._w - mean_t * mean_t
        if var_t < 0.25:  # every step the same size: the slope is unknown
            return None
        slope = max(0.0, (self._ts / self._w - mean_t * mean_s) / var_t)
        return max(0.0, mean_s - slope * mean_t), slope


@dataclass
class SpeculationGate:
    """Which requests draft for the next step (see the module docstring). A request the gate holds
    back still drafts once every ``probe_every`` steps, so its acceptance and the fit keep being
    measured and a gate that closed on a few unlucky steps opens again."""

    prior_weight: float = 8.0  # drafts' worth of the prior in an acceptance estimate
    probe_every: int = 16
    fit: StepTimeFit = field(default_factory=StepTimeFit)
    _drafted: int = 0
    _accepted: int = 0
    _per_request: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (drafted, accepted)
    _held_back: dict[str, int] = field(default_factory=dict)  # id -> steps held back since it last drafted

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A decode-only step of ``tokens`` tokens (drafts included) took ``seconds``."""
        self.fit.add(tokens, seconds)

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        self._drafted += drafted
        self._accepted += accepted
        old_d, old_a = self._per_request.get(request_id, (0, 0))
        self._per_request[request_id] = (old_d + drafted, old_a + accepted)

    def forget(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)
        self._held_back.pop(request_id, None)

    def acceptance(self, request_id: str) -> float:
        """The request's acceptance rate, pulled toward the engine's, itself pulled toward 0.5."""
        overall = (self._accepted + self.prior_weight * 0.5) / (self._drafted + self.prior_weight)
        drafted, accepted = self._per_request.get(request_id, (0, 0))
        return (accepted + self.prior_weight * overall) / (drafted + self.prior_weight)

    def threshold(self, batch_size: int) -> float:
        """The acceptance rate drafts need in a batch of ``batch_size`` decodes (0 until measured)."""
        line = self.fit.line()
        if line is None or batch_size < 1:
            return 0.0
        a, b = line
        per_token = b * batch_size
        return per_token / (a + per_token) if a + per_token > 0 else 0.0

    def drafting(self, request_ids: list[str], batch_size: int) -> list[bool]:
        """For each request, whether it drafts for the next step in a batch of ``batch_size``:
        where its drafts are expected to pay, or where it is due a probe."""
        needed = self.threshold(batch_size)
        return [self._decide(r, self.acceptance(r) > needed) for r in request_ids]

    def _decide(self, request_id: str, pays: bool) -> bool:
        held = 0 if pays else self._held_back.get(request_id, 0) + 1
        if held >= self.probe_every:
            held = 0
        self._held_back[request_id] = held
        return held == 0

    def stats(self) -> dict[str, float]:
        line = self.fit.line()
        return {"spec_step_fixed_s": line[0] if line else 0.0, "spec_step_per_token_s": line[1] if line else 0.0}
