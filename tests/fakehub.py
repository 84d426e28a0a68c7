"""A Hub-compatible HTTP server for tests: the real `huggingface_hub` client talks to it via HF_ENDPOINT.

Implements the endpoints /work/shared/HUB.md lists for huggingface_hub 2.4 (repos, preupload,
NDJSON commits with inline and git-LFS files, branches, tags, refs, commits, tree, resolve with
HEAD/GET/Range) over `loractl.remote.store.RepoStore`, the same on-disk model the `file://`
registry uses. Stdlib `http.server` only, on 127.0.0.1 with an ephemeral port.

Knobs for tests: `upload_mode` ("regular", or "lfs" for *.safetensors / *.bin), `tokens`
(token → user; an unknown token gets 401), `fail(...)` fault injection (an HTTP status, a
download cut mid-body, or same-size corrupted bytes), `requests` (every method and path seen).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from loractl.remote import errors as rerr
from loractl.remote.base import local_file
from loractl.remote.store import RepoStore

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


class HubError(Exception):
    """An error answer: status, optional `X-Error-Code`, message (also as JSON `error`)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Fault:
    """Answer matching requests with `status`, or damage a download ("cut", "corrupt"); `times` < 0: forever."""

    method: str
    pattern: re.Pattern[str]
    action: str
    status: int
    times: int
    code: str | None = None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})


class FakeHub:
    """The server plus its storage root and knobs (see the module docstring and `fail`)."""

    def __init__(self, root: Path, *, upload_mode: str = "regular") -> None:
        self.root = root
        self.upload_mode = upload_mode
        self.tokens = {"tok-alice": "alice", "tok-bob": "bob"}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of every ranged download: the resumes
        self.connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def store(self, repo_id: str) -> RepoStore:
        return RepoStore(self.root / repo_id)

    def fail(
        self,
        method: str,
        pattern: str,
        *,
        status: int = 500,
        action: str = "status",
        times: int = 1,
        code: str | None = None,
    ) -> None:
        """Inject a fault into the next `times` requests whose path matches `pattern`.

        Actions: "status" answers `status` (with `X-Error-Code: code`) without doing anything;
        "lost" does the work, then answers `status` (a response lost after a commit landed);
        "cut" sends half the body and drops the connection; "corrupt" flips the first byte.
        """
        with self._lock:
            self.faults.append(Fault(method, re.compile(pattern), action, status, times, code))

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: the registry is gone."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.method == method and f.times != 0 and f.pattern.search(path):
                    f.times -= 1
                    return f
        return None

    def is_lfs(self, path: str) -> bool:
        return self.upload_mode == "lfs" and path.endswith((".safetensors", ".bin"))


# -- routing --------------------------------------------------------------------------------------
Route = tuple[str, re.Pattern[str], Callable[..., Reply]]


