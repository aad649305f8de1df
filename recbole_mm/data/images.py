"""Download the images of a dataset's items (the ``imUrl`` attribute) into ``<dataset>/images/``.

- parallel (a thread pool), resumable: an image file that is already there and decodes is
  skipped; one that does not decode is fetched again (files only appear complete: each is written
  to a temporary file and renamed with ``os.replace``; temporaries left by a killed run are removed);
- one file per item: the item id with characters other than ``A-Za-z0-9._-`` replaced, plus
  ``@`` and a hash of the raw id whenever that replacement changed it (``A:1`` -> ``A_1@<hash>``,
  never ``A_1``), so two items never share a file;
- each attempt has a total deadline (``timeout``: connecting, headers and body together), so a
  server that trickles bytes cannot hold a download forever;
- retries with exponential back-off for time-outs, connection errors, HTTP 408/429/5xx and bytes
  that do not decode; other HTTP errors (404, 403, ...) fail at once;
- every file is decoded with Pillow before it is kept;
- the side file ``<name>.items.jsonl`` gets ``image`` = ``images/<file>`` for every item whose image
  is present, and ``<name>.images_report.json`` lists the failures (item, URL, error, attempts).

Only ``http``/``https`` URLs are fetched (a ``file:`` URL in the data could read local files).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from recbole_mm.errors import DataFormatError
from recbole_mm.files import atomic_output, read_jsonl, remove_stale_temps, write_json, write_jsonl

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
    #: files that were on disk but did not decode (fetched again)
    corrupt_on_disk: int = 0

    def summary(self) -> str:
        text = (f"{self.downloaded} downloaded, {self.skipped} already present, {len(self.failures)} failed, "
                f"{self.without_url} items without URL")
        if self.corrupt_on_disk:
            text += f" ({self.corrupt_on_disk} files on disk did not decode and were fetched again)"
        return text


class _Retryable(Exception):
    pass


def image_file_name(token: str, url: str) -> str:
    """A safe file name for an item's image, different for different ``token`` (see the module doc)."""
    ext = os.path.splitext(urllib.request.urlparse(url).path)[1].lower()
    if ext not in _EXT:
        ext = ".jpg"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", token).lstrip(".")[:100]
    if safe != token:  # '@' never survives the replacement, so these names cannot meet unchanged ones
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        safe = f"{safe}@{digest}"
    return safe + ext


def _verify(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()


def _decodes(path: Path) -> bool:
    try:
        _verify(path.read_bytes())
    except Exception:  # Pillow raises several types for bad bytes
        return False
    return True


class _Deadline:
    """Shuts down the sockets of one attempt when its time is up.

    urllib (like requests, urllib3 and httpx) applies its timeout to each socket operation, so a
    server that sends a byte every few seconds is never timed out; shutting the socket down from a
    timer thread wakes the blocked read at once.
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)
        return sock

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain call, also for an SSL socket
        except OSError:
            pass

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


class _Watched:
    """An ``http.client`` connection whose sockets a :class:`_Deadline` can shut down."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = lambda *a, **kw: deadline.watch(socket.create_connection(*a, **kw))

    def connect(self):
        super().connect()
        self._deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's opener for http/https only (no ftp/file/data, also not through a redirect)."""

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(lambda *a, **kw: _HTTPConnection(*a, deadline=deadline, **kw), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(lambda *a, **kw: _HTTPSConnection(*a, deadline=deadline, **kw), req,
                                context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), HTTPHandler(),
                    HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    deadline = _Deadline(timeout)
    timed_out = _Retryable(f"timed out after {timeout:g} s")
    try:
        with _opener(deadline).open(req, timeout=timeout) as resp:
            data = resp.read(max_bytes + 1)
            missing = resp.length if len(data) <= max_bytes else None  # bytes of Content-Length not received
    except urllib.error.HTTPError as e:
        msg = f"HTTP {e.code} {e.reason}"
        if e.code in (408, 429) or e.code >= 500:
            raise _Retryable(msg) from None
        raise RuntimeError(msg) from None
    except (socket.timeout, TimeoutError):
        raise timed_out from None
    except urllib.error.URLError as e:
        if deadline.expired or isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise timed_out from None
        raise _Retryable(f"connection error: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        if deadline.expired:
            raise timed_out from None
        raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
    finally:
        deadline.cancel()
    if deadline.expired:  # the shut-down socket may have looked like the end of the body
        raise timed_out
    if len(data) > max_bytes:
        raise RuntimeError(f"larger than {max_bytes} bytes")
    if missing:
        raise _Retryable(f"connection error: closed after {len(data)} of {len(data) + missing} bytes")
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
    """Fetch ``url`` to ``dest``; return ``(ok, error, attempts)``. Retries ``retries`` times.

    ``timeout`` bounds each attempt in total (connect, headers and body), in seconds.
    """
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
                    max_bytes: int = MAX_BYTES, show_progress: bool = True) -> DownloadReport:
    """Download the images of ``dataset`` (a folder with ``<name>.items.jsonl``); see the module doc.
    ``show_progress``: a tqdm bar over the items."""
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
    remove_stale_temps(images)
    report = DownloadReport()
    jobs = []
    for rec in records:
        url = rec.get(url_field)
        if not url or not isinstance(url, str):
            report.without_url += 1
            continue
        fname = image_file_name(str(rec.get("item_id")), url)
        jobs.append((rec, url, images / fname, fname))

    def work(job):
        rec, url, dest, fname = job
        if dest.is_file():
            if _decodes(dest):
                return job, "present", None
            present = "corrupt"
            dest.unlink(missing_ok=True)  # never served again, even if the new download fails
        else:
            present = None
        return job, present, download_one(url, dest, timeout=timeout, retries=retries, backoff=backoff,
                                          max_bytes=max_bytes)

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (rec, url, dest, fname), present, result in tqdm(pool.map(work, jobs), total=len(jobs), desc="images",
                                                             unit="img", ncols=100, disable=not show_progress):
            if present == "present":
                report.skipped += 1
                rec["image"] = f"images/{fname}"
                continue
            report.corrupt_on_disk += present == "corrupt"
            ok, err, attempts = result
            if ok:
                report.downloaded += 1
                rec["image"] = f"images/{fname}"
            else:
                rec.pop("image", None)
                report.failures.append(Failure(str(rec.get("item_id")), url, err, attempts))
    write_jsonl(side, records)
    write_json(folder / f"{name}.images_report.json",
               {"downloaded": report.downloaded, "skipped": report.skipped, "without_url": report.without_url,
                "corrupt_on_disk": report.corrupt_on_disk,
                "failed": len(report.failures), "failures": [asdict(f) for f in report.failures]})
    return report
