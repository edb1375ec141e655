"""Audits, DSARs and forensics over a local ledger: search, show, session, export.

The data flow: the ledger → a rebuildable sidecar index (:mod:`._index`) → queries whose every
hit is re-checked against its leaf (:mod:`._leaves`, :mod:`._search`) → views for a person
(:mod:`._show`) and verifiable data-subject packages (:mod:`._export`, :mod:`._package`,
:mod:`._verify_export`). The click commands live in :mod:`._cli`.

Import this package after :mod:`tokentrail._cli` has defined its options (the commands reuse
them): registered by ``_cli.py``.
"""

from __future__ import annotations

from ._cli import (
    export_command,
    index_command,
    search_command,
    session_command,
    show_command,
    verify_export_command,
)
from ._export import build_export, write_package
from ._index import Index, index_path
from ._search import Filters, search
from ._verify_export import verify_export

__all__ = [
    "Filters",
    "Index",
    "build_export",
    "export_command",
    "index_command",
    "index_path",
    "search",
    "search_command",
    "session_command",
    "show_command",
    "verify_export",
    "verify_export_command",
    "write_package",
]
