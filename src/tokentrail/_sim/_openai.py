"""The OpenAI-compatible API as three servers speak it: OpenAI, llama.cpp and vLLM.

References followed:

- OpenAI API reference, "Chat Completions" and "Completions (legacy)": ``chat.completion`` and
  ``chat.completion.chunk`` objects, SSE ``data: {...}\\n\\n`` framing closed by
  ``data: [DONE]``, the usage chunk with empty ``choices`` when
  ``stream_options.include_usage`` is true, ``logprobs.content[]`` entries
  (``token``, ``logprob``, ``bytes``, ``top_logprobs``), the legacy ``logprobs`` object
  (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), ``system_fingerprint``;
  the ``openai`` Python package's ``types/chat`` models.
- llama.cpp ``tools/server`` (``server-task.cpp``: ``completion_token_output::to_json``,
  ``to_json_oaicompat_chat_stream``): logprobs entries carry the token ``id``; a first chunk
  with ``{"role": "assistant", "content": null}``; ``timings`` on the last chunk; legacy
  completions use the chat-style ``logprobs.content``; ``/tokenize``, ``/detokenize``,
  ``/health``; the native ``/completion`` with ``return_tokens`` (``tokens``) and
  ``n_probs`` (``completion_probabilities``). llama.cpp serves whatever model it loaded,
  whatever ``model`` a request names.
- vLLM ``entrypoints/openai`` (``serving_chat.py``, ``serving_completion.py``): the
  ``return_token_ids`` extension puts ``prompt_token_ids`` on the first chat chunk (or the
  response) and ``token_ids`` on each choice; for completions both sit in the choice; the
  last token's chunk carries ``finish_reason`` and ``stop_reason``.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiohttp import web

from tokentrail._sim._config import SimConfig
from tokentrail._sim._engine import Generation, Step, generate, render_chat
from tokentrail._sim._tokenizer import SimTokenizer
from tokentrail._sim._wire import (
    SSE,
    BodyError,
    ChunkWriter,
    Fault,
    Pacer,
    dumps,
    fault_of,
    read_json,
    send_body,
)

__all__ = ["OpenAIDialect"]

_ALNUM = string.ascii_letters + string.digits
_OPENAI_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
    "us through our help center at help.openai.com.)"
)


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


async def _interleaved(
    gens: list[Generation], pacer: Pacer
) -> AsyncIterator[tuple[int, int, Generation, Step]]:
    """``(k, choice index, generation, step k)`` in the order servers stream ``n`` choices:
    step k of every choice that has one, then step k + 1; paced once a step."""
    for k in range(max(len(g.steps) for g in gens)):
        await pacer.tokens(max(len(g.steps[k].tokens) for g in gens if k < len(g.steps)))
        for i, gen in enumerate(gens):
            if k < len(gen.steps):
                yield k, i, gen, gen.steps[k]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _ollama_listing(name: str) -> dict[str, Any]:
    """One model of llama.cpp's Ollama-style ``models`` list (``handle_models``): no digest."""
    return {
        "name": name, "model": name, "modified_at": "", "size": "", "digest": "",
        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
        "parameters": "",
        "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                    "parameter_size": "", "quantization_level": ""},
    }  # fmt: skip


