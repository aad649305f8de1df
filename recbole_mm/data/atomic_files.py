"""Writing RecBole atomic files (``.inter``, ``.item``, ...) safely, and the side files next to them.

RecBole reads atomic files with ``pandas.read_csv(sep="\t", engine="python")`` and the default
quoting, so a value that contains a tab or a newline, or that begins with ``"``, silently shifts or
merges columns and rows. Values written here are therefore *sanitised*: tabs, newlines and other
control characters become a space, double quotes become single quotes, and invalid Unicode
(lone surrogates) becomes U+FFFD. The exact raw text of an item is kept in the JSON-lines side file
``<name>.items.jsonl``, which RecBole never reads (there too, surrogate pairs, as Python 2 wrote
astral characters, are joined and lone surrogates become U+FFFD: UTF-8 cannot hold them).

Ids (the required ``token`` fields, e.g. ``user_id``, ``item_id``) that differ in the input but
become equal once sanitised (``'A\tB'`` and ``'A B'``) are refused, naming both raw ids.

Files are written atomically (:mod:`recbole_mm.files`). Input that cannot be made valid (a missing
key field, a float that is not a number, bytes that are not UTF-8) raises
:class:`~recbole_mm.errors.DataFormatError`, whose message names the file, the row, the field and
the value, and says what to do.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from recbole_mm.errors import DataFormatError, show_value
from recbole_mm.files import atomic_output, decode_utf8, fix_surrogates

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")


def sanitize_text(value: str) -> str:
    """Make ``value`` safe for one cell of a tab-separated atomic file (see module docstring)."""
    value = fix_surrogates(value)
    value = _CONTROL.sub(" ", value).replace('"', "'")
    return value.strip()


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
            except (TypeError, ValueError, OverflowError):
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


def check_output_folder(out: str | os.PathLike, name: str) -> Path:
    """``out/name`` after checking that ``name`` is a plain folder name and ``out`` is not a file."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or "") or name == "ml-100k":
        raise DataFormatError(f"bad dataset name {name!r}", hint="use a plain folder name such as 'beauty' "
                              "(letters, digits, '.', '_', '-'; 'ml-100k' is RecBole's own)")
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise DataFormatError("--out names a file, not a folder", file=p,
                                      hint="pass a folder (it is created if missing)")
            break
    target = out / name
    if target.exists() and not target.is_dir():
        raise DataFormatError("the dataset path exists and is not a folder", file=target,
                              hint="remove or rename that file, or choose another --name/--out")
    return target


def write_atomic(path: str | os.PathLike, fields: Sequence[tuple[str, str]], rows: Iterable[Any],
                 *, required: Sequence[str] = (), source: Any = None, ids: Sequence[str] | None = None) -> int:
    """Write a RecBole atomic file; return the number of rows written.

    ``fields`` is ``[(name, type), ...]``; each row is a mapping (missing keys are empty cells) or a
    sequence in field order. Fields in ``required`` (e.g. the user and item ids) must be non-empty.
    Fields in ``ids`` (default: the required ``token`` fields) must not merge two different raw
    values into one token. Errors name ``source`` (the input the rows came from) when given, else
    the output file.
    """
    names = [n for n, _ in fields]
    types = dict(fields)
    where = source if source is not None else path
    if ids is None:
        ids = [k for k in required if types.get(k) == "token"]
    raw_of = {names.index(k): {} for k in ids}  # column -> {token: first raw value}
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
            for j, seen in raw_of.items():
                if cells[j] == "":
                    continue
                raw = values[j].decode("utf-8") if isinstance(values[j], bytes) else str(values[j])
                first = seen.setdefault(cells[j], raw)
                if first != raw:
                    raise DataFormatError(f"two ids, {show_value(first)} and {show_value(raw)}, both become "
                                          f"{show_value(cells[j])} once sanitised", file=where, field=names[j],
                                          hint="make them distinct in the input (tabs, newlines and control "
                                               "characters become spaces, '\"' becomes \"'\")")
            f.write("\t".join(cells) + "\n")
            n += 1
    return n


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
