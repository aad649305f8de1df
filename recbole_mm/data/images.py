"""Download the images of a dataset's items (the ``imUrl`` attribute) into ``<dataset>/images/``.

- parallel (a thread pool), resumable: an image file that is already there is skipped (files only
  appear complete: each is written to a temporary file and renamed with ``os.replace``);
- retries with exponential back-off for time-outs, connection errors, HTTP 408/429/5xx and bytes
  that do not decode; other HTTP errors (404, 403, ...) fail at once;
- every file is decoded with Pillow before it is kept;
- the side file ``<name>.items.jsonl`` gets ``image`` = ``images/<file>`` for every item whose image
  is present, and ``<name>.images_report.json`` lists the failures (item, URL, error, attempts).

Only ``http``/``https`` URLs are fetched (a ``file:`` URL in the data could read local files).
"""

from __future__ import annotations

import io
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from recbole_mm.data.atomic import DataFormatError, atomic_output, read_jsonl, write_json, write_jsonl

USER_AGENT = "recbole-mm-image-downloader/0.1"
MAX_BYTES = 20 * 1024 * 1024
_EXT = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


@dataclass
class Failure:
    """One image that could not be fetched."""

    item_id: str
    url: str
    error: str
    attempts: int


@dataclass
class DownloadReport:
    """Outcome of :func:`download_images`."""

    downloaded: int = 0
    skipped: int = 0
    without_url: int = 0
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.downloaded} downloaded, {self.skipped} already present, {len(self.failures)} failed, "
                f"{self.without_url} items without URL")


class _Retryable(Exception):
    pass


def image_file_name(token: str, url: str) -> str:
    """A safe file name for an item's image: the token (unsafe characters -> ``_``) + the URL's extension."""
    ext = os.path.splitext(urllib.request.urlparse(url).path)[1].lower()
    if ext not in _EXT:
        ext = ".jpg"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", token).lstrip(".") or "_"
    return safe + ext


def _verify(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        msg = f"HTTP {e.code} {e.reason}"
        if e.code in (408, 429) or e.code >= 500:
            raise _Retryable(msg) from None
        raise RuntimeError(msg) from None
    except (socket.timeout, TimeoutError):
        raise _Retryable(f"timed out after {timeout:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise _Retryable(f"timed out after {timeout:g} s") from None
        raise _Retryable(f"connection error: {e.reason}") from None
    except (ConnectionError, OSError) as e:
        raise _Retryable(f"connection error: {e}") from None
    if len(data) > max_bytes:
        raise RuntimeError(f"larger than {max_bytes} bytes")
    try:
        _verify(data)
    except Exception as e:  # Pillow raises several types for bad bytes
        raise _Retryable(f"does not decode as an image ({type(e).__name__})") from None
    return data


def _save(data: bytes, dest: Path) -> None:
    with atomic_output(dest, "wb") as f:
        f.write(data)


def download_one(url: str, dest: Path, *, timeout: float = 10.0, retries: int = 3, backoff: float = 1.0,
                 max_bytes: int = MAX_BYTES, sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str, int]:
    """Fetch ``url`` to ``dest``; return ``(ok, error, attempts)``. Retries ``retries`` times."""
    scheme = urllib.request.urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        return False, f"unsupported URL scheme '{scheme}' (only http/https)", 0
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            _save(_fetch(url, timeout, max_bytes), dest)
            return True, "", attempt + 1
        except _Retryable as e:
            error = str(e)
        except RuntimeError as e:
            return False, str(e), attempt + 1
    return False, error, retries + 1


def download_images(dataset: str | os.PathLike, *, workers: int = 8, timeout: float = 10.0,
                    retries: int = 3, backoff: float = 1.0, url_field: str = "imUrl",
                    max_bytes: int = MAX_BYTES) -> DownloadReport:
    """Download the images of ``dataset`` (a folder with ``<name>.items.jsonl``); see the module doc."""
    folder = Path(dataset)
    name = folder.name
    side = folder / f"{name}.items.jsonl"
    if not side.is_file():
        raise DataFormatError("side file not found", file=side,
                              hint="convert the dataset first (recbole-mm-data convert-amazon ...)")
    if workers < 1 or retries < 0 or timeout <= 0:
        raise DataFormatError("need --workers >= 1, --retries >= 0, --timeout > 0",
                              value={"workers": workers, "retries": retries, "timeout": timeout})
    records = list(read_jsonl(side))
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    report = DownloadReport()
    jobs = []
    for rec in records:
        url = rec.get(url_field)
        if not url or not isinstance(url, str):
            report.without_url += 1
            continue
        fname = image_file_name(str(rec.get("item_id")), url)
        dest = images / fname
        if dest.is_file() and dest.stat().st_size > 0:
            report.skipped += 1
            rec["image"] = f"images/{fname}"
        else:
            jobs.append((rec, url, dest, fname))

    def work(job):
        rec, url, dest, fname = job
        return job, download_one(url, dest, timeout=timeout, retries=retries, backoff=backoff,
                                 max_bytes=max_bytes)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (rec, url, dest, fname), (ok, err, attempts) in pool.map(work, jobs):
            if ok:
                report.downloaded += 1
                rec["image"] = f"images/{fname}"
            else:
                rec.pop("image", None)
                report.failures.append(Failure(str(rec.get("item_id")), url, err, attempts))
    write_jsonl(side, records)
    write_json(folder / f"{name}.images_report.json",
               {"downloaded": report.downloaded, "skipped": report.skipped, "without_url": report.without_url,
                "failed": len(report.failures), "failures": [asdict(f) for f in report.failures]})
    return report
