"""Rewards as services, end to end: real `marble serve-reward` subprocesses on 127.0.0.1 (port 0:
the server picks a free port and prints its URL), `marble train` with `--rewards remote:…`.

* a remote reward trains bitwise like the in-process one (metrics equal but for wall-clock
  times and the client's own counters), through a server killed mid-run: the run stops with a
  one-line error naming the URL, checkpoints its last complete step, and resumes against a
  restarted server (on another port) to the same trajectory;
* on_error="nan": the batch the dead server could not score is NaN (not judged: λ = 0), with a
  warning and a counter, and the run finishes with an intact checkpoint;
* a wrong token and a malformed reply are refused with one-line errors.

Every run is tiny (3 prompts × 2 images, 1 timestep, 4 sampler steps, 1 thread). Three servers
boot in parallel once for the module (a few seconds each, mostly importing torch).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from cli_runs import marble, metric_lines

from marble_kit.checkpoint import list_checkpoints, load_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.registry import build
from marble_kit.trainer import Trainer, build_components

TOKEN = "s3cret-token"
TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=4", "--set", "threads=1", "--set", "sample_every=0", "--no-progress"]
IN_PROCESS = ["--rewards", "color,shape,centering"]
REMOTE = ["--rewards", "color,shape,remote:centering", "--reward-opt", "remote:centering.retries=1",
          "--reward-opt", "remote:centering.backoff=0.01"]
CLIENT_COUNTERS = ("reward_failures/remote:", "reward_retries/remote:")  # the remote client's own


class Server:
    """`marble serve-reward NAME --port 0` in a subprocess; ``url`` once it printed its line."""

    def __init__(self, name: str, *args: str, token: str | None = TOKEN):
        env = {**os.environ, "MARBLE_LOAD_PLUGINS": ""}
        env.pop("MARBLE_REWARD_TOKEN", None)
        if token is not None:
            env["MARBLE_REWARD_TOKEN"] = token
        self.process = subprocess.Popen(
            [sys.executable, "-m", "marble_cli.app", "serve-reward", name, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self._url: str | None = None

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    @property
    def url(self) -> str:
        while self._url is None:
            try:
                line = self.lines.get(timeout=120)
            except queue.Empty:
                raise AssertionError(f"no startup line from the server: {''.join(self.output)}") from None
            if " at http://" in line:
                self._url = line.split(" at ", 1)[1].split()[0]
        return self._url

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers():
    """Three servers of the `centering` world reward (token required), booting in parallel."""
    started = {name: Server("centering") for name in ("first", "second", "third")}
    yield started
    for server in started.values():
        server.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The 3-step run with the in-process `centering`."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = marble("train", "--out", run, "--steps", 3, *TINY, *IN_PROCESS, "--set", "checkpoint_every=0")
    assert result.exit_code == 0, result.output
    return metric_lines(run)


def as_in_process(row: dict) -> dict:
    """A remote run's metrics line under the in-process names, without clocks and client counters."""
    return {key.replace("remote:centering", "centering"): value for key, value in row.items()
            if not key.startswith(("time/", *CLIENT_COUNTERS))}


def without_clocks(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("time/")}


def kill_after_step(monkeypatch, server: Server, step: int) -> None:
    """Kill ``server`` right after the trainer finished ``step`` (deterministic, in-process run)."""
    original = Trainer.step

    def step_then_kill(trainer):
        metrics = original(trainer)
        if trainer.step_count == step:
            server.kill()
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_kill)


def test_the_server_names_its_reward_and_refuses_a_wrong_token(servers, reference, tmp_path, monkeypatch):
    """(`reference` trains while the servers boot.)"""
    server = servers["first"]
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    info = build("reward", "remote:centering", {"url": server.url, "token": TOKEN}).info
    assert (info["protocol"], info["reward"], info["provider"]) == (1, "centering", "marble-kit")
    assert info["version"] and info["max_batch"] >= 1 and "float32" in info["encodings"]
    monkeypatch.setenv("MARBLE_REWARD_TOKEN", "wrong")
    with pytest.raises(MarbleError, match=rf"the server at {server.url} refused the token \(401.*set "
                                          r"\$MARBLE_REWARD_TOKEN to the token"):
        build("reward", "remote:centering", {"url": server.url})
    result = marble("train", "--out", tmp_path / "run", "--steps", 1, *TINY, *REMOTE,
                    "--reward-opt", f"remote:centering.url={server.url}")
    assert result.exit_code == 2 and "refused the token" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "run").exists()


