"""A report kind as an object: what it answers, the formats it writes, its options
and its three steps (compute the answer from a record; write it as text; as JSON; a
kind may also draw it).  Each report module defines its ``KIND``; ``KINDS`` holds
them all, and ``udamon report KIND`` is one runner over them (cli/report.py): the CLI
turns its options into the kind's ``options`` and calls ``run``.  From Python:

    from udamon.report.kind import KINDS
    text = KINDS["numa"].run(udamon.read_record("rec.jsonl"), "text")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from udamon.errors import ParameterError
from udamon.record.reader import Record


@dataclass(frozen=True)
class ReportKind:
    name: str
    help: str
    formats: tuple[str, ...]
    options: type  # a dataclass; its defaults are the kind's
    compute: Callable[[Record, Any], Any]  # (record, options) -> the answer
    to_text: Callable[[Record, Any, Any], str]  # (record, answer, options)
    to_json: Callable[[Record, Any, Any], dict]
    to_png: Callable[[Record, Any, Any, str], None] | None = None  # (..., path)

    def run(self, rec: Record, fmt: str = "text", opts: Any = None,
            output: str | None = None) -> str | dict | None:
        """The answer in ``fmt``: text (a str), json (a dict), png (drawn to
        ``output``, returns None)."""
        if fmt not in self.formats:
            raise ParameterError("format", "report {kind} writes {param} {allowed}, not "
                                 "{fmt}", kind=self.name, allowed=", ".join(self.formats),
                                 fmt=fmt)
        opts = opts if opts is not None else self.options()
        res = self.compute(rec, opts)
        if fmt == "json":
            return self.to_json(rec, res, opts)
        if fmt == "png":
            assert self.to_png is not None and output
            self.to_png(rec, res, opts, output)
            return None
        return self.to_text(rec, res, opts)


_KINDS: dict[str, ReportKind] = {}


def __getattr__(name: str):
    """``KINDS``, made on first use (the report modules import this one for the class)."""
    if name != "KINDS":
        raise AttributeError(name)
    if not _KINDS:
        from udamon.report import access, dirty, heatmap, ksm, numa, sharing, wss

        _KINDS.update((k.name, k) for k in (access.KIND, heatmap.KIND, wss.KIND, ksm.KIND,
                                           dirty.KIND, sharing.KIND, numa.KIND))
    return _KINDS
