"""``marble serve-reward``: any installed reward plugin behind the HTTP protocol of
:mod:`marble_kit.remote` (FastAPI on uvicorn; the ``serve`` extra).

One reward per server. Requests are scored one at a time (a lock: reward models are not
assumed thread-safe), each as one call of the reward, which batches by its own ``batch_size``
exactly as in the training process. A reward that raises answers 500 with a one-line error
naming it; the server keeps serving. Bodies over ``max_request_bytes`` are refused (413) while
they are read, before they are parsed.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time)

import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata as importlib_metadata
from typing import Any

import torch

from marble_kit import registry
from marble_kit.errors import MarbleError
from marble_kit.remote import ProtocolError, encode_scores, parse_score_request
from marble_kit.reward_protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_PORT,
    ENCODINGS,
    HEALTH_ROUTE,
    INFO_ROUTE,
    PROTOCOL_VERSION,
    SCORE_ROUTE,
)
from marble_kit.rewards import Reward

REMOTE_PREFIX = "remote:"  # the client family (marble_kit.remote), not something a server serves


def _import_server() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError as exc:
        raise MarbleError(f"marble serve-reward needs FastAPI and uvicorn ({exc}); "
                          "`pip install 'marble-kit[serve]'` in the reward's environment") from None
    return fastapi, uvicorn


def _version(distribution: str) -> str:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def reward_info(name: str, reward: Reward, info: registry.PluginInfo, max_batch: int,
                max_request_bytes: int) -> dict[str, Any]:
    """What ``GET /v1/info`` answers: the reward, who provides it, and the server's limits."""
    return {"protocol": PROTOCOL_VERSION, "reward": name, "provider": info.provider,
            "version": _version(info.provider), "module": info.module, "description": info.description,
            "marble_kit": _version(registry.BUILTIN_DISTRIBUTION), "batch_size": int(reward.batch_size),
            "device": str(reward.device), "max_batch": max_batch, "max_request_bytes": max_request_bytes,
            "encodings": list(ENCODINGS)}


def _authorized(header: str | None, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, value = (header or "").partition(" ")
    # constant-time: the comparison takes as long for a near miss as for a wild guess
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def create_app(name: str, reward: Reward, info: dict[str, Any], token: str | None = None,
               max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20),
               max_batch: int = DEFAULT_MAX_BATCH) -> Any:
    """The FastAPI application serving ``reward`` (named ``name``) over protocol v1."""
    fastapi, _ = _import_server()
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = fastapi.FastAPI(title=f"marble reward {name}", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    def error(status: int, message: str) -> Any:
        return JSONResponse({"protocol": PROTOCOL_VERSION, "error": message}, status_code=status)

    def refused() -> Any:
        return error(401, "missing or wrong token: send `Authorization: Bearer TOKEN` with the server's --token")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Any, exc: Any) -> Any:  # 404 / 405 in the protocol's shape
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get(HEALTH_ROUTE)
    def health() -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "status": "ok"}

    @app.get(INFO_ROUTE)
    def describe(request: fastapi.Request) -> Any:
        return info if _authorized(request.headers.get("authorization"), token) else refused()

    def score_locked(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        with lock:
            scores = reward(images, prompts)
            counters = getattr(reward, "metrics", None)
            metrics = {str(k): float(v) for k, v in counters.items()} if isinstance(counters, dict) else {}
        return scores, metrics

    @app.post(SCORE_ROUTE)
    async def score(request: fastapi.Request) -> Any:
        if not _authorized(request.headers.get("authorization"), token):
            return refused()
        too_large = error(413, f"request body over {max_request_bytes} bytes (the server's --max-request-mb); "
                               "send fewer images per request")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            return too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                return too_large
        try:
            images, prompts = parse_score_request(json.loads(body), max_batch)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not JSON ({exc})")
        except ProtocolError as exc:
            return error(400, f"malformed score request: {exc}")
        try:
            scores, metrics = await run_in_threadpool(score_locked, images, prompts)
            values = encode_scores(scores)
        except Exception as exc:  # the reward's failure, not the server's: answer and keep serving
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            return error(500, f"reward {name!r} raised {type(exc).__name__}: {text}")
        return {"protocol": PROTOCOL_VERSION, "reward": name, "scores": values, "metrics": metrics}

    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to loopback addresses only."""
    try:
        addresses = {item[4][0] for item in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a busy port is a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as exc:
        raise MarbleError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                          "(0 picks a free one) or --host") from None


def server_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_reward(name: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, token: str | None = None,
                 max_request_mb: float = DEFAULT_MAX_REQUEST_MB, max_batch: int = DEFAULT_MAX_BATCH,
                 device: str | None = None, log_level: str = "warning",
                 on_ready: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Check the options, listen on ``host:port``, build reward ``name`` (weights are checked
    now), call ``on_ready(url, info)``, then serve until SIGINT/SIGTERM. Every mistake that can
    be seen without the reward (port, log level, device, a busy port) is a one-line error before
    its weights are loaded."""
    _, uvicorn = _import_server()
    from uvicorn.config import LOG_LEVELS

    if max_request_mb <= 0 or max_batch < 1:
        raise MarbleError(f"--max-request-mb must be > 0 and --max-batch >= 1 (got {max_request_mb}, {max_batch})")
    if token is not None and not token.strip():
        raise MarbleError("--token is empty; pass a secret (or leave it out to serve without a token)")
    if not 0 <= port <= 65535:
        raise MarbleError(f"--port {port} is not a TCP port; pass one in 0–65535 (0 picks a free one)")
    if log_level.lower() not in LOG_LEVELS:
        raise MarbleError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if device is not None:
        _check_device(device)
    if name.startswith(REMOTE_PREFIX):
        served = name[len(REMOTE_PREFIX):]
        raise MarbleError(f"marble serve-reward serves an installed reward plugin, not a {name!r} client; "
                          f"run `marble serve-reward {served}` and train with --rewards {name}")
    plugin = registry.get_registry().get("reward", name)
    sock = listen(host, port)  # before the weights: a busy port is refused at once
    try:
        reward = registry.build("reward", name, options or {})
        if device is not None:
            reward.to(device)
        limit = int(max_request_mb * 2**20)
        info = reward_info(name, reward, plugin, max_batch, limit)
        app = create_app(name, reward, info, token=token, max_request_bytes=limit, max_batch=max_batch)
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, lifespan="off")
        if on_ready is not None:
            on_ready(server_url(sock), info)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _check_device(device: str) -> None:
    """A torch device this machine has, or a one-line error (a server on a missing GPU would
    start, then fail every request)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise MarbleError(f"--device {device!r} is not a torch device; pass e.g. cpu or cuda:0") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MarbleError(f"--device {device}: no CUDA GPU is visible on this machine; pass --device cpu "
                          "or serve from a GPU machine")


@contextlib.contextmanager
def serving_in_thread(name: str, reward: Reward, token: str | None = None, host: str = "127.0.0.1",
                      max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
                      max_batch: int = DEFAULT_MAX_BATCH) -> Iterator[str]:
    """Serve an already built ``reward`` from a thread of this process on a free port; yields
    the URL (for tests and notebooks: the same application `marble serve-reward` runs)."""
    _, uvicorn = _import_server()
    plugin = registry.get_registry().get("reward", name)
    limit = int(max_request_mb * 2**20)
    app = create_app(name, reward, reward_info(name, reward, plugin, max_batch, limit), token=token,
                     max_request_bytes=limit, max_batch=max_batch)
    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="marble-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise MarbleError(f"the reward server thread for {name!r} did not start")
        yield server_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
