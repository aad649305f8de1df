"""Image downloader against a local HTTP server: 404, time-out, corrupt bytes, transient 503, resume."""

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from recbole_mm.data.atomic import read_jsonl, write_jsonl
from recbole_mm.data.cli import main
from recbole_mm.data.images import download_images, download_one, image_file_name


def png(colour, size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


class Server:
    """Serves generated images; ``hits`` counts requests per path."""

    def __init__(self, sleep_s):
        self.hits = Counter()
        self.routes = {"/a.png": png("red"), "/b.jpg": jpeg("blue"),
                       "/corrupt.jpg": jpeg("green")[:40] + b"garbage" * 20}
        self.flaky_left = 2
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.path = self.path.split("?")[0]
                server.hits[self.path] += 1
                if self.path == "/slow.png":
                    time.sleep(sleep_s)
                    body = png("black")
                elif self.path == "/flaky.png" and server.flaky_left > 0:
                    server.flaky_left -= 1
                    self.send_error(503)
                    return
                elif self.path == "/flaky.png":
                    body = png("white")
                elif self.path in server.routes:
                    body = server.routes[self.path]
                else:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server(sleep_s=1.5) as s:
        yield s


def make_dataset(tmp_path, base):
    folder = tmp_path / "shop"
    folder.mkdir()
    recs = [
        {"item_id": "A", "title": "red", "imUrl": f"{base}/a.png"},
        {"item_id": "B/../x", "title": "blue", "imUrl": f"{base}/b.jpg?size=big"},
        {"item_id": "C", "imUrl": f"{base}/missing.jpg"},
        {"item_id": "D", "imUrl": f"{base}/slow.png"},
        {"item_id": "E", "imUrl": f"{base}/corrupt.jpg"},
        {"item_id": "F", "imUrl": f"{base}/flaky.png"},
        {"item_id": "G", "imUrl": "file:///etc/passwd"},
        {"item_id": "H", "title": "no url"},
    ]
    write_jsonl(folder / "shop.items.jsonl", recs)
    return folder


def test_download_failures_report_and_resume(tmp_path, server):
    folder = make_dataset(tmp_path, server.url)
    report = download_images(folder, workers=4, timeout=0.4, retries=2, backoff=0.01)
    assert (report.downloaded, report.skipped, report.without_url) == (3, 0, 1)
    failed = {f.item_id: f for f in report.failures}
    assert set(failed) == {"C", "D", "E", "G"}
    assert failed["C"].error.startswith("HTTP 404") and failed["C"].attempts == 1  # not retried
    assert "timed out" in failed["D"].error and failed["D"].attempts == 3
    assert "does not decode" in failed["E"].error and failed["E"].attempts == 3
    assert "scheme" in failed["G"].error and failed["G"].attempts == 0
    assert server.hits["/flaky.png"] == 3  # two 503s, then success

    images = folder / "images"
    assert sorted(p.name for p in images.iterdir()) == ["A.png", "B_.._x.jpg", "F.png"]  # no temp files
    with Image.open(images / "A.png") as im:
        assert im.size == (24, 16) and im.getpixel((0, 0)) == (255, 0, 0)
    side = {r["item_id"]: r for r in read_jsonl(folder / "shop.items.jsonl")}
    assert side["A"]["image"] == "images/A.png" and side["B/../x"]["image"] == "images/B_.._x.jpg"
    assert "image" not in side["C"] and side["H"] == {"item_id": "H", "title": "no url"}
    saved = json.loads((folder / "shop.images_report.json").read_text())
    assert saved["failed"] == 4 and {f["item_id"] for f in saved["failures"]} == {"C", "D", "E", "G"}

    # resume: finished files are not fetched again, failed ones are retried
    server.routes["/missing.jpg"] = png("yellow")
    before = server.hits.copy()
    report2 = download_images(folder, workers=2, timeout=0.4, retries=0, backoff=0.01)
    assert report2.skipped == 3 and report2.downloaded == 1
    assert server.hits["/a.png"] == before["/a.png"] and server.hits["/flaky.png"] == before["/flaky.png"]
    assert server.hits["/missing.jpg"] == before["/missing.jpg"] + 1
    assert {r["item_id"]: r.get("image") for r in read_jsonl(folder / "shop.items.jsonl")}["C"] == "images/C.jpg"


def test_interrupted_download_leaves_no_file(tmp_path, server, monkeypatch):
    import recbole_mm.data.images as images_mod

    def boom(data):
        raise KeyboardInterrupt

    dest = tmp_path / "x.png"
    monkeypatch.setattr(images_mod.os, "replace", lambda *a: boom(a))
    with pytest.raises(KeyboardInterrupt):
        download_one(f"{server.url}/a.png", dest, timeout=2, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_backoff_doubles(server, tmp_path):
    waits = []
    ok, err, attempts = download_one(f"{server.url}/corrupt.jpg", tmp_path / "c.jpg", timeout=2, retries=3,
                                     backoff=0.5, sleep=waits.append)
    assert not ok and attempts == 4 and waits == [0.5, 1.0, 2.0]


def test_cli_download(tmp_path, server, capsys):
    folder = make_dataset(tmp_path, server.url)
    assert main(["download-images", "--dataset", str(folder), "--timeout", "0.3", "--retries", "0",
                 "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 downloaded, 0 already present, 5 failed, 1 items without URL" in out  # flaky: no retry
    assert main(["download-images", "--dataset", str(tmp_path / "nothing")]) == 2
    assert "nothing.items.jsonl: side file not found" in capsys.readouterr().err


def test_file_names():
    assert image_file_name("B00X", "http://h/p/img.JPEG?x=1") == "B00X.jpeg"
    assert image_file_name("../etc", "http://h/p/noext") == "_etc.jpg"


def test_convert_download_then_item_store_serves_images(tmp_path, server, capsys):
    import gzip

    from recbole_mm.data.item_store import ItemStore

    reviews = tmp_path / "reviews_Toy_5.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        for u in range(5):
            for i, t in zip("AB" + "CDE", range(5)):
                f.write(json.dumps({"reviewerID": f"u{u}", "asin": i, "overall": 5.0, "unixReviewTime": t}) + "\n")
    meta = tmp_path / "meta_Toy.json.gz"
    with gzip.open(meta, "wt", encoding="utf-8") as f:
        f.write(repr({"asin": "A", "title": "Red", "imUrl": f"{server.url}/a.png"}) + "\n")
        f.write(repr({"asin": "B", "title": "Gone", "imUrl": f"{server.url}/missing.jpg"}) + "\n")
    out = tmp_path / "out"
    assert main(["convert-amazon", "--reviews", str(reviews), "--meta", str(meta), "--name", "toy",
                 "--out", str(out)]) == 0
    assert "| toy | 5 | 5 | 0 | 25 | 100.0000% |" in capsys.readouterr().out
    assert main(["download-images", "--dataset", str(out / "toy"), "--retries", "0"]) == 0
    assert "1 downloaded, 0 already present, 1 failed, 3 items without URL" in capsys.readouterr().out
    store = ItemStore(out / "toy", ["[PAD]", "A", "B", "C"])
    assert store.image(1).getpixel((5, 5)) == (255, 0, 0) and store.image(2) is None
    assert store.get(2, "title") == "Gone" and store.get(1, "imUrl").endswith("/a.png")
