"""A local stand-in for the Hugging Face Hub, for tests and benchmarks: a real HTTP server on 127.0.0.1.

It serves a folder of repositories ``root/org/name/<files>`` under the Hub's URL layout:

- ``GET /api/models/{org}/{name}`` and ``/api/models/{org}/{name}/revision/{rev}``: model
  info as ``huggingface_hub.HfApi.model_info`` expects (``sha``, ``siblings`` with
  ``size``/``blobId``/``lfs`` when ``blobs=true``).
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]``: the file listing.
- ``GET /api/models?author={org}``: the repositories of an owner (``HfApi.list_models``).
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: small files are answered directly;
  "LFS" files (weights) get a 302 to ``/_cdn/...`` like the Hub's CDN redirect, with
  ``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size`` and ``ETag`` headers.
- ``HEAD|GET /_cdn/{org}/{name}/{commit}/{path}``: the bytes, with ``Range`` support, served
  on a second port (``cdn_endpoint``): another origin, like the Hub's CDN.

Revisions: ``main`` and the repo's commit hash (a sha1 of its file list and sizes).
Gated repos answer 401 unless the request carries ``Authorization: Bearer <token>``.

Faults are injected with :meth:`HubServer.add_fault`: a rule matches a path substring
and fires ``times`` times (``None`` = always), after letting ``after`` matching requests through.  Kinds: ``drop`` (close the connection
without answering), ``slow`` (sleep ``seconds`` before answering), ``drip`` (send the
body slowly), ``404``, ``401``, ``500``, ``429`` (with ``Retry-After: seconds``), ``truncate``
(send half the promised body, then close), ``norange`` (ignore ``Range`` and answer 200 with
the whole file), ``alter`` (a correct 206 whose body has one byte flipped), ``badrange``
(a 206 whose ``Content-Range`` names a span one byte later than the one sent).

LFS files carry their real SHA-256 (``lfs.sha256`` in the model info, ``X-Linked-Etag``),
computed once per file version; files over ``hash_limit`` bytes (e.g. sparse multi-GB
test files) are listed without one, as if the Hub had none.

Stats: ``connections`` (TCP connections accepted), ``requests`` (list of
``(method, path, range)``), ``bytes_sent`` (body bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@dataclass
class Fault:
    match: str
    kind: str
    times: int | None = 1
    seconds: float = 0.0
    method: str | None = None
    #: Matching requests let through untouched before the fault starts firing.
    after: int = 0

    def take(self, method: str, path: str) -> bool:
        if self.match not in path or (self.method and self.method != method):
            return False
        if self.after > 0:
            self.after -= 1
            return False
        if self.times is None:
            return True
        if self.times > 0:
            self.times -= 1
            return True
        return False


def _fake_blob_sha(path: Path) -> str:
    """A stable stand-in for the git blob id (hashing gigabytes would slow tests down)."""
    st = path.stat()
    return hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:  # clients hang up on purpose
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class HubServer:
    """Serve ``root`` on 127.0.0.1 (random port) in a background thread."""

    def __init__(self, root: str | os.PathLike[str], *, gated: dict[str, str] | None = None,
                 hash_limit: int = 256 << 20) -> None:
        self.root = Path(root)
        self.hash_limit = hash_limit
        self._sha256: dict[tuple[str, int, int], str] = {}
        self.gated = dict(gated or {})  # repo_id -> accepted token
        self.faults: list[Fault] = []
        self.connections = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        server = self

        class Handler(_Handler):
            hub = server

        # the API and /resolve/ on one port, the "CDN" on another (a different origin, as on
        # the Hub, so huggingface_hub stops at the redirect and reads the metadata from it)
        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.cdn_httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn_endpoint = f"http://127.0.0.1:{self.cdn_httpd.server_address[1]}"
        self._threads = [threading.Thread(target=h.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True)
                         for h in (self.httpd, self.cdn_httpd)]

    # -- control -----------------------------------------------------------------
    def start(self) -> HubServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        for h in (self.httpd, self.cdn_httpd):
            h.shutdown()
            h.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_fault(self, match: str, kind: str, times: int | None = 1, seconds: float = 0.0,
                  method: str | None = None, after: int = 0) -> Fault:
        f = Fault(match, kind, times, seconds, method, after)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.bytes_sent = 0
            self.connections = 0

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.take(method, path):
                    return f
        return None

    # -- repo model ----------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path | None:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            return None
        d = self.root / repo_id
        return d if d.is_dir() else None

    def files(self, repo: Path) -> list[Path]:
        return sorted(p for p in repo.rglob("*") if p.is_file())

    def blob_sha(self, p: Path) -> str:
        return _fake_blob_sha(p)

    def lfs_sha256(self, p: Path) -> str | None:
        """The file's real SHA-256 (cached per version), or None above ``hash_limit``."""
        st = p.stat()
        if st.st_size > self.hash_limit:
            return None
        key = (str(p), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._sha256.get(key)
        if hit is None:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            hit = h.hexdigest()
            with self._lock:
                self._sha256[key] = hit
        return hit

    def commit(self, repo: Path) -> str:
        h = hashlib.sha1()
        for p in self.files(repo):
            h.update(f"{p.relative_to(repo).as_posix()}:{p.stat().st_size}\n".encode())
        return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.hub._lock:
            self.hub.connections += 1

    # -- helpers -------------------------------------------------------------------
    def _send_json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorised(self, repo_id: str) -> bool:
        token = self.hub.gated.get(repo_id)
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
        fault = self.hub.take_fault(self.command, path)
        if fault is not None:
            if fault.kind == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault.kind == "slow":
                time.sleep(fault.seconds)
            elif fault.kind in ("404", "401", "500", "429"):
                self.close_connection = False
                extra = {"Retry-After": f"{fault.seconds:g}"} if fault.kind == "429" else {}
                self._send_json(int(fault.kind), {"error": f"injected {fault.kind}"},
                                {"X-Error-Code": "Injected", "X-Error-Message": f"injected {fault.kind}", **extra})
                return
        try:
            self._route(path, parse_qs(parts.query), fault)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, path: str, query: dict[str, list[str]], fault: Fault | None) -> None:
        if path in ("/api/models", "/api/models/"):
            return self._list_models(query)
        m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._model_info(m.group(1), m.group(2) or "main", query)
        m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree(m.group(1), m.group(2), m.group(3) or "")
        m = re.fullmatch(r"/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3), fault)
        m = re.fullmatch(r"/_cdn/([\w.-]+/[\w.-]+)/([0-9a-f]{40})/(.+)", path)
        if m:
            return self._cdn(m.group(1), m.group(2), m.group(3), fault)
        self._error(404, "NotFound", f"no route for {path}")

    def _repo(self, repo_id: str, rev: str) -> tuple[Path, str] | None:
        repo = self.hub.repo_dir(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        if not self._authorised(repo_id):
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        commit = self.hub.commit(repo)
        if rev not in ("main", commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    def _sibling(self, repo: Path, p: Path, blobs: bool) -> dict[str, object]:
        rel = p.relative_to(repo).as_posix()
        out: dict[str, object] = {"rfilename": rel}
        if blobs:
            size = p.stat().st_size
            out["size"] = size
            out["blobId"] = self.hub.blob_sha(p)
            sha = self.hub.lfs_sha256(p) if rel.endswith(LFS_SUFFIXES) else None
            if sha is not None:
                out["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
        return out

    def _list_models(self, query: dict[str, list[str]]) -> None:
        """``GET /api/models?author=ORG[&limit=N]``: the (non-gated-filtered) repositories of an owner."""
        author = query.get("author", [None])[0]
        limit = int(query.get("limit", ["0"])[0] or 0)
        owners = [author] if author else sorted(p.name for p in self.hub.root.iterdir() if p.is_dir())
        out = []
        for owner in owners:
            d = self.hub.root / owner
            if not d.is_dir() or not re.fullmatch(r"[\w.-]+", owner):
                continue
            for repo in sorted(p for p in d.iterdir() if p.is_dir()):
                repo_id = f"{owner}/{repo.name}"
                out.append({"_id": self.hub.commit(repo)[:24], "id": repo_id, "modelId": repo_id, "author": owner,
                            "sha": self.hub.commit(repo), "private": False, "tags": [], "downloads": 0, "likes": 0})
        self._send_json(200, out[:limit] if limit else out)

    def _model_info(self, repo_id: str, rev: str, query: dict[str, list[str]]) -> None:
        got = self._repo(repo_id, rev)
        if got is None:
            return
        repo, commit = got
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        info = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": repo_id in self.hub.gated and "auto",
            "disabled": False,
            "tags": [],
            "siblings": [self._sibling(repo, p, blobs) for p in self.hub.files(repo)],
        }
        self._send_json(200, info)

    def _tree(self, repo_id: str, rev: str, sub: str) -> None:
        got = self._repo(repo_id, rev)
        if got is None:
            return
        repo, _ = got
        items = []
        for p in self.hub.files(repo):
            rel = p.relative_to(repo).as_posix()
            if sub and not rel.startswith(sub.rstrip("/") + "/"):
                continue
            item: dict[str, object] = {"type": "file", "oid": self.hub.blob_sha(p), "size": p.stat().st_size,
                                       "path": rel}
            sha = self.hub.lfs_sha256(p) if rel.endswith(LFS_SUFFIXES) else None
            if sha is not None:
                item["lfs"] = {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}
            items.append(item)
        self._send_json(200, items)

    def _resolve(self, repo_id: str, rev: str, rel: str, fault: Fault | None) -> None:
        got = self._repo(repo_id, rev)
        if got is None:
            return
        repo, commit = got
        p = (repo / rel).resolve()
        if not p.is_file() or repo.resolve() not in p.parents:
            self._error(404, "EntryNotFound", f"{rel} does not exist on {rev}")
            return
        size = p.stat().st_size
        etag = f'"{self.hub.blob_sha(p)}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes"}
        if rel.endswith(LFS_SUFFIXES):
            sha = self.hub.lfs_sha256(p)
            headers.update({
                "Location": f"{self.hub.cdn_endpoint}/_cdn/{repo_id}/{commit}/{rel}",
                "X-Linked-Size": str(size),
                "X-Linked-Etag": f'"{sha}"' if sha else etag,
                "Content-Length": "0",
            })
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send_file(p, headers, fault)

    def _cdn(self, repo_id: str, commit: str, rel: str, fault: Fault | None) -> None:
        repo = self.hub.repo_dir(repo_id)
        p = (repo / rel).resolve() if repo else None
        if repo is None or p is None or not p.is_file() or self.hub.commit(repo) != commit:
            self._error(404, "EntryNotFound", "no such object")
            return
        self._send_file(p, {"ETag": f'"{self.hub.blob_sha(p)}"', "Accept-Ranges": "bytes"}, fault)

    def _send_file(self, p: Path, headers: dict[str, str], fault: Fault | None) -> None:
        size = p.stat().st_size
        rng = None if fault is not None and fault.kind == "norange" else self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                self._error(416, "RangeNotSatisfiable", f"bad range {rng}")
                return
            start = int(m.group(1))
            end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            if start >= size or end < start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        if status == 206:
            shift = 1 if fault is not None and fault.kind == "badrange" else 0
            self.send_header("Content-Range", f"bytes {start + shift}-{end + shift}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        send = length
        if fault is not None and fault.kind == "truncate":
            send = length // 2
        with open(p, "rb") as f:
            f.seek(start)
            left = send
            first = True
            while left > 0:
                chunk = f.read(min(left, 1 << 16 if not (fault and fault.kind == "drip") else 64))
                if not chunk:
                    break
                if first and fault is not None and fault.kind == "alter" and status == 206:
                    chunk = bytes([chunk[0] ^ 0x55]) + chunk[1:]  # same length, headers correct
                first = False
                self.wfile.write(chunk)
                with self.hub._lock:
                    self.hub.bytes_sent += len(chunk)
                left -= len(chunk)
                if fault is not None and fault.kind == "drip":
                    self.wfile.flush()
                    time.sleep(fault.seconds)
        if send < length:
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
