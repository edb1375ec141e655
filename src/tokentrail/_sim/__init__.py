"""A deterministic simulated LLM server that speaks the real wire formats.

``tokentrail sim`` stands in for Ollama (0.4.x and ≥ 0.12.11), the OpenAI API, llama.cpp's
``llama-server`` and vLLM, so that the proxy, the SDK wrappers and real client programs (the
official ``ollama`` and ``openai`` packages) can be tested without model weights. Each mode
follows its server's published API reference and source (cited in ``_ollama.py`` and
``_openai.py``); answers are a pure function of (model, prompt, seed), tokenised by a small
byte-level vocabulary (``_tokenizer.py``) so that token ids, pieces, ``context``, logprobs and
``token_ids`` all agree with the text.

Faults for proxy tests are asked for per request with the ``X-Sim-Fault`` header
(``500``, ``cut:N``, ``stall:MS``, ``stall-mid:MS``, comma-separated; see ``_wire.py``).

    async with running_sim(SimConfig(mode="vllm")) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x")
"""

from __future__ import annotations

from tokentrail._sim._cli import sim_command
from tokentrail._sim._config import DEFAULT_MODELS, MODES, SimConfig
from tokentrail._sim._engine import Generation, generate, render_chat, render_prompt
from tokentrail._sim._server import make_app, running_sim, sim_in_thread
from tokentrail._sim._tokenizer import SimTokenizer
from tokentrail._sim._wire import FAULT_HEADER

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_HEADER",
    "MODES",
    "Generation",
    "SimConfig",
    "SimTokenizer",
    "generate",
    "make_app",
    "render_chat",
    "render_prompt",
    "running_sim",
    "sim_command",
    "sim_in_thread",
]
