"""``tokentrail demo``: the whole product end to end on one machine, in well under a minute.

It starts the simulated model server in three guises (Ollama 0.4 with ``context``, Ollama 0.12
with logprobs, an OpenAI-compatible server), an auditing proxy in front of each writing one
local ledger, drives exchanges through the official ``ollama`` and ``openai`` clients (chat and
generate, streamed and not), closes the proxies (which seals the logs), verifies the ledger and
prints what was captured. Nothing is fetched from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._checkpoint import Signer, propose_key_name
from ._errors import ConfigError
from ._layout import iter_lines, list_log, list_logs
from ._proxy import ProxyConfig, running_proxy
from ._sim import SimConfig, running_sim
from ._verify import Report, VerifyOptions, verify_local

PROMPTS = (
    "Summarise the audit policy for model access in one paragraph.",
    "What is a Merkle tree, and why do transparency logs use one?",
    "Write a haiku about the café on the corner.",
    "List three risks of storing prompts without encryption.",
    "Explain what a data-subject access request is.",
)

#: (log id, simulator mode, what the proxy asks the upstream for on the client's behalf)
UPSTREAMS = (
    ("demo-ollama-04", "ollama-0.4", "off"),
    ("demo-ollama", "ollama", "logprobs"),
    ("demo-openai", "openai", "off"),
)


@dataclass
class DemoResult:
    """What the demo did and found."""

    directory: Path
    ledger: Path
    verifier_key: str
    exchanges: int = 0
    records: int = 0
    tokens_by_source: Counter[str] = field(default_factory=Counter)
    records_by_source: Counter[str] = field(default_factory=Counter)
    report: Report | None = None


async def _drive_ollama(url: str, n: int, step: Callable[[], None]) -> None:
    import ollama

    client = ollama.AsyncClient(host=url)
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = i % 2 == 0
        if i % 4 < 2:
            if stream:
                async for _ in await client.generate(
                    model="llama3.2:1b", prompt=prompt, stream=True
                ):
                    pass
            else:
                await client.generate(model="llama3.2:1b", prompt=prompt)
        else:
            messages = [{"role": "user", "content": prompt}]
            if stream:
                async for _ in await client.chat(
                    model="llama3.2:1b", messages=messages, stream=True
                ):
                    pass
            else:
                await client.chat(model="llama3.2:1b", messages=messages)
        step()


async def _drive_openai(url: str, n: int, step: Callable[[], None]) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo-key", max_retries=0)
    try:
        for i in range(n):
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = i % 2 == 0
            if i % 4 < 2:
                messages: Any = [{"role": "user", "content": prompt}]
                if stream:
                    chunks = await client.chat.completions.create(
                        model="llama3.2:1b",
                        messages=messages,
                        stream=True,
                        stream_options={"include_usage": True},
                        logprobs=True,
                    )
                    async for _ in chunks:
                        pass
                else:
                    await client.chat.completions.create(
                        model="llama3.2:1b", messages=messages, logprobs=True
                    )
            else:
                if stream:
                    pieces = await client.completions.create(
                        model="llama3.2:1b", prompt=prompt, max_tokens=64, stream=True
                    )
                    async for _ in pieces:
                        pass
                else:
                    await client.completions.create(
                        model="llama3.2:1b", prompt=prompt, max_tokens=64
                    )
            step()
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _stack(directory: Path, signer: Signer) -> AsyncIterator[list[tuple[str, str, str]]]:
    """Start each simulator and its proxy; yield ``(log id, mode, proxy url)``."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for log_id, mode, token_data in UPSTREAMS:
            sim_url = await stack.enter_async_context(running_sim(SimConfig(mode=mode)))
            config = ProxyConfig(
                upstream=sim_url,
                host="127.0.0.1",
                port=0,
                ledger=directory / "ledger",
                key=directory / "keys" / "signing.key",
                log_id=log_id,
                request_token_data=token_data,  # type: ignore[arg-type]
            )
            proxy = await stack.enter_async_context(running_proxy(config))
            out.append((log_id, mode, proxy.url))
        yield out


