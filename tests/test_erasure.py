"""Crypto-shredding (SPEC section 7): sealed content, keyed hashes, and ``forget``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import Seen
from test_proxy import _env, start_proxy
from tokentrail._erasure import FileKeyStore, Sealer, forget, key_id, open_record
from tokentrail._errors import StoreError, VerificationError
from tokentrail._layout import iter_lines, list_log, list_logs
from tokentrail._record import Exchange, encode_line
from tokentrail._sim import SimConfig, sim_in_thread


def records_of(ledger: Path) -> list[dict[str, object]]:
    out = []
    for log_id in list_logs(ledger):
        for seg in list_log(ledger, log_id).segments:
            out += [orjson.loads(line) for _, line, ok in iter_lines(seg.path) if ok]
    return out


def forget_cli(user: str, keystore: Path, ledger: Path) -> subprocess.CompletedProcess[str]:
    """``tokentrail forget`` as an operator runs it, beside a running proxy (a process of its
    own); asserts it succeeded."""
    result = subprocess.run(
        [sys.executable, "-m", "tokentrail", "forget", "--user", user, "--keystore",
         str(keystore), "--ledger", str(ledger), "--yes"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert 0 == result.returncode, result.stderr
    return result


def every_byte_under(*roots: Path) -> bytes:
    return b"\n".join(p.read_bytes() for r in roots for p in sorted(r.rglob("*")) if p.is_file())


class TestSealer:
    def exchange(self) -> Exchange:
        return Exchange(
            model="m",
            api="ollama.chat",
            stop_reason="stop",
            input_tokens=[1, 2, 3],
            output_tokens=["ok", [255]],
            input_text="my secret question",
            output_text="the answer",
            user_id="alice",
            extra={"request_body": {"messages": [{"role": "user", "content": "my secret"}]}},
        )

    def test_round_trip(self, tmp_path: Path) -> None:
        """Sealed content opens back to exactly what was sealed, hashes checked."""
        keys = FileKeyStore(tmp_path / "keys")
        sealed = Sealer(keys)(self.exchange())
        record = orjson.loads(encode_line("l", 0, "0" * 64, sealed.fields()))
        assert (None, None, True) == (
            record["input_text"],
            record["input_tokens"],
            record["content_sealed"],
        )
        assert b"secret" not in orjson.dumps(record)
        opened = open_record(record, keys)
        assert opened.content is not None
        assert "my secret question" == opened.content["input_text"]
        assert [1, 2, 3] == opened.content["input_tokens"]
        assert {"messages": [{"role": "user", "content": "my secret"}]} == opened.content[
            "request_body"
        ]

    def test_hashes_are_keyed(self, tmp_path: Path) -> None:
        """A sealed record's hashes are not the plain SHA-256 of its content (no guessing)."""
        sealed = Sealer(FileKeyStore(tmp_path / "keys"))(self.exchange()).fields()
        plain = hashlib.sha256(json.dumps([1, 2, 3]).encode()).hexdigest()
        assert plain != sealed["input_hash"]
        assert hashlib.sha256(b"my secret question").hexdigest() != sealed["input_text_hash"]

    def test_tampered_ciphertext_does_not_open(self, tmp_path: Path) -> None:
        """An edited ciphertext fails authentication instead of yielding other content."""
        keys = FileKeyStore(tmp_path / "keys")
        record = orjson.loads(encode_line("l", 0, "0" * 64, Sealer(keys)(self.exchange()).fields()))
        blob = record["sealed_content"]["ciphertext"]
        record["sealed_content"]["ciphertext"] = ("A" if blob[0] != "A" else "B") + blob[1:]
        with pytest.raises(VerificationError):
            open_record(record, keys)

    def test_user_id_not_utf8_is_sealed_as_stored(self, tmp_path: Path) -> None:
        """A user id holding lone surrogates (bytes that were not UTF-8) is stored with U+FFFD,
        and sealed under that stored name's key (it raised UnicodeEncodeError: no record);
        forget of the stored name erases it."""
        keys = FileKeyStore(tmp_path / "keys")
        exchange = replace(self.exchange(), user_id="al\udcffice", input_text="my secret \ud800")
        record = orjson.loads(Sealer(keys)(exchange).content_bytes())
        assert ("al\ufffdice", True) == (record["user_id"], record["content_sealed"])
        opened = open_record(record, keys).content
        assert opened is not None and "my secret \ufffd" == opened["input_text"]
        forget(keys, "al\ufffdice")
        assert open_record(record, keys).content is None

    def test_body_nested_too_deep_is_sealed_with_a_note(self, tmp_path: Path) -> None:
        """A request body nested deeper than the encoder goes is sealed with a note in its
        place, as an unsealed record keeps it (the sealer raised TypeError: no record)."""
        keys = FileKeyStore(tmp_path / "keys")
        deep: Any = "bottom"
        for _ in range(600):
            deep = [deep]
        exchange = replace(self.exchange(), extra={"request_body": {"messages": deep}})
        record = orjson.loads(Sealer(keys)(exchange).content_bytes())
        opened = open_record(record, keys).content
        assert opened is not None and "my secret question" == opened["input_text"]
        assert "tokentrail.unrecordable" in opened["request_body"]

    def test_subject_of_a_noncharacter_id_is_as_before(self) -> None:
        """A user id with a noncharacter names the key it named before (its records, sealed
        then, stay erasable by that id); only a lone surrogate, which no key name can hold,
        becomes U+FFFD."""
        from tokentrail._erasure import subject_of

        assert ("bob\uffff", "al\ufffdice", "_anonymous") == (
            subject_of("bob\uffff"),
            subject_of("al\udcffice"),
            subject_of(None),
        )

    def test_forget_erases_and_refuses_new_content(self, tmp_path: Path) -> None:
        """After forget the content is gone, and new content for that subject is refused."""
        keys = FileKeyStore(tmp_path / "keys")
        record = orjson.loads(encode_line("l", 0, "0" * 64, Sealer(keys)(self.exchange()).fields()))
        when = forget(keys, "alice")
        opened = open_record(record, keys)
        assert (None, when) == (opened.content, opened.erased_at)
        assert b"" == every_byte_under(tmp_path / "keys").replace(when.encode() + b"\n", b"")
        with pytest.raises(StoreError):
            Sealer(keys)(self.exchange())


