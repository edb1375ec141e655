"""Helper for the crash-safety test: append to a ledger until killed.

Usage: ``python _crash_writer.py ROOT LOG_ID KEY_FILE [THREADS]``

Opens the log with strict durability (continuing it if it exists), then appends from THREADS
threads in a loop. After each append returns, prints ``<seq> <event_id>`` on one line and flushes,
so every line the parent reads is an acknowledged append. Small segments and a short seal
interval make rotations and checkpoints happen while the parent's SIGKILL can land.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tokentrail._checkpoint import Signer
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Exchange


def main(argv: list[str]) -> None:
    root, log_id, key = Path(argv[1]), argv[2], Path(argv[3])
    threads = int(argv[4]) if len(argv) > 4 else 4
    config = LedgerConfig(
        root,
        log_id,
        Signer.load(key),
        durability="strict",
        seal_interval_s=0.05,
        max_segment_bytes=16 * 1024,
    )
    ledger = Ledger.open(config)
    out = sys.stdout
    lock = threading.Lock()

    def work(worker: int) -> None:
        i = 0
        while True:
            record = ledger.append(
                Exchange(
                    model="crash-model",
                    api="sdk",
                    stop_reason="stop",
                    input_tokens=list(range(i % 40)),
                    output_tokens=["piece", [0xFF, 0x00]],
                    input_text=f"worker {worker} append {i}",
                    output_text="ok",
                )
            )
            with lock:
                out.write(f"{record.seq} {record.event_id}\n")
                out.flush()
            i += 1

    for worker in range(threads):
        threading.Thread(target=work, args=(worker,), daemon=True).start()
    threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main(sys.argv)
