"""Ollama's OpenAI-compatible API (``/v1/...``), as an Ollama-mode simulator serves it.

Real Ollama answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and
``/v1/embeddings`` by translating to and from its native API (``middleware/openai.go`` and
``openai/openai.go`` of ollama/ollama), so the shapes are Ollama's own, not OpenAI's:

- ids ``chatcmpl-<n>`` / ``cmpl-<n>`` with n below 999, ``system_fingerprint: "fp_ollama"``;
- every chat chunk's delta carries ``role`` and ``content``; the native answer's last line
  becomes a chunk with empty content and the ``finish_reason``; with
  ``stream_options.include_usage`` a last chunk repeats it with ``choices: []`` and the usage
  (legacy completion chunks then carry an all-zero usage on every chunk, as Ollama's do); then
  ``data: [DONE]``;
- usage has only ``prompt_tokens``, ``completion_tokens``, ``total_tokens``;
- errors are ``{"error": {"message", "type", "param": null, "code": null}}`` with the type
  ``invalid_request_error`` (400), ``not_found_error`` (404) or ``api_error``;
- bodies are written by Go's ``json.Encoder``: Go's escaping and a trailing newline.

- chat logprobs (≥ 0.12.11, ``--mode ollama``): ``logprobs: true`` (and ``top_logprobs``) adds
  ``"logprobs": {"content": [...]}`` after ``finish_reason`` to each choice that has tokens,
  with the native API's entries (``ChoiceLogprobs`` in ``openai/openai.go``, ``omitempty``);
  legacy completions pass ``logprobs`` on but answer without them, as Ollama's do.

Not simulated: tools, images and reasoning through this layer (use the native API or an
OpenAI-family mode for those).
"""

from __future__ import annotations

import base64
import random
import struct
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tokentrail._sim._engine import Generation, embedding, generate, render_chat
from tokentrail._sim._wire import ChunkWriter, Pacer, dumps, fault_of, send_body

if TYPE_CHECKING:
    from tokentrail._sim._ollama import OllamaDialect

__all__ = ["OllamaOpenAI"]

FINGERPRINT = "fp_ollama"
#: The types Ollama's middleware sets (no charset, unlike its native gin JSON answers).
JSON = "application/json"
EVENT_STREAM = "text/event-stream"


def _encoded(obj: Any) -> bytes:
    """``json.NewEncoder(w).Encode(obj)``: Go's escaping and a newline."""
    return dumps(obj, go=True) + b"\n"


