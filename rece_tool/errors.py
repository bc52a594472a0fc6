"""Error types and the exit codes they map to.

Every error the user can cause is a `ReceError` whose message names the file and the field or
key at fault and, where one exists, the fix. The CLI prints `diagnostics()` as one line and
exits with `exit_code`; a traceback is shown only with `--debug`.

Exit codes: 0 all passed · 1 a gate failed · 2 bad input · 3 internal error.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class ReceError(Exception):
    """Base of every error rece-tool raises on purpose."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.field = field
        self.hint = hint

    def diagnostics(self) -> str:
        """One line: `file: field: what is wrong (what to do)`."""
        parts = [p for p in (self.path, self.field) if p]
        text = ": ".join(parts + [self.message])
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.diagnostics()


class BadInput(ReceError):
    """Anything the user handed us that we refuse: exit 2."""

    exit_code = EXIT_BAD_INPUT


class ManifestError(BadInput):
    """The manifest (or a file it names) is malformed."""


class CheckpointError(BadInput):
    """A checkpoint file is unreadable, malformed, of an unknown layout, or unsafe."""


class TokenizerError(BadInput):
    """The tokenizer cannot be resolved or read."""


class NumericError(BadInput):
    """Non-finite weights or embeddings, or an ill-conditioned solve."""


class SigningError(BadInput):
    """A signing or public key is unusable."""


class OutputError(BadInput):
    """The output location cannot be written safely (exists, locked, escapes the output dir)."""


class WriteFailure(ReceError):
    """Writing an output failed (disk full, I/O error): internal, nothing is left behind."""

    exit_code = EXIT_INTERNAL


class GateFailure(ReceError):
    """At least one audit gate failed: exit 1, outputs are written but left unsigned."""

    exit_code = EXIT_GATE_FAILED
