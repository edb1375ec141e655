"""Shared helpers for the benchmarks: realistic exchanges, a table printer, stopping a child."""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
from collections.abc import Sequence

from tokentrail import Exchange


def exchange(rng: random.Random, n_in: int = 1000, n_out: int = 300) -> Exchange:
    """An exchange of ``n_in`` input and ``n_out`` output token ids, with its texts."""
    input_tokens: list[int | str | list[int]] = [rng.randrange(0, 128_000) for _ in range(n_in)]
    output_tokens: list[int | str | list[int]] = [rng.randrange(0, 128_000) for _ in range(n_out)]
    return Exchange(
        model="llama3.2:1b",
        model_version="sha256:a80c4f17acd5",
        api="ollama.generate",
        stop_reason="stop",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        input_token_source="upstream-context",
        output_token_source="upstream-context",
        input_text="lorem ipsum " * (n_in // 3),
        output_text="dolor sit amet " * (n_out // 4),
        user_id=f"user-{rng.randrange(50)}",
        session_id=f"session-{rng.randrange(1000)}",
        request_duration_ms=812.5,
    )


def positive(text: str) -> int:
    """An ``argparse`` type: a count of at least 1 (so a run never divides by zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def mean(values: Sequence[float]) -> float:
    """The mean, or NaN for no values."""
    return statistics.fmean(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so the output can be pasted into the README as it is."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> int:
    """SIGTERM (a graceful stop: a proxy seals), then SIGKILL after ``grace`` s; the status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
