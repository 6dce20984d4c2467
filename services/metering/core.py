"""Metering's pure core: the price book, quotes, rating, usage rules and run estimates.

No I/O here: token counts arrive as integers (see `tokens.py`), the catalog arrives parsed,
errors leave as `TFError`. Money is integer nano-units (`tokenforge.money`): a rating rounds
once, half-up; a quote (a hold) rounds up, so a hold always covers what it stands for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenforge.catalog import Catalog, Model, ModelChannel
from tokenforge.errors import TFError
from tokenforge.money import Bucket, format_nano, hold_nano, rate_nano

POLICIES = ("routed", "direct", "auto")
# Bounds (TIGER_STYLE): usage beyond this is an upstream's bug, not a bill; with prices below
# MAX_PRICE_NANO every amount fits comfortably in int64.
MAX_TOKENS = 1_000_000_000
MAX_PLAN_STEPS = 1_000
MAX_PLAN_CALLS = 10_000_000
INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one attempt. Cached tokens are part of input; reasoning part of output."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Quote:
    amount_nano: int
    bucket: Bucket
    prompt_tokens: int
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class Rating:
    amount_nano: int
    bucket: Bucket
    channel: ModelChannel
    compare_amount_nano: int | None = None
    compare_bucket: Bucket | None = None


@dataclass(frozen=True, slots=True)
class PlanStep:
    model: str
    calls: int
    input_tokens: int  # per call
    output_tokens: int  # per call
    step: str = ""


@dataclass(frozen=True, slots=True)
class BucketEstimate:
    low_nano: int = 0
    expected_nano: int = 0
    high_nano: int = 0


@dataclass(frozen=True, slots=True)
class Warning:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RunEstimate:
    buckets: dict[Bucket, BucketEstimate]
    warnings: tuple[Warning, ...]


WARNING_CODES = (
    "insufficient_balance",
    "large_share_of_balance",
    "uses_credit",
    "fallback_may_cost_more",
    "budget_below_estimate",
)


class PriceBook:
    """The catalog's prices, indexed for the hot path: (model, channel) → entry in O(1)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._entries: dict[tuple[str, str], ModelChannel] = {}
        for model in catalog.models.values():
            for mc in model.channels:
                self._entries[(model.name, mc.channel.id)] = mc

    def model(self, name: str) -> Model:
        model = self.catalog.models.get(name)
        if model is None:
            raise TFError(
                "model_not_found",
                f"The model `{name}` is not in the catalog ({self.catalog.source}).",
                "model",
            )
        return model

    def entry(self, model: str, channel_id: str, param: str = "channel_id") -> ModelChannel:
        mc = self._entries.get((model, channel_id))
        if mc is not None:
            return mc
        known = self.model(model)  # raises model_not_found first
        ids = ", ".join(c.channel.id for c in known.channels)
        raise TFError(
            "invalid_request",
            f"The model `{model}` has no channel `{channel_id}`; its channels are: {ids}.",
            param,
        )


# ---------------------------------------------------------------- usage


def validate_usage(usage: Usage) -> Usage:
    """Reject a usage that contradicts itself; the router marks such an attempt bad_response."""
    problem = None
    for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
        value = getattr(usage, name)
        if value < 0:
            problem = f"`{name}` is negative ({value})"
            break
        if value > MAX_TOKENS:
            problem = f"`{name}` is implausibly large ({value} > {MAX_TOKENS})"
            break
    if problem is None and usage.cached_input_tokens > usage.input_tokens:
        problem = (
            f"cached prompt tokens ({usage.cached_input_tokens}) exceed the prompt tokens "
            f"({usage.input_tokens}); cached tokens are part of the prompt tokens"
        )
    if problem is None and usage.reasoning_tokens > usage.output_tokens:
        problem = (
            f"reasoning tokens ({usage.reasoning_tokens}) exceed the completion tokens "
            f"({usage.output_tokens}); reasoning tokens are part of the completion tokens"
        )
    if problem is not None:
        raise TFError("invalid_request", f"The usage contradicts itself: {problem}.", "usage")
    return usage