def test_forget_ledger_named_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --ledger that is not there is refused before the key is touched (the index holding
    the subject's text would stay); with --ledger left out, the key goes and a warning says no
    index was dropped."""
    from click.testing import CliRunner

    from tokentrail._cli import main
    from tokentrail._erasure import key_id, subject_of

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENTRAIL_LEDGER", raising=False)
    keys = FileKeyStore(tmp_path / "keys")
    keys.key_for(subject_of("alice"))
    args = ["forget", "--user", "alice", "--keystore", str(tmp_path / "keys"), "--yes"]
    result = CliRunner().invoke(main, [*args, "--ledger", str(tmp_path / "typo")])
    assert (2, "") == (result.exit_code, result.stdout)
    assert result.stderr.startswith(f"tokentrail: error: --ledger {tmp_path / 'typo'} is not")
    assert keys.lookup(key_id(subject_of("alice"))) is not None
    result = CliRunner().invoke(main, args)
    assert 0 == result.exit_code, result.output
    assert result.stdout.startswith("erased: the content key of alice was destroyed at ")
    assert result.stderr.startswith("tokentrail: warning: no ledger at tokentrail-ledger, so no")
    assert keys.lookup(key_id(subject_of("alice"))) is None


def test_forget_while_the_proxy_runs(tmp_path: Path) -> None:
    """Once a user is forgotten, their requests are refused (403, in the client's dialect)
    before they reach the model, nothing of theirs is noted in plaintext, the proxy restarts,
    and everyone else is served and recorded as before."""
    keystore = tmp_path / "keys"

    def ask(url: str, user: str, prompt: str, stream: bool) -> httpx.Response:
        body = {"model": "llama3.2:1b", "prompt": prompt, "stream": stream}
        headers = {"X-Tokentrail-User": user}
        return httpx.post(url + "/api/generate", json=body, headers=headers, timeout=10)

    with sim_in_thread(SimConfig(mode="ollama")) as sim_url:
        args = ("--keystore", str(keystore), "--trust-identity-headers", "--log-id", "p")
        proxy = start_proxy(tmp_path, sim_url, *args)
        try:
            assert 200 == ask(proxy.url, "alice", "alice-before", False).status_code
            forget_cli("alice", keystore, proxy.ledger)
            for stream in (False, True):
                refused = ask(proxy.url, "alice", "alice-after-forget", stream)
                assert 403 == refused.status_code
                assert "erased" in refused.json()["error"]
            assert 200 == ask(proxy.url, "bob", "bob-after", True).status_code
            assert b"alice-after-forget" not in every_byte_under(proxy.ledger)
        finally:
            proxy.stop()
        again = start_proxy(tmp_path, sim_url, *args)  # the restart replays what was noted
        try:
            assert 200 == ask(again.url, "bob", "bob-after-restart", False).status_code
        finally:
            again.stop()
    users = [r["user_id"] for r in records_of(proxy.ledger)]
    assert ["alice", "bob", "bob"] == users
    assert 0 == again.verify(tmp_path / "state").returncode


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_forgotten_user_never_reaches_the_model(
    tmp_path: Path, recording_upstream: tuple[str, Seen], fail_open: bool
) -> None:
    """A forgotten user's requests, in either dialect, streamed or not, are answered 403 by the
    proxy and never forwarded, even when it runs fail-open; others still are."""
    upstream, seen = recording_upstream
    keystore = tmp_path / "keys"
    FileKeyStore(keystore).key_for("alice")
    forget(FileKeyStore(keystore), "alice")
    args = ["--keystore", str(keystore), "--trust-identity-headers", *(["--fail-open"] * fail_open)]
    proxy = start_proxy(tmp_path, upstream, *args)
    try:
        with httpx.Client(timeout=10) as client:
            for path, body in (
                ("/api/generate", {"model": "m", "prompt": "alice-after-forget"}),
                ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                ("/v1/chat/completions", {"model": "m", "messages": [], "stream": True}),
                ("/v1/completions", {"model": "m", "prompt": "alice-after-forget"}),
            ):
                for user in ("alice", "bob"):
                    sent = client.post(proxy.url + path, json=body,
                                       headers={"X-Tokentrail-User": user})  # fmt: skip
                    assert (403 if user == "alice" else 200) == sent.status_code, sent.text
        audited = [line for line in seen.lines if line.startswith("POST ")]
        assert [
            "POST /api/generate HTTP/1.1",
            "POST /api/chat HTTP/1.1",
            "POST /v1/chat/completions HTTP/1.1",
            "POST /v1/completions HTTP/1.1",
        ] == audited  # bob's four, none of alice's
    finally:
        proxy.stop()
    assert ["bob"] * 4 == [r["user_id"] for r in records_of(proxy.ledger)]


def test_forget_refuses_an_empty_user(tmp_path: Path) -> None:
    """An empty --user would erase every record without a user_id: refused, key untouched."""
    from click.testing import CliRunner

    from tokentrail._cli import main
    from tokentrail._erasure import ANONYMOUS, key_id

    keys = FileKeyStore(tmp_path / "keys")
    keys.key_for(ANONYMOUS)
    for user in ("", "  "):
        args = ["forget", "--user", user, "--keystore", str(tmp_path / "keys"), "--yes"]
        result = CliRunner().invoke(main, args)
        assert 2 == result.exit_code
        assert result.stderr.startswith("tokentrail: error: --user is empty")
    assert keys.lookup(key_id(ANONYMOUS)) is not None


def test_destroy_tombstone_is_private_and_a_missing_store_is_named(tmp_path: Path) -> None:
    """The tombstone a destroyed key leaves is mode 0600 like the keys (the README: "a
    directory of 0600 files"); forgetting in a key store that is not there says so."""
    from tokentrail._erasure import key_id

    keys = FileKeyStore(tmp_path / "keys")
    keys.key_for("erin")
    keys.destroy("erin")
    tombstone = tmp_path / "keys" / f"{key_id('erin')}.destroyed"
    assert 0o600 == tombstone.stat().st_mode & 0o777
    with pytest.raises(StoreError, match=r"key store .*nosuch does not exist"):
        FileKeyStore(tmp_path / "nosuch").destroy("erin")


def test_forget_counts_what_it_cannot_erase(tmp_path: Path) -> None:
    """Records written before sealing was turned on stay readable: forget says how many and
    exits 1, after destroying the key; with no key at all it says so in its error."""
    from click.testing import CliRunner

    from tokentrail import Ledger, LedgerConfig, Signer
    from tokentrail._cli import main

    keystore, ledger = tmp_path / "keys", tmp_path / "ledger"
    sealer = Sealer(FileKeyStore(keystore))
    for log_id, sealing, users in (("old", None, ("alice", "alice", "carol", "alice-2")),
                                   ("new", sealer, ("alice", "bob"))):  # fmt: skip
        with Ledger.open(LedgerConfig(ledger, log_id, Signer.generate("t"), sealer=sealing)) as w:
            for user in users:
                w.append(Exchange(model="m", api="sdk", stop_reason="stop", user_id=user,
                                  input_text=f"{user} says hi"))  # fmt: skip
    runner = CliRunner()
    common = ["--keystore", str(keystore), "--ledger", str(ledger), "--yes"]
    alice = runner.invoke(main, ["forget", "--user", "alice", *common])
    assert 1 == alice.exit_code, alice.output
    assert alice.stdout.startswith("erased: the content key of alice was destroyed at")
    assert (
        f"tokentrail: warning: 2 records of alice in {ledger} were written without a key store:"
        " not sealed, the content stays readable, and cannot be erased from the append-only"
        " log\n"
    ) == alice.stderr
    bob = runner.invoke(main, ["forget", "--user", "bob", *common])
    assert (0, "") == (bob.exit_code, bob.stderr)
    carol = runner.invoke(main, ["forget", "--user", "carol", *common])
    assert 2 == carol.exit_code
    assert carol.stderr.startswith("tokentrail: error: no key for subject 'carol' in")
    assert carol.stderr.endswith(f"; 1 record of carol in {ledger} was written without a key"
                                 " store: not sealed, the content stays readable, and cannot"
                                 " be erased from the append-only log\n")  # fmt: skip


@pytest.mark.parametrize(
    "line", [b'{"user_id": "alice", broken', b'["alice"]', b'"alice"', b'{"user_id": "alice"}']
)
def test_forget_past_a_damaged_line(tmp_path: Path, line: bytes) -> None:
    """A line in the ledger that is not a record (damage verify reports) never stops an
    erasure, nor counts as one of the user's records."""
    from click.testing import CliRunner

    from tokentrail import Ledger, LedgerConfig, Signer
    from tokentrail._cli import main

    keystore, ledger = tmp_path / "keys", tmp_path / "ledger"
    config = LedgerConfig(ledger, "a", Signer.generate("t"), sealer=Sealer(FileKeyStore(keystore)))
    with Ledger.open(config) as writer:
        writer.append(Exchange(model="m", api="sdk", stop_reason="stop", user_id="alice"))
    segment = next(ledger.rglob("*.jsonl"))
    with segment.open("ab") as fh:
        fh.write(line + b"\n")
    args = ["forget", "--user", "alice", "--keystore", str(keystore), "--ledger", str(ledger)]
    result = CliRunner().invoke(main, [*args, "--yes"])
    assert (0, "") == (result.exit_code, result.stderr), result.output
    assert FileKeyStore(keystore).lookup(key_id("alice")) is None


def test_forget_through_the_proxy(tmp_path: Path) -> None:
    """Erasing one user: nothing of her prompt anywhere, the ledger verifies, others intact."""
    keystore = tmp_path / "keys"
    with sim_in_thread(SimConfig(mode="ollama-0.4")) as sim_url:
        proxy = start_proxy(
            tmp_path, sim_url, "--keystore", str(keystore), "--trust-identity-headers"
        )
        try:
            with httpx.Client(timeout=10) as client:
                for user in ("alice", "bob"):
                    for i in range(3):
                        body = {
                            "model": "llama3.2:1b",
                            "prompt": f"{user}-private-prompt-{i}",
                            "stream": i % 2 == 0,
                        }
                        resp = client.post(
                            proxy.url + "/api/generate",
                            json=body,
                            headers={"X-Tokentrail-User": user},
                        )
                        assert 200 == resp.status_code
        finally:
            proxy.stop()
    assert b"private-prompt" not in every_byte_under(proxy.ledger)
    before = {r["event_id"]: r for r in records_of(proxy.ledger)}
    assert 6 == len(before)
    result = forget_cli("alice", keystore, proxy.ledger)
    assert result.stdout.startswith("erased: the content key of alice was destroyed")
    assert 0 == proxy.verify(tmp_path / "state").returncode
    keys = FileKeyStore(keystore)
    texts = {}
    for record in records_of(proxy.ledger):
        opened = open_record(record, keys)
        texts[record["user_id"], record["event_id"]] = opened
    alice = [o for (u, _), o in texts.items() if u == "alice"]
    bob = [o for (u, _), o in texts.items() if u == "bob"]
    assert [None] * 3 == [o.content for o in alice]
    assert all(o.erased_at for o in alice)
    assert sorted(f"bob-private-prompt-{i}" for i in range(3)) == sorted(
        str(o.content["input_text"]) for o in bob if o.content
    )
    assert b"alice-private-prompt" not in every_byte_under(proxy.ledger, keystore)


def test_show_opens_sealed_content_and_states_erasure(tmp_path: Path) -> None:
    """``show --keystore`` reads sealed content, and says when a forgotten subject's went."""
    from click.testing import CliRunner

    from tokentrail import Ledger, LedgerConfig, Signer
    from tokentrail._cli import main

    keystore, ledger = tmp_path / "keys", tmp_path / "ledger"
    config = LedgerConfig(
        ledger, "sdk", Signer.generate("t"), sealer=Sealer(FileKeyStore(keystore))
    )
    with Ledger.open(config) as writer:
        ids = {
            user: writer.append(
                Exchange(model="m", api="sdk", stop_reason="stop", user_id=user,
                         input_text=f"{user} asks something private", output_text="reply")
            ).event_id
            for user in ("alice", "bob")
        }  # fmt: skip
    forget(FileKeyStore(keystore), "alice", ledger)
    runner = CliRunner(env={"TOKENTRAIL_HOME": str(tmp_path / "home")})  # no default key here
    common = ["--ledger", str(ledger), "--keystore", str(keystore), "--no-color"]
    bob = runner.invoke(main, ["show", ids["bob"], *common])
    alice = runner.invoke(main, ["show", ids["alice"], *common])
    assert 0 == bob.exit_code, bob.output
    assert "bob asks something private" in bob.output
    assert "content erased" in alice.output
    assert "alice asks" not in alice.output


def test_search_opens_sealed_content_with_the_keystore(tmp_path: Path) -> None:
    """``search --keystore`` shows sealed content opened; without it, or once erased, the
    texts are null in ``--json`` and the hit says why."""
    from click.testing import CliRunner

    from tokentrail import Ledger, LedgerConfig, Signer
    from tokentrail._cli import main

    keystore, ledger = tmp_path / "keys", tmp_path / "ledger"
    config = LedgerConfig(
        ledger, "sdk", Signer.generate("t"), sealer=Sealer(FileKeyStore(keystore))
    )
    with Ledger.open(config) as writer:
        for user in ("alice", "bob"):
            writer.append(
                Exchange(model="m", api="sdk", stop_reason="stop", user_id=user,
                         input_text=f"{user} asks something private", output_text="a reply")
            )  # fmt: skip
    runner = CliRunner(env={"TOKENTRAIL_HOME": str(tmp_path / "home")})

    def texts(*args: str) -> list[tuple[object, ...]]:
        result = runner.invoke(main, ["search", "--ledger", str(ledger), "--json", *args])
        assert 0 == result.exit_code, result.output
        hits = [orjson.loads(line) for line in result.stdout.splitlines()]
        return sorted(
            (h["user_id"], h["input_text"], h["content_sealed"], h["content_erased_at"])
            for h in hits
        )

    keys = ["--keystore", str(keystore)]
    assert [
        ("alice", "alice asks something private", True, None),
        ("bob", "bob asks something private", True, None),
    ] == texts(*keys)
    assert [("alice", None, True, None), ("bob", None, True, None)] == texts()
    table = runner.invoke(main, ["search", "--ledger", str(ledger), "--user", "bob", *keys])
    assert "bob asks something private" in table.output
    # --text cannot look into sealed content: it says so rather than find nothing silently.
    found = runner.invoke(main, ["search", "--ledger", str(ledger), "--text", "private", *keys])
    assert 0 == found.exit_code, found.output
    assert found.stderr.startswith(
        "tokentrail: warning: log sdk seals records' content: --text searches only content"
        " that is not sealed"
    ), found.stderr
    assert found.stdout.splitlines()[-1].startswith("0 records")
    when = forget(FileKeyStore(keystore), "alice", ledger)
    assert [
        ("alice", None, True, when),
        ("bob", "bob asks something private", True, None),
    ] == texts(*keys)


def test_dsar_export_opens_sealed_content_and_checks_it(tmp_path: Path) -> None:
    """export --keystore hands the subject their content, which verify-export checks."""
    from click.testing import CliRunner

    from tokentrail import Ledger, LedgerConfig, Signer
    from tokentrail._cli import main

    keystore, ledger = tmp_path / "keys", tmp_path / "ledger"
    signer = Signer.generate("t")
    signer.save(tmp_path / "signing.key")
    pub = signer.verifier.to_text()
    config = LedgerConfig(ledger, "sdk", signer, sealer=Sealer(FileKeyStore(keystore)))
    with Ledger.open(config) as writer:
        for user in ("alice", "bob", "alice"):
            writer.append(
                Exchange(model="m", api="sdk", stop_reason="stop", user_id=user,
                         input_text=f"{user} private question", output_text=f"{user} answer",
                         input_tokens=[1, 2, 3])
            )  # fmt: skip
    runner = CliRunner()
    common = ["--ledger", str(ledger), "--public-key", pub, "--key", str(tmp_path / "signing.key")]
    out = tmp_path / "alice"
    made = runner.invoke(
        main, ["export", "--user", "alice", "--format", "csv", "--out", str(out),
               "--keystore", str(keystore), *common],
    )  # fmt: skip
    assert 0 == made.exit_code, made.output
    assert 2 == (out / "records.csv").read_text().count("alice private question")
    assert "bob" not in (out / "content.json").read_text()
    # The package's README says where sealed content is and how its hashes are checked.
    guide = (out / "README.txt").read_text()
    assert "content.json     the content of the 2 sealed records" in guide
    assert "HMAC-SHA-256 instead, keyed with content_hash_keys[" in guide
    # Without the key store, an export that would hold none of the sealed content stops,
    # unless asked for as such.
    bare = tmp_path / "alice-bare"
    args = ["export", "--user", "alice", "--format", "csv", "--out", str(bare), *common]
    refused = runner.invoke(main, args)
    assert 2 == refused.exit_code, refused.output
    assert (
        "tokentrail: error: 2 of the 2 records of user alice are sealed, and without --keystore the"
        " package would hold none of their content; nothing was written"
    ) in refused.output
    assert not bare.exists()
    made = runner.invoke(main, [*args, "--without-sealed-content"])
    assert 0 == made.exit_code, made.output
    assert "(2 records are sealed" in (bare / "README.txt").read_text()
    checked = runner.invoke(main, ["verify-export", str(out), "--public-key", pub])
    assert 0 == checked.exit_code, checked.output
    # An edited opened text is caught, even with the manifest digest made to match.
    content = out / "content.json"
    content.write_text(content.read_text().replace("alice private question", "alice other"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["content.json"] = hashlib.sha256(content.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tampered = runner.invoke(main, ["verify-export", str(out), "--public-key", pub])
    assert 1 == tampered.exit_code
    assert "opened content does not match" in tampered.output
    # After forget, the export states the erasure and still verifies.
    forget(FileKeyStore(keystore), "alice", ledger)
    gone = tmp_path / "alice-after"
    made = runner.invoke(
        main, ["export", "--user", "alice", "--format", "csv", "--out", str(gone),
               "--keystore", str(keystore), *common],
    )  # fmt: skip
    assert 0 == made.exit_code, made.output
    assert "alice private question" not in (gone / "records.csv").read_text()
    assert "content erased" in (gone / "records.csv").read_text()
    after = runner.invoke(main, ["verify-export", str(gone), "--public-key", pub])
    assert 0 == after.exit_code, after.output


def test_destroy_leaves_no_moment_for_a_new_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a key is being destroyed, a writer asking for it gets neither the zeroed key nor
    a new one: the tombstone is down before the key is zeroed."""
    from tokentrail._erasure import key_id
    from tokentrail._errors import SubjectForgottenError

    keys = FileKeyStore(tmp_path / "keys")
    keys.key_for("dana")
    seen: list[str] = []
    real_unlink = Path.unlink

    def unlink(path: Path, *args: object, **kwargs: object) -> None:
        if path.suffix == ".key":  # the key is zeroed and about to go: a writer asks now
            assert keys.lookup(key_id("dana")) is None  # never the zeroed key
            with pytest.raises(SubjectForgottenError) as refused:
                keys.key_for("dana")  # and no new one
            seen.append(str(refused.value))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "unlink", unlink)
    when = keys.destroy("dana")
    assert [f"the data of user 'dana' was erased on {when}"] == [m.split(" (")[0] for m in seen]
    monkeypatch.undo()
    with pytest.raises(SubjectForgottenError):
        keys.key_for("dana")


def test_forget_says_when_the_index_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index forget cannot remove (a read-only ledger) is an error naming it, after the
    key is gone, never a silent success."""
    from tokentrail._erasure import key_id

    keys = FileKeyStore(tmp_path / "keys")
    keys.key_for("erin")
    index = tmp_path / "ledger" / "index"
    index.mkdir(parents=True)
    (index / "audit.sqlite3").write_bytes(b"x")
    real_unlink = Path.unlink

    def unlink(path: Path, *args: object, **kwargs: object) -> None:
        if path.parent == index:
            raise PermissionError(30, "Read-only file system")
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(StoreError, match=f"the search index {index} could not be removed"):
        forget(keys, "erin", tmp_path / "ledger")
    assert keys.lookup(key_id("erin")) is None
    assert keys.destroyed_at(key_id("erin")) is not None
