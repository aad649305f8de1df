"""Image downloader against a local HTTP server: 404, time-out, corrupt bytes, transient 503, resume."""

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from recbole_mm.files import read_jsonl, write_jsonl
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
    b_file = image_file_name("B/../x", "x.jpg")
    assert b_file.startswith("B_.._x@") and b_file.endswith(".jpg")
    assert sorted(p.name for p in images.iterdir()) == sorted(["A.png", b_file, "F.png"])  # no temp files
    with Image.open(images / "A.png") as im:
        assert im.size == (24, 16) and im.getpixel((0, 0)) == (255, 0, 0)
    side = {r["item_id"]: r for r in read_jsonl(folder / "shop.items.jsonl")}
    assert side["A"]["image"] == "images/A.png" and side["B/../x"]["image"] == f"images/{b_file}"
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


def test_file_names_are_injective():
    assert image_file_name("B00X", "http://h/p/img.JPEG?x=1") == "B00X.jpeg"
    etc = image_file_name("../etc", "http://h/p/noext")
    assert etc.startswith("_etc@") and etc.endswith(".jpg") and "/" not in etc
    # ids that sanitise alike get different files; unchanged ids keep their plain name
    names = {t: image_file_name(t, "http://h/x.png") for t in ["A:1", "A_1", "A 1", "A/1", ".A_1", "A_1@x"]}
    assert names["A_1"] == "A_1.png"
    assert len(set(names.values())) == len(names)
    assert all(n.startswith("A_1@") for t, n in names.items() if t not in ("A_1", "A_1@x"))
    long = image_file_name("x" * 5000, "http://h/x.png")
    assert len(long) < 150 and long != image_file_name("x" * 4999, "http://h/x.png")


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


def test_items_whose_ids_sanitise_alike_keep_their_own_pictures(tmp_path, server):
    folder = tmp_path / "shop"
    folder.mkdir()
    server.routes["/green.png"] = png("green")
    write_jsonl(folder / "shop.items.jsonl", [{"item_id": "A:1", "imUrl": f"{server.url}/a.png"},
                                              {"item_id": "A_1", "imUrl": f"{server.url}/green.png"}])
    report = download_images(folder, workers=2, timeout=2, retries=0)
    assert report.downloaded == 2 and not report.failures
    side = {r["item_id"]: r["image"] for r in read_jsonl(folder / "shop.items.jsonl")}
    assert side["A_1"] == "images/A_1.png" and side["A:1"] != side["A_1"]
    with Image.open(folder / side["A:1"]) as a, Image.open(folder / side["A_1"]) as b:
        assert a.getpixel((0, 0)) == (255, 0, 0) and b.getpixel((0, 0)) == (0, 128, 0)


def test_image_on_disk_is_decoded_before_it_is_trusted(tmp_path, server):
    folder = tmp_path / "shop"
    folder.mkdir()
    write_jsonl(folder / "shop.items.jsonl", [{"item_id": "A", "imUrl": f"{server.url}/a.png"},
                                              {"item_id": "B", "imUrl": f"{server.url}/missing.png"}])
    (folder / "images").mkdir()
    (folder / "images" / "A.png").write_bytes(png("red")[:30])  # truncated: a killed copy, a bad disk
    (folder / "images" / "B.png").write_bytes(b"not an image")
    # temporaries of a killed run: removed; other files stay
    (folder / "images" / ".A.png.k1ll3d_x.part").write_bytes(b"")
    (folder / "images" / "notes.part").write_bytes(b"mine")
    report = download_images(folder, workers=2, timeout=2, retries=0)
    assert (report.downloaded, report.skipped, report.corrupt_on_disk) == (1, 0, 2)
    assert server.hits["/a.png"] == 1
    with Image.open(folder / "images" / "A.png") as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    # B's corrupt file is gone (its download failed) and B has no image
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["A.png", "notes.part"]
    assert "image" not in {r["item_id"]: r for r in read_jsonl(folder / "shop.items.jsonl")}["B"]
    assert "2 files on disk did not decode" in report.summary()
    # a good file is now trusted: not fetched again
    assert download_images(folder, workers=1, timeout=2, retries=0).skipped == 1
    assert server.hits["/a.png"] == 1


class Trickle:
    """A raw HTTP server that sends its answer one byte every ``gap`` seconds (at most ``limit`` bytes)."""

    def __init__(self, gap=0.1, limit=100, headers_slow=False):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/x.png"
        body = png("red")
        head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.payload = head + body if headers_slow else None
        self.head, self.body, self.gap, self.limit = head, body, gap, limit
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.sock.accept()
        with conn:
            try:
                conn.recv(65536)
                data = self.payload if self.payload is not None else self.body
                if self.payload is None:
                    conn.sendall(self.head)
                for k in range(min(self.limit, len(data))):
                    conn.sendall(data[k:k + 1])
                    time.sleep(self.gap)
            except OSError:
                pass

    def close(self):
        self.sock.close()
        self.thread.join(timeout=15)


@pytest.mark.parametrize("headers_slow", [False, True])
def test_a_trickling_server_hits_the_total_deadline(tmp_path, headers_slow):
    # every byte comes well within the per-socket timeout, so only a total deadline stops it
    server = Trickle(gap=0.1, limit=100, headers_slow=headers_slow)
    try:
        start = time.monotonic()
        ok, err, attempts = download_one(server.url, tmp_path / "x.png", timeout=0.8, retries=0)
        took = time.monotonic() - start
    finally:
        server.close()
    assert not ok and "timed out after 0.8 s" in err and attempts == 1
    assert took < 3, took  # without the deadline: 100 bytes x 0.1 s = 10 s
    assert list(tmp_path.iterdir()) == []


def test_connection_closed_early_is_a_retryable_error(tmp_path):
    import socket

    sock = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(2):
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\nshort")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        ok, err, attempts = download_one(f"http://127.0.0.1:{sock.getsockname()[1]}/x.png", tmp_path / "x.png",
                                         timeout=2, retries=1, backoff=0.01)
    finally:
        t.join(timeout=5)
        sock.close()
    assert not ok and attempts == 2 and err == "connection error: closed after 5 of 1000 bytes"
