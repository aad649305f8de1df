"""Low-level file helpers every layer uses: atomic writes, JSON lines, locked temporaries,
folders built atomically, and stable fingerprints of settings and data.

Every file is written to a temporary file beside it and renamed (:func:`atomic_output`); a folder of
several files is built in a temporary folder and published when complete (:func:`staged_folder`,
:func:`build_atomically`). Temporary files and folders left by a killed process
(``.<name>.*.part``) carry no lock and are removed by :func:`remove_stale_temps` on later writes into
that folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from recbole_mm.errors import DataFormatError

try:
    import fcntl
except ImportError:  # not POSIX: stale temporaries are recognised by their age instead of a lock
    fcntl = None

logger = logging.getLogger(__name__)

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# tempfile.mkstemp/mkdtemp names: prefix, 8 characters of tempfile's alphabet, suffix
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part")
_STARTED = time.time()
# Python refuses to turn longer digit strings into an int (CVE-2020-10735), in json and ast alike
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300
_LONG_INT = re.compile(r"""["']?([A-Za-z_]\w*)["']?\s*:\s*[-+]?(\d{%d,})""" % (_INT_DIGITS + 1))
BUILD_MARKER = "recbole_mm_small.json"  # the file that marks a folder made by build_atomically as complete


def fix_surrogates(value: str) -> str:
    """Join surrogate pairs into the characters they encode; lone surrogates become U+FFFD."""
    if not _SURROGATE.search(value):
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def decode_utf8(raw: bytes, *, file: Any = None, row: int | None = None, field: str | None = None) -> str:
    """Decode ``raw`` as UTF-8 or raise a :class:`DataFormatError` that points at the bad bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[max(0, e.start - 10): e.end + 10]
        raise DataFormatError(f"bytes that are not UTF-8 at byte {e.start}", file=file, row=row,
                              field=field, value=bad,
                              hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


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
            yield json_object_line(text, path, i, "each line must be one JSON object")


def json_object_line(text: str, path: Any, row: int, hint: str) -> dict:
    """One line of a JSON-lines file as a dict; anything else is a :class:`DataFormatError` naming
    the file and the line (``hint`` says what the line should be)."""
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError, MemoryError) as e:
        raise unparsable_line(e, text, path, row, "valid JSON", hint) from None
    if not isinstance(rec, dict):
        raise DataFormatError("not a JSON object", file=path, row=row, value=text)
    return rec


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_output(path) as f:
        f.write(fix_surrogates(json.dumps(obj, ensure_ascii=False, indent=2)) + "\n")


def build_is_complete(out_dir: str, meta: dict) -> bool:
    """Whether ``out_dir`` holds the finished build described by ``meta`` (:func:`build_atomically`)."""
    path = os.path.join(out_dir, BUILD_MARKER)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out_dir, "config.json")):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    keys = ("kind", "version", "arguments", "texts_fingerprint")
    return all(found.get(k) == meta.get(k) for k in keys) and all(
        os.path.isfile(os.path.join(out_dir, name)) for name in found.get("files", []))


def build_atomically(out_dir: str, meta: dict, write) -> str:
    """Reuse ``out_dir`` when it holds this build, else ``write(tmp)`` beside it and rename."""
    out_dir = os.path.abspath(out_dir)
    if build_is_complete(out_dir, meta):
        logger.info(f"built folder: reusing {out_dir}")
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        files = sorted(os.path.relpath(os.path.join(d, n), tmp) for d, _, ns in os.walk(tmp) for n in ns)
        with open(os.path.join(tmp, BUILD_MARKER), "w", encoding="utf-8") as f:
            json.dump({**meta, "files": files}, f, indent=2, sort_keys=True)
        if os.path.lexists(out_dir):
            if build_is_complete(out_dir, meta):  # built concurrently by someone else
                return out_dir
            stale = out_dir + f".stale-{os.getpid()}"
            os.rename(out_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if build_is_complete(out_dir, meta):
                return out_dir
            raise
        logger.info(f"built folder: built {out_dir}")
        return out_dir
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(*parts) -> str:
    """Short stable hash of JSON-serialisable parts (configs, file fingerprints, ...)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def dataset_fingerprint(config) -> dict:
    """Name, size and modification time of the dataset's atomic files (cheap, no reading)."""
    folder = config["data_path"]
    files = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and name.startswith(config["dataset"] + "."):
                stat = os.stat(path)
                files[name] = [stat.st_size, int(stat.st_mtime)]
    return {"dataset": config["dataset"], "files": files}