def _routes() -> list[Route]:
    table = [
        ("GET", r"/api/whoami-v2", _whoami),
        ("POST", r"/api/repos/create", _create_repo),
        ("POST", r"/api/validate-yaml", lambda h, m: _json({"errors": [], "warnings": []})),
        ("GET", rf"/api/models/{REPO}", _repo_info),
        ("GET", rf"/api/models/{REPO}/revision/{REV}", _repo_info),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", _preupload),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", _commit),
        ("POST", rf"/api/models/{REPO}/branch/{REV}", _create_branch),
        ("POST", rf"/api/models/{REPO}/tag/{REV}", _create_tag),
        ("DELETE", rf"/api/models/{REPO}/tag/{REV}", _delete_tag),
        ("GET", rf"/api/models/{REPO}/refs", _refs),
        ("GET", rf"/api/models/{REPO}/commits/{REV}", _commits),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", _tree),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", _lfs_batch),
        ("PUT", rf"/_lfs/upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", _lfs_put),
        ("POST", rf"/_lfs/verify/{REPO}", _lfs_verify),
        ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", _resolve),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", _resolve),
    ]
    return [(m, re.compile(p), f) for m, p, f in table]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        fake = hub

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fake.connections.add(self.connection)

        def finish(self) -> None:
            self.fake.connections.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""  # drain first: keep-alive stays in sync
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            fault = self.fake.take_fault(method, url.path)
            try:
                if fault is not None and fault.action == "status":
                    raise HubError(fault.status, f"injected {fault.status}", fault.code)
                reply = self._route(method, url.path)
                if fault is not None and fault.action == "lost":
                    raise HubError(fault.status, f"injected {fault.status} after the work was done", fault.code)
            except HubError as e:
                headers = {"X-Error-Message": e.message, **e.headers}
                if e.code:
                    headers["X-Error-Code"] = e.code
                reply = _json({"error": e.message}, e.status, headers)
            self._send(method, reply, fault)

        def _route(self, method: str, path: str) -> Reply:
            for m, pattern, handler in _routes():
                match = pattern.fullmatch(path)
                if m == method and match:
                    return handler(self, {k: unquote(v) for k, v in match.groupdict().items() if v is not None})
            raise HubError(404, f"no route {method} {path}")

        def _send(self, method: str, reply: Reply, fault: Fault | None) -> None:
            body = reply.body
            if fault is not None and fault.action == "corrupt" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            self.send_response(reply.status)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method == "HEAD":
                return
            if fault is not None and fault.action == "cut":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        # helpers used by the endpoint functions
        def user(self) -> str | None:
            auth = self.headers.get("authorization", "")
            if not auth:
                return None
            user = self.fake.tokens.get(auth.removeprefix("Bearer ").strip())
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return user

        def repo(self, repo_id: str, *, write: bool = False) -> RepoStore:
            store, user = self.fake.store(repo_id), self.user()
            owner = repo_id.split("/")[0]
            if write and user is None:
                raise HubError(401, "You must be authenticated to write")
            if not store.exists() or (store.private and user != owner):
                status = 401 if user is None else 404
                raise HubError(status, "Repository Not Found", "RepoNotFound")
            if write and user != owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
            return store

        def json_body(self) -> Any:
            return json.loads(self.body or b"{}")

    return Handler


# -- endpoints ------------------------------------------------------------------------------------
def _mapped(call: Callable[[], Any]) -> Any:
    """Run a store operation, answering its errors the way the Hub does."""
    try:
        return call()
    except rerr.RevisionNotFoundError as e:
        raise HubError(404, e.message, "RevisionNotFound") from None
    except rerr.RepoNotFoundError as e:
        raise HubError(404, e.message, "RepoNotFound") from None
    except rerr.TagExistsError as e:
        raise HubError(409, e.message) from None
    except rerr.ConflictError:
        raise HubError(
            412, "The branch was updated since you opened this page. Please refresh and try again."
        ) from None
    except rerr.UnsafePathError as e:
        raise HubError(422, e.message) from None


def _whoami(h: Any, m: dict[str, str]) -> Reply:
    user = h.user()
    if user is None:
        raise HubError(401, "Invalid user token.")
    return _json({"name": user, "type": "user", "auth": {"type": "access_token"}})


def _create_repo(h: Any, m: dict[str, str]) -> Reply:
    doc, user = h.json_body(), h.user()
    repo_id = f"{doc.get('organization') or user}/{doc['name']}"
    url = {"url": f"{h.fake.endpoint}/{repo_id}"}
    if user is None:
        raise HubError(401, "You must be authenticated to create a repo")
    if repo_id.split("/")[0] != user:
        raise HubError(403, f"You don't have the rights to create a repo under {repo_id.split('/')[0]}")
    private = doc.get("private") is True or doc.get("visibility") == "private"
    if not h.fake.store(repo_id).create(private=private):
        return _json({"error": "You already created this model repo", **url}, 409)
    return _json(url)


