"""The Amazon 2014 download path against a local HTTP server that injects failures per path."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.fetch import file_digest
from pipeline.data.cnn_features import RECORD
from pipeline.data.datasets import IMAGES_DIR, MANIFEST_FILE, DatasetInfo
from pipeline.data.download import DownloadConfig, DownloadError, download_dataset

ROOT = Path(__file__).resolve().parents[1]
INFO = DatasetInfo("tiny", "Tiny", synthetic=False)
REVIEWS = f"/files/{INFO.reviews_file}"
META = f"/files/{INFO.meta_file}"
FEATURES = f"/features/{INFO.image_features_file}"
GOOD = ["A1", "A2", "A3", "A4", "A5", "A6"]  # plain images, served at /img/<asin>.jpg


class Server:
    """Serves ``files``; ``script[path]`` is a list of per-request actions, then plain serving.

    Actions: an int status code, "drop" (full Content-Length, half the body, close),
    "truncgz" (half the gzip with a matching Content-Length), "block" (half the body, then
    wait for ``release``), ("redirect", target).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list] = {}
        self.counts: Counter[str] = Counter()
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.counts[self.path] += 1
                    todo = server.script.get(self.path)
                    action = todo.pop(0) if todo else None
                body = server.files.get(self.path)
                if isinstance(action, tuple):
                    self.send_response(301)
                    self.send_header("Location", action[1])
                    self.end_headers()
                elif isinstance(action, int) or body is None:
                    self.send_error(action or 404)
                elif action == "truncgz":
                    self._send(body[: len(body) // 2])
                elif action in ("drop", "block"):
                    self._send(body, len(body) // 2)
                    if action == "block":
                        server.blocked.set()
                        server.release.wait(10)
                else:
                    self._send(body)

            def _send(self, body: bytes, cut: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[:cut])
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * i % 256, 90, 200 - 10 * i)).save(buf, "JPEG")
    return buf.getvalue()


def _fixtures(server: Server) -> None:
    """Reviews for A1-A6 and B1-B6 (B = trouble), meta lines (Python literals) for them and C1."""
    img = {a: f"/img/{a}.jpg" for a in GOOD}
    img |= {
        "B1": "/img/dead.jpg",  # 404
        "B2": "/img/flaky.jpg",  # 500 then ok
        "B3": "/img/drop.jpg",  # connection dropped mid-body, then ok
        "B4": "/img/moved.jpg",  # 301 to /img/target.jpg
        "B5": "/img/broken.jpg",  # 503 forever: failed, not fatal
        "C1": "/img/C1.jpg",  # in meta but never reviewed: never requested
    }
    for i, path in enumerate(sorted(set(img.values()) | {"/img/target.jpg"})):
        server.files[path] = _jpeg(i)
    del server.files["/img/dead.jpg"], server.files["/img/moved.jpg"]
    reviewed = [*GOOD, "B1", "B2", "B3", "B4", "B5", "B6"]  # B6 has no imUrl
    reviews = "".join(
        json.dumps({"reviewerID": f"U{u}", "asin": a, "overall": 5.0, "reviewText": "x" * 50})
        + "\n"
        for u in range(3)
        for a in reviewed
    )
    meta = (
        "".join(
            repr({"asin": a, "title": f"item {a}", "imUrl": server.base + img[a]}) + "\n"
            for a in sorted(img)
        )
        + repr({"asin": "B6", "title": "no image"})
        + "\n"
    )
    server.files[REVIEWS] = gzip.compress(reviews.encode(), mtime=0)
    server.files[META] = gzip.compress(meta.encode(), mtime=0)
    server.files[FEATURES] = (bytes(range(256)) * 129)[: 2 * RECORD.itemsize]  # two records
    server.script.update(
        {
            REVIEWS: ["truncgz"],
            META: [429],
            "/img/flaky.jpg": [500],
            "/img/drop.jpg": ["drop"],
            "/img/moved.jpg": [("redirect", "/img/target.jpg")],
            "/img/broken.jpg": [503] * 10,
        }
    )


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests go straight to 127.0.0.1, never through a proxy named in the environment."""
    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)


@pytest.fixture()
def server():
    srv = Server()
    _fixtures(srv)
    yield srv
    srv.close()


def _cfg(server: Server, **kw) -> DownloadConfig:
    base = dict(
        reviews_url=server.base + "/files/",
        meta_url=server.base + "/files",  # no trailing slash: joined all the same
        image_features_url=server.base + "/features/",
        workers=4,
        retries=2,
        backoff=0.001,
        timeout=5.0,
    )
    return DownloadConfig(**(base | kw))


def _manifest(out: Path) -> dict[str, dict]:
    data = json.loads((out / MANIFEST_FILE).read_text())
    assert data["dataset"] == INFO.category
    return {e["url"]: e for e in data["files"]}


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".part") or ".tmp-" in p.name]


def _assert_complete(server: Server, out: Path) -> None:
    """Every ok file is byte-identical to the fixture and recorded with its size and sha256."""
    man = _manifest(out)
    expected = {
        REVIEWS: INFO.reviews_file,
        META: INFO.meta_file,
        FEATURES: INFO.image_features_file,
    }
    expected |= {f"/img/{a}.jpg": f"{IMAGES_DIR}/{a}.jpg" for a in GOOD}
    expected |= {
        f"/img/{n}.jpg": f"{IMAGES_DIR}/{a}.jpg" for n, a in [("flaky", "B2"), ("drop", "B3")]
    }
    for url_path, rel in expected.items():
        entry = man[server.base + url_path]
        assert entry["status"] == "ok" and entry["path"] == rel and entry["error"] is None
        assert (out / rel).read_bytes() == server.files[url_path]
        assert (entry["bytes"], entry["sha256"]) == file_digest(out / rel)
    moved = man[server.base + "/img/moved.jpg"]
    assert (out / moved["path"]).read_bytes() == server.files["/img/target.jpg"]
    dead, broken = man[server.base + "/img/dead.jpg"], man[server.base + "/img/broken.jpg"]
    assert dead["status"] == "dead" and dead["path"] is None and "404" in dead["error"]
    assert broken["status"] == "failed" and "503" in broken["error"]
    assert not (out / IMAGES_DIR / "B1.jpg").exists() and not (out / IMAGES_DIR / "B5.jpg").exists()
    assert len(man) == 3 + 11  # core files + reviewed items with an imUrl
    assert not _leftovers(out)


def test_download_retries_and_records_everything(server, tmp_path):
    out = tmp_path / "raw"
    summary = download_dataset(INFO, out, _cfg(server))
    _assert_complete(server, out)
    assert summary == {
        "ok": 12, "skipped": 0, "dead": 1, "failed": 1, "refused": 0, "images": 11,
        "no_image_url": 1,
        "bytes": sum(e["bytes"] or 0 for e in _manifest(out).values()),
    }  # fmt: skip
    c = server.counts
    assert (c[REVIEWS], c[META], c[FEATURES]) == (2, 2, 1)  # truncated gzip, 429: retried
    assert (c["/img/flaky.jpg"], c["/img/drop.jpg"], c["/img/moved.jpg"]) == (2, 2, 1)
    assert c["/img/dead.jpg"] == 1  # dead: never retried
    assert c["/img/broken.jpg"] == 3  # 1 + retries
    assert c["/img/C1.jpg"] == 0  # not reviewed


def test_rerun_fetches_only_what_is_missing(server, tmp_path):
    out = tmp_path / "raw"
    download_dataset(INFO, out, _cfg(server))
    before = server.counts.copy()
    (out / IMAGES_DIR / "A2.jpg").write_bytes(b"tampered")
    summary = download_dataset(INFO, out, _cfg(server))
    _assert_complete(server, out)
    new = server.counts - before
    assert new == Counter({"/img/A2.jpg": 1, "/img/broken.jpg": 3})  # changed, failed
    assert summary["skipped"] == 11 and summary["ok"] == 1 and summary["dead"] == 1
    download_dataset(INFO, out, _cfg(server, retry_dead=True))
    assert server.counts["/img/dead.jpg"] == 2


def test_fatal_when_reviews_are_dead(server, tmp_path):
    server.script[REVIEWS] = [404]
    url = server.base + REVIEWS
    with pytest.raises(DownloadError, match=f"could not download {url}: HTTP 404") as err:
        download_dataset(INFO, tmp_path / "raw", _cfg(server))
    assert "running the download again requests it again" in str(err.value)
    assert _manifest(tmp_path / "raw")[url]["status"] == "dead"
    assert server.counts[REVIEWS] == 1
    assert not any(p.startswith("/img/") for p in server.counts)


@pytest.mark.parametrize("path", [REVIEWS, META, FEATURES], ids=["reviews", "meta", "features"])
def test_dead_core_file_is_requested_again(server, tmp_path, path, caplog):
    """A 404 on reviews, metadata or image features is not remembered: once the file is back,
    the next run fetches it without retry_dead; dead images stay remembered, with a hint."""
    out = tmp_path / "raw"
    server.script[path] = [404]
    if path == FEATURES:
        download_dataset(INFO, out, _cfg(server))
    else:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_dataset(INFO, out, _cfg(server))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        download_dataset(INFO, out, _cfg(server))
    assert server.counts[path] == 2
    _assert_complete(server, out)
    assert server.counts["/img/dead.jpg"] == 1
    assert "set download.retry_dead: true" in caplog.text


def test_truncated_features_with_matching_length_are_not_ok(server, tmp_path):
    """A .b served cut mid-record with a Content-Length that matches what is sent is retried,
    then recorded failed (not ok) and not kept; a whole one on a later run is ok."""
    out = tmp_path / "raw"
    whole = server.files[FEATURES]
    server.files[FEATURES] = whole[: RECORD.itemsize + 100]
    summary = download_dataset(INFO, out, _cfg(server))
    entry = _manifest(out)[server.base + FEATURES]
    assert entry["status"] == "failed" and "whole number" in entry["error"]
    assert not (out / INFO.image_features_file).exists() and summary["failed"] == 2
    assert server.counts[FEATURES] == 3  # 1 + retries
    server.files[FEATURES] = whole
    download_dataset(INFO, out, _cfg(server))
    _assert_complete(server, out)


def test_fetched_image_that_does_not_decode_is_not_ok(server, tmp_path):
    """An image whose body arrives whole but does not decode is retried, then recorded failed."""
    out = tmp_path / "raw"
    server.files["/img/A6.jpg"] = server.files["/img/A6.jpg"][:100]
    download_dataset(INFO, out, _cfg(server))
    entry = _manifest(out)[server.base + "/img/A6.jpg"]
    assert entry["status"] == "failed" and "does not decode" in entry["error"]
    assert not (out / IMAGES_DIR / "A6.jpg").exists() and server.counts["/img/A6.jpg"] == 3


def _truncated_gzip(server: Server) -> bytes:
    return server.files[REVIEWS][: len(server.files[REVIEWS]) // 2]


@pytest.mark.parametrize(
    ("rel", "url_path", "bad"),
    [
        (INFO.image_features_file, FEATURES, lambda s: s.files[FEATURES][: RECORD.itemsize + 7]),
        (f"{IMAGES_DIR}/A2.jpg", "/img/A2.jpg", lambda s: s.files["/img/A2.jpg"][:100]),
        (f"{IMAGES_DIR}/A3.jpg", "/img/A3.jpg", lambda s: b"\xff\xd8" + b"x" * 98),
        (INFO.reviews_file, REVIEWS, _truncated_gzip),
    ],
    ids=["truncated-b", "100-byte-jpg", "garbage-jpg", "truncated-gz"],
)
def test_unmanifested_bad_file_is_not_adopted(server, tmp_path, rel, url_path, bad, caplog):
    """A file on disk with no manifest entry is verified first; a bad one is fetched again."""
    out = tmp_path / "raw"
    (out / rel).parent.mkdir(parents=True)
    (out / rel).write_bytes(bad(server))
    server.script.pop(url_path, None)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        download_dataset(INFO, out, _cfg(server))
    assert server.counts[url_path] == 1
    assert "found on disk is unusable" in caplog.text
    _assert_complete(server, out)


def test_fatal_when_metadata_keeps_failing(server, tmp_path):
    server.script[META] = [500] * 5
    with pytest.raises(DownloadError, match=f"{server.base + META}: HTTP 500"):
        download_dataset(INFO, tmp_path / "raw", _cfg(server))
    assert server.counts[META] == 3


def test_max_images_and_no_features(server, tmp_path):
    out = tmp_path / "raw"
    summary = download_dataset(INFO, out, _cfg(server, max_images=3, image_features=False))
    assert summary["images"] == 3
    assert sorted(p.name for p in (out / IMAGES_DIR).iterdir()) == ["A1.jpg", "A2.jpg", "A3.jpg"]
    assert server.counts[FEATURES] == 0 and not (out / INFO.image_features_file).exists()


def test_image_urls_from_the_data_are_http_only(server, tmp_path):
    """A file:// (or ftp://) imUrl in downloaded metadata is refused, counted and recorded, and
    no local file is copied; a server redirecting an image to file:// or ftp:// gets no request
    through either."""
    secret = tmp_path / "secret.txt"
    secret.write_text("local file: must never be copied")
    urls = {"A1": secret.as_uri(), "A2": "ftp://127.0.0.1/x.jpg", "A3": "FILE:///etc/hostname"}
    meta = gzip.decompress(server.files[META]).decode()
    for asin, url in urls.items():
        meta = meta.replace(server.base + f"/img/{asin}.jpg", url)
    server.files[META] = gzip.compress(meta.encode(), mtime=0)
    server.script["/img/A4.jpg"] = [("redirect", secret.as_uri())]
    server.script["/img/A5.jpg"] = [("redirect", "ftp://127.0.0.1/x.jpg")]
    out = tmp_path / "raw"
    summary = download_dataset(INFO, out, _cfg(server))
    assert summary["refused"] == 3 and summary["images"] == 11
    man = _manifest(out)
    for url in urls.values():
        assert man[url]["status"] == "refused" and man[url]["path"] is None
        assert "http or https only" in man[url]["error"]
    for asin in ("A1", "A2", "A3", "A4", "A5"):
        assert not (out / IMAGES_DIR / f"{asin}.jpg").exists()
    assert man[server.base + "/img/A4.jpg"]["status"] == "failed"
    assert "file:" in man[server.base + "/img/A4.jpg"]["error"]  # urllib's own refusal
    assert "redirect to 'ftp' refused" in man[server.base + "/img/A5.jpg"]["error"]
    assert all("secret" not in p.name for p in out.rglob("*"))
    assert (out / IMAGES_DIR / "A6.jpg").read_bytes() == server.files["/img/A6.jpg"]


def test_other_datasets_manifest_is_refused(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / MANIFEST_FILE).write_text(json.dumps({"dataset": "Baby", "files": []}))
    with pytest.raises(DownloadError, match="belongs to dataset 'Baby'"):
        download_dataset(INFO, out, _cfg(server))


def _wait_for(predicate, what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _paths_in_manifest(out: Path) -> set[str]:
    path = out / MANIFEST_FILE
    return {e["path"] for e in _manifest(out).values()} if path.exists() else set()


_CHILD = """
import sys
from pathlib import Path
from pipeline.data.datasets import DatasetInfo
from pipeline.data.download import DownloadConfig, download_dataset
base, out, every = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
cfg = DownloadConfig(base + "/files/", base + "/files/", base + "/features/", workers=1,
                     retries=2, backoff=0.001, timeout=20.0, manifest_every=every)
download_dataset(DatasetInfo("tiny", "Tiny", synthetic=False), out, cfg)
"""


@pytest.mark.parametrize("manifest_every", [1, 1000], ids=["manifest", "adopt-from-disk"])
def test_resume_after_kill(server, tmp_path, manifest_every, caplog):
    """Kill -9 a run while an image is half written; the re-run refetches only what is missing."""
    out = tmp_path / "raw"
    server.script["/img/A4.jpg"] = ["block"]  # images go in asin order with one worker
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(ROOT)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, server.base, str(out), str(manifest_every)], env=env
    )
    part = out / IMAGES_DIR / "A4.jpg.part"
    finished = {f"{IMAGES_DIR}/{a}.jpg" for a in ("A1", "A2", "A3")}
    try:
        assert server.blocked.wait(15), "the child never reached the blocking image"
        _wait_for(part.exists, "a half-written A4.jpg.part")
        if manifest_every == 1:  # the main thread records A3 just after A4 starts
            _wait_for(lambda: finished <= _paths_in_manifest(out), "A1-A3 in the manifest")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    server.release.set()
    first = server.counts.copy()
    assert manifest_every == 1 or not (out / MANIFEST_FILE).exists()
    (out / IMAGES_DIR / "Z9.jpg.part").write_bytes(b"left by a killed run")
    (out / f".{MANIFEST_FILE}.tmp-0badf00d").write_text("{")
    with caplog.at_level(logging.INFO, logger="pipeline.data.download"):
        download_dataset(INFO, out, _cfg(server))
    _assert_complete(server, out)
    adopted = "adopting" in caplog.text  # files unknown to the manifest are hashed and kept
    assert adopted == (manifest_every != 1)
    again = server.counts - first
    fetched = [REVIEWS, META, FEATURES, "/img/A1.jpg", "/img/A2.jpg", "/img/A3.jpg"]
    assert all(first[p] >= 1 and again[p] == 0 for p in fetched), (first, again)
    assert again["/img/A4.jpg"] == 1 and again["/img/A5.jpg"] == 1


def test_config_is_validated():
    with pytest.raises(ValueError, match="workers = 0"):
        DownloadConfig(workers=0)
    assert replace(DownloadConfig(), max_images=5).max_images == 5
