"""Fetch one URL to a file, robustly: retries with backoff, integrity checks, atomic rename.

Generic (knows nothing of Amazon); ``pipeline.data.download`` runs many of these in a thread pool.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 16
USER_AGENT = "lmmrec-download/0.1 (research dataset download)"
DEAD_CODES = frozenset({404, 410})  # the resource is gone: recorded, never retried
RETRY_CODES = frozenset({408, 429})  # plus every 5xx
MAX_RETRY_AFTER = 60.0  # seconds: the longest server-requested wait honoured


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only from http(s) to http(s): a server cannot send us to ftp:// or
    file:// (urllib's default handler follows ftp://)."""

    def redirect_request(
        self, req: urllib.request.Request, fp, code: int, msg: str, headers, newurl: str
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to {scheme!r} refused (http and https only)", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


@dataclass(frozen=True)
class Fetched:
    """The outcome of one fetch: ``status`` is "ok", "dead" (404/410) or "failed"."""

    status: str
    bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    attempts: int = 0


class Cancelled(Exception):
    """The caller's stop event was set while a fetch was in progress."""


class _Retryable(Exception):
    """A transient failure: the attempt is repeated after a backoff."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


class _Final(Exception):
    """A failure that no retry can fix."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def part_path(dest: Path) -> Path:
    """The temporary a download is written to before it takes its final name."""
    return dest.with_name(dest.name + ".part")


def file_digest(path: Path) -> tuple[int, str]:
    """Size in bytes and sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def gzip_error(path: Path) -> str | None:
    """Decompress a whole .gz file; return why it is truncated or corrupt, or None if intact."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(CHUNK * 16):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        return f"gzip integrity check failed ({exc})"
    return None


def _retry_after(exc: urllib.error.HTTPError) -> float:
    value = exc.headers.get("Retry-After", "") if exc.headers else ""
    try:
        return min(float(value), MAX_RETRY_AFTER)
    except ValueError:
        return 0.0


Check = Callable[[Path], str | None]  # why a downloaded file is unusable, or None


def gzip_check(part: Path) -> str | None:
    """``fetch``'s default check: a ``.gz`` download must decompress completely."""
    return gzip_error(part) if part.name.endswith(".gz.part") else None


def _attempt(
    url: str, part: Path, timeout: float, stop: threading.Event | None, check: Check | None
) -> tuple[int, str]:
    """One GET of ``url`` into ``part``; returns (bytes, sha256) or raises _Retryable/_Final."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            h = hashlib.sha256()
            size = 0
            with open(part, "wb") as fh:
                while chunk := resp.read(CHUNK):
                    if stop is not None and stop.is_set():
                        raise Cancelled(url)
                    fh.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in DEAD_CODES:
            raise _Final(f"HTTP {exc.code} {exc.reason}", "dead") from exc
        if exc.code in RETRY_CODES or exc.code >= 500:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}", _retry_after(exc)) from exc
        raise _Final(f"HTTP {exc.code} {exc.reason}", "failed") from exc
    except ValueError as exc:  # a malformed URL
        raise _Final(f"bad URL ({exc})", "failed") from exc
    except urllib.error.URLError as exc:  # a local mirror (file://) lacks the file: like a 404
        if not isinstance(exc.reason, FileNotFoundError):
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        raise _Final(f"no such file ({exc.reason})", "dead") from exc
    except (OSError, http.client.HTTPException) as exc:  # connection errors, timeouts
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
    if expected is not None and expected.isdigit() and size != int(expected):
        raise _Retryable(f"connection dropped: got {size} of {expected} bytes")
    if check is not None and (problem := check(part)):
        raise _Retryable(problem)
    return size, h.hexdigest()


def fetch(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 60.0,
    stop: threading.Event | None = None,
    check: Check | None = gzip_check,
) -> Fetched:
    """Download ``url`` to ``dest`` via ``dest.part``, retrying transient failures.

    Retries (up to ``retries`` times, waiting ``backoff * 2**k`` seconds) connection errors,
    timeouts, 408/429/5xx, a body shorter than its Content-Length, and a body that ``check``
    (given the downloaded file; by default ``gzip_check``: a .gz must decompress in full) finds
    unusable.
    404/410 give status "dead" at once. ``dest`` only ever holds a complete file.
    Raises ``Cancelled`` if ``stop`` is set.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    error = ""
    try:
        for attempt in range(retries + 1):
            if stop is not None and stop.is_set():
                raise Cancelled(url)
            try:
                size, digest = _attempt(url, part, timeout, stop, check)
            except _Final as exc:
                return Fetched(exc.status, error=str(exc), attempts=attempt + 1)
            except _Retryable as exc:
                error = str(exc)
                if attempt == retries:
                    break
                wait = max(backoff * 2**attempt, exc.wait)
                log.debug("%s: %s; retry %d/%d in %.2fs", url, error, attempt + 1, retries, wait)
                if stop is not None:
                    if stop.wait(wait):
                        raise Cancelled(url) from None
                else:
                    time.sleep(wait)
                continue
            os.replace(part, dest)
            return Fetched("ok", bytes=size, sha256=digest, attempts=attempt + 1)
        return Fetched("failed", error=error, attempts=retries + 1)
    finally:
        part.unlink(missing_ok=True)