class _Request:
    """What one completion request asked for, read once from its body."""

    def __init__(self, body: Mapping[str, Any], *, chat: bool, flavor: str) -> None:
        limit = body.get("max_completion_tokens") if chat else None
        if limit is None:
            limit = body.get("max_tokens")
        self.max_tokens = int(limit) if isinstance(limit, int | float) and limit >= 0 else None
        stop = body.get("stop") or []
        self.stops = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        self.seed = body.get("seed")
        self.stream = body.get("stream") is True
        options = body.get("stream_options") or {}
        options = options if isinstance(options, Mapping) else {}
        self.include_usage = self.stream and options.get("include_usage") is True
        self.obfuscation = options.get("include_obfuscation") is not False
        #: llama.cpp refuses top_logprobs without logprobs (``params_from_json_cmpl``).
        self.top_alone = chat and "top_logprobs" in body and body.get("logprobs") is not True
        if chat:
            self.logprobs = body.get("logprobs") is True
            top = body.get("top_logprobs")
            self.top_n = int(top) if isinstance(top, int) and top > 0 else 0
        else:
            top = body.get("logprobs")  # llama.cpp reads it as n_probs: 0 asks for none
            least = 1 if flavor == "llamacpp" else 0
            self.logprobs = isinstance(top, int) and not isinstance(top, bool) and top >= least
            self.top_n = int(top) if self.logprobs and isinstance(top, int) else 0
        self.return_token_ids = body.get("return_token_ids") is True
        n = body.get("n")
        #: Choices asked for; ``None`` when ``n`` is not a positive integer (a 400).
        self.n: int | None = 1 if n is None else n if _positive_int(n) else None


