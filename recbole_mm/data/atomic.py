"""Writing RecBole atomic files (``.inter``, ``.item``, ...) safely, and the side files next to them.

RecBole reads atomic files with ``pandas.read_csv(sep="\\t", engine="python")`` and the default
quoting, so a value that contains a tab or a newline, or that begins with ``"``, silently shifts or
merges columns and rows. Values written here are therefore *sanitised*: tabs, newlines and other
control characters become a space, double quotes become single quotes, and invalid Unicode
(lone surrogates) becomes U+FFFD. The exact raw text of an item is kept in the JSON-lines side file
``<name>.items.jsonl``, which RecBole never reads.

Input that cannot be made valid (a missing key field, a float that is not a number, bytes that are
not UTF-8) raises :class:`DataFormatError`, whose message names the file, the row, the field and
the value, and says what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class DataFormatError(ValueError):
    """Bad input data; the message names the file, row, field and value, and what to do."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, row: int | None = None,
                 field: str | None = None, value: Any = None, hint: str | None = None):
        self.file, self.row, self.field, self.value, self.hint = file, row, field, value, hint
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if value is not None:
            text += f" (value: {_show(value)})"
        if hint:
            text += f"; {hint}"
        super().__init__(text)


def _show(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def sanitize_text(value: str) -> str:
    """Make ``value`` safe for one cell of a tab-separated atomic file (see module docstring)."""
    value = _SURROGATE.sub("\ufffd", value)
    value = _CONTROL.sub(" ", value).replace('"', "'")
    return value.strip()


def decode_utf8(raw: bytes, *, file: Any = None, row: int | None = None, field: str | None = None) -> str:
    """Decode ``raw`` as UTF-8 or raise a :class:`DataFormatError` that points at the bad bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[max(0, e.start - 10): e.end + 10]
        raise DataFormatError(f"bytes that are not UTF-8 at byte {e.start}", file=file, row=row,
                              field=field, value=bad,
                              hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def format_cell(value: Any, ftype: str, *, file: Any = None, row: int | None = None,
                field: str | None = None, seq_separator: str = " ") -> str:
    """Turn one Python value into the text of one atomic-file cell of type ``ftype``.

    ``None`` (and NaN) becomes an empty cell. Lists are joined with ``seq_separator`` for the
    ``*_seq`` types. Bytes must be UTF-8.
    """
    if ftype not in FIELD_TYPES:
        raise DataFormatError(f"unknown RecBole field type '{ftype}'", file=file, field=field,
                              hint=f"use one of {', '.join(FIELD_TYPES)}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        value = decode_utf8(value, file=file, row=row, field=field)
    if ftype.startswith("float"):
        parts = value if (ftype == "float_seq" and isinstance(value, (list, tuple))) else (
            str(value).split() if ftype == "float_seq" else [value])
        out = []
        for p in parts:
            try:
                x = float(p)
            except (TypeError, ValueError):
                raise DataFormatError("not a number", file=file, row=row, field=field, value=p,
                                      hint="fix or remove the value") from None
            if not math.isfinite(x):
                raise DataFormatError("not a finite number", file=file, row=row, field=field, value=p,
                                      hint="fix or remove the value")
            out.append(str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x))
        return seq_separator.join(out)
    if ftype == "token_seq" and isinstance(value, (list, tuple)):
        toks = [sanitize_text(str(v)).replace(seq_separator, "_") for v in value]
        return seq_separator.join(t for t in toks if t)
    return sanitize_text(str(value))


def header(fields: Sequence[tuple[str, str]]) -> str:
    """The header line of an atomic file, e.g. ``user_id:token\\titem_id:token``."""
    for name, ftype in fields:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DataFormatError("field names must be identifiers (letters, digits, _)", field=name)
        if ftype not in FIELD_TYPES:
            raise DataFormatError(f"unknown RecBole field type '{ftype}'", field=name,
                                  hint=f"use one of {', '.join(FIELD_TYPES)}")
    return "\t".join(f"{n}:{t}" for n, t in fields)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one step.

    On error the temporary file is removed, so ``path`` is never left half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: str | os.PathLike, fields: Sequence[tuple[str, str]], rows: Iterable[Any],
                 *, required: Sequence[str] = (), source: Any = None) -> int:
    """Write a RecBole atomic file; return the number of rows written.

    ``fields`` is ``[(name, type), ...]``; each row is a mapping (missing keys are empty cells) or a
    sequence in field order. Fields in ``required`` (e.g. the user and item ids) must be non-empty.
    Errors name ``source`` (the input the rows came from) when given, else the output file.
    """
    names = [n for n, _ in fields]
    types = dict(fields)
    where = source if source is not None else path
    n = 0
    with atomic_output(path) as f:
        f.write(header(fields) + "\n")
        for i, row in enumerate(rows, start=1):
            if isinstance(row, Mapping):
                values = [row.get(k) for k in names]
            else:
                values = list(row)
                if len(values) != len(names):
                    raise DataFormatError(f"expected {len(names)} values, got {len(values)}",
                                          file=where, row=i, value=row)
            cells = [format_cell(v, types[k], file=where, row=i, field=k) for k, v in zip(names, values)]
            for k, c in zip(names, cells):
                if k in required and c == "":
                    raise DataFormatError("required field is missing or empty", file=where, row=i,
                                          field=k, value=row,
                                          hint="drop this row or fill the field")
            f.write("\t".join(cells) + "\n")
            n += 1
    return n


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write JSON lines atomically (UTF-8, raw text kept exactly); return the number of records."""
    n = 0
    with atomic_output(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSON-lines file; a bad line raises :class:`DataFormatError` naming file and line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            text = decode_utf8(raw, file=path, row=i).strip()
            if not text:
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"not valid JSON ({e.msg})", file=path, row=i, value=text,
                                      hint="each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise DataFormatError("not a JSON object", file=path, row=i, value=text)
            yield rec


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_output(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def read_header(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The ``[(name, type), ...]`` of an atomic file's header line."""
    with open(path, "rb") as f:
        line = decode_utf8(f.readline(), file=path, row=1).rstrip("\r\n")
    out = []
    for col in line.split("\t"):
        name, sep, ftype = col.partition(":")
        if not sep or ftype not in FIELD_TYPES:
            raise DataFormatError("bad header column, expected name:type", file=path, row=1, value=col,
                                  hint=f"types are {', '.join(FIELD_TYPES)}")
        out.append((name, ftype))
    return out
