"""``tokentrail sim``: run a simulated model server from the command line."""

from __future__ import annotations

import asyncio
import signal

import click

from tokentrail._errors import ConfigError
from tokentrail._options import FiniteFloatRange
from tokentrail._sim._config import DEFAULT_MODELS, MODES, SimConfig
from tokentrail._sim._server import running_sim

__all__ = ["sim_command"]


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6) into host and port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen wants HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


@click.command(
    "sim",
    epilog="""\b
Examples:
  tokentrail sim --mode ollama --listen 127.0.0.1:11434
  tokentrail sim --mode vllm --listen 127.0.0.1:8000 --ttft-ms 300 --token-ms 20 \\
      --model Qwen/Qwen2.5-0.5B-Instruct
  curl -H 'X-Sim-Fault: cut:3' localhost:11434/api/generate \\
      -d '{"model": "llama3.2:1b", "prompt": "Why is the sky blue?"}'
""",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="ollama",
    show_default=True,
    help="Wire dialect to speak.",
)
@click.option(
    "--listen",
    default="127.0.0.1:11434",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on.",
)
@click.option(
    "--ttft-ms",
    type=FiniteFloatRange(min=0, max=3_600_000),
    default=0.0,
    show_default=True,
    help="Delay before the first token.",
)
@click.option(
    "--token-ms",
    type=FiniteFloatRange(min=0, max=3_600_000),
    default=0.0,
    show_default=True,
    help="Delay per further token.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="Model name to serve (repeatable; default llama3.2:1b and qwen2.5:0.5b).",
)
def sim_command(
    mode: str, listen: str, ttft_ms: float, token_ms: float, models: tuple[str, ...]
) -> None:
    """Run a deterministic simulated LLM server (Ollama, OpenAI, llama.cpp or vLLM dialect).

    Answers are a pure function of model, prompt and seed, token by token from a small
    built-in vocabulary, on the real wire formats, so proxies and clients can be tested
    without model weights. An ollama mode also serves Ollama's OpenAI-compatible /v1 layer,
    as Ollama does. Faults are injected per request with the X-Sim-Fault header:
    500, cut:N (close after N streamed chunks), stall:MS (before the first byte) and
    stall-mid:MS (after the first chunk), comma-separated.
    """
    try:
        host, port = parse_listen(listen)
        config = SimConfig(
            mode=mode,
            ttft_ms=ttft_ms,
            token_ms=token_ms,
            models=models or DEFAULT_MODELS,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc

    async def serve() -> None:
        async with running_sim(config, host, port) as url:
            click.echo(f"tokentrail sim ({mode}) serving {', '.join(config.models)} on {url}")
            click.echo("Press Ctrl+C to stop.")
            await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a server stops on SIGTERM, quietly
    # And on SIGINT, even started where it is ignored (a script's background job): Ctrl+C's
    # signal is how it is told to stop, and asyncio.run only acts on it if it is not ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