async def run_demo(directory: Path, exchanges: int, progress: bool = True) -> DemoResult:
    """Run the demo in ``directory`` (which must be empty or new)."""
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty; give a new or empty --dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the demo directory {directory}: {exc.strerror}") from exc
    signer = Signer.generate(propose_key_name())
    signer.save(directory / "keys" / "signing.key")
    verifier = signer.verifier.to_text()
    (directory / "keys" / "verifier.pub").write_text(verifier + "\n")
    result = DemoResult(directory, directory / "ledger", verifier)
    # --exchanges N drives exactly N (at least one per upstream): the remainder goes first.
    total = max(exchanges, len(UPSTREAMS))
    shares = [total // len(UPSTREAMS) + (i < total % len(UPSTREAMS)) for i in range(len(UPSTREAMS))]
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # progress is not the result: stdout keeps the summary
        disable=not progress,
        transient=False,
    )
    with bar:
        task = bar.add_task("exchanges through the proxy", total=total)

        def step() -> None:
            result.exchanges += 1
            bar.advance(task)

        async with _stack(directory, signer) as stack:
            jobs: list[Awaitable[None]] = []
            for (_log_id, mode, url), share in zip(stack, shares, strict=True):
                drive = _drive_openai if mode == "openai" else _drive_ollama
                jobs.append(drive(url, share, step))
            await asyncio.gather(*jobs)
        bar.update(task, description="sealed; verifying")
        result.report = await asyncio.to_thread(
            verify_local,
            result.ledger,
            VerifyOptions(verifiers=[signer.verifier], state_dir=directory / "witness"),
        )
    for log_id in list_logs(result.ledger):
        for seg in list_log(result.ledger, log_id).segments:
            for _, line, complete in iter_lines(seg.path):
                if not complete:
                    continue
                rec = orjson.loads(line)
                result.records += 1
                for side in ("input", "output"):
                    tokens = rec.get(f"{side}_tokens")
                    source = rec.get(f"{side}_token_source")
                    result.tokens_by_source[f"{side} {source}"] += len(tokens or [])
                    result.records_by_source[f"{side} {source}"] += 1
    return result


def render(result: DemoResult, console: Console) -> None:
    """Print the summary table and what to run next."""
    report = result.report
    console.print(
        f"[bold]{result.exchanges}[/bold] exchanges through the proxy (official ollama and"
        f" openai clients), [bold]{result.records}[/bold] records in the ledger"
    )
    table = Table(title="tokens captured, by where they came from (SPEC section 5)")
    table.add_column("side")
    table.add_column("token source")
    table.add_column("records", justify="right")
    table.add_column("tokens", justify="right")
    for key in sorted(result.records_by_source):
        side, source = key.split(" ", 1)
        shown = "none (text + SHA-256 only)" if source == "none" else source
        table.add_row(
            side, shown, str(result.records_by_source[key]), f"{result.tokens_by_source[key]:,}"
        )
    console.print(table)
    if report is not None:
        verdict = "[green]VALID[/green]" if report.ok else "[red]INVALID[/red]"
        console.print(f"verify: {verdict}", report.summary(), markup=True)
    console.print(f"ledger: {result.ledger}", markup=False)
    console.print(f"verifier key: {result.verifier_key}", markup=False)
    pub = result.directory / "keys" / "verifier.pub"
    console.print(
        "Check it yourself:\n"
        f"  tokentrail verify --ledger {result.ledger} --public-key {pub} --all\n"
        f"  tokentrail count --ledger {result.ledger} --date today",
        markup=False,
        soft_wrap=True,
    )
    if report is not None:
        for item in report.findings + report.warnings:
            console.print(item.to_line(), markup=False)


def demo_main(directory: Path | None, exchanges: int, progress: bool) -> bool:
    """The ``demo`` command's body; returns whether the ledger verified."""
    try:
        import ollama  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "the demo drives the official ollama and openai clients: pip install 'tokentrail[demo]'"
        ) from exc
    target = directory or Path(tempfile.mkdtemp(prefix="tokentrail-demo-"))
    console = Console(soft_wrap=True)  # lines are not cut or broken at 80 columns in a file
    result = asyncio.run(run_demo(target, exchanges, progress))
    render(result, console)
    return bool(result.report and result.report.ok and result.records == result.exchanges)