class OllamaOpenAI:
    """The ``/v1`` routes of an Ollama-mode simulator, over its native dialect."""

    def __init__(self, native: OllamaDialect) -> None:
        self.native = native

    def error(self, status: int, message: str) -> web.Response:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return web.Response(status=status, body=_encoded(body), content_type=JSON)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await self.native.read_body(request)
        return self.error(400, body) if isinstance(body, str) else body

    def _model(self, body: Mapping[str, Any]) -> str | web.Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "model is required")
        if not self.native.known(model):
            return self.error(404, self.native.not_found_message(model))
        return model

    def _generate(
        self, body: Mapping[str, Any], model: str, prompt_text: str, top_logprobs: int = 0
    ) -> Generation:
        """The answer to ``prompt_text`` under the request's ``max_tokens``, ``seed``, ``stop``."""
        limit = body.get("max_tokens")
        stop = body.get("stop") or []
        counted = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
        return generate(
            self.native.tok,
            model=model,
            prompt_text=prompt_text,
            seed=body.get("seed"),
            max_tokens=limit if counted else None,
            stop=[stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)],
            top_logprobs=top_logprobs,
            drop_partial=True,  # Ollama never sends an incomplete character
        )

    @staticmethod
    def _usage(gen: Generation) -> dict[str, int]:
        prompt, completion = len(gen.prompt_ids), len(gen.output_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # -- chat -------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        pacer = Pacer(self.native.config.ttft_ms, self.native.config.token_ms)
        fault = fault_of(request)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.error(400, "[] is too short - 'messages'")
        model = self._model(body)
        if isinstance(model, web.Response):
            return model
        wants = self.native.check_logprobs(body)
        if isinstance(wants, str):
            return self.error(400, wants)
        want_logprobs, top_n = wants
        gen = self._generate(
            body, model, render_chat([m for m in messages if isinstance(m, Mapping)]), top_n
        )

        def with_logprobs(choice: dict[str, Any], steps: tuple[Any, ...]) -> dict[str, Any]:
            entries = self.native.logprobs(steps, top_n) if want_logprobs else []
            if entries:
                choice["logprobs"] = {"content": entries}
            return choice

        ident = f"chatcmpl-{random.randrange(999)}"
        created = int(time.time())
        if body.get("stream") is not True:
            await pacer.all(len(gen.output_ids))
            whole = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    with_logprobs(
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": gen.text},
                            "finish_reason": gen.finish_reason,
                        },
                        gen.steps,
                    )
                ],
                "usage": self._usage(gen),
            }
            return await send_body(request, fault, _encoded(whole), content_type=JSON)

        def chunk(content: str, finish: str | None, steps: tuple[Any, ...] = ()) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    with_logprobs(
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": content},
                            "finish_reason": finish,
                        },
                        steps,
                    )
                ],
            }

        writer = ChunkWriter(request, fault, EVENT_STREAM)
        for step in gen.steps:
            await pacer.tokens(len(step.tokens))
            if not await writer.send(_event(chunk(step.text, None, (step,)))):
                return await writer.finish()
        last = chunk("", gen.finish_reason)
        await writer.send(_event(last))
        if _include_usage(body):
            await writer.send(_event({**last, "choices": [], "usage": self._usage(gen)}))
        await writer.send(b"data: [DONE]\n\n")
        return await writer.finish()

    # -- legacy completions -----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        pacer = Pacer(self.native.config.ttft_ms, self.native.config.token_ms)
        fault = fault_of(request)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            kind = "array" if isinstance(prompt, list) else type(prompt).__name__
            return self.error(
                400,
                f"json: cannot unmarshal {kind} into Go struct field"
                " CompletionRequest.prompt of type string",
            )
        model = self._model(body)
        if isinstance(model, web.Response):
            return model
        gen = self._generate(body, model, render_chat([{"role": "user", "content": prompt or ""}]))
        ident = f"cmpl-{random.randrange(999)}"
        created = int(time.time())

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "finish_reason": finish}

        if body.get("stream") is not True:
            await pacer.all(len(gen.output_ids))
            whole = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [choice(gen.text, gen.finish_reason)],
                "usage": self._usage(gen),
            }
            return await send_body(request, fault, _encoded(whole), content_type=JSON)

        usage = _include_usage(body)

        def chunk(choices: list[dict[str, Any]], counts: dict[str, int] | None) -> bytes:
            obj: dict[str, Any] = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "choices": choices,
                "model": model,
                "system_fingerprint": FINGERPRINT,
            }
            if counts is not None:
                obj["usage"] = counts
            return _event(obj)

        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0} if usage else None
        writer = ChunkWriter(request, fault, EVENT_STREAM)
        for step in gen.steps:
            await pacer.tokens(len(step.tokens))
            if not await writer.send(chunk([choice(step.text, None)], zero)):
                return await writer.finish()
        await writer.send(chunk([choice("", gen.finish_reason)], zero))
        if usage:
            await writer.send(chunk([], self._usage(gen)))
        await writer.send(b"data: [DONE]\n\n")
        return await writer.finish()

    # -- models and embeddings --------------------------------------------------------------

    def _model_entry(self, name: str) -> dict[str, Any]:
        namespace = name.split("/")[-2] if "/" in name else "library"
        return {
            "id": name,
            "object": "model",
            "created": self.native.config.created,
            "owned_by": namespace,
        }

    async def models(self, request: web.Request) -> web.Response:
        data = [self._model_entry(name) for name in self.native.config.models]
        return web.Response(body=_encoded({"object": "list", "data": data}), content_type=JSON)

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if not self.native.known(name):
            return self.error(404, self.native.not_found_message(name))
        return web.Response(body=_encoded(self._model_entry(name)), content_type=JSON)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        fmt = body.get("encoding_format") or ""
        if not isinstance(fmt, str) or fmt.lower() not in ("", "float", "base64"):
            return self.error(
                400,
                f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float',"
                " 'base64'].",
            )
        raw = body.get("input")
        if raw == "":
            raw = [""]
        if raw is None or raw == []:
            return self.error(400, "invalid input")
        model = self._model(body)
        if isinstance(model, web.Response):
            return model
        inputs = [raw] if isinstance(raw, str) else [s for s in raw if isinstance(s, str)]
        count = sum(len(self.native.tok.encode(text)) for text in inputs)
        vectors: list[Any] = [embedding(model, text) for text in inputs]
        if fmt.lower() == "base64":  # float32, little-endian, as floatsToBase64 packs them
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [
            {"object": "embedding", "embedding": vector, "index": i}
            for i, vector in enumerate(vectors)
        ]
        out = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }
        return web.Response(body=_encoded(out), content_type=JSON)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model:.+}", self.model),
            web.post("/v1/embeddings", self.embeddings),
        ]


def _event(obj: Any) -> bytes:
    return b"data: " + dumps(obj, go=True) + b"\n\n"


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True