def test_a_remote_reward_trains_bitwise_like_the_in_process_one_across_a_server_kill(
        servers, reference, tmp_path, monkeypatch):
    first, second = servers["first"], servers["second"]
    monkeypatch.setenv("MARBLE_REWARD_TOKEN", TOKEN)
    run = tmp_path / "remote"
    kill_after_step(monkeypatch, first, 2)
    # checkpoint_every=0: only the end of the run would save; the failure saves step 2 instead
    result = marble("train", "--out", run, "--steps", 3, *TINY, *REMOTE, "--set", "checkpoint_every=0",
                    "--reward-opt", f"remote:centering.url={first.url}")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error: reward 'remote:centering': the server at "
                                                      f"{first.url} cannot be reached"), message
    assert "after 2 attempt(s)" in message and "stopped after step 2 (checkpoint saved)" in message, message
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert load_checkpoint(list_checkpoints(run)[0])[0]["step"] == 2  # complete, checksums verified
    assert len(metric_lines(run)) == 2

    monkeypatch.undo()  # the next server stays up
    monkeypatch.setenv("MARBLE_REWARD_TOKEN", TOKEN)
    resumed = marble("train", "--resume", run, "--steps", 3, "--no-progress",
                     "--reward-opt", f"remote:centering.url={second.url}")  # the server moved
    assert resumed.exit_code == 0, resumed.output
    rows = metric_lines(run)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["reward_failures/remote:centering"] == 0 for row in rows)
    assert [as_in_process(row) for row in rows] == [without_clocks(row) for row in reference]


def test_on_error_nan_scores_the_lost_batch_nan_and_counts_it(servers, tmp_path, monkeypatch):
    third = servers["third"]
    monkeypatch.setenv("MARBLE_REWARD_TOKEN", TOKEN)
    run = tmp_path / "nan"
    kill_after_step(monkeypatch, third, 1)
    result = marble("train", "--out", run, "--steps", 2, *TINY, *REMOTE, "--set", "checkpoint_every=0",
                    "--reward-opt", f"remote:centering.url={third.url}",
                    "--reward-opt", "remote:centering.on_error=nan")
    assert result.exit_code == 0, result.output
    assert f"warning: reward 'remote:centering': the server at {third.url} cannot be reached" in result.stderr
    first, second = metric_lines(run)
    assert first["reward_failures/remote:centering"] == 0 and first["active/remote:centering"] == 1.0
    assert second["reward_failures/remote:centering"] == 6  # 3 prompts × 2 images
    assert second["reward_retries/remote:centering"] == 1
    assert second["reward/remote:centering"] is None  # NaN: not judged this step
    assert second["active/remote:centering"] == 0.0 and second["lambda/remote:centering"] == 0.0
    assert second["judged_rows/remote:centering"] == 0.0
    assert all(value is not None for key, value in second.items() if key.startswith(("lambda/", "weight/")))
    meta, state = load_checkpoint(list_checkpoints(run)[-1])
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for v in state["policy"].values())


# ------------------------------------------------------------------ a server that breaks the protocol

