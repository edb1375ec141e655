"""What S3 costs per month for each layout, so a team sees why batching matters.

The seed's per-record layout makes one PUT per exchange; the batched layout makes one PUT per
log per minute (plus one checkpoint per log per minute), whatever the request rate. Record size
and zstd ratio are measured here on synthetic records built by tokentrail itself (token ids,
prompt and answer text at about four characters per token, and the request body stored beside
the text), not guessed.

Prices: Amazon S3 Standard, US East (N. Virginia), from https://aws.amazon.com/s3/pricing/ —
PUT, COPY, POST, LIST requests $0.005 per 1,000; storage $0.023 per GB-month for the first
50 TB. Checked 2026-11-26 against the pricing page as quoted by cloudburn.io ("Amazon S3 Pricing
Explained", prices as of March 2026); the request price could not be re-read from the AWS page
itself that day. A month is 730 hours, as AWS's pricing calculator counts it; a GB is 2^30
bytes. Not included: GET/LIST requests of verification, data transfer, KMS, and that every
version of an object is billed (tokentrail writes each key once).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import zstandard

from .._record import SCHEMA, ZERO_HASH, Exchange
from ._bucket import DEFAULT_DAYS

PUT_PRICE_PER_1000 = 0.005
STORAGE_PRICE_GB_MONTH = 0.023
PRICES_CHECKED = "2026-11-26"
PRICE_SOURCE = "https://aws.amazon.com/s3/pricing/ (S3 Standard, us-east-1)"
HOURS_PER_MONTH = 730
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
GB = 1 << 30
CHECKPOINT_BYTES = 200  # a signed C2SP checkpoint note is about this size

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which"
    " but have an they you were her she there been one all we their has would when if so no"
    " model token audit request response user system data log chain hash record compliance"
)
WORDS = _VOCABULARY.split()


@dataclass(frozen=True)
class RecordSample:
    """Measured size of one record line and the zstd ratio of a batch of them."""

    tokens: int
    record_bytes: float
    zstd_ratio: float  # compressed / raw


@dataclass(frozen=True)
class CostRow:
    """One layout's monthly numbers."""

    layout: str
    puts_per_month: int
    put_cost: float
    gb_per_month: float
    storage_cost_first_month: float
    storage_cost_at_retention: float

    @property
    def total_first_month(self) -> float:
        """PUTs plus the first month's storage."""
        return self.put_cost + self.storage_cost_first_month


def _text(rng: random.Random, tokens: int) -> str:
    words: list[str] = []
    chars = 0
    while chars < tokens * 4:
        word = rng.choice(WORDS)
        words.append(word)
        chars += len(word) + 1
    return " ".join(words)


SAMPLE_TOKENS = 1_600_000
#: The longest exchange priced (a million-token context): larger ones scale linearly.
MAX_TOKENS_PER_EXCHANGE = 1_000_000


