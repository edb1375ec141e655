"""The in-process SDK: audited ``ollama`` / ``openai`` clients and a plain recording API.

::

    recorder = Recorder.open("ledger", key="signing.key")         # one per process (one log)
    client = audit(ollama.Client(), ledger=recorder, user_id="u1", session_id="s1")
    client.chat(model="llama3.2", messages=[...])                  # one record per call
    recorder.record(model="my-model", input_text="...", output_text="...")
    with recorder.exchange(model="my-model", input_text=prompt) as ex:
        ex.output_text = my_provider(prompt)                       # timed, errors recorded
    session_turns("ledger", "s1")                                  # what the model saw, in order

Records come from the same capture code as the proxy's (``tokentrail._capture``), so a record of
the same exchange differs from the proxy's only in provenance fields (``tokentrail.via: "sdk"``,
``tokentrail.sdk.client``) and in what only the proxy knows (``client.address``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypeVar

from .._errors import ConfigError
from .._ledger import AsyncLedger, Ledger, LedgerWriter
from ._recorder import ExchangeScope, Recorder, check_identity
from ._sessions import Turn, request_messages, session_turns
from ._tokenizers import HFTokenizer, LocalTokenizer, TiktokenBPE, load_tokenizer

C = TypeVar("C")
_CLIENTS = {"ollama": "Client", "openai": "OpenAI"}


def audit(
    client: C,
    *,
    ledger: Recorder | Ledger | AsyncLedger | LedgerWriter,
    user_id: str | None = None,
    session_id: str | None = None,
) -> C:
    """A drop-in for ``client`` that records every completion call into ``ledger``.

    ``client`` is an ``ollama.Client``, ``ollama.AsyncClient``, ``openai.OpenAI`` or
    ``openai.AsyncOpenAI``. ``generate`` / ``chat`` and ``chat.completions.create`` /
    ``completions.create``, streamed or not, leave one record each, with ``user_id`` and
    ``session_id`` as given here (the SDK trusts its own caller); everything else is the
    client's own. The result has the client's type and methods: use it where the client was.
    """
    user_id = check_identity("user_id", user_id)
    session_id = check_identity("session_id", session_id)
    recorder = Recorder.of(ledger)
    module = type(client).__module__.split(".", 1)[0]
    if module == "ollama" or _is_instance(client, "ollama", ("Client", "AsyncClient")):
        from ._wrap_ollama import audit_ollama

        audited: Any = audit_ollama(client, recorder, user_id=user_id, session_id=session_id)
        return audited  # type: ignore[no-any-return]
    if module == "openai" or _is_instance(client, "openai", ("OpenAI", "AsyncOpenAI")):
        from ._wrap_openai import audit_openai

        audited = audit_openai(client, recorder, user_id=user_id, session_id=session_id)
        return audited  # type: ignore[no-any-return]
    if isinstance(client, ModuleType) and client.__name__ in _CLIENTS:
        # audit(ollama): the module's functions (ollama.chat) call a client of its own
        raise ConfigError(
            f"cannot audit the module {client.__name__}: audit a client and call its methods"
            f" (tokentrail.audit({client.__name__}.{_CLIENTS[client.__name__]}(), ledger=...));"
            " the module's own functions are not recorded"
        )
    raise ConfigError(
        f"cannot audit a {type(client).__module__}.{type(client).__qualname__}: expected an"
        " ollama.Client, ollama.AsyncClient, openai.OpenAI or openai.AsyncOpenAI"
    )


def _is_instance(client: object, module: str, names: tuple[str, ...]) -> bool:
    import sys

    mod = sys.modules.get(module)
    return mod is not None and any(
        isinstance(client, getattr(mod, n)) for n in names if hasattr(mod, n)
    )


__all__ = [
    "ExchangeScope",
    "HFTokenizer",
    "LocalTokenizer",
    "Recorder",
    "TiktokenBPE",
    "Turn",
    "audit",
    "load_tokenizer",
    "request_messages",
    "session_turns",
]
