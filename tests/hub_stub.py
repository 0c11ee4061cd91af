"""A small local HTTP server that stands in for the Hugging Face Hub API in tests.

The real Hub cannot be reached from the test machines, yet the push/download code paths should be
tested with the REAL `huggingface_hub` client, not with mocks of it. This module answers the
requests that huggingface_hub 2.4 and diffusers 0.42 actually send (see docs in
/work/shared/facts.md, "A local stand-in for the Hub API"), from an in-memory store:

- `POST /api/repos/create` (409 when the repo exists), `POST /api/models/{repo}/branch/{branch}`
- `POST /api/models/{repo}/preupload/{rev}` (every file "regular": content goes inline, no LFS/xet)
- `POST /api/models/{repo}/commit/{rev}` (NDJSON; file contents base64)
- `GET /api/models/{repo}[/revision/{rev}]`, `/tree/{rev}[/path]`, `/refs`, `/commits/{rev}`
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with `X-Repo-Commit`, `ETag`, `Content-Length`)
- `GET /api/whoami-v2`, `POST /api/validate-yaml` (sent before uploading a README.md)

Errors carry the headers huggingface_hub's `hf_raise_for_status` reads (`X-Error-Code`:
`RepoNotFound` / `RevisionNotFound` / `EntryNotFound`, `X-Error-Message`) and a JSON
`{"error": ...}` body, so the client raises its usual exception types.

Auth, like the Hub: a request carrying a token other than `stub.token` gets 401; a private repo
is visible only with the valid token (401 + `RepoNotFound` otherwise); with
`require_token_for_writes=True` a write without a token gets 401 as well.

Failure injection: `stub.fail(r"/commit/", status=503, times=2)` makes the next 2 matching
requests fail. Note that huggingface_hub retries 408/429/5xx with backoff (1 s, 2 s, 4 s, ...)
on some endpoints (preupload, downloads) but not others (repo creation, commits): inject on a
non-retried path, or `times=1`, to keep tests fast.

Every request is recorded in `stub.requests` (method, path, query, headers including the
Authorization value, body size, status), so tests can count commits or check that a token was
sent. State: `stub.repo_files(repo_id, revision)`, `stub.commits(repo_id, branch)`,
`stub.private(repo_id)`.

Use as a context manager (`with HubStub() as stub:`) or through the `hub_stub` fixture in
conftest.py, which also points the in-process huggingface_hub at the stub
(`point_huggingface_hub_at`). For a subprocess, pass `stub.client_env(hf_home)` as its
environment additions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_stubTokenForTests0123456789"
DEFAULT_USER = "user"

# Path segments that follow a repo id in `/api/models/...` URLs (so "ns/name" vs "name" can be told apart).
_API_ACTIONS = {"preupload", "commit", "revision", "tree", "refs", "branch", "commits", "paths-info", "resolve"}


@dataclass
class RecordedRequest:
    """One request as the stub saw it (headers keep the Authorization value on purpose)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body_size: int
    status: int = 0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Commit:
    """A commit: the full file set after it (repos here are tiny, so full snapshots are fine)."""

    oid: str
    title: str
    message: str
    parent: str | None
    files: dict[str, bytes]
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))


@dataclass
class _Repo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    branches: dict[str, list[str]] = field(default_factory=dict)  # branch -> commit oids, oldest first
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit


@dataclass
class _Failure:
    pattern: re.Pattern
    status: int
    remaining: int | None  # None: fail forever
    method: str | None
    message: str


