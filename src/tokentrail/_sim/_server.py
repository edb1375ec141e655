"""The simulated server: one aiohttp application per :class:`SimConfig`, and ways to run it.

``make_app`` builds the application; ``running_sim`` runs it on a free port inside the current
event loop (for async tests); ``sim_in_thread`` runs it in a background thread with its own loop
(for synchronous clients, which would otherwise block the loop serving them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aiohttp import web

from tokentrail._sim._config import SimConfig
from tokentrail._sim._ollama import OllamaDialect
from tokentrail._sim._openai import OpenAIDialect
from tokentrail._sim._tokenizer import SimTokenizer
from tokentrail._sim._wire import FAULT_HEADER, Fault, FaultSyntaxError

__all__ = ["make_app", "running_sim", "sim_in_thread"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The largest request body the simulator reads (1 GiB).
MAX_BODY_BYTES = 1 << 30
CONFIG_KEY = web.AppKey("sim_config", SimConfig)
TOKENIZER_KEY = web.AppKey("sim_tokenizer", SimTokenizer)


def make_app(config: SimConfig | None = None) -> web.Application:
    """The aiohttp application of a simulated server speaking ``config.mode``'s dialect."""
    config = config or SimConfig()
    tok = SimTokenizer()
    dialect: OllamaDialect | OpenAIDialect
    dialect = OllamaDialect(config, tok) if config.is_ollama else OpenAIDialect(config, tok)

    @web.middleware
    async def faults(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            fault = Fault.parse(request.headers.get(FAULT_HEADER))
        except FaultSyntaxError as exc:
            return web.Response(status=400, text=str(exc))
        if fault.stall_ms > 0:
            await asyncio.sleep(fault.stall_ms / 1000)
        if fault.error_500:
            return dialect.fault_error(request.path)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            if isinstance(dialect, OpenAIDialect):
                return dialect.not_found_route(request)
            return web.Response(status=404, text="404 page not found")
        except web.HTTPMethodNotAllowed:
            if isinstance(dialect, OpenAIDialect):
                return dialect.error(405, "Method Not Allowed")
            return web.Response(status=404, text="404 page not found")

    # Ollama and vLLM put no small cap on a request body (base64 images run to megabytes);
    # aiohttp's default would refuse anything over 1 MiB.
    app = web.Application(middlewares=[faults], client_max_size=MAX_BODY_BYTES)
    if config.mode == "llamacpp":  # cpp-httplib's default headers, as llama-server sets them
        app.on_response_prepare.append(_llamacpp_server_header)
    app[CONFIG_KEY] = config
    app[TOKENIZER_KEY] = tok
    app.add_routes(dialect.routes())
    return app


async def _llamacpp_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "llama.cpp"


def _base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@contextlib.asynccontextmanager
async def running_sim(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Run a simulated server in this event loop; yields its base URL (``http://host:port``)."""
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield _base_url(host, int(bound))
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def sim_in_thread(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Run a simulated server in a background thread; yields its base URL.

    For synchronous clients (``ollama.Client``, ``openai.OpenAI``), whose blocking calls
    would stall a server sharing their thread's event loop.
    """
    ready = threading.Event()
    url: list[str] = []
    errors: list[BaseException] = []
    stop: list[asyncio.Event] = []
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        stop.append(asyncio.Event())
        try:
            async with running_sim(config, host, port) as base:
                url.append(base)
                ready.set()
                await stop[0].wait()
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait()
    try:
        if errors:
            raise errors[0]
        yield url[0]
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=10)
        loop.close()
