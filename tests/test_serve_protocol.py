"""The reward-service protocol (marble_kit.remote) and the server application (marble_kit.serve)
in process: lossless and quantized image encodings, NaN as null, the server's refusals (token,
size, malformed), a reward that raises answered with an error naming it while the server keeps
serving, and the registry's `remote:NAME` family and its options from the CLI and from TOML."""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.options import parse_plugin_options
from marble_kit.prompts import Prompt
from marble_kit.registry import get_registry
from marble_kit.remote import (
    ProtocolError,
    decode_images,
    decode_scores,
    encode_images,
    encode_scores,
    parse_score_request,
    score_request,
)
from marble_kit.rewards import Reward
from marble_kit.run import run_fingerprint
from marble_kit.serve import _authorized, create_app, is_loopback


@settings(max_examples=25)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_float32_images_travel_bitwise_and_uint8_png_as_8_bit_pixels(batch, height, width, seed):
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    images[0, 0, 0, 0] = 1.0  # the ends of the range
    assert torch.equal(decode_images(encode_images(images, "float32")), images)
    quantized = (images * 255).round() / 255
    assert torch.equal(decode_images(encode_images(images, "uint8")), quantized)
    assert torch.equal(decode_images(encode_images(images, "png")), quantized)


def test_scores_travel_bitwise_with_nan_as_null():
    scores = torch.tensor([0.1, float("nan"), -3.25e-7, 1 / 3], dtype=torch.float32)
    encoded = encode_scores(scores)
    assert encoded[1] is None
    decoded = decode_scores(encoded, 4)
    assert torch.equal(decoded.isnan(), scores.isnan()) and torch.equal(decoded.nan_to_num(), scores.nan_to_num())
    with pytest.raises(ProtocolError, match="score 0 is inf"):
        encode_scores(torch.tensor([math.inf]))


@pytest.mark.parametrize(("images", "message"), [
    ({"encoding": "float32", "shape": [1, 3, 2, 2], "data": "AAAA"}, "holds 3 bytes, shape [1, 3, 2, 2] needs 48"),
    ({"encoding": "float32", "shape": [1, 4, 2, 2], "data": ""}, "must be [B, 3, H, W]"),
    ({"encoding": "uint8", "shape": [1, 2, 2], "data": ""}, '"images.shape" must be a list of 4'),
    ({"encoding": "png", "data": ["bm90IGEgcG5n"]}, '"images.data"[0] is not a PNG/JPEG file'),
    ({"encoding": "jpeg2000", "data": ""}, "'jpeg2000' is unknown"),
    ({"encoding": "uint8", "shape": [1, 1, 1, 3], "data": "@@@"}, "is not valid base64"),
])
def test_malformed_images_are_named(images, message):
    with pytest.raises(ProtocolError) as raised:
        decode_images(images)
    assert message in str(raised.value)


def test_prompt_metadata_travels_with_the_prompts():
    prompts = [Prompt("a dog", {"tag": "single_object"}), "plain"]
    body = score_request(torch.zeros(2, 3, 1, 1), prompts)
    assert body["metadata"] == [{"tag": "single_object"}, None]
    images, received = parse_score_request(body, max_batch=8)
    assert received == ["a dog", "plain"] and received[0].metadata == {"tag": "single_object"}
    assert not hasattr(received[1], "metadata") and images.shape == (2, 3, 1, 1)
    with pytest.raises(ProtocolError, match="2 images in one request; this server takes at most 1"):
        parse_score_request(body, max_batch=1)


class Mood(Reward):
    """Brightness, but raises on a prompt that says 'explode'; counts its calls in ``metrics``."""

    name = "mood"

    def __init__(self):
        self.calls = 0

    @property
    def metrics(self):
        return {"calls": float(self.calls)}

    def score(self, images, prompts):
        self.calls += 1
        if "explode" in prompts:
            raise ValueError("asked to explode")
        return images.mean(dim=(1, 2, 3))


@pytest.fixture
def client():
    app = create_app("mood", Mood(), {"protocol": 1, "reward": "mood"}, token="right", max_request_bytes=4096,
                     max_batch=4)
    return TestClient(app)


def auth(token="right"):
    return {"Authorization": f"Bearer {token}"}


