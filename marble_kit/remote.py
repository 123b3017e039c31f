"""Rewards over HTTP: the JSON protocol (version 1) and the ``remote:NAME`` client.

A reward server (``marble serve-reward NAME``, :mod:`marble_kit.serve`) scores batches for one
reward; :class:`RemoteReward` is that reward seen from the trainer. The protocol (docs/reward-
services.md has it in full):

``GET /v1/info`` → ``{"protocol": 1, "reward": NAME, "provider": DIST, "version": VERSION,
"description": ..., "max_batch": N, "max_request_bytes": N, "encodings": [...]}``

``POST /v1/score`` with ``{"protocol": 1, "images": IMAGES, "prompts": [str, ...],
"metadata": [object | null, ...]}`` → ``{"protocol": 1, "reward": NAME, "scores": [number |
null, ...], "metrics": {KEY: number}}``. ``null`` is NaN (the reward does not judge that image;
JSON has no NaN); ``IMAGES`` is one of

* ``{"encoding": "float32", "shape": [B, 3, H, W], "data": BASE64}``: the exact tensor
  (little-endian float32, C order; lossless, the client's default);
* ``{"encoding": "uint8", "shape": [B, H, W, 3], "data": BASE64}``: round(255·x) pixels;
* ``{"encoding": "png", "data": [BASE64, ...]}``: one PNG file per image (all the same size).

An error is ``{"protocol": 1, "error": ONE LINE}`` with status 400 (malformed request), 401
(missing or wrong token), 413 (request too large), 500 (the reward raised) or 503. With a
token the server wants ``Authorization: Bearer TOKEN`` on every route but ``GET /health``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from marble_kit.errors import MarbleError
from marble_kit.prompts import prompt_metadata
from marble_kit.reward_protocol import (
    ENCODINGS,
    INFO_ROUTE,
    ON_ERROR,
    PROTOCOL_VERSION,
    RETRY_STATUS,
    SCORE_ROUTE,
    TOKEN_ENV,
)
from marble_kit.rewards import Reward

__all__ = ["ProtocolError", "RemoteReward", "decode_images", "decode_scores", "encode_images", "encode_scores",
           "parse_score_request", "score_request"]


class ProtocolError(ValueError):
    """A request or reply that does not follow the protocol (one line: what and where)."""


# ------------------------------------------------------------------------------ the protocol

def encode_images(images: torch.Tensor, encoding: str = "float32") -> dict[str, Any]:
    """``[B, 3, H, W]`` float images in [0, 1] as the ``images`` object of a score request."""
    images = images.detach().float().cpu().contiguous()
    if encoding == "float32":
        data = images.numpy().astype("<f4", copy=False).tobytes()
        return {"encoding": "float32", "shape": list(images.shape), "data": base64.b64encode(data).decode()}
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    if encoding == "uint8":
        return {"encoding": "uint8", "shape": list(pixels.shape), "data": base64.b64encode(pixels.tobytes()).decode()}
    if encoding == "png":
        from PIL import Image

        files = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            files.append(base64.b64encode(buffer.getvalue()).decode())
        return {"encoding": "png", "data": files}
    raise ProtocolError(f"unknown image encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ProtocolError(f"{what} is not valid base64") from None


def _shape(value: Any, rank: int, what: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) != rank
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)):
        raise ProtocolError(f"{what} must be a list of {rank} non-negative integers")
    return tuple(value)


def _check_size(data: bytes, expected: int, shape: tuple[int, ...]) -> None:
    if len(data) != expected:
        raise ProtocolError(f'"images.data" holds {len(data)} bytes, shape {list(shape)} needs {expected}')


def decode_images(payload: Any) -> torch.Tensor:
    """The ``images`` object of a score request as float32 ``[B, 3, H, W]`` in [0, 1]."""
    if not isinstance(payload, dict):
        raise ProtocolError('"images" must be an object with "encoding" and "data"')
    encoding = payload.get("encoding")
    if encoding == "float32":
        shape = _shape(payload.get("shape"), 4, '"images.shape"')
        if shape[1] != 3:
            raise ProtocolError(f'"images.shape" {list(shape)} must be [B, 3, H, W]')
        data = _b64(payload.get("data"), '"images.data"')
        _check_size(data, 4 * math.prod(shape), shape)
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape))
    if encoding == "uint8":
        shape = _shape(payload.get("shape"), 4, '"images.shape"')
        if shape[3] != 3:
            raise ProtocolError(f'"images.shape" {list(shape)} must be [B, H, W, 3]')
        data = _b64(payload.get("data"), '"images.data"')
        _check_size(data, math.prod(shape), shape)
        pixels = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(shape).copy())
        return pixels.permute(0, 3, 1, 2).float() / 255.0
    if encoding == "png":
        from PIL import Image, UnidentifiedImageError

        files = payload.get("data")
        if not isinstance(files, list):
            raise ProtocolError('"images.data" must be a list of base64 PNG files')
        arrays = []
        for index, text in enumerate(files):
            try:
                with Image.open(io.BytesIO(_b64(text, f'"images.data"[{index}]'))) as image:
                    arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError):
                raise ProtocolError(f'"images.data"[{index}] is not a PNG/JPEG file') from None
        if len({a.shape for a in arrays}) > 1:
            raise ProtocolError("the PNG images of one request differ in size; send one size per request")
        if not arrays:
            return torch.zeros(0, 3, 0, 0)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    raise ProtocolError(f'"images.encoding" {encoding!r} is unknown; use one of {", ".join(ENCODINGS)}')


def encode_scores(scores: torch.Tensor) -> list[float | None]:
    """float32 scores as JSON numbers, NaN as ``null`` (±inf is refused: JSON has neither)."""
    values = [float(v) for v in torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()]
    for index, value in enumerate(values):
        if math.isinf(value):
            raise ProtocolError(f"score {index} is {value}; a reward returns finite scores or NaN")
    return [None if math.isnan(v) else v for v in values]


def decode_scores(values: Any, count: int) -> torch.Tensor:
    """The ``scores`` of a reply as float32 ``[count]`` (``null`` → NaN); bitwise the floats sent."""
    if not isinstance(values, list) or len(values) != count:
        got = f"{len(values)} scores" if isinstance(values, list) else type(values).__name__
        raise ProtocolError(f'"scores" must be a list of {count} numbers or nulls, got {got}')
    for value in values:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ProtocolError(f'"scores" holds {value!r}, not a number or null')
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


def score_request(images: torch.Tensor, prompts: Sequence[str], encoding: str = "float32") -> dict[str, Any]:
    """The JSON body of ``POST /v1/score`` for one batch (prompt metadata included)."""
    metadata = [prompt_metadata(p) or None for p in prompts]
    body: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "images": encode_images(images, encoding),
                            "prompts": [str(p) for p in prompts]}
    if any(m is not None for m in metadata):
        body["metadata"] = metadata
    return body


def parse_score_request(body: Any, max_batch: int) -> tuple[torch.Tensor, list[str]]:
    """(images, prompts) of a score request; prompts with metadata become Prompt objects."""
    from marble_kit.prompts import Prompt

    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    if body.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f'"protocol" is {body.get("protocol")!r}; this server speaks protocol {PROTOCOL_VERSION}')
    images = decode_images(body.get("images"))
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError('"prompts" must be a list of strings')
    if len(prompts) != images.shape[0]:
        raise ProtocolError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if images.shape[0] > max_batch:
        raise ProtocolError(f"{images.shape[0]} images in one request; this server takes at most {max_batch}")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, list) or len(metadata) != len(prompts) or \
                not all(m is None or isinstance(m, dict) for m in metadata):
            raise ProtocolError('"metadata" must be a list of objects (or nulls), one per prompt')
        prompts = [Prompt(p, m) if m else p for p, m in zip(prompts, metadata)]
    return images, prompts


# ------------------------------------------------------------------------------ the client

class RemoteReward(Reward):
    """``remote:NAME``: the reward NAME scored by a reward server at ``url``.

    Built with a handshake (``GET /v1/info``): an unreachable server, a wrong token, another
    protocol or a server of another reward fail here, before training starts. Scoring sends
    the whole batch in one request where the server's limits allow (so the server's reward
    batches exactly as it would in process) and retries a failed request ``retries`` times
    after ``backoff``·2^i seconds. When it still fails: ``on_error="raise"`` stops the run with
    a one-line error naming the URL; ``on_error="nan"`` scores that batch NaN (not judged this
    step), warns, and counts the images in ``failures``. A wrong token, a refused request and a
    protocol mismatch always raise: retrying them cannot help.
    """

    batch_size = 0  # the whole batch to score(): it splits by the server's limits itself

    def __init__(self, reward: str, url: str, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 on_error: str = "raise", encoding: str = "float32", token: str | None = None,
                 token_env: str = TOKEN_ENV, batch_size: int = 0):
        import httpx

        self.reward, self.name = reward, f"remote:{reward}"
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise MarbleError(f"reward {self.name!r}: url {url!r} is not an http(s) URL; pass "
                              f"--reward-opt {self.name}.url=http://127.0.0.1:PORT")
        if on_error not in ON_ERROR:
            raise MarbleError(f"reward {self.name!r}: on_error={on_error!r}; use \"raise\" or \"nan\"")
        if encoding not in ENCODINGS:
            raise MarbleError(f"reward {self.name!r}: encoding={encoding!r}; use one of {', '.join(ENCODINGS)}")
        if not (timeout > 0 and retries >= 0 and backoff >= 0 and batch_size >= 0):
            raise MarbleError(f"reward {self.name!r}: timeout must be > 0 and retries, backoff, batch_size "
                              f">= 0 (got {timeout}, {retries}, {backoff}, {batch_size})")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), float(timeout), int(retries), backoff
        self.on_error, self.encoding, self.request_batch = on_error, encoding, int(batch_size)
        self.token_source = "token option" if token else f"${token_env}"
        token = token or os.environ.get(token_env) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout), trust_env=False)
        self._counters = {"failures": 0.0, "retries": 0.0}
        self.info = self._handshake()
        self.max_batch = int(self.info.get("max_batch") or 0) or None
        self.max_request_bytes = int(self.info.get("max_request_bytes") or 0) or None

    # -- HTTP ---------------------------------------------------------------------------
    def _fail(self, why: str, fix: str) -> MarbleError:
        return MarbleError(f"reward {self.name!r}: the server at {self.url} {why}; {fix}")

    def _request(self, method: str, route: str, body: bytes | None = None) -> Any:
        """The JSON reply of one request, retried on transport errors and busy servers."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._counters["retries"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.request(method, self.url + route, content=body,
                                               headers={"Content-Type": "application/json"} if body else None)
            except httpx.TimeoutException as exc:
                last = f"did not answer within {self.timeout:g} s ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"cannot be reached ({type(exc).__name__}: {str(exc)[:120]})"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"answered {response.status_code} ({_error_text(response)})"
                continue
            return self._reply(response)
        raise _Transient(f"{last} after {self.retries + 1} attempt(s)")

    def _reply(self, response: Any) -> Any:
        status = response.status_code
        if status in (401, 403):
            raise self._fail(f"refused the token ({status}: {_error_text(response)})",
                             f"set {self.token_source} to the token the server was started with (--token)")
        try:
            reply = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            reply = None
        if status >= 400:
            message = reply.get("error") if isinstance(reply, dict) else None
            why = f"answered {status}: {str(message or response.text)[:300]}"
            if status == 500:
                raise _Transient(why)  # the reward raised on the server: this batch only
            raise self._fail(why, "fix the request or the server's limits (`marble serve-reward --help`)")
        if not isinstance(reply, dict):
            raise _Transient(f"sent a malformed reply (not a JSON object: {response.text[:80]!r})")
        if reply.get("protocol") != PROTOCOL_VERSION:
            raise self._fail(f"speaks protocol {reply.get('protocol')!r}, this client {PROTOCOL_VERSION}",
                             "run the same marble-kit version on both sides")
        return reply

    def _handshake(self) -> dict[str, Any]:
        try:
            info = self._request("GET", INFO_ROUTE)
        except _Transient as exc:
            raise self._fail(str(exc), f"start it with `marble serve-reward {self.reward} --port PORT` or fix "
                                       f"--reward-opt {self.name}.url") from None
        if info.get("reward") != self.reward:
            raise self._fail(f"serves reward {info.get('reward')!r}, not {self.reward!r}",
                             f"use --rewards remote:{info.get('reward')} or point {self.name}.url at a "
                             f"server of {self.reward!r}")
        return info

    # -- scoring --------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._counters = {"failures": 0.0, "retries": 0.0}  # per call: one training step
        self._server_metrics: dict[str, float] = {}
        return super().__call__(images, prompts)

    @property
    def metrics(self) -> dict[str, float]:
        """Counters of the last call (``reward_<key>/remote:NAME``): the server reward's own
        (summed over requests), ``failures`` (images scored NaN because a request failed, plus
        the server's own failures) and ``retries``."""
        merged = dict(getattr(self, "_server_metrics", {}))
        merged["failures"] = merged.get("failures", 0.0) + self._counters["failures"]
        merged["retries"] = self._counters["retries"]
        return merged

    def _chunks(self, count: int, bytes_per_image: int) -> list[slice]:
        size = count
        for limit in (self.request_batch or None, self.max_batch):
            if limit:
                size = min(size, limit)
        if self.max_request_bytes:  # base64 (4/3) of the pixels, and room for prompts/metadata
            size = min(size, max(1, int(0.7 * self.max_request_bytes) // max(1, bytes_per_image * 4 // 3)))
        size = max(1, size)
        return [slice(i, min(i + size, count)) for i in range(0, count, size)]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        per_image = images[0].numel() * (4 if self.encoding == "float32" else 1) if len(images) else 0
        parts = [self._score_request(images[rows], list(prompts[rows]))
                 for rows in self._chunks(images.shape[0], per_image)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _score_request(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = json.dumps(score_request(images, prompts, self.encoding)).encode()
        try:
            reply = self._request("POST", SCORE_ROUTE, body)
            try:
                scores = decode_scores(reply.get("scores"), images.shape[0])
            except ProtocolError as exc:
                raise _Transient(f"sent a malformed reply ({exc})") from None
        except _Transient as exc:
            if self.on_error == "raise":
                raise self._fail(str(exc), f"check the server's log (or set --reward-opt {self.name}.on_error=nan "
                                           "to score such a batch NaN and go on)") from None
            self._counters["failures"] += images.shape[0]
            warnings.warn(f"reward {self.name!r}: the server at {self.url} {exc}; these {images.shape[0]} "
                          f"images score NaN (not judged this step; counted in reward_failures/{self.name})",
                          RuntimeWarning, stacklevel=2)
            return torch.full((images.shape[0],), math.nan)
        for key, value in (reply.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._server_metrics[str(key)] = self._server_metrics.get(str(key), 0.0) + float(value)
        return scores

    def close(self) -> None:
        self.client.close()


class _Transient(Exception):
    """A failure another try (or the next batch) may not have: unreachable, 5xx, malformed."""


def _error_text(response: Any) -> str:
    try:
        reply = response.json()
    except ValueError:
        return response.text[:200]
    return str(reply.get("error") if isinstance(reply, dict) else reply)[:200]