class HttpError(Exception):
    """Raised inside the handler to answer an error; becomes a JSON `{"error": ...}` response."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra  # more fields for the JSON body


def _sha1(data: bytes) -> str:
    # Git blob id, like the Hub's `oid` for regular files.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStub:
    """An in-memory Hub API on 127.0.0.1 with a free port. See the module docstring."""

    def __init__(self, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER, require_token_for_writes: bool = False):
        self.token = token
        self.user = user
        self.require_token_for_writes = require_token_for_writes
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self._connections: set[socket.socket] = set()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "HubStub":
        handler = type("_BoundHandler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True  # idle keep-alive connections must not block shutdown
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-stub", daemon=True)  # short poll: quick stop()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Also end open keep-alive connections: otherwise a pooled client connection would still
        # be answered by its handler thread after the stub "stopped".
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the stub first"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The value for HF_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    url = endpoint

    def client_env(self, hf_home: str | None = None, token: str | None = None) -> dict[str, str]:
        """Environment variables that point a fresh Python process (huggingface_hub, diffusers) here."""
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if hf_home is not None:
            env["HF_HOME"] = str(hf_home)
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ----------------------------------------------------------------- test controls
    def fail(self, path_pattern: str, status: int = 500, times: int | None = 1, method: str | None = None,
             message: str | None = None) -> None:
        """Make the next `times` requests whose path matches `path_pattern` (re.search) answer `status`.

        `times=None` fails every matching request until `clear_failures()`. `method` limits it to one
        HTTP method ("POST", "HEAD", ...).
        """
        default = {401: "Invalid credentials in Authorization header", 403: "You don't have the rights to do this",
                   500: "Internal Error - We're working hard to fix this as soon as possible!",
                   503: "Service Unavailable"}.get(status, f"Injected error {status}")
        with self._lock:
            self._failures.append(_Failure(re.compile(path_pattern), status, times, method and method.upper(),
                                           message or default))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def add_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> None:
        """Create a repo directly (no HTTP), optionally with a first commit of `files`."""
        with self._lock:
            self._create(repo_id, private)
            if files:
                self._commit(self._repos[repo_id], "main", "Add files", "", dict(files), [])

    # ----------------------------------------------------------------- inspection
    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of a branch, oldest first (the first is the repo's empty "initial commit")."""
        with self._lock:
            repo = self._repos[repo_id]
            return [repo.commits[oid] for oid in repo.branches[branch]]

    def branches(self, repo_id: str) -> list[str]:
        with self._lock:
            return sorted(self._repos[repo_id].branches)

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> bytes at a branch or commit."""
        with self._lock:
            return dict(self._resolve(self._repos[repo_id], revision).files)

    def requests_matching(self, method: str | None = None, path_pattern: str = "") -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method.upper()) and re.search(path_pattern, r.path)]

    # ----------------------------------------------------------------- store helpers (hold the lock)
    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"{time.time_ns()}-{self._counter}".encode()).hexdigest()

    def _create(self, repo_id: str, private: bool, repo_type: str = "model") -> _Repo:
        repo = _Repo(repo_id, private, repo_type)
        initial = Commit(self._new_oid(), "initial commit", "", None, {})
        repo.commits[initial.oid] = initial
        repo.branches["main"] = [initial.oid]
        self._repos[repo_id] = repo
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> Commit:
        revision = unquote(revision)
        revision = revision.removeprefix("refs/heads/")
        if revision in repo.branches:
            return repo.commits[repo.branches[revision][-1]]
        if revision in repo.commits:
            return repo.commits[revision]
        raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: _Repo, branch: str, title: str, message: str, added: dict[str, bytes],
                deleted: list[str]) -> Commit:
        parent = repo.commits[repo.branches[branch][-1]]
        files = dict(parent.files)
        for path in deleted:
            if path.endswith("/"):  # deletedFolder
                files = {p: b for p, b in files.items() if not p.startswith(path)}
            else:
                files.pop(path, None)
        files.update(added)
        commit = Commit(self._new_oid(), title, message, parent.oid, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch].append(commit.oid)
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the stub. `stub` is set on a per-server subclass."""

    stub: HubStub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer sets Content-Length
    timeout = 30  # an idle keep-alive connection ends its thread after this

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.stub._lock:
            self.stub._connections.add(self.connection)

    def finish(self) -> None:
        with self.stub._lock:
            self.stub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the stub was stopped under this connection
            pass

    # Every method goes through the same router.
    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ----------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HttpError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._json(err.status, {"error": err.message, **err.extra}, headers)

    def _handle(self) -> None:
        stub = self.stub
        body = self._read_body()
        split = urlsplit(self.path)
        path = split.path
        record = RecordedRequest(self.command, path, parse_qs(split.query),
                                 {k.lower(): v for k, v in self.headers.items()}, len(body))
        self._status = 0
        with stub._lock:
            stub.requests.append(record)
        try:
            self._injected_failure(path)
            with stub._lock:
                self._route(path, parse_qs(split.query), body)
        except HttpError as err:
            self._error(err)
        except Exception as err:  # a bug in the stub: say so loudly rather than hang the client
            self._error(HttpError(500, f"hub stub crashed: {type(err).__name__}: {err}"))
            raise
        finally:
            record.status = self._status

    def _injected_failure(self, path: str) -> None:
        stub = self.stub
        with stub._lock:
            for failure in stub._failures:
                if failure.method not in (None, self.command) or not failure.pattern.search(path):
                    continue
                if failure.remaining is not None:
                    if failure.remaining <= 0:
                        continue
                    failure.remaining -= 1
                raise HttpError(failure.status, failure.message)

    # ----------------------------------------------------------------- auth
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token != self.stub.token:
            # The Hub rejects any request that carries a wrong token, even for public content.
            raise HttpError(401, "Invalid credentials in Authorization header")
        return token

    def _check_write(self) -> None:
        if self._token() is None and self.stub.require_token_for_writes:
            raise HttpError(401, "You must be authenticated to access this resource.")

    def _repo(self, repo_id: str) -> _Repo:
        repo = self.stub._repos.get(repo_id)
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if repo.private and self._token() is None:
            # Like the Hub: a private repo looks missing (401 + RepoNotFound) without a valid token.
            raise HttpError(401, "Repository not found", "RepoNotFound")
        return repo

    # ----------------------------------------------------------------- routes
    def _route(self, path: str, query: dict, body: bytes) -> None:
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(body)
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(body)
        match = re.fullmatch(r"/api/(models|datasets|spaces)/(.+)", path)
        if match:
            parts = [unquote(p) for p in match.group(2).split("/")]
            n = 2 if len(parts) >= 2 and parts[1] not in _API_ACTIONS else 1
            repo_id, action, rest = "/".join(parts[:n]), parts[n:n + 1], parts[n + 1:]
            action = action[0] if action else None
            return self._api(method, repo_id, action, rest, query, body)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if "resolve" in parts[1:3] and method in ("GET", "HEAD"):
            i = parts.index("resolve")
            if len(parts) >= i + 3:
                return self._resolve_file("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:]))
        raise HttpError(404, f"Not handled by the hub stub: {method} {path}")

    def _whoami(self) -> None:
        if self._token() is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        self._json(200, {
            "type": "user", "id": "0" * 24, "name": self.stub.user, "fullname": "Stub User",
            "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
            "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "stub", "role": "write"}},
        })

    def _validate_yaml(self, body: bytes) -> None:
        # upload_folder sends README.md here first; check that the front matter, if any, is YAML.
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        if match:
            try:
                import yaml

                yaml.safe_load(match.group(1))
            except ImportError:
                pass
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> None:
        self._check_write()
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org or self.stub.user}/{name}"
        # huggingface_hub 2.4 sends `visibility`; older clients send `private`.
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.stub.endpoint}/{repo_id}"
        if repo_id in self.stub._repos:
            # The Hub's 409 carries the url: `create_repo(exist_ok=True)` reads it.
            raise HttpError(409, "You already created this model repo", url=url)
        self.stub._create(repo_id, private, payload.get("type") or "model")
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, method: str, repo_id: str, action: str | None, rest: list[str], query: dict,
             body: bytes) -> None:
        if action in ("preupload", "commit", "branch") and method == "POST":
            self._check_write()
        repo = self._repo(repo_id)
        if action is None and method == "GET":
            return self._info(repo, "main")
        if action == "revision" and method == "GET" and rest:
            return self._info(repo, "/".join(rest))
        if action == "tree" and method == "GET" and rest:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._tree(repo, rest[0], "/".join(rest[1:]), recursive)
        if action == "refs" and method == "GET":
            return self._json(200, {
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oids[-1]}
                             for b, oids in repo.branches.items()],
                "tags": [], "converts": [], "pullRequests": []})
        if action == "commits" and method == "GET" and rest:
            head = self.stub._resolve(repo, "/".join(rest))
            history = []
            while head is not None:
                history.append({"id": head.oid, "title": head.title, "message": head.message,
                                "date": head.date, "authors": [{"user": self.stub.user}]})
                head = repo.commits.get(head.parent) if head.parent else None
            return self._json(200, history)
        if action == "branch" and method == "POST" and rest:
            return self._create_branch(repo, "/".join(rest), body)
        if action == "preupload" and method == "POST" and rest:
            # Like the Hub, give the oid of files already there: the client then skips unchanged files
            # (and the whole commit when nothing changed).
            existing = self.stub._resolve(repo, "/".join(rest)).files
            files = json.loads(body).get("files", [])
            return self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": _sha1(existing[f["path"]]) if f["path"] in existing else None}
                for f in files]})
        if action == "commit" and method == "POST" and rest:
            return self._commit(repo, "/".join(rest), body, query)
        raise HttpError(404, f"Not handled by the hub stub: {method} {self.path}")

    def _info(self, repo: _Repo, revision: str) -> None:
        commit = self.stub._resolve(repo, revision)
        self._json(200, {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
            "disabled": False, "gated": False, "lastModified": commit.date, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _tree(self, repo: _Repo, revision: str, prefix: str, recursive: bool) -> None:
        commit = self.stub._resolve(repo, revision)
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        if prefix and prefix not in commit.files and not any(p.startswith(base) for p in commit.files):
            raise HttpError(404, f"Entry not found: {prefix}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            # Folders along the way are listed too, as the Hub does.
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": _sha1(folder.encode()), "size": 0,
                                                "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": _sha1(data), "size": len(data), "path": path}
        self._json(200, list(entries.values()))

    def _create_branch(self, repo: _Repo, branch: str, body: bytes) -> None:
        if branch in repo.branches:
            raise HttpError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = [self.stub._resolve(repo, start).oid]
        self._json(200, {})

    def _commit(self, repo: _Repo, revision: str, body: bytes, query: dict) -> None:
        branch = unquote(revision).removeprefix("refs/heads/")
        if branch not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if query.get("create_pr"):
            raise HttpError(400, "The hub stub does not support pull requests")
        header: dict = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted.append(value["path"].rstrip("/") + "/")
            else:  # lfsFile, copyFile, ...: never requested, since preupload answers "regular"
                raise HttpError(400, f"The hub stub does not support {key!r} operations")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch][-1]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.stub._commit(repo, branch, header.get("summary", ""), header.get("description", ""),
                                   added, deleted)
        self._json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.stub.endpoint}/{repo.repo_id}/commit/{commit.oid}"})

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self.stub._resolve(repo, revision)
        if path not in commit.files:
            raise HttpError(404, "Entry not found", "EntryNotFound")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{_sha1(data)}"', "Accept-Ranges": "bytes"}
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:  # resumed downloads
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