def test_the_server_scores_and_survives_a_reward_that_raises(client):
    body = score_request(torch.full((2, 3, 2, 2), 0.25), ["calm", "calm"])
    reply = client.post("/v1/score", json=body, headers=auth())
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"protocol": 1, "reward": "mood", "scores": [0.25, 0.25], "metrics": {"calls": 1.0}}
    broken = client.post("/v1/score", json=score_request(torch.zeros(1, 3, 2, 2), ["explode"]), headers=auth())
    assert broken.status_code == 500
    assert broken.json() == {"protocol": 1, "error": "reward 'mood' raised ValueError: asked to explode"}
    assert client.post("/v1/score", json=body, headers=auth()).status_code == 200  # still serving


def test_the_server_refuses_wrong_tokens_large_and_malformed_requests(client):
    body = score_request(torch.zeros(1, 3, 2, 2), ["calm"])
    assert client.get("/health").json() == {"protocol": 1, "status": "ok"}  # no token needed
    for headers in ({}, auth("wrong"), {"Authorization": "Basic right"}):
        assert client.get("/v1/info", headers=headers).status_code == 401
        refused = client.post("/v1/score", json=body, headers=headers)
        assert refused.status_code == 401 and "missing or wrong token" in refused.json()["error"]
    assert client.get("/v1/info", headers=auth()).json()["reward"] == "mood"
    large = client.post("/v1/score", json=score_request(torch.zeros(4, 3, 16, 16), ["calm"] * 4), headers=auth())
    assert large.status_code == 413 and "over 4096 bytes" in large.json()["error"]
    garbage = client.post("/v1/score", content=b"{not json", headers=auth())
    assert garbage.status_code == 400 and "not JSON" in garbage.json()["error"]
    old = client.post("/v1/score", json={**body, "protocol": 0}, headers=auth())
    assert old.status_code == 400 and "this server speaks protocol 1" in old.json()["error"]
    assert client.get("/v2/score", headers=auth()).json()["error"] == "GET /v2/score: Not Found"


def test_the_token_comparison_needs_the_bearer_scheme_and_the_exact_token():
    assert _authorized(None, None) and _authorized("Bearer x", None)
    assert _authorized("Bearer abc", "abc") and _authorized("bearer abc", "abc")
    assert not _authorized("Bearer abcd", "abc") and not _authorized("abc", "abc") and not _authorized(None, "abc")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_remote_names_resolve_through_their_family_with_options_from_cli_and_toml(tmp_path):
    registry = get_registry()
    info = registry.get("reward", "remote:ocr")
    assert info.name == "remote:ocr" and info.provider == "marble-kit" and info.factory.args == ("ocr",)
    with pytest.raises(MarbleError, match="names no member of 'remote:\\*'; write remote:NAME"):
        registry.get("reward", "remote:")
    with pytest.raises(MarbleError, match="has no option 'uri'; valid options: backoff, batch_size, encoding"):
        from marble_kit.registry import build

        build("reward", "remote:ocr", {"uri": "http://127.0.0.1:1"})
    assert parse_plugin_options(["remote:ocr.url=http://127.0.0.1:8765", "remote:ocr.timeout=5"], "--reward-opt") \
        == {"remote:ocr": {"url": "http://127.0.0.1:8765", "timeout": 5}}
    path = tmp_path / "run.toml"
    path.write_text('rewards = ["color", "remote:ocr"]\n[reward_options."remote:ocr"]\nurl = "http://127.0.0.1:1"\n'
                    'on_error = "nan"\n')
    config = TrainConfig.from_toml(path)
    assert config.reward_options == {"remote:ocr": {"url": "http://127.0.0.1:1", "on_error": "nan"}}
    assert TrainConfig.from_dict(__import__("tomllib").loads(config.to_toml())).reward_options == config.reward_options
    moved = config.replace(reward_options={"remote:ocr": {"url": "http://10.0.0.2:9", "on_error": "nan"}})
    assert run_fingerprint(moved) == run_fingerprint(config)  # a moved server is the same run
    assert run_fingerprint(config.replace(reward_options={"remote:ocr": {"url": "x", "on_error": "raise"}})) \
        != run_fingerprint(config)