class OpenAIDialect:
    """Request handlers for one OpenAI-family server (``openai``, ``llamacpp`` or ``vllm``)."""

    def __init__(self, config: SimConfig, tok: SimTokenizer) -> None:
        self.config = config
        self.tok = tok
        self.flavor = config.mode
        self.fingerprint = config.server_version

    # -- errors -----------------------------------------------------------------------------

    def json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=dumps(obj), content_type="application/json", charset="utf-8"
        )

    def error(
        self, status: int, message: str, *, kind: str = "", param: str | None = None,
        code: str | None = None,
    ) -> web.Response:  # fmt: skip
        """The flavor's error body for *status*."""
        if self.flavor == "llamacpp":
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(
                status, "server_error"
            )
            return self.json({"error": {"code": status, "message": message, "type": kind}}, status)
        if self.flavor == "vllm":
            kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
            err = {"message": message, "type": kind, "param": param, "code": status}
            return self.json({"error": err}, status)
        kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        err = {"message": message, "type": kind, "param": param, "code": code}
        return self.json({"error": err}, status)

    def fault_error(self, path: str) -> web.Response:
        """The flavor's answer to ``X-Sim-Fault: 500`` (the same on every ``path``)."""
        if self.flavor == "openai":
            message = "The server had an error while processing your request. Sorry about that!"
        else:
            message = "simulated engine failure (X-Sim-Fault: 500)"
        return self.error(500, message)

    def not_found_route(self, request: web.Request) -> web.Response:
        if self.flavor == "vllm":
            return self.json({"detail": "Not Found"}, 404)
        if self.flavor == "llamacpp":
            return self.error(404, "File Not Found")
        return self.error(404, f"Invalid URL ({request.method} {request.path})")

    async def body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await read_json(request)
        except BodyError as exc:
            message = _OPENAI_BAD_JSON if self.flavor == "openai" else f"JSON decode error: {exc}"
            return self.error(400, message)
        if not isinstance(body, dict):
            return self.error(400, "the request body must be a JSON object")
        return body

    @property
    def sse_type(self) -> str:
        """The stream's Content-Type: llama.cpp's cpp-httplib names no charset."""
        return "text/event-stream" if self.flavor == "llamacpp" else SSE

    def id_suffix(self) -> str:
        """A response id's random part: OpenAI's 29 and llama.cpp's 32 alphanumerics
        (``random_string``), vLLM's 32 hex digits (a uuid4's)."""
        if self.flavor == "vllm":
            return secrets.token_hex(16)
        return _rand(29 if self.flavor == "openai" else 32)

    def model_of(self, body: Mapping[str, Any]) -> str | web.Response:
        model = body.get("model")
        if self.flavor == "llamacpp":
            return model if isinstance(model, str) and model else self.config.models[0]
        if not isinstance(model, str) or not model:
            return self.error(
                400, "you must provide a model parameter", param="model",
                code="missing_required_parameter",
            )  # fmt: skip
        if model not in self.config.models:
            if self.flavor == "vllm":
                return self.error(404, f"The model `{model}` does not exist.", param="model")
            return self.error(
                404, f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )  # fmt: skip
        return model

    # -- shared pieces ----------------------------------------------------------------------

    def usage(
        self, gen: Generation | Sequence[Generation], *, final_chunk: bool = False
    ) -> dict[str, Any]:
        """Token counts: the prompt once, the completion tokens of every choice."""
        gens = [gen] if isinstance(gen, Generation) else list(gen)
        prompt = len(gens[0].prompt_ids)
        completion = sum(len(g.output_ids) for g in gens)
        total = prompt + completion
        if self.flavor == "llamacpp":
            return {
                "completion_tokens": completion,
                "prompt_tokens": prompt,
                "total_tokens": total,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
        if self.flavor == "vllm":
            usage: dict[str, Any] = {
                "prompt_tokens": prompt,
                "total_tokens": total,
                "completion_tokens": completion,
            }
            if not final_chunk:
                usage["prompt_tokens_details"] = None
            return usage
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def timings(self, gen: Generation, pacer: Pacer) -> dict[str, Any]:
        prompt_ms = pacer.prefill_ns() / 1e6
        predicted_ms = pacer.decode_ns() / 1e6
        n_prompt, n_out = len(gen.prompt_ids), len(gen.output_ids)
        return {
            "cache_n": 0,
            "prompt_n": n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(1, n_prompt),
            "prompt_per_second": 1e3 * n_prompt / max(prompt_ms, 1e-6),
            "predicted_n": n_out,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(1, n_out),
            "predicted_per_second": 1e3 * n_out / max(predicted_ms, 1e-6),
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        style = {"openai": "openai", "vllm": "vllm", "llamacpp": "llamacpp"}[self.flavor]
        text = self.tok.token_text(token_id, style)
        raw = list(self.tok.piece_bytes(token_id))
        if self.flavor == "llamacpp":
            return {"id": token_id, "token": text, "bytes": raw, "logprob": logprob}
        return {"token": text, "logprob": logprob, "bytes": raw}

    def logprob_content(self, steps: Sequence[Step], top_n: int) -> list[dict[str, Any]]:
        """``logprobs.content`` entries for every token of *steps*.

        llama.cpp's server gives none to a token that leaves the text ending inside a UTF-8
        character (``process_token`` adds a token only once the text is complete): the step's
        last token gets the entry, with the text and bytes of the whole step.
        """
        out = []
        for step in steps:
            tokens = step.tokens[-1:] if self.flavor == "llamacpp" else step.tokens
            for choice in tokens:
                entry = self._entry(choice.token_id, choice.logprob)
                if len(step.tokens) > 1 and self.flavor == "llamacpp":
                    data = self.tok.decode_bytes(c.token_id for c in step.tokens)
                    entry["token"] = data.decode("utf-8", errors="replace")
                    entry["bytes"] = list(data)
                entry["top_logprobs"] = [self._entry(t, lp) for t, lp in choice.top[:top_n]]
                out.append(entry)
        return out

    def chat_logprobs(self, steps: Sequence[Step], top_n: int) -> dict[str, Any]:
        content = self.logprob_content(steps, top_n)
        if self.flavor == "openai":
            return {"content": content, "refusal": None}
        return {"content": content}

    def legacy_logprobs(self, steps: Sequence[Step], top_n: int, offset: int) -> dict[str, Any]:
        """The legacy completions ``logprobs`` object (llama.cpp: the chat-style one)."""
        if self.flavor == "llamacpp":
            return {"content": self.logprob_content(steps, top_n)}
        style = "openai-legacy" if self.flavor == "openai" else "vllm"
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        text_offset: list[int] = []
        width = top_n + 1 if self.flavor == "vllm" else top_n
        for step in steps:
            for choice in step.tokens:
                text = self.tok.token_text(choice.token_id, style)
                tokens.append(text)
                token_logprobs.append(choice.logprob)
                top_logprobs.append(
                    {self.tok.token_text(t, style): lp for t, lp in choice.top[:width]}
                )
                text_offset.append(offset)
                offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    # -- endpoints --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = []
        for name in self.config.models:
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": self.config.created,
                "owned_by": {"openai": "system", "vllm": "vllm", "llamacpp": "llamacpp"}[
                    self.flavor
                ],
            }
            if self.flavor == "vllm":
                entry.update({"root": name, "parent": None, "max_model_len": 32768})
            if self.flavor == "llamacpp":
                entry["meta"] = {
                    "vocab_type": 2,
                    "n_vocab": self.tok.vocab_size,
                    "n_ctx_train": 32768,
                    "n_embd": 2048,
                    "n_params": 1235814400,
                    "size": 1321082880,
                }
            data.append(entry)
        if self.flavor == "llamacpp":  # handle_models, also its /api/tags: Ollama's list first
            models = [_ollama_listing(name) for name in self.config.models]
            return self.json({"models": models, "object": "list", "data": data})
        return self.json({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self.flavor == "llamacpp":
            return self.json({"status": "ok"})
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return self.json({"version": self.config.server_version})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        content = body.get("content")
        if not isinstance(content, str):
            return self.error(400, '"content" must be provided')
        ids = self.tok.encode(content)
        if body.get("add_special") is True:
            ids.insert(0, self.tok.bos_id)
        if body.get("with_pieces") is True:
            return self.json({"tokens": [{"id": i, "piece": self.tok.piece(i)} for i in ids]})
        return self.json({"tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        tokens = body.get("tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return self.error(400, '"tokens" must be a list of token ids')
        if any(not 0 <= t < self.tok.vocab_size for t in tokens):
            return self.error(400, "token id out of range")
        return self.json({"content": self.tok.decode(tokens)})

    def check_n(self, req: _Request) -> web.Response | None:
        """The flavor's refusal of ``n`` (llama.cpp serves one choice) or of ``top_logprobs``."""
        if req.n is None:
            return self.error(400, "Invalid value for 'n': expected an integer of at least 1.",
                              param="n", code="invalid_value")  # fmt: skip
        if req.n != 1 and self.flavor == "llamacpp":
            return self.error(400, "Only one completion choice is allowed")
        if req.top_alone and self.flavor == "llamacpp":
            return self.error(400, "top_logprobs requires logprobs to be set to true")
        return None

    def more_choices(self, req: _Request, gen: Generation, **kwargs: Any) -> list[Generation]:
        """``gen`` and the other ``n - 1`` choices, each from a seed of its own."""
        n = req.n or 1
        return [gen] + [generate(self.tok, seed=(req.seed, i), **kwargs) for i in range(1, n)]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        pacer = Pacer(self.config.ttft_ms, self.config.token_ms)
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        model = self.model_of(body)
        if isinstance(model, web.Response):
            return model
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.error(
                400, "Missing required parameter: 'messages'.", param="messages",
                code="missing_required_parameter",
            )  # fmt: skip
        req = _Request(body, chat=True, flavor=self.flavor)
        refused = self.check_n(req)
        if refused is not None:
            return refused
        spec: dict[str, Any] = {
            "model": model,
            "prompt_text": render_chat([m for m in messages if isinstance(m, Mapping)]),
            "max_tokens": req.max_tokens,
            "stop": req.stops,
            "top_logprobs": req.top_n,
        }
        gens = self.more_choices(req, generate(self.tok, seed=req.seed, **spec), **spec)
        ident = "chatcmpl-" + self.id_suffix()
        created = int(time.time())
        fault = fault_of(request)
        if req.stream:
            return await self._chat_stream(request, fault, req, gens, model, ident, created, pacer)
        await pacer.all(max(len(g.output_ids) for g in gens))
        return await send_body(
            request, fault, dumps(self._chat_whole(req, gens, model, ident, created, pacer))
        )

    def _chat_whole(
        self, req: _Request, gens: list[Generation], model: str, ident: str, created: int,
        pacer: Pacer,
    ) -> dict[str, Any]:  # fmt: skip
        gen = gens[0]
        logprobs = self.chat_logprobs(gen.steps, req.top_n) if req.logprobs else None
        if self.flavor == "llamacpp":
            choice: dict[str, Any] = {
                "finish_reason": gen.finish_reason,
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
            }
            if logprobs:
                choice["logprobs"] = logprobs
            return {
                "choices": [choice],
                "created": created,
                "model": model,
                "system_fingerprint": self.fingerprint,
                "object": "chat.completion",
                "usage": self.usage(gen),
                "id": ident,
                "timings": self.timings(gen, pacer),
            }
        if self.flavor == "vllm":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": gen.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            }
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {**message, "content": g.text},
                        "logprobs": (
                            self.chat_logprobs(g.steps, req.top_n) if req.logprobs else None
                        ),
                        "finish_reason": g.finish_reason,
                        "stop_reason": g.stop_sequence,
                        "token_ids": list(g.output_ids) if req.return_token_ids else None,
                    }
                    for i, g in enumerate(gens)
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": self.usage(gens),
                "prompt_logprobs": None,
                "prompt_token_ids": list(gen.prompt_ids) if req.return_token_ids else None,
                "kv_transfer_params": None,
            }
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": g.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": self.chat_logprobs(g.steps, req.top_n) if req.logprobs else None,
                    "finish_reason": g.finish_reason,
                }
                for i, g in enumerate(gens)
            ],
            "usage": self.usage(gens),
            "service_tier": "default",
            "system_fingerprint": self.fingerprint,
        }

    def _chunk(
        self, req: _Request, model: str, ident: str, created: int, choices: list[dict[str, Any]],
        **extra: Any,
    ) -> bytes:  # fmt: skip
        """One ``chat.completion.chunk`` SSE event."""
        if self.flavor == "llamacpp":
            obj: dict[str, Any] = {
                "choices": choices,
                "created": created,
                "id": ident,
                "model": model,
                "system_fingerprint": self.fingerprint,
                "object": "chat.completion.chunk",
            }
        else:
            obj = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            if self.flavor == "openai":
                obj["service_tier"] = "default"
                obj["system_fingerprint"] = self.fingerprint
            obj["choices"] = choices
            if self.flavor == "openai" and req.include_usage:
                obj["usage"] = None
        obj.update(extra)
        if self.flavor == "openai" and req.obfuscation:
            obj["obfuscation"] = _rand(1 + secrets.randbelow(12))
        return b"data: " + dumps(obj) + b"\n\n"

    def _choice(self, delta: dict[str, Any], index: int = 0, **fields: Any) -> dict[str, Any]:
        if self.flavor == "llamacpp":
            choice = {
                "finish_reason": fields.pop("finish_reason", None),
                "index": 0,
                "delta": delta,
            }
            logprobs = fields.pop("logprobs", None)
            if logprobs:
                choice["logprobs"] = logprobs
            return choice
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": fields.pop("logprobs", None),
            "finish_reason": fields.pop("finish_reason", None),
        }
        if self.flavor == "vllm":
            choice.update(fields)
        return choice

    async def _chat_stream(
        self, request: web.Request, fault: Fault, req: _Request, gens: list[Generation],
        model: str, ident: str, created: int, pacer: Pacer,
    ) -> web.StreamResponse:  # fmt: skip
        """The chunks of every choice, interleaved step by step as the servers send them."""
        writer = ChunkWriter(request, fault, self.sse_type)
        await writer.start()
        vllm = self.flavor == "vllm"
        ids_or_none = (lambda ids: list(ids)) if req.return_token_ids else (lambda ids: None)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return self._chunk(req, model, ident, created, choices, **extra)

        firsts: list[bytes] = []
        for i, gen in enumerate(gens):
            if self.flavor == "openai":
                role = {"role": "assistant", "content": "", "refusal": None}
                firsts.append(chunk([self._choice(role, i)]))
            elif vllm:
                prompt_ids = list(gen.prompt_ids) if req.return_token_ids else None
                role = {"role": "assistant", "content": ""}
                firsts.append(chunk([self._choice(role, i)], prompt_token_ids=prompt_ids))
            # llama.cpp sends its role chunk with the first token
        for first in firsts:
            if not await writer.send(first):
                return await writer.finish()

        async for k, i, gen, step in _interleaved(gens, pacer):
            logprobs = self.chat_logprobs((step,), req.top_n) if req.logprobs else None
            events = []
            if self.flavor == "llamacpp" and k == 0:
                events.append(chunk([self._choice({"role": "assistant", "content": None})]))
            fields: dict[str, Any] = {"logprobs": logprobs}
            if vllm:
                last = k == len(gen.steps) - 1
                fields["finish_reason"] = gen.finish_reason if last else None
                if last:
                    fields["stop_reason"] = gen.stop_sequence
                fields["token_ids"] = ids_or_none(c.token_id for c in step.tokens)
            events.append(chunk([self._choice({"content": step.text}, i, **fields)]))
            for event in events:
                if not await writer.send(event):
                    return await writer.finish()

        for i, gen in enumerate(gens):
            if vllm and gen.steps:
                continue  # vLLM's last content chunk carries the finish reason
            extra: dict[str, Any] = {}
            fields = {"finish_reason": gen.finish_reason}
            if vllm:
                fields.update(stop_reason=gen.stop_sequence, token_ids=ids_or_none(()))
            if self.flavor == "llamacpp" and not req.include_usage:
                extra["timings"] = self.timings(gen, pacer)
            if not await writer.send(chunk([self._choice({}, i, **fields)], **extra)):
                return await writer.finish()
        if req.include_usage:
            extra = {"usage": self.usage(gens, final_chunk=True)}
            if self.flavor == "llamacpp":
                extra["timings"] = self.timings(gens[0], pacer)
            usage_chunk = self._usage_chunk(
                req, model, ident, created, "chat.completion.chunk", extra
            )
            if not await writer.send(usage_chunk):
                return await writer.finish()
        await writer.send(b"data: [DONE]\n\n")
        return await writer.finish()

    def _usage_chunk(
        self, req: _Request, model: str, ident: str, created: int, obj_type: str,
        extra: dict[str, Any],
    ) -> bytes:  # fmt: skip
        if self.flavor == "llamacpp":
            obj: dict[str, Any] = {
                "choices": [],
                "created": created,
                "id": ident,
                "model": model,
                "system_fingerprint": self.fingerprint,
                "object": obj_type,
            }
        else:
            obj = {"id": ident, "object": obj_type, "created": created, "model": model}
            if self.flavor == "openai" and obj_type == "chat.completion.chunk":
                obj["service_tier"] = "default"
                obj["system_fingerprint"] = self.fingerprint
            obj["choices"] = []
        obj.update(extra)
        if self.flavor == "openai" and req.obfuscation and obj_type == "chat.completion.chunk":
            obj["obfuscation"] = _rand(1 + secrets.randbelow(12))
        return b"data: " + dumps(obj) + b"\n\n"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        pacer = Pacer(self.config.ttft_ms, self.config.token_ms)
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        model = self.model_of(body)
        if isinstance(model, web.Response):
            return model
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = self.tok.decode(prompt)
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return self.error(
                400, "Missing required parameter: 'prompt'.", param="prompt",
                code="missing_required_parameter",
            )  # fmt: skip
        req = _Request(body, chat=False, flavor=self.flavor)
        refused = self.check_n(req)
        if refused is not None:
            return refused
        limit = 16 if req.max_tokens is None and self.flavor == "openai" else req.max_tokens
        spec: dict[str, Any] = {
            "model": model,
            "prompt_text": prompt,
            "max_tokens": limit,
            "stop": req.stops,
            "top_logprobs": req.top_n + 1 if self.flavor == "vllm" else req.top_n,
        }
        gens = self.more_choices(req, generate(self.tok, seed=req.seed, **spec), **spec)
        # llama.cpp names its completions as it names its chats (gen_chatcmplid)
        ident = ("chatcmpl-" if self.flavor == "llamacpp" else "cmpl-") + self.id_suffix()
        created = int(time.time())
        fault = fault_of(request)
        if req.stream:
            return await self._text_stream(request, fault, req, gens, model, ident, created, pacer)
        await pacer.all(max(len(g.output_ids) for g in gens))
        choices: list[dict[str, Any]] = []
        for i, gen in enumerate(gens):
            logprobs = self.legacy_logprobs(gen.steps, req.top_n, 0) if req.logprobs else None
            choice: dict[str, Any] = {
                "text": gen.text,
                "index": i,
                "logprobs": logprobs,
                "finish_reason": gen.finish_reason,
            }
            if self.flavor == "vllm":
                choice = {
                    "index": i,
                    "text": gen.text,
                    "logprobs": logprobs,
                    "finish_reason": gen.finish_reason,
                    "stop_reason": gen.stop_sequence,
                    "prompt_logprobs": None,
                    "prompt_token_ids": list(gen.prompt_ids) if req.return_token_ids else None,
                    "token_ids": list(gen.output_ids) if req.return_token_ids else None,
                }
            choices.append(choice)
        obj = self._text_object(model, ident, created, choices)
        obj["usage"] = self.usage(gens)
        if self.flavor == "llamacpp":
            obj["timings"] = self.timings(gens[0], pacer)
        return await send_body(request, fault, dumps(obj))

    def _text_object(
        self, model: str, ident: str, created: int, choices: list[dict[str, Any]]
    ) -> dict[str, Any]:
        if self.flavor == "llamacpp":
            return {
                "choices": choices,
                "created": created,
                "model": model,
                "system_fingerprint": self.fingerprint,
                "object": "text_completion",
                "id": ident,
            }
        obj: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if self.flavor == "openai":
            obj["system_fingerprint"] = self.fingerprint
        return obj

    async def _text_stream(
        self, request: web.Request, fault: Fault, req: _Request, gens: list[Generation],
        model: str, ident: str, created: int, pacer: Pacer,
    ) -> web.StreamResponse:  # fmt: skip
        """The chunks of every choice, interleaved step by step as the servers send them."""
        writer = ChunkWriter(request, fault, self.sse_type)
        await writer.start()
        vllm = self.flavor == "vllm"
        offsets = [0] * len(gens)
        async for k, i, gen, step in _interleaved(gens, pacer):
            logprobs = (
                self.legacy_logprobs((step,), req.top_n, offsets[i]) if req.logprobs else None
            )
            offsets[i] += len(step.text)
            choice: dict[str, Any] = {
                "text": step.text,
                "index": i,
                "logprobs": logprobs,
                "finish_reason": None,
            }
            if vllm:
                last = k == len(gen.steps) - 1
                choice = {
                    "index": i,
                    "text": step.text,
                    "logprobs": logprobs,
                    "finish_reason": gen.finish_reason if last else None,
                    "stop_reason": gen.stop_sequence if last else None,
                    "prompt_token_ids": (
                        list(gen.prompt_ids) if req.return_token_ids and k == 0 else None
                    ),
                    "token_ids": (
                        [c.token_id for c in step.tokens] if req.return_token_ids else None
                    ),
                }
            obj = self._text_object(model, ident, created, [choice])
            if vllm:
                obj["usage"] = None
            if not await writer.send(b"data: " + dumps(obj) + b"\n\n"):
                return await writer.finish()
        for i, gen in enumerate(gens):
            if vllm and gen.steps:
                continue  # vLLM's last text chunk carries the finish reason
            choice = {"text": "", "index": i, "logprobs": None, "finish_reason": gen.finish_reason}
            if vllm:
                choice.update(stop_reason=gen.stop_sequence, prompt_token_ids=None, token_ids=None)
            obj = self._text_object(model, ident, created, [choice])
            if self.flavor == "llamacpp":
                obj["usage"] = self.usage(gen)
                obj["timings"] = self.timings(gen, pacer)
            if not await writer.send(b"data: " + dumps(obj) + b"\n\n"):
                return await writer.finish()
        if req.include_usage and self.flavor != "llamacpp":
            extra = {"usage": self.usage(gens, final_chunk=True)}
            usage_chunk = self._usage_chunk(req, model, ident, created, "text_completion", extra)
            if not await writer.send(usage_chunk):
                return await writer.finish()
        await writer.send(b"data: [DONE]\n\n")
        return await writer.finish()

    async def native_completion(self, request: web.Request) -> web.StreamResponse:
        """llama.cpp's own ``/completion`` (``to_json_non_oaicompat``), with ``return_tokens``."""
        pacer = Pacer(self.config.ttft_ms, self.config.token_ms)
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            prompt = self.tok.decode(prompt)
        if not isinstance(prompt, str):
            return self.error(400, '"prompt" must be provided')
        model = self.model_of(body)
        assert isinstance(model, str)  # llama.cpp serves any model name
        n_predict = body.get("n_predict", -1)
        limit = n_predict if isinstance(n_predict, int) and n_predict >= 0 else None
        n_probs = body.get("n_probs", 0)
        n_probs = n_probs if isinstance(n_probs, int) and n_probs > 0 else 0
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [x for x in stop if isinstance(x, str)]
        return_tokens = body.get("return_tokens") is True
        gen = generate(
            self.tok,
            model=model,
            prompt_text=prompt,
            seed=body.get("seed"),
            max_tokens=limit,
            stop=stops,
            top_logprobs=n_probs,
        )
        n_prompt = len(gen.prompt_ids)
        fault = fault_of(request)

        def final(stream: bool) -> dict[str, Any]:
            stop_type = "limit" if gen.finish_reason == "length" else "eos"
            if gen.stop_sequence is not None:
                stop_type = "word"
            obj: dict[str, Any] = {
                "index": 0,
                "content": "" if stream else gen.text,
                "tokens": list(gen.output_ids) if return_tokens and not stream else [],
                "id_slot": 0,
                "stop": True,
                "model": model,
                "tokens_predicted": len(gen.output_ids),
                "tokens_evaluated": n_prompt,
                "generation_settings": {"n_predict": n_predict, "seed": body.get("seed")},
                "prompt": prompt,
                "has_new_line": "\n" in gen.text,
                "truncated": False,
                "stop_type": stop_type,
                "stopping_word": gen.stop_sequence or "",
                "tokens_cached": n_prompt + len(gen.output_ids),
                "timings": self.timings(gen, pacer),
            }
            if n_probs and not stream:
                obj["completion_probabilities"] = self.logprob_content(gen.steps, n_probs)
            return obj

        if body.get("stream") is not True:
            await pacer.all(len(gen.output_ids))
            return await send_body(request, fault, dumps(final(stream=False)))
        writer = ChunkWriter(request, fault, self.sse_type)
        await writer.start()
        predicted = 0
        for step in gen.steps:
            await pacer.tokens(len(step.tokens))
            predicted += len(step.tokens)
            obj: dict[str, Any] = {
                "index": 0,
                "content": step.text,
                # llama.cpp (4227c9b) sends the id of the token that completed the text, asked
                # or not: a token that ended inside a UTF-8 character has no event of its own.
                "tokens": [step.tokens[-1].token_id],
                "stop": False,
                "id_slot": 0,
                "tokens_predicted": predicted,
                "tokens_evaluated": n_prompt,
            }
            if n_probs:
                obj["completion_probabilities"] = self.logprob_content((step,), n_probs)
            if not await writer.send(b"data: " + dumps(obj) + b"\n\n"):
                return await writer.finish()
        await writer.send(b"data: " + dumps(final(stream=True)) + b"\n\n")
        return await writer.finish()

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
        ]
        if self.flavor == "llamacpp":
            routes += [
                web.get("/health", self.health),
                web.get("/models", self.models),
                web.post("/tokenize", self.tokenize),
                web.post("/detokenize", self.detokenize),
                web.post("/chat/completions", self.chat),
                web.post("/api/chat", self.chat),  # "ollama specific endpoint", OpenAI answers
                web.get("/api/tags", self.models),
                web.post("/completion", self.native_completion),
                web.post("/completions", self.native_completion),
            ]
        if self.flavor == "vllm":
            routes += [web.get("/health", self.health), web.get("/version", self.version)]
        return routes
