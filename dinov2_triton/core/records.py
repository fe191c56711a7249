"""Typed, versioned records for every file that crosses a stage boundary.

Each such file has exactly one record class (a pydantic model derived from
:class:`Record`), one writer and one reader; docs/architecture.md ("The
records") lists them with their files, writers and readers.

A record is validated when it is read: a missing field, a wrong type or an
unknown ``schema_version`` raises :class:`RecordError` with one line naming
the file and the field, e.g. ``models/model_final.pth: field 'num_classes':
Input should be a valid integer``. Files written by an older schema are
upgraded by the class's ``_migrate`` or refused with a message that says how
to regenerate them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError


class RecordError(ValueError):
    """A stage-boundary file is missing a field, has a wrong type or an
    unknown schema version. str(exc) is one line naming file and field."""


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(record)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line for the first error (and a count of the others)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _field_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid")
    if first.get("type") == "missing":
        msg = "missing (required)"
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif "input" in first and first.get("type") != "missing":
        shown = repr(first["input"])
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: field '{loc}': {msg}{more}"


class Record(BaseModel):
    """Base of the stage-boundary records.

    Subclasses set ``SCHEMA_VERSION`` (the version this code writes),
    ``KIND`` (words for messages, e.g. "export manifest") and
    ``REGENERATE`` (the command that writes a fresh file), and may override
    ``_migrate(data, version)`` to upgrade older files in place."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    SCHEMA_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "record"
    REGENERATE: ClassVar[str] = ""

    schema_version: int

    # ------------------------------------------------------------------ reading
    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Upgrade ``data`` written with schema ``version`` (< SCHEMA_VERSION)
        to the current schema. The default refuses: override per record."""
        raise RecordError(f"schema_version {version} is no longer supported")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | Path = "<memory>"):
        """Validate ``data`` (as read from ``source``) into a record."""
        source = str(source)
        if not isinstance(data, Mapping):
            raise RecordError(f"{source}: not a {cls.KIND} (expected a mapping, got {type(data).__name__})")
        data = dict(data)
        version = data.get("schema_version")
        hint = f"; regenerate it with: {cls.REGENERATE}" if cls.REGENERATE else ""
        if version is None:
            try:
                data = cls._migrate(data, 0)
            except RecordError as exc:
                raise RecordError(f"{source}: field 'schema_version': missing ({exc}){hint}") from None
        elif not isinstance(version, int) or isinstance(version, bool):
            raise RecordError(f"{source}: field 'schema_version': expected an integer, got {version!r}")
        elif version > cls.SCHEMA_VERSION:
            raise RecordError(f"{source}: field 'schema_version': {version} is newer than this code "
                              f"reads ({cls.SCHEMA_VERSION}); update the project or{hint[1:] or ' regenerate it'}")
        elif version < cls.SCHEMA_VERSION:
            try:
                data = cls._migrate(data, version)
            except RecordError as exc:
                raise RecordError(f"{source}: field 'schema_version': {exc}{hint}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecordError(format_validation_error(exc, source) + hint) from None

    # ------------------------------------------------------------------ writing
    @classmethod
    def new(cls, **fields: Any):
        """A record of the current schema (``schema_version`` filled in)."""
        return cls(schema_version=cls.SCHEMA_VERSION, **fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the writer (pydantic's python mode: tensors and
        numpy arrays stay as they are, so torch.save keeps them)."""
        return self.model_dump(mode="python")