def _int_field(raw: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TFError("invalid_request", f"The usage field `{name}` is not an integer.", "usage")
        return value
    return None


def _details(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TFError("invalid_request", f"The usage field `{name}` is not an object.", "usage")
    return value


def normalise_usage(raw: Any) -> Usage | None:
    """An upstream's `usage` object → Usage, across the shapes OpenAI-compatible APIs send.

    - Chat Completions: prompt_tokens / completion_tokens, prompt_tokens_details.cached_tokens,
      completion_tokens_details.reasoning_tokens.
    - Responses API: input_tokens / output_tokens with input_tokens_details.cached_tokens and
      output_tokens_details.reasoning_tokens.
    - DeepSeek-style prompt_cache_hit_tokens (part of prompt_tokens).
    - Anthropic-style cache_read_input_tokens / cache_creation_input_tokens, which are NOT part
      of input_tokens there; we add them so cached tokens stay part of input, as in OpenAI's.

    None when no token counts are present (the caller counts locally). The result is validated.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TFError("invalid_request", "The usage is not an object.", "usage")
    prompt = _int_field(raw, "prompt_tokens", "input_tokens")
    completion = _int_field(raw, "completion_tokens", "output_tokens")
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    completion = completion or 0
    in_details = _details(raw, "prompt_tokens_details") or _details(raw, "input_tokens_details")
    out_details = _details(raw, "completion_tokens_details") or _details(raw, "output_tokens_details")
    cached = _int_field(in_details, "cached_tokens")
    if cached is None:
        cached = _int_field(raw, "prompt_cache_hit_tokens")
    anthropic_read = _int_field(raw, "cache_read_input_tokens")
    if cached is None and anthropic_read is not None and "prompt_tokens" not in raw:
        cache_write = _int_field(raw, "cache_creation_input_tokens") or 0
        prompt += anthropic_read + cache_write
        cached = anthropic_read
    reasoning = _int_field(out_details, "reasoning_tokens")
    return validate_usage(Usage(prompt, completion, cached or 0, reasoning or 0))


# ---------------------------------------------------------------- quote and rate


def _amount(mc: ModelChannel, usage: Usage, *, hold: bool) -> int:
    fn = hold_nano if hold else rate_nano
    amount = fn(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        input_price_nano=mc.price.input,
        output_price_nano=mc.price.output,
        cached_input_price_nano=mc.price.cached_input,
    )
    if amount > INT64_MAX:
        raise TFError("invalid_request", "The amount does not fit in 64 bits; the usage is too large.", "usage")
    assert amount >= 0
    return amount


MIN_HOLD_NANO = 1


def quote(book: PriceBook, model: str, channel_id: str, prompt_tokens: int, max_tokens: int) -> Quote:
    """The hold for one request: its prompt plus the most output it may produce, rounded up."""
    mc = book.entry(model, channel_id)
    if max_tokens < 0 or max_tokens > MAX_TOKENS:
        raise TFError("invalid_request", f"`max_tokens` must be in [1, {MAX_TOKENS}], got {max_tokens}.", "max_tokens")
    assert 0 <= prompt_tokens <= MAX_TOKENS * 10, prompt_tokens
    output_tokens = max_tokens or book.model(model).max_output_tokens
    amount = _amount(mc, Usage(prompt_tokens, output_tokens), hold=True)
    # A free model (price 0) still holds the smallest unit: every request has a hold to settle,
    # and so its receipt; the settlement charges 0 and releases it.
    return Quote(max(amount, MIN_HOLD_NANO), mc.channel.bucket, prompt_tokens, output_tokens)


def rate(
    book: PriceBook, model: str, channel_id: str, usage: Usage, compare_channel_id: str = ""
) -> Rating:
    """The charge for a usage at a channel's price (and, optionally, at another channel's)."""
    mc = book.entry(model, channel_id)
    validate_usage(usage)
    amount = _amount(mc, usage, hold=False)
    if not compare_channel_id:
        return Rating(amount, mc.channel.bucket, mc)
    other = book.entry(model, compare_channel_id, param="compare_channel_id")
    return Rating(amount, mc.channel.bucket, mc, _amount(other, usage, hold=False), other.channel.bucket)


# ---------------------------------------------------------------- run estimates


def eligible(model: Model, policy: str) -> list[ModelChannel]:
    """The model's channels a key with this route policy may use, in attempt order."""
    assert policy in POLICIES, policy
    if policy == "auto":
        routed = [mc for mc in model.channels if mc.channel.route == "routed"]
        return routed + [mc for mc in model.channels if mc.channel.route == "direct"]
    return [mc for mc in model.channels if mc.channel.route == policy]


def _check_step(index: int, step: PlanStep) -> None:
    for name, value, limit in (
        ("calls", step.calls, MAX_PLAN_CALLS),
        ("input_tokens", step.input_tokens, MAX_TOKENS),
        ("output_tokens", step.output_tokens, MAX_TOKENS),
    ):
        if not 0 <= value <= limit:
            raise TFError("invalid_request", f"`{name}` must be in [0, {limit}], got {value}.", f"plan[{index}].{name}")


def _label(index: int, step: PlanStep) -> str:
    return f"step {step.step!r} ({step.model})" if step.step else f"plan[{index}] ({step.model})"


def _money(amount_nano: int, bucket: Bucket) -> str:
    return f"{format_nano(amount_nano)} {bucket.unit}"


def estimate_run(
    book: PriceBook,
    plan: Sequence[PlanStep],
    policy: str,
    allowed_models: Iterable[str] = (),
    available_nano: Mapping[Bucket, int] | None = None,
    budget_nano: Mapping[Bucket, int] | None = None,
) -> RunEstimate:
    """A run's cost per bucket before it starts, and what the user should know about it.

    For each step, every call is rated at that step's per-call usage (rounded per call, as
    each receipt is), on the step's eligible channels:
      - expected: on the primary (the first eligible channel);
      - low: on the cheapest eligible channel of the primary's bucket (prices in different
        units cannot be compared, so a cross-unit fallback never lowers an estimate);
      - high: per bucket, on the priciest eligible channel of that bucket — the most that
        bucket could pay if every call fell back to it.
    So low <= expected <= high in every bucket. `available_nano` (None: unknown, no balance
    warnings) and `budget_nano` (0 or missing: no budget) are per bucket.
    """
    if policy not in POLICIES:
        raise TFError("invalid_request", f"Unknown route policy {policy!r}; use routed, direct or auto.", "route_policy")
    if len(plan) > MAX_PLAN_STEPS:
        raise TFError("invalid_request", f"A plan has at most {MAX_PLAN_STEPS} steps.", "plan")
    allowed = tuple(allowed_models)
    low = dict.fromkeys(Bucket, 0)
    expected = dict.fromkeys(Bucket, 0)
    high = dict.fromkeys(Bucket, 0)
    warnings: list[Warning] = []

    for index, step in enumerate(plan):
        model = book.catalog.models.get(step.model)
        if model is None:
            raise TFError(
                "model_not_found",
                f"plan[{index}]: the model `{step.model}` is not in the catalog.",
                f"plan[{index}].model",
            )
        if allowed and step.model not in allowed:
            raise TFError(
                "model_not_allowed",
                f"plan[{index}]: this API key may not use `{step.model}`; it may use: {', '.join(allowed)}.",
                f"plan[{index}].model",
            )
        _check_step(index, step)
        channels = eligible(model, policy)
        if not channels:
            raise TFError(
                "route_not_allowed",
                f"plan[{index}]: `{step.model}` has no {policy} channel; use a key with another route policy.",
                f"plan[{index}].model",
            )
        usage = Usage(step.input_tokens, step.output_tokens)
        per_call = [(mc, _amount(mc, usage, hold=False)) for mc in channels]
        primary, primary_amount = per_call[0]
        primary_bucket = primary.channel.bucket
        same_bucket = [a for mc, a in per_call if mc.channel.bucket is primary_bucket]
        expected[primary_bucket] += step.calls * primary_amount
        low[primary_bucket] += step.calls * min(same_bucket)
        for bucket in Bucket:
            amounts = [a for mc, a in per_call if mc.channel.bucket is bucket]
            if amounts:
                high[bucket] += step.calls * max(amounts)

        label = _label(index, step)
        if all(mc.channel.route == "direct" for mc in channels):
            warnings.append(Warning(
                "uses_credit",
                f"{label} can only be served by direct channels, so it is paid from Credit "
                f"(expected {_money(step.calls * primary_amount, Bucket.CREDIT)}). Make sure "
                f"Credit covers it, or plan a model that has a routed channel to pay from the wallet.",
            ))
        pricier = [(mc, a) for mc, a in per_call[1:] if mc.channel.bucket is primary_bucket and a > primary_amount]
        crossing = [mc for mc, _ in per_call[1:] if mc.channel.bucket is not primary_bucket]
        if pricier and step.calls:
            worst_mc, worst = max(pricier, key=lambda item: item[1])
            extra = step.calls * (worst - primary_amount)
            budget = (budget_nano or {}).get(primary_bucket, 0)
            # Only a budget in the bucket this step pays from caps what its fallbacks can cost.
            cap = (f"; the run's {primary_bucket.value} budget of {_money(budget, primary_bucket)} caps "
                   f"what the whole run can spend." if budget > 0 else ", or set a run budget to cap it.")
            warnings.append(Warning(
                "fallback_may_cost_more",
                f"{label}: if the primary channel `{primary.channel.id}` fails, falling back to "
                f"`{worst_mc.channel.id}` costs up to {_money(extra, primary_bucket)} more for this "
                f"step. Keep a margin of that much{cap}",
            ))
        if crossing and step.calls:
            other = crossing[0].channel.bucket
            worst_other = max(a for mc, a in per_call if mc.channel.bucket is other)
            warnings.append(Warning(
                "fallback_may_cost_more",
                f"{label}: if every {primary.channel.route} channel fails, calls fall back to "
                f"`{crossing[0].channel.id}` and are paid from the {other.value} instead (up to "
                f"{_money(step.calls * worst_other, other)}). Use a `{primary.channel.route}` key "
                f"if this run must never pay from the {other.value}.",
            ))

    estimates = {b: BucketEstimate(low[b], expected[b], high[b]) for b in Bucket}
    for b, est in estimates.items():
        assert 0 <= est.low_nano <= est.expected_nano <= est.high_nano, (b, est)

    for bucket in Bucket:
        est = estimates[bucket]
        budget = (budget_nano or {}).get(bucket, 0)
        if available_nano is not None and est.high_nano > 0:
            available = available_nano.get(bucket, 0)
            if est.high_nano > available:
                shortfall = est.high_nano - available
                warnings.append(Warning(
                    "insufficient_balance",
                    f"{bucket.value}: the high estimate {_money(est.high_nano, bucket)} exceeds the "
                    f"available {_money(available, bucket)}. Top up the {bucket.value} by at least "
                    f"{_money(shortfall, bucket)}, or shorten the plan.",
                ))
            elif est.high_nano * 2 > available:
                advice = (f"top up, or lower the run's {bucket.value} budget of {_money(budget, bucket)}"
                          if budget > 0 else "top up or set a budget")
                warnings.append(Warning(
                    "large_share_of_balance",
                    f"{bucket.value}: the high estimate {_money(est.high_nano, bucket)} is more than "
                    f"half of the available {_money(available, bucket)}. Other work paid from the "
                    f"{bucket.value} may be refused while this run is going; {advice}.",
                ))
        if budget > 0 and budget < est.high_nano:
            if budget < est.expected_nano:
                what = (f"below the expected cost {_money(est.expected_nano, bucket)}: the run "
                        f"will likely be refused (run_budget_exceeded) before it ends")
            else:
                what = (f"below the high estimate {_money(est.high_nano, bucket)}: fallbacks to "
                        f"pricier channels may exhaust it")
            warnings.append(Warning(
                "budget_below_estimate",
                f"{bucket.value}: the budget {_money(budget, bucket)} is {what}. Raise the budget "
                f"to {_money(est.high_nano, bucket)} to cover the worst case, or shorten the plan.",
            ))
    return RunEstimate(estimates, tuple(warnings))