class BrokenServer(BaseHTTPRequestHandler):
    """Answers the handshake correctly and every score request with ``reply`` (status, body)."""

    reply: tuple[int, bytes] = (200, b"")

    def do_GET(self):
        self._send(200, json.dumps({"protocol": 1, "reward": "probe", "max_batch": 64}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(*self.reply)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def broken_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BrokenServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(("status", "body", "message"), [
    (200, b"<html>oops</html>", "sent a malformed reply (not a JSON object"),
    (200, b'{"protocol": 1, "scores": [0.5]}', 'sent a malformed reply ("scores" must be a list of 2 numbers'),
    (200, b'{"protocol": 1, "scores": [0.5, "high"]}', "sent a malformed reply (\"scores\" holds 'high'"),
    (200, b'{"protocol": 7, "scores": [0.5, 0.5]}', "speaks protocol 7, this client 1"),
    (500, b'{"protocol": 1, "error": "reward \'probe\' raised ValueError: bad"}',
     "answered 500: reward 'probe' raised ValueError: bad"),
])
def test_a_malformed_reply_is_refused_in_one_line(broken_url, status, body, message):
    BrokenServer.reply = (status, body)
    reward = build("reward", "remote:probe", {"url": broken_url, "retries": 0})
    with pytest.raises(MarbleError) as raised:
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    text = str(raised.value)
    assert text.startswith(f"reward 'remote:probe': the server at {broken_url} ") and "\n" not in text
    assert message in text, text


def test_a_busy_server_is_retried_and_a_lost_batch_counted(broken_url):
    BrokenServer.reply = (503, b'{"protocol": 1, "error": "busy"}')
    reward = build("reward", "remote:probe", {"url": broken_url, "retries": 2, "backoff": 0.0, "on_error": "nan"})
    with pytest.warns(RuntimeWarning, match=r"answered 503 \(busy\) after 3 attempt\(s\); these 2 images score NaN"):
        scores = reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert torch.isnan(scores).all() and reward.metrics == {"failures": 2.0, "retries": 2.0}
    BrokenServer.reply = (200, b'{"protocol": 1, "scores": [0.25, null], "metrics": {"failures": 1}}')
    scores = reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert scores[0] == 0.25 and torch.isnan(scores[1])
    assert reward.metrics == {"failures": 1.0, "retries": 0.0}  # the server's own count, per call


def test_a_set_tagged_with_a_reward_is_judged_by_the_served_reward_as_in_process(tmp_path):
    """`--prompts colors:color+centering` with `--rewards remote:color,…`: the served color
    judges the colors set (and only it), so one step equals the in-process run's."""
    from marble_kit.evaluate import EvalPlan, eval_prompt_sets
    from marble_kit.serve import serving_in_thread

    settings = dict(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2, steps=1,
                    checkpoint_every=0, sample_every=0, out=str(tmp_path / "unused"),
                    prompts=["colors:color+centering", "shapes:shape+centering"],
                    eval_prompts=["world_eval:color"])
    in_process = TrainConfig(rewards=["color", "shape", "centering"], **settings)
    reference = Trainer(in_process, build_components(in_process)).step()
    with serving_in_thread("color", build("reward", "color", {})) as url:
        served = TrainConfig(rewards=["remote:color", "shape", "centering"],
                             reward_options={"remote:color": {"url": url}}, **settings)
        metrics = Trainer(served, build_components(served)).step()
        names = list(served.rewards)
        plan = EvalPlan.build(eval_prompt_sets(served), names, 1, 4, 0, 2)
    assert plan.mask.tolist() == [[True] * 4, [False] * 4, [False] * 4]  # world_eval is tagged color
    assert metrics["judged_rows/remote:color"] == reference["judged_rows/color"] > 0
    renamed = {key.replace("remote:color", "color"): value for key, value in metrics.items()
               if not key.startswith(("time/", *CLIENT_COUNTERS))}
    assert renamed == {key: value for key, value in reference.items() if not key.startswith("time/")}


SERVE_MISTAKES = [
    (["nosuch"], "unknown reward 'nosuch'"),
    (["remote:centering"], "serves an installed reward plugin"),
    (["centering", "--reward-opt", "centering.nosuch=1"], "has no option 'nosuch'"),
    (["centering", "--reward-opt", "clip.weights=x"], "this server serves 'centering'"),
    (["centering", "--port", "70000"], "--port 70000"),
    (["centering", "--log-level", "loud"], "--log-level 'loud'"),
    (["centering", "--device", "cdua"], "--device 'cdua'"),
    (["centering", "--max-batch", "0"], "--max-batch"),
]
if not torch.cuda.is_available():
    SERVE_MISTAKES.append((["centering", "--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("args, message", SERVE_MISTAKES)
def test_serve_reward_mistakes_are_one_line_errors_before_serving(args, message, monkeypatch):
    import uvicorn

    def no_serving(self, *args, **kwargs):
        raise AssertionError("the server started despite the mistake")

    monkeypatch.setattr(uvicorn.Server, "run", no_serving)
    result = marble("serve-reward", *args, "--port", "0") if "--port" not in args else marble("serve-reward", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_a_busy_port_is_refused_before_the_reward_is_built(monkeypatch):
    """The port is bound first: a mistyped --port does not wait for gigabytes of reward weights."""
    import socket

    import marble_kit.serve as serve

    def no_build(*args, **kwargs):
        raise AssertionError("the reward was built before the port was checked")

    with socket.create_server(("127.0.0.1", 0)) as busy:
        monkeypatch.setattr(serve.registry, "build", no_build)
        result = marble("serve-reward", "centering", "--port", busy.getsockname()[1])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.stderr, result.output
