"""The Ollama native API, as Ollama 0.4.x and ≥ 0.12.11 put it on the wire.

Follows docs/api.md of ollama/ollama and the Go types it is serialised from (``api/types.go``:
``GenerateResponse``, ``ChatResponse``, ``Metrics``, ``Logprob``; ``server/routes.go``):

- ``/api/generate`` streams NDJSON chunks ``{"model","created_at","response","done"}``; the last
  one has ``done: true``, ``done_reason``, ``context`` (the re-tokenised templated prompt plus the
  output, absent in raw mode) and the metrics, durations in nanoseconds. ``stream: false``
  gives the same last object with the whole ``response``.
- ``/api/chat`` streams ``message`` deltas instead and never has ``context``.
- ``logprobs: true`` (≥ 0.12.11 only) adds ``logprobs: [{"token","logprob","bytes",
  "top_logprobs"}]`` to each chunk that carries tokens (``top_logprobs`` only when asked for,
  ``bytes`` as in ``server/logprob.go``); a non-streamed answer carries them all.
- Field order and omission follow the Go structs (``omitempty``), and strings are escaped as
  ``encoding/json`` escapes them (``<`` is ``\\u003c``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tokentrail._sim._config import SimConfig
from tokentrail._sim._engine import TEMPLATE, Generation, Step, embedding, generate, render_chat
from tokentrail._sim._ollama_openai import OllamaOpenAI
from tokentrail._sim._tokenizer import SimTokenizer
from tokentrail._sim._wire import (
    JSON,
    NDJSON,
    BodyError,
    ChunkWriter,
    Pacer,
    dumps,
    fault_of,
    read_json,
    send_body,
)

__all__ = ["OllamaDialect"]

RUNNER_CRASHED = "llama runner process has terminated: exit status 2"


def go_time(ns: int | None = None) -> str:
    """``time.Now().UTC()`` as Go marshals it: RFC 3339 with nanoseconds, zeros trimmed."""
    ns = time.time_ns() if ns is None else ns
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def normalize_name(name: str) -> str:
    """Ollama's short model name with the default tag: ``llama3.2`` is ``llama3.2:latest``."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class OllamaDialect:
    """Request handlers for one Ollama-mode server."""

    def __init__(self, config: SimConfig, tok: SimTokenizer) -> None:
        self.config = config
        self.tok = tok
        self.modern = config.mode == "ollama"
        self._models = {normalize_name(m): m for m in config.models}
        self.compat = OllamaOpenAI(self)  # Ollama's OpenAI-compatible /v1 layer

    # -- helpers ----------------------------------------------------------------------------

    def json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(
            status=status,
            body=dumps(obj, go=True),
            content_type="application/json",
            charset="utf-8",
        )

    def error(self, status: int, message: str) -> web.Response:
        """Ollama's error body: ``{"error": "..."}``."""
        return self.json({"error": message}, status)

    def fault_error(self, path: str) -> web.Response:
        """A crashed runner, as the native API reports it, or its /v1 layer does."""
        if path.startswith("/v1/"):
            return self.compat.error(500, RUNNER_CRASHED)
        return self.error(500, RUNNER_CRASHED)

    def not_found_message(self, model: str) -> str:
        if self.modern:
            return f"model '{model}' not found"
        return f'model "{model}" not found, try pulling it first'

    def not_found(self, model: str) -> web.Response:
        return self.error(404, self.not_found_message(model))

    def known(self, model: str) -> bool:
        return normalize_name(model) in self._models

    def digest(self, model: str) -> str:
        return hashlib.sha256(f"tokentrail-sim:{normalize_name(model)}".encode()).hexdigest()

    def details(self, model: str) -> dict[str, Any]:
        family = "qwen2" if model.startswith("qwen") else "llama"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "494.03M" if family == "qwen2" else "1.24B",
            "quantization_level": "Q4_K_M",
        }

    def modified_at(self) -> str:
        return go_time(self.config.created * 1_000_000_000)

    @staticmethod
    async def read_body(request: web.Request) -> dict[str, Any] | str:
        """The request's JSON object, or the message Go's decoder gives for it."""
        try:
            body = await read_json(request)
        except BodyError as exc:
            return str(exc)
        if not isinstance(body, dict):
            kind = "array" if isinstance(body, list) else type(body).__name__
            return f"json: cannot unmarshal {kind} into Go value"
        return body

    async def body(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await self.read_body(request)
        return self.error(400, body) if isinstance(body, str) else body

    def metrics(self, gen: Generation, pacer: Pacer) -> dict[str, int]:
        total = max(1, time.perf_counter_ns() - pacer.started_ns)
        return {
            "total_duration": total,
            "load_duration": max(1, min(250_000, total // 100)),
            "prompt_eval_count": len(gen.prompt_ids),
            "prompt_eval_duration": pacer.prefill_ns(),
            "eval_count": len(gen.output_ids),
            "eval_duration": pacer.decode_ns(),
        }

    def logprobs(self, steps: tuple[Step, ...], top_n: int) -> list[dict[str, Any]]:
        """Ollama's ``logprobs`` entries for the tokens of *steps* (``server/logprob.go``)."""
        out = []
        for step in steps:
            for choice in step.tokens:
                entry = self._token(choice.token_id, choice.logprob)
                if top_n > 0:
                    entry["top_logprobs"] = [self._token(t, lp) for t, lp in choice.top[:top_n]]
                out.append(entry)
        return out

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tok.token_text(token_id, "ollama")
        raw = self.tok.piece_bytes(token_id)
        if self.config.ollama_partial_utf8_bug:
            raw = text.encode("utf-8")
        entry: dict[str, Any] = {"token": text, "logprob": logprob}
        if raw:
            entry["bytes"] = list(raw)
        return entry

    def options(self, body: Mapping[str, Any]) -> tuple[int | None, object, list[str]]:
        opts = body.get("options") or {}
        if not isinstance(opts, Mapping):
            opts = {}
        num_predict = opts.get("num_predict")
        limit = (
            int(num_predict) if isinstance(num_predict, int | float) and num_predict > 0 else None
        )
        stop = opts.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        return limit, opts.get("seed"), stops

    def check_logprobs(self, body: Mapping[str, Any]) -> tuple[bool, int] | str:
        """Whether logprobs are asked for and how many top ones, or the refusal's message
        (the native API and its /v1 layer read the same names, and word errors their own way)."""
        if not self.modern:
            return False, 0
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            return "top_logprobs must be between 0 and 20"
        return body.get("logprobs") is True, top

    # -- endpoints --------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return self.json({"version": self.config.server_version})

    async def tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": self.modified_at(),
                "size": 807_694_464 + i * 1_000_003,
                "digest": self.digest(name),
                "details": self.details(name),
            }
            for i, name in enumerate(self.config.models)
        ]
        return self.json({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": name,
                "model": name,
                "size": 1_260_000_000,
                "digest": self.digest(name),
                "details": self.details(name),
                "expires_at": go_time(time.time_ns() + 300 * 1_000_000_000),
                "size_vram": 0,
            }
            for name in self.config.models
        ]
        return self.json({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        model = str(body.get("model") or body.get("name") or "")
        if not self.known(model):
            return self.error(404, f"model '{model}' not found")
        details = self.details(model)
        show: dict[str, Any] = {
            "license": "Simulated model for tokentrail tests; no weights.",
            "modelfile": (
                '# Modelfile generated by "ollama show"\n'
                f'FROM {model}\nTEMPLATE """{TEMPLATE}"""\n'
                'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n'
            ),
            "parameters": 'stop                           "<|im_start|>"\n'
            'stop                           "<|im_end|>"',
            "template": TEMPLATE,
            "details": details,
            "model_info": {
                "general.architecture": details["family"],
                "general.parameter_count": 1_235_814_432,
                "general.file_type": 15,
                f"{details['family']}.context_length": 32768,
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.bos_token_id": self.tok.bos_id,
                "tokenizer.ggml.eos_token_id": self.tok.eos_id,
                "tokenizer.ggml.tokens": [],
            },
        }
        if self.modern:
            show["capabilities"] = ["completion"]
        show["modified_at"] = self.modified_at()
        return self.json(show)

    async def embed(self, request: web.Request) -> web.Response:
        started = time.perf_counter_ns()
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        model = str(body.get("model") or "")
        if not self.known(model):
            return self.not_found(model)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [s for s in raw or [] if isinstance(s, str)]
        vectors = [embedding(model, text) for text in inputs]
        count = sum(len(self.tok.encode(text)) for text in inputs)
        return self.json(
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": max(1, time.perf_counter_ns() - started),
                "load_duration": 1,
                "prompt_eval_count": count,
            }
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        pacer = Pacer(self.config.ttft_ms, self.config.token_ms)
        fault = fault_of(request)
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "model is required")
        if not self.known(model):
            return self.not_found(model)
        wants = self.check_logprobs(body)
        if isinstance(wants, str):
            return self.error(400, wants)
        want_logprobs, top_n = wants
        messages = body.get("messages") if chat else None
        if chat and messages is not None and not isinstance(messages, list):
            return self.error(400, "json: cannot unmarshal object into Go struct field messages")
        prompt = body.get("prompt") if not chat else None
        if (chat and not messages) or (not chat and not prompt):
            return self._load(model, body, chat=chat)

        raw = bool(body.get("raw")) and not chat
        if chat:
            prompt_text = render_chat([m for m in messages or [] if isinstance(m, Mapping)])
        elif raw:
            prompt_text = str(prompt)
        else:
            prefix = ""
            context = body.get("context")
            if isinstance(context, list) and context:
                prefix = self.tok.decode(int(i) for i in context)
            system = body.get("system")
            messages_ = [{"role": "system", "content": system}] if system else []
            messages_.append({"role": "user", "content": str(prompt)})
            prompt_text = prefix + render_chat(messages_)
        limit, seed, stops = self.options(body)
        gen = generate(
            self.tok,
            model=model,
            prompt_text=prompt_text,
            seed=seed,
            max_tokens=limit,
            stop=stops,
            top_logprobs=top_n,
            drop_partial=True,  # Ollama never sends an incomplete character
        )

        def chunk(step_text: str, done: bool) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": model, "created_at": go_time()}
            if chat:
                obj["message"] = {"role": "assistant", "content": step_text}
            else:
                obj["response"] = step_text
            if not done:
                obj["done"] = False
            return obj

        def final(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
            obj = chunk(text, done=True)
            metrics = self.metrics(gen, pacer)
            if chat and not self.modern:
                obj["done_reason"] = gen.finish_reason
                obj["done"] = True
            else:
                obj["done"] = True
                obj["done_reason"] = gen.finish_reason
            if not chat and not raw:
                obj["context"] = self.tok.encode(gen.prompt_text + gen.text)
            if chat and logprobs:
                obj["logprobs"] = logprobs
            obj.update(metrics)
            if not chat and logprobs:
                obj["logprobs"] = logprobs
            return obj

        if body.get("stream") is False:
            await pacer.all(len(gen.output_ids))
            logprobs = self.logprobs(gen.steps, top_n) if want_logprobs else None
            return await send_body(
                request, fault, dumps(final(gen.text, logprobs), go=True), content_type=JSON
            )

        writer = ChunkWriter(request, fault, NDJSON)
        for step in gen.steps:
            await pacer.tokens(len(step.tokens))
            obj = chunk(step.text, done=False)
            if want_logprobs:
                obj["logprobs"] = self.logprobs((step,), top_n)
            if not await writer.send(dumps(obj, go=True) + b"\n"):
                return await writer.finish()
        await writer.send(dumps(final("", None), go=True) + b"\n")
        return await writer.finish()

    def _load(self, model: str, body: Mapping[str, Any], *, chat: bool) -> web.Response:
        """The answer to an empty prompt: load (or, with ``keep_alive: 0``, unload) the model."""
        keep_alive = body.get("keep_alive")
        unload = keep_alive in (0, "0", "0s", "0m")
        obj: dict[str, Any] = {"model": model, "created_at": go_time()}
        if chat:
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj["done"] = True
        obj["done_reason"] = "unload" if unload else "load"
        return self.json(obj)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.root),
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.get("/api/ps", self.ps),
            web.post("/api/show", self.show),
            web.post("/api/embed", self.embed),
            web.post("/api/generate", self.generate),
            web.post("/api/chat", self.chat),
            *self.compat.routes(),
        ]