def point_huggingface_hub_at(stub: HubStub, monkeypatch, hf_home) -> None:
    """Point the huggingface_hub already imported in this process at `stub`, with an empty HF_HOME.

    huggingface_hub 2.4 reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, ... once, at import, into
    `huggingface_hub.constants`, and its module-level `api = HfApi()` (behind `create_repo`,
    `upload_folder`, ...) copies the endpoint when created. Setting the environment is therefore not
    enough in-process: patch those attributes too (monkeypatch undoes it all after the test). The
    environment is set as well, for subprocesses started by the test. Also unsets HF_TOKEN so that
    only tokens passed explicitly reach the stub.
    """
    import huggingface_hub.hf_api  # imported explicitly: the package loads submodules lazily
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    hf_home = str(hf_home)
    for key, value in stub.client_env(hf_home).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        "ENDPOINT": stub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": stub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": f"{hf_home}/hub",
        "HUGGINGFACE_HUB_CACHE": f"{hf_home}/hub",
        "HF_ASSETS_CACHE": f"{hf_home}/assets",
        "HF_TOKEN_PATH": f"{hf_home}/token",
        "HF_STORED_TOKENS_PATH": f"{hf_home}/stored_tokens",
        "HF_XET_CACHE": f"{hf_home}/xet",
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", stub.endpoint)
    # Pooled keep-alive connections from an earlier stub (maybe on the same port) must not be reused.
    close_session()