def _repo_info(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"])
    sha = _mapped(lambda: store.resolve(m.get("rev", "main")))
    siblings = [{"rfilename": p} for p in sorted(store.files(sha))]
    info = store.info(sha)
    when = info.date.strftime("%Y-%m-%dT%H:%M:%S.000Z") if info.date else None
    return _json(
        {
            "id": m["repo"],
            "modelId": m["repo"],
            "sha": sha,
            "private": store.private,
            "siblings": siblings,
            "lastModified": when,
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }
    )


def _preupload(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    current = store.files(_mapped(lambda: store.resolve(m["rev"])))
    out = []
    for f in h.json_body()["files"]:
        lfs = h.fake.is_lfs(f["path"]) and f["size"] > 0
        entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
        if f["path"] in current:
            have = current[f["path"]]
            entry["oid"] = have.sha256 if lfs else have.git_oid
        out.append(entry)
    return _json({"files": out})


def _commit(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    header: dict[str, Any] = {}
    adds, deletes = [], []
    for line in h.body.decode().splitlines():
        item = json.loads(line)
        key, value = item["key"], item["value"]
        if key == "header":
            header = value
        elif key == "file":
            adds.append(local_file(value["path"], data=base64.b64decode(value["content"])))
        elif key == "lfsFile":
            blob = store.blob(value["oid"])
            if not blob.is_file():
                raise HubError(422, f"LFS object {value['oid']} was never uploaded")
            adds.append(local_file(value["path"], source=blob))
        elif key in ("deletedFile", "deletedFolder"):
            deletes.append(value["path"])
    title, message = header.get("summary", ""), header.get("description", "")
    sha = _mapped(lambda: store.commit(m["rev"], header.get("parentCommit"), adds, deletes, title, message))
    return _json({"commitUrl": f"{h.fake.endpoint}/{m['repo']}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})


def _create_branch(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    start = _mapped(lambda: store.resolve(h.json_body().get("startingPoint") or "main"))
    if m["rev"] in store.branches():
        raise HubError(409, f"Reference {m['rev']} already exists")
    _mapped(lambda: store.create_branch(m["rev"], start))
    return _json({})


def _create_tag(h: Any, m: dict[str, str]) -> Reply:
    store, doc = h.repo(m["repo"], write=True), h.json_body()
    target = _mapped(lambda: store.resolve(m["rev"]))
    _mapped(lambda: store.create_tag(doc["tag"], target))
    return _json({})


def _delete_tag(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    _mapped(lambda: store.delete_tag(unquote(m["rev"])))
    return _json({})


def _refs(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"])

    def refs(kind: str, names: dict[str, str]) -> list[dict[str, str]]:
        return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in names.items()]

    return _json({"branches": refs("heads", store.branches()), "tags": refs("tags", store.tags()), "converts": []})


def _commits(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"])
    head = _mapped(lambda: store.resolve(m["rev"]))
    return _json(
        [
            {
                "id": c.sha,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": "alice"}],
                "date": c.date.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if c.date else None,
            }
            for c in store.log(head)
        ]
    )


def _tree(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"])
    sha = _mapped(lambda: store.resolve(m["rev"]))
    prefix = m.get("path", "").strip("/")
    entries = [
        _tree_entry(h.fake, f) for p, f in sorted(store.files(sha).items()) if not prefix or p.startswith(prefix + "/")
    ]
    return _json(entries)


def _tree_entry(hub: FakeHub, f: Any) -> dict[str, Any]:
    if not hub.is_lfs(f.path):
        return {"type": "file", "path": f.path, "size": f.size, "oid": f.git_oid}
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {f.size}\n".encode()
    oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return {
        "type": "file",
        "path": f.path,
        "size": f.size,
        "oid": oid,
        "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)},
    }


def _lfs_batch(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    objects = []
    for obj in h.json_body()["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"]}
        if not store.blob(obj["oid"]).is_file():
            auth = {"Authorization": h.headers.get("authorization", "")}
            entry["actions"] = {
                "upload": {"href": f"{h.fake.endpoint}/_lfs/upload/{m['repo']}/{obj['oid']}"},
                "verify": {"href": f"{h.fake.endpoint}/_lfs/verify/{m['repo']}", "header": auth},
            }
        objects.append(entry)
    reply = _json({"transfer": "basic", "objects": objects})
    reply.headers["Content-Type"] = "application/vnd.git-lfs+json"
    return reply


def _lfs_put(h: Any, m: dict[str, str]) -> Reply:
    try:
        h.fake.store(m["repo"]).put_bytes(h.body, m["oid"])
    except ValueError:
        raise HubError(400, "uploaded bytes do not match the oid") from None
    return Reply(200)


def _lfs_verify(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"], write=True)
    if not store.blob(h.json_body()["oid"]).is_file():
        raise HubError(404, "object not found")
    return _json({})


def _resolve(h: Any, m: dict[str, str]) -> Reply:
    store = h.repo(m["repo"])
    sha = _mapped(lambda: store.resolve(m["rev"]))
    f = store.files(sha).get(m["path"])
    if f is None:
        raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
    data = store.blob(f.sha256).read_bytes()
    etag = f.sha256 if h.fake.is_lfs(f.path) else f.git_oid
    headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
    if h.fake.is_lfs(f.path):
        headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(f.size)})
    start = _range_start(h.headers.get("Range"))
    if start and h.command == "GET":
        h.fake.ranges.append((m["path"], start))
    if start:
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return Reply(206, data[start:], headers)
    return Reply(200, data, headers)


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else 0


# -- pytest fixtures ------------------------------------------------------------------------------
@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail the test if anything tries to connect beyond 127.0.0.1 (the Hub, a CDN, telemetry)."""
    escapes: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            escapes.append(address)
            raise OSError(f"test tried to leave loopback: {address}")
        return real_connect(sock, address)

    real_getaddrinfo = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "::1", "localhost", None):
            escapes.append(host)
            raise OSError(f"test tried to resolve a non-loopback name: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield escapes
    assert not escapes, f"requests left loopback: {escapes}"


def start_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upload_mode: str) -> FakeHub:
    """A fresh fake Hub with the client pointed at it and isolated (stop it with `.stop()`).

    huggingface_hub reads its environment at import, so the constants are patched instead:
    endpoint, cache, token file, telemetry off, offline off, Xet off in "lfs" mode.
    """
    from huggingface_hub import constants

    from loractl.remote import retry

    server = FakeHub(tmp_path / "hub-storage", upload_mode=upload_mode)
    template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": template,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_TOKEN_PATH": str(tmp_path / "no-token"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": upload_mode == "lfs",
    }.items():
        monkeypatch.setattr(constants, name, value)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setattr(retry, "DELAYS", (0.0, 0.0, 0.0))
    return server


@pytest.fixture(params=["regular", "lfs"])
def hub(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[Any]
) -> Iterator[FakeHub]:
    """A fresh fake Hub per test, in both upload modes (regular; git-LFS with Xet disabled)."""
    server = start_hub(tmp_path, monkeypatch, request.param)
    yield server
    server.stop()


@dataclass
class Registry:
    """One registry under test, hiding whether it is the fake Hub or a file:// directory."""

    kind: str
    root: Path
    hub: FakeHub | None = None

    def uri(self, repo_id: str, rev: str | None = None) -> str:
        suffix = f"@{quote(rev, safe='')}" if rev else ""
        return f"hf://{repo_id}{suffix}" if self.hub else f"file://{self.root}/{repo_id}{suffix}"

    @property
    def auth(self) -> dict[str, Any]:
        """Keyword arguments for push/pull/versions: the Hub needs a token and the server's endpoint."""
        return {"token": "tok-alice", "endpoint": self.hub.endpoint} if self.hub else {}

    def store(self, repo_id: str) -> RepoStore:
        return self.hub.store(repo_id) if self.hub else RepoStore(self.root / repo_id)


@pytest.fixture(params=["file", "hf-regular", "hf-lfs"])
def registry(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[Any]
) -> Iterator[Registry]:
    """Each registry kind in turn: one test suite, the same semantics."""
    if request.param == "file":
        yield Registry("file", tmp_path / "registry")
        return
    server = start_hub(tmp_path, monkeypatch, request.param.removeprefix("hf-"))
    yield Registry(request.param, server.root, server)
    server.stop()
