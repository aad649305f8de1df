"""Writing RecBole atomic files (``.inter``, ``.item``, ...) safely, and the side files next to them.

RecBole reads atomic files with ``pandas.read_csv(sep="\\t", engine="python")`` and the default
quoting, so a value that contains a tab or a newline, or that begins with ``"``, silently shifts or
merges columns and rows. Values written here are therefore *sanitised*: tabs, newlines and other
control characters become a space, double quotes become single quotes, and invalid Unicode
(lone surrogates) becomes U+FFFD. The exact raw text of an item is kept in the JSON-lines side file
``<name>.items.jsonl``, which RecBole never reads (there too, surrogate pairs, as Python 2 wrote
astral characters, are joined and lone surrogates become U+FFFD: UTF-8 cannot hold them).

Ids (the required ``token`` fields, e.g. ``user_id``, ``item_id``) that differ in the input but
become equal once sanitised (``'A\\tB'`` and ``'A B'``) are refused, naming both raw ids.

Every file is written to a temporary file beside it and renamed (:func:`atomic_output`); a dataset
of several files is built in a temporary folder and published when complete
(:func:`staged_folder`). Temporary files and folders left by a killed process (``.<name>.*.part``)
carry no lock and are removed by :func:`remove_stale_temps` on later writes into that folder.

Input that cannot be made valid (a missing key field, a float that is not a number, bytes that are
not UTF-8) raises :class:`DataFormatError`, whose message names the file, the row, the field and
the value, and says what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

from recbole_mm.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: stale temporaries are recognised by their age instead of a lock
    fcntl = None

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# tempfile.mkstemp/mkdtemp names: prefix, 8 characters of tempfile's alphabet, suffix
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part")
_STARTED = time.time()
# Python refuses to turn longer digit strings into an int (CVE-2020-10735), in json and ast alike
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300
_LONG_INT = re.compile(r"""["']?([A-Za-z_]\w*)["']?\s*:\s*[-+]?(\d{%d,})""" % (_INT_DIGITS + 1))


class DataFormatError(UserError, ValueError):
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
    try:
        r = repr(value)
    except ValueError:  # an int beyond Python's int-to-text digit limit
        r = f"<integer with about {value.bit_length() * 0.30103:.0f} digits>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def fix_surrogates(value: str) -> str:
    """Join surrogate pairs into the characters they encode; lone surrogates become U+FFFD."""
    if not _SURROGATE.search(value):
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def sanitize_text(value: str) -> str:
    """Make ``value`` safe for one cell of a tab-separated atomic file (see module docstring)."""
    value = fix_surrogates(value)
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock(fd: int, wait: bool = True) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (kept until it is closed); False if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` is still the file or folder open as ``fd`` (not removed by a sweep meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> int:
    """Remove temporaries ``.<name>.XXXXXXXX.part`` (files or folders) that nobody is writing.

    A writer holds a lock on its temporary until it is renamed, so an unlocked one was left by a
    process that was killed. (Without ``fcntl``: those older than this process.) ``name`` limits the
    sweep to the temporaries of one target. Returns how many were removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        try:  # never follow a link, never wait on a FIFO
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            if fcntl is None:
                if os.fstat(fd).st_mtime >= _STARTED:
                    continue
            elif not _lock(fd, wait=False) or not _still_named(fd, entry.path):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", *, sweep: bool = False) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one step.

    On error the temporary file is removed, so ``path`` is never left half-written. The temporary is
    locked while it is written; ``sweep=True`` first removes the unlocked temporaries that killed
    processes left in the folder (:func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale_temps(path.parent)
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        _lock(fd)
        if fcntl is None or _still_named(fd, tmp):
            break
        os.close(fd)  # a sweep removed it between its creation and the lock: take another
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if fcntl is not None:  # rename while the lock is held (POSIX allows renaming open files)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder's files in a temporary folder beside it; publish them only if all succeed.

    A new ``target`` appears in one rename. If ``target`` exists, the new files are moved into it
    one by one (files it holds that are not rebuilt, such as downloaded images or captions, stay),
    ``<name>.meta.json`` last; only a failing rename could leave a mix. On any error the temporary
    folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    made_parent = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    while True:
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        fd = os.open(tmp, os.O_RDONLY)
        _lock(fd)
        if fcntl is None or _still_named(fd, tmp):
            break
        os.close(fd)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield Path(tmp)
        if not target.exists():
            os.rename(tmp, target)
        else:
            files = sorted(p for p in Path(tmp).rglob("*") if not p.is_dir())
            files.sort(key=lambda p: p.name.endswith(".meta.json"))  # stable: meta last
            for src in files:
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            try:
                target.parent.rmdir()
            except OSError:
                pass
        raise
    finally:
        os.close(fd)


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
                    raise DataFormatError(f"two ids, {_show(first)} and {_show(raw)}, both become "
                                          f"{_show(cells[j])} once sanitised", file=where, field=names[j],
                                          hint="make them distinct in the input (tabs, newlines and control "
                                               "characters become spaces, '\"' becomes \"'\")")
            f.write("\t".join(cells) + "\n")
            n += 1
    return n


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write JSON lines atomically (UTF-8, raw text kept exactly); return the number of records."""
    n = 0
    with atomic_output(path) as f:
        for r in records:
            f.write(fix_surrogates(json.dumps(r, ensure_ascii=False)) + "\n")
            n += 1
    return n


def unparsable_line(err: BaseException, line: str, file: Any, row: int, what: str, hint: str) -> DataFormatError:
    """A :class:`DataFormatError` for a line that Python's ``json``/``ast`` parsers refused."""
    text = str(err)
    if isinstance(err, (RecursionError, MemoryError)) or "too many nested" in text:
        return DataFormatError("nested too deeply for Python's json/ast parsers (their recursion limit)",
                               file=file, row=row, value=line, hint=hint)
    if "integer string conversion" in text:
        m = _LONG_INT.search(line)
        digits = m[2] if m else ""
        return DataFormatError(f"an integer with {len(digits) or 'too many'} digits: more than the "
                               f"{_INT_DIGITS} Python converts from text", file=file, row=row,
                               field=m[1] if m else None, value=(digits[:12] + "...") if digits else line,
                               hint="fix or remove the value")
    detail = getattr(err, "msg", None) or "only literals are allowed, no names or calls"
    return DataFormatError(f"not {what} ({detail})", file=file, row=row, value=line, hint=hint)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSON-lines file; a bad line raises :class:`DataFormatError` naming file and line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            text = decode_utf8(raw, file=path, row=i).strip()
            if not text:
                continue
            try:
                rec = json.loads(text)
            except (ValueError, RecursionError, MemoryError) as e:
                raise unparsable_line(e, text, path, i, "valid JSON", "each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise DataFormatError("not a JSON object", file=path, row=i, value=text)
            yield rec


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_output(path) as f:
        f.write(fix_surrogates(json.dumps(obj, ensure_ascii=False, indent=2)) + "\n")


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