def measure_records(
    tokens_per_exchange: int, samples: int | None = None, seed: int = 7
) -> RecordSample:
    """Build ``samples`` realistic records and measure their size and zstd ratio (by default
    64, fewer for long exchanges: about 1.6 million tokens in all, and at least 4)."""
    if samples is None:
        samples = max(4, min(64, SAMPLE_TOKENS // max(tokens_per_exchange, 1)))
    rng = random.Random(seed)
    n_in = max(tokens_per_exchange * 3 // 4, 0)
    n_out = max(tokens_per_exchange - n_in, 0)
    lines = []
    for seq in range(samples):
        prompt, answer = _text(rng, n_in), _text(rng, n_out)
        exchange = Exchange(
            model="llama3.2:1b",
            api="openai.chat",
            stop_reason="stop",
            input_tokens=[rng.randrange(128_000) for _ in range(n_in)],
            output_tokens=[rng.randrange(128_000) for _ in range(n_out)],
            input_token_source="upstream-ids",
            output_token_source="upstream-ids",
            input_text=prompt,
            output_text=answer,
            user_id=f"user-{rng.randrange(100)}",
            session_id=f"session-{rng.randrange(1000)}",
            model_version="sha256:a80c4f17acd5",
            request_duration_ms=rng.uniform(50, 5000),
            extra={
                "gen_ai.request.body": {
                    "model": "llama3.2:1b",
                    "messages": [{"role": "user", "content": prompt}],
                },
                "gen_ai.usage.input_tokens": n_in,
                "gen_ai.usage.output_tokens": n_out,
            },
        )
        head = f'{{"schema":"{SCHEMA}","log_id":"proxy-1","seq":{seq},"prev_hash":"{ZERO_HASH}",'
        lines.append(head.encode() + exchange.content_bytes()[1:] + b"\n")
    raw = b"".join(lines)
    packed = zstandard.ZstdCompressor(level=3).compress(raw)
    return RecordSample(tokens_per_exchange, len(raw) / samples, len(packed) / len(raw))


def estimate(
    rps: float,
    tokens_per_exchange: int = 1000,
    *,
    writers: int = 1,
    segment_seconds: float = 60.0,
    max_segment_bytes: int = 64 << 20,
    retention_days: int = DEFAULT_DAYS,
    sample: RecordSample | None = None,
) -> tuple[RecordSample, list[CostRow]]:
    """Monthly PUTs, PUT cost and storage for the per-record and batched layouts."""
    sample = sample or measure_records(tokens_per_exchange)
    records = rps * SECONDS_PER_MONTH
    raw_bytes = records * sample.record_bytes
    periods = SECONDS_PER_MONTH / segment_seconds * writers  # log-minutes per month
    checkpoints = int(periods) if rps > 0 else 0
    months_retained = retention_days / (365.25 / 12)

    def row(layout: str, puts: float, stored: float) -> CostRow:
        gb = (stored + checkpoints * CHECKPOINT_BYTES) / GB
        return CostRow(
            layout,
            round(puts),
            puts / 1000 * PUT_PRICE_PER_1000,
            gb,
            gb * STORAGE_PRICE_GB_MONTH,
            gb * months_retained * STORAGE_PRICE_GB_MONTH,
        )

    per_period_bytes = raw_bytes / periods if periods else 0.0
    segments = periods * max(1, math.ceil(per_period_bytes / max_segment_bytes)) if rps else 0
    return sample, [
        row("per-record (seed)", records + checkpoints, raw_bytes),
        row(
            f"batched ({segment_seconds:g}s zstd)",
            segments + checkpoints,
            raw_bytes * sample.zstd_ratio,
        ),
    ]


def format_table(
    rps: float, tokens: int, sample: RecordSample, rows: list[CostRow], retention_days: int
) -> str:
    """A plain-text table with the assumptions under it."""
    header = (
        f"{'layout':<24} {'PUTs/month':>14} {'PUT $/month':>12} {'GB/month':>10}"
        f" {'storage $ (1st month)':>22} {f'storage $/month after {retention_days} d':>28}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:<24} {r.puts_per_month:>14,} {r.put_cost:>12,.2f} {r.gb_per_month:>10,.2f}"
            f" {r.storage_cost_first_month:>22,.2f} {r.storage_cost_at_retention:>28,.2f}"
        )
    lines += [
        "",
        f"{rps:g} exchanges/s, {tokens} tokens each: {sample.record_bytes:,.0f} bytes per record"
        f" ({sample.record_bytes / max(tokens, 1):.1f} bytes/token), zstd ratio"
        f" {sample.zstd_ratio:.2f} (measured on synthetic tokentrail records)",
        f"prices: PUT ${PUT_PRICE_PER_1000} per 1,000, storage ${STORAGE_PRICE_GB_MONTH}/GB-month;"
        f" {PRICE_SOURCE}, as quoted by a secondary source on {PRICES_CHECKED} (see the"
        f" module docstring); month = {HOURS_PER_MONTH} h",
    ]
    return "\n".join(lines)
