"""Multi-process training: 2 CPU processes (gloo, torchrun) against one process, and failures.

The same file is the worker the launches run (``python tests/test_distributed.py MODE ...``):
``cli`` runs ``marble train`` with a fault-injecting test reward and dumps each rank's metric
history and weights; ``collectives`` checks the Distributed reductions between real processes;
``hang`` has rank 1 never reach a collective, to prove the timeout.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from marble_kit.distributed import CollectiveError, Distributed, tensors_digest, timeout_from_environment
from marble_kit.errors import MarbleError
from marble_kit.rewards import Reward

THIS_FILE = Path(__file__).resolve()
PROBE = "probe"
FAIL_RANK_ENV = "MARBLE_TEST_FAIL_RANK"        # the probe raises on this rank
SIGINT_ENV = "MARBLE_TEST_SIGINT"              # "RANK:CALL": Ctrl-C on that rank at that call
DUMP_ENV = "MARBLE_TEST_DUMP_DIR"              # where each rank writes rank<R>.pt

# Tiny and quick, but every code path of the distributed step: NaN-aware rewards on two tagged
# prompt sets, groups split across ranks, the periodic Gram (affine solve on steps 1 and 3, one
# fused backward + gradient all-reduce on step 2), sample grids and checkpoints from rank 0.
SETTINGS = {
    "rewards": ["shape", "sharpness", PROBE],
    "prompts": [f"shapes:shape+sharpness+{PROBE}", f"colors:sharpness+{PROBE}"],
    "prompts_per_step": 4, "images_per_prompt": 2, "timesteps_per_image": 1, "sample_steps": 3,
    "threads": 1, "gram": "periodic", "gram_period": 2, "checkpoint_every": 1,
    "keep_checkpoints": 0, "sample_every": 2, "seed": 7,
    # Pinned optimisation settings (not the defaults): float32 reduction-order differences
    # between 2 processes and 1 grow with the step size; these keep 3 steps within 1e-3.
    "lr": 3e-3, "beta": 0.1, "kl": 1e-4,
}


class ProbeReward(Reward):
    """Mean luminance, with faults injected on one rank through environment variables."""

    name = PROBE

    def __init__(self) -> None:
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        rank = int(os.environ.get("RANK", "0"))
        if os.environ.get(FAIL_RANK_ENV) == str(rank):
            raise RuntimeError(f"probe failure injected on rank {rank}")
        if os.environ.get(SIGINT_ENV) == f"{rank}:{self.calls}":
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C reached this rank alone
        return images.mean(dim=(1, 2, 3))


def register_probe() -> None:
    from marble_kit.registry import PluginInfo, get_registry

    registry = get_registry()
    if PROBE not in registry.entries["reward"]:
        registry.add(PluginInfo("reward", PROBE, ProbeReward, "test reward with fault injection",
                                "tests", __name__))


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


# ======================================================================= worker side

def recording_trainer(captured: dict):
    """A Trainer subclass for marble_kit.run that keeps itself, its initial weights and its
    metric history in ``captured`` (the run API returns neither weights nor the trainer)."""
    from marble_kit.trainer import Trainer

    class RecordingTrainer(Trainer):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.history = []
            captured["trainer"] = self
            captured["initial"] = {k: v.clone() for k, v in self.policy.state_dict().items()}

        def step(self):
            metrics = super().step()
            self.history.append(without_timing(metrics))
            return metrics

    return RecordingTrainer


def cli_worker(argv: list[str]) -> None:
    """`marble train ARGV` on this rank; dumps (history, weights) to $MARBLE_TEST_DUMP_DIR."""
    register_probe()
    import marble_kit.run as run_module

    captured: dict = {}
    run_module.Trainer = recording_trainer(captured)
    from marble_cli.app import app

    try:
        app(args=argv, prog_name="marble")
    finally:
        trainer, dump_dir = captured.get("trainer"), os.environ.get(DUMP_ENV)
        if trainer is not None and dump_dir:
            local = getattr(trainer.optimizer, "optim", trainer.optimizer)  # ZeRO's own shard
            state = {"history": trainer.history, "step": trainer.step_count,
                     "policy": trainer.policy.state_dict(), "optimizer": type(trainer.optimizer).__name__,
                     "local_moments": len(local.state)}
            torch.save(state, Path(dump_dir) / f"rank{os.environ.get('RANK', '0')}.pt")


def refuse() -> None:
    raise MarbleError("run directory is taken")


def collectives_worker(out_dir: str, dist: Distributed | None = None) -> None:
    """Every Distributed helper between real processes (or the threads of
    :class:`ThreadedCollectives`); results to OUT/rank<R>.json."""
    dist = dist or Distributed.from_environment()
    rank, world = dist.rank, dist.world_size
    rewards = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * rank  # K=2, B=3 per rank
    gathered, groups = dist.gather_rewards(rewards, torch.tensor([0, 0, 1]))
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.full((2, 2), float(rank + 1))  # params[1] has no grad on any rank
    dist.all_reduce_mean_grads(params)
    errors = {}
    for name, action in {
        "check_same": lambda: dist.check_same(rank, "the rank", "expected in this test"),
        "run_on_main": lambda: dist.run_on_main(refuse),
    }.items():
        try:
            action()
            errors[name] = None
        except MarbleError as exc:
            errors[name] = str(exc)
    result = {
        "rank": rank, "world": world,
        "gathered": gathered.tolist(), "groups": groups.tolist(),
        "local_rows": dist.local_rows(gathered).tolist(),
        "mean": dist.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank])).tolist(),
        "grads": [params[0].grad.tolist(), params[1].grad.tolist()],
        "broadcast": dist.broadcast_from_main(torch.tensor([rank + 0.5])).tolist(),
        "any_rank1": dist.any(rank == 1), "any_none": dist.any(False),
        "main_result": dist.run_on_main(lambda: "from rank 0"),
        "errors": errors,
    }
    dist.check_same("same on every rank", "a constant", "never raised")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.close()


def hang_worker() -> None:
    """Rank 1 never reaches the collective: rank 0's all-reduce must time out, not hang."""
    dist = Distributed.from_environment()
    if dist.rank == 1:
        time.sleep(120)
        return
    started = time.monotonic()
    try:
        dist.all_reduce_mean(torch.ones(1))
    except CollectiveError as exc:  # the gloo timeout
        print(f"rank 0 collective failed after {time.monotonic() - started:.1f}s", flush=True)
        dist.exit_after_collective_failure(exc, code=3)  # the product's exit path (no teardown)
    sys.exit(0)


# ======================================================================= launching

def torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 150
             ) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --standalone --nproc-per-node 2 tests/test_distributed.py ARGS` (wall time too).

    Collectives time out after 60 s, so a desynchronized run fails instead of hanging; past
    ``timeout`` torchrun gets SIGTERM, which it forwards to the workers (own sessions).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.2", str(THIS_FILE), *args]
    environment = {**os.environ, "MARBLE_LOAD_PLUGINS": "", "MARBLE_DIST_TIMEOUT": "60", **(env or {})}
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish within {timeout:.0f}s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return done, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def output(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"


# ======================================================================= fast tests

def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MARBLE_DIST_TIMEOUT", raising=False)
    assert timeout_from_environment() == 600.0
    monkeypatch.setenv("MARBLE_DIST_TIMEOUT", "45")
    assert timeout_from_environment() == 45.0
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("MARBLE_DIST_TIMEOUT", bad)
        with pytest.raises(MarbleError, match="MARBLE_DIST_TIMEOUT"):
            timeout_from_environment()


def test_single_process_reductions_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = Distributed.from_environment()
    assert (dist.rank, dist.world_size, dist.is_main, dist.active) == (0, 1, True, False)
    rewards, groups = torch.randn(2, 4), torch.tensor([0, 0, 1, 1])
    assert dist.gather_rewards(rewards, groups) == (rewards, groups)
    assert torch.equal(dist.local_rows(rewards), rewards)
    assert torch.equal(dist.all_reduce_mean(rewards), rewards)
    assert dist.any(True) and not dist.any(False)
    assert dist.run_on_main(lambda: 5) == 5
    with pytest.raises(MarbleError, match="taken"):
        dist.run_on_main(refuse)
    dist.check_same(1, "x", "y")  # nothing to disagree with


def test_each_rank_must_train_on_its_own_gpu():
    rank3 = Distributed(rank=3, world_size=8, local_rank=3, device=torch.device("cuda", 3))
    rank3.check_device(torch.device("cuda"))      # "cuda" = the current device, set per rank
    rank3.check_device(torch.device("cuda", 3))
    with pytest.raises(MarbleError, match="LOCAL_RANK 3.*cuda:0"):
        rank3.check_device(torch.device("cuda", 0))
    Distributed().check_device(torch.device("cuda", 0))  # one process: any device is fine


def test_tensors_digest_sees_every_bit():
    a = [torch.ones(3), torch.zeros(2, 2)]
    assert tensors_digest(a) == tensors_digest([t.clone() for t in a])
    nudged = [a[0].clone(), a[1].clone()]
    nudged[1][1, 1] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert tensors_digest(nudged) != tensors_digest(a)
    assert tensors_digest([torch.ones(4)]) != tensors_digest([torch.ones(2, 2)])  # shape counts


class ThreadedCollectives:
    """Stands in for ``torch.distributed`` in-process: each rank is a thread, and every collective
    is an exchange of the ranks' inputs through shared slots (the same semantics as gloo's).
    ``fail`` makes every collective raise the RuntimeError a backend raises on a timeout."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.turnstile = threading.Barrier(world, timeout=30)
        self.local = threading.local()
        self.fail: str | None = None
        self.destroyed = 0

    def _exchange(self, value):
        if self.fail:
            raise RuntimeError(self.fail)
        self.slots[self.local.rank] = value
        self.turnstile.wait()
        values = list(self.slots)
        self.turnstile.wait()
        return values

    def is_initialized(self) -> bool:
        return True

    def all_gather(self, pieces, tensor):
        for piece, value in zip(pieces, self._exchange(tensor.clone())):
            piece.copy_(value)

    def all_reduce(self, tensor, op):
        values = torch.stack(self._exchange(tensor.clone()))
        reductions = {self.ReduceOp.SUM: lambda: values.sum(0), self.ReduceOp.MAX: lambda: values.amax(0)}
        tensor.copy_(reductions[op]())

    def broadcast(self, tensor, src):
        tensor.copy_(self._exchange(tensor.clone())[src])

    def all_gather_object(self, gathered, value):
        gathered[:] = self._exchange(value)

    def broadcast_object_list(self, box, src):
        box[:] = self._exchange(list(box))[src]

    def barrier(self):
        self._exchange(None)

    def destroy_process_group(self):
        self.destroyed += 1

    def run(self, work) -> list:
        """``work(rank)`` on every rank at once; the ranks' results (or the first error)."""
        results, errors = [None] * self.world, []

        def rank_thread(rank):
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as exc:
                errors.append(exc)
                self.turnstile.abort()

        threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def threaded(monkeypatch):
    import marble_kit.distributed as distributed_module

    collectives = ThreadedCollectives(2)
    monkeypatch.setattr(distributed_module, "torch_dist", collectives)
    return collectives


def test_collectives_between_two_ranks_in_threads(threaded, tmp_path):
    """The two-process check of test_collectives_between_two_processes, on two threads."""
    threaded.run(lambda rank: collectives_worker(str(tmp_path), Distributed(rank=rank, world_size=2)))
    check_collectives([json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)])
    assert threaded.destroyed == 2  # close() left the process group on every rank


def test_reductions_leave_their_inputs_alone_and_keep_devices_and_dtypes(threaded):
    def work(rank):
        dist = Distributed(rank=rank, world_size=2)
        found = []
        for transpose in (True, False):  # a strided view, and a contiguous tensor (no copy needed)
            mine = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64) * (rank + 1)
            mine = mine.t() if transpose else mine
            found.append((mine, dist.all_reduce_mean(mine), dist.broadcast_from_main(mine), transpose))
        return found

    for rank, found in enumerate(threaded.run(work)):
        for mine, mean, main, transpose in found:
            base = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
            base = base.t() if transpose else base
            assert torch.equal(mine, base * (rank + 1))
            assert torch.equal(mean, base * 1.5) and torch.equal(main, base)
            assert mean.dtype == main.dtype == torch.float64


def test_gathered_groups_stay_whole_and_unique_with_more_groups_per_rank(threaded):
    def work(rank):
        dist = Distributed(rank=rank, world_size=2)
        rewards = torch.arange(8.0).view(1, 8) + 100 * rank
        gathered, groups = dist.gather_rewards(rewards, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        return gathered, groups, dist.local_rows(gathered)

    for rank, (gathered, groups, local) in enumerate(threaded.run(work)):
        assert gathered.tolist() == [list(range(8)) + list(range(100, 108))]
        assert groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
        assert torch.equal(local, torch.arange(8.0).view(1, 8) + 100 * rank)


def test_gradient_mean_over_ranks_fills_missing_grads_and_keeps_shapes(threaded):
    def work(rank):
        params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
                  torch.nn.Parameter(torch.zeros(1))]
        params[0].grad = torch.arange(6.0).view(2, 3) * (rank + 1)
        if rank == 1:
            params[1].grad = torch.full((4,), 8.0)
        params[2].grad = torch.tensor([float(rank)])
        Distributed(rank=rank, world_size=2).all_reduce_mean_grads(params)
        return [p.grad.clone() for p in params]

    for grads in threaded.run(work):
        assert torch.equal(grads[0], torch.arange(6.0).view(2, 3) * 1.5)
        assert torch.equal(grads[1], torch.full((4,), 4.0))
        assert torch.equal(grads[2], torch.tensor([0.5]))


def test_agreement_and_errors_reach_every_rank(threaded):
    def work(rank):
        dist = Distributed(rank=rank, world_size=2)
        found = {"any": [dist.any(rank == 0), dist.any(False), dist.any(True)],
                 "objects": dist.gather_objects({"rank": rank})}
        dist.barrier()
        with pytest.raises(MarbleError) as info:
            dist.check_same([7, rank], "the prompt sizes", "use the same --prompts")
        found["error"] = str(info.value)
        dist.check_same("same", "a constant", "never raised")
        calls = []
        found["main"] = dist.run_on_main(lambda: calls.append(rank) or "done")
        found["calls"] = calls
        return found

    for found in threaded.run(work):
        assert found["any"] == [True, False, True]
        assert found["objects"] == [{"rank": 0}, {"rank": 1}]
        assert found["error"] == ("the prompt sizes differs between rank 0 ([7, 0]) and rank 1 ([7, 1]); "
                                  "use the same --prompts")
    assert [f["main"] for f in threaded.run(work)] == ["done", None]
    assert [f["calls"] for f in threaded.run(work)] == [[0], []]


def test_a_failed_collective_is_a_collective_error_naming_it(threaded):
    threaded.fail = "Connection closed by peer\n  C++ trace line 1\n  C++ trace line 2"
    dist = Distributed(rank=1, world_size=2)
    threaded.local.rank = 1
    for call, name in [(lambda: dist.all_reduce_mean(torch.ones(2)), "all_reduce"),
                       (lambda: dist.gather_rewards(torch.ones(1, 2), torch.tensor([0, 0])), "all_gather"),
                       (lambda: dist.broadcast_from_main(torch.ones(1)), "broadcast"),
                       (lambda: dist.any(True), "all_reduce"),
                       (dist.barrier, "barrier"),
                       (lambda: dist.gather_objects(1), "all_gather_object"),
                       (lambda: dist.run_on_main(lambda: 1), "broadcast_object_list")]:
        with pytest.raises(CollectiveError) as info:
            call()
        assert str(info.value) == f"{name} failed: Connection closed by peer", name
        assert isinstance(info.value.__cause__, RuntimeError)
    threaded.fail = "x" * 500
    with pytest.raises(CollectiveError) as info:
        dist.barrier()
    assert str(info.value) == "barrier failed: " + "x" * 300
    threaded.fail = None

    class Sharded:
        def consolidate_state_dict(self, to):
            raise RuntimeError("") if to == 0 else AssertionError(to)

    with pytest.raises(CollectiveError, match="^consolidate_state_dict failed: RuntimeError$"):
        dist.consolidate_optimizer(Sharded())


def test_joining_the_process_group_from_the_launchers_environment(monkeypatch):
    import marble_kit.distributed as distributed_module

    joined = []

    class Launched:
        initialized = False

        def is_initialized(self):
            return self.initialized

        def init_process_group(self, backend, timeout):
            joined.append((backend, timeout))
            self.initialized = True

        def get_rank(self):
            return 3

        def get_world_size(self):
            return 4

    monkeypatch.setattr(distributed_module, "torch_dist", Launched())
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MARBLE_DIST_TIMEOUT", "75")
    dist = Distributed.from_environment()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.device) == (3, 4, 1, torch.device("cpu"))
    assert joined == [("gloo", datetime.timedelta(seconds=75))] and not dist.is_main and dist.active
    Distributed.from_environment(timeout_s=5)  # already joined: not again
    assert len(joined) == 1
    distributed_module.torch_dist.initialized = False
    monkeypatch.delenv("LOCAL_RANK")
    assert Distributed.from_environment(backend="gloo", timeout_s=5).local_rank == 0
    assert joined[-1] == ("gloo", datetime.timedelta(seconds=5))
    with pytest.raises(MarbleError, match=r"LOCAL_RANK 0 but only 0 GPUs are visible"):
        Distributed.from_environment(backend="nccl")  # this machine has no GPU
    distributed_module.torch_dist.initialized = False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Distributed.from_environment(timeout_s=5).active
    for world in ("1", "0"):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert Distributed.from_environment() == Distributed()


def test_with_gpus_each_rank_joins_over_nccl_on_its_own_gpu(monkeypatch):
    """A machine with two GPUs, simulated: torch's CUDA queries answered, the device switch recorded."""
    import marble_kit.distributed as distributed_module

    calls = []

    class Launched:
        def is_initialized(self):
            return False

        def init_process_group(self, backend, timeout):
            calls.append(("join", backend))

        def get_rank(self):
            return 1

        def get_world_size(self):
            return 2

    monkeypatch.setattr(distributed_module, "torch_dist", Launched())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = Distributed.from_environment(timeout_s=5)
    assert calls == [("set_device", 1), ("join", "nccl")]
    assert (dist.rank, dist.local_rank, dist.device) == (1, 1, torch.device("cuda", 1))
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert _raised(lambda: Distributed.from_environment(timeout_s=5)) == (
        "LOCAL_RANK 2 but only 2 GPUs are visible; start at most one process per GPU (--nproc-per-node)")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert Distributed.from_environment(backend="gloo", timeout_s=5).device == torch.device("cpu")


def _raised(call) -> str:
    with pytest.raises(MarbleError) as info:
        call()
    return str(info.value)


def test_timeouts_below_a_second_are_allowed_and_a_wrong_device_is_named(monkeypatch):
    monkeypatch.setenv("MARBLE_DIST_TIMEOUT", "0.5")
    assert timeout_from_environment() == 0.5
    rank3 = Distributed(rank=3, world_size=8, local_rank=3, device=torch.device("cuda", 3))
    assert _raised(lambda: rank3.check_device(torch.device("cuda", 0))) == (
        "rank 3 (LOCAL_RANK 3) was told to train on cuda:0; leave the policy option `device` unset "
        "(or 'cuda') under torchrun/accelerate so that each rank uses its own GPU")


def test_a_collective_failure_ends_the_process_in_one_line(monkeypatch, capsys):
    exits = []

    def leave(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(SystemExit):
        Distributed(rank=1, world_size=2).exit_after_collective_failure(
            CollectiveError("all_reduce failed: timed out\nmore"), code=4)
    assert capsys.readouterr().err == (
        "error: rank 1: all_reduce failed: timed out; another rank failed or stopped responding; "
        "see its log, or raise MARBLE_DIST_TIMEOUT if rank 0 needs longer for checkpoints\n")
    with pytest.raises(SystemExit):
        Distributed(rank=0, world_size=2).exit_after_collective_failure(CollectiveError("barrier failed: x"))
    assert exits == [4, 1]


def test_closing_leaves_only_a_joined_group(threaded):
    Distributed().close()
    assert threaded.destroyed == 0  # one process: nothing to leave
    Distributed(rank=0, world_size=2).close()
    assert threaded.destroyed == 1
    threaded.is_initialized = lambda: False
    Distributed(rank=0, world_size=2).close()
    assert threaded.destroyed == 1


def test_tensors_digest_reads_values_not_layout():
    base = torch.arange(6.0).view(2, 3)
    assert tensors_digest([base.t()]) == tensors_digest([base.t().contiguous()])
    assert len(tensors_digest([base])) == 16
    assert tensors_digest([base]) != tensors_digest([base.double()])  # dtype counts
    assert tensors_digest([base[:1], base[1:]]) != tensors_digest([base[1:], base[:1]])  # order counts


# ======================================================================= launched tests

@pytest.mark.slow
def test_collectives_between_two_processes(tmp_path):
    done, _ = torchrun(["collectives", str(tmp_path)], timeout=90)
    assert done.returncode == 0, output(done)
    check_collectives([json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)])


def check_collectives(results: list[dict]) -> None:
    """What collectives_worker must find on ranks 0 and 1 of two."""
    expected_gathered = [[0, 1, 2, 10, 11, 12], [3, 4, 5, 13, 14, 15]]
    for rank, result in enumerate(results):
        assert (result["rank"], result["world"]) == (rank, 2)
        assert result["gathered"] == expected_gathered           # rank-major columns
        assert result["groups"] == [0, 0, 1, 2, 2, 3]             # ids unique across ranks
        assert result["local_rows"] == [row[3 * rank:3 * rank + 3] for row in expected_gathered]
        assert result["mean"] == [0.5, 1.0]
        assert result["grads"] == [[[1.5, 1.5], [1.5, 1.5]], [0.0, 0.0, 0.0]]
        assert result["broadcast"] == [0.5]
        assert result["any_rank1"] is True and result["any_none"] is False
        assert result["main_result"] == ("from rank 0" if rank == 0 else None)
        # The same error on every rank, not only where it arose.
        assert "the rank differs between rank 0 (0) and rank 1 (1)" in result["errors"]["check_same"]
        assert result["errors"]["run_on_main"] == "run directory is taken"


@pytest.mark.slow
def test_a_collective_times_out_when_a_rank_never_arrives():
    """No agent to tear the job down (plain processes): MARBLE_DIST_TIMEOUT bounds the wait."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "MARBLE_DIST_TIMEOUT": "4"}
    procs = [subprocess.Popen([sys.executable, str(THIS_FILE), "hang"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    started = time.monotonic()
    try:
        stdout, stderr = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert procs[0].returncode == 3, stdout + stderr
    assert "rank 0 collective failed" in stdout
    assert "error: rank 0: all_reduce failed" in stderr and "Traceback" not in stderr, stderr
    assert elapsed < 40, f"rank 0 waited {elapsed:.0f}s for a 4 s collective timeout"


@pytest.fixture
def probe_registered():
    from marble_kit.registry import get_registry

    register_probe()
    yield
    get_registry().entries["reward"].pop(PROBE, None)


def _config_file(tmp_path: Path, **extra) -> Path:
    import tomli_w

    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps({**SETTINGS, **extra}))
    return path


def _single_process_reference(tmp_path: Path, steps: int, monkeypatch, **extra):
    """The same config in this process (world size 1): history, initial and final weights."""
    import marble_kit.run as run_module
    from marble_kit.config import TrainConfig

    captured: dict = {}
    monkeypatch.setattr(run_module, "Trainer", recording_trainer(captured))
    config = TrainConfig.from_dict({**SETTINGS, **extra, "steps": steps, "out": str(tmp_path / "single")})
    run_module.train(config, progress=False)
    trainer = captured["trainer"]
    return trainer.history, captured["initial"], trainer.policy.state_dict()


def _assert_same_metrics(actual: dict, expected: dict, where: str) -> None:
    """Equal to float tolerance: a different batch split changes this fp32 gradient by ~2e-4
    relative (measured in one process with micro_batch 2 vs 0); metrics moved ≤ 3e-5. A
    missing, doubled or per-rank reduction is off by order one (grad_norm by 2×)."""
    assert set(actual) == set(expected), where
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[key]), f"{where}: {key}"
        elif isinstance(value, float):
            absolute = 2e-4 if key.startswith(("cos/", "cos_update/")) else 1e-7
            assert actual[key] == pytest.approx(value, rel=1e-3, abs=absolute), f"{where}: {key}"
        else:
            assert actual[key] == value, f"{where}: {key}"


def _assert_ranks_agree(dumps: list[dict]) -> None:
    """Every rank took the same steps: identical metrics and bitwise-identical weights."""
    assert dumps[0]["history"] == dumps[1]["history"] or all(
        json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN != NaN in ==
        for a, b in zip(dumps[0]["history"], dumps[1]["history"]))
    assert dumps[0]["step"] == dumps[1]["step"]
    for name, tensor in dumps[0]["policy"].items():
        assert torch.equal(tensor, dumps[1]["policy"][name]), name


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([weights[k].reshape(-1).double() for k in sorted(weights)])


def _assert_close_weights(actual: dict, expected: dict, initial: dict) -> None:
    """Same weights up to float rounding, measured against the size of the training update.

    A different batch split moves this fp32 gradient by ~2e-4 relative, and Adam's first steps
    (≈ lr·g/(|g|+ε)) magnify that on coordinates with |g| ≈ ε: measured ≤ 1.5e-3 of the update,
    as for micro-batching in one process. Training on half the batch is off by order one.
    """
    assert sorted(actual) == sorted(expected)
    error = (_flat(actual) - _flat(expected)).norm()
    update = (_flat(expected) - _flat(initial)).norm()
    print(f"weights: |error| {float(error):.3e}, |update| {float(update):.3e}")
    assert error <= 1e-2 * update, f"|θ_2proc − θ_1proc| = {float(error):.2e}, |Δθ| = {float(update):.2e}"


def _dumps(directory: Path) -> list[dict]:
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_two_processes_match_one_process_then_resume_and_stop_together(tmp_path, probe_registered,
                                                                      monkeypatch):
    reference, initial, reference_weights = _single_process_reference(tmp_path, 3, monkeypatch)
    run_dir, config = tmp_path / "run", _config_file(tmp_path)

    # Launch 1: steps 1-2 from scratch on 2 ranks.
    first = tmp_path / "first"
    first.mkdir()
    done, _ = torchrun(["cli", "train", "--config", str(config), "--out", str(run_dir),
                        "--steps", "2", "--no-progress"], env={DUMP_ENV: str(first)})
    assert done.returncode == 0, output(done)
    dumps = _dumps(first)
    _assert_ranks_agree(dumps)
    assert [m["gram_mode"] for m in dumps[0]["history"]] == ["affine", "reuse"]
    for step, (actual, expected) in enumerate(zip(dumps[0]["history"], reference[:2]), start=1):
        _assert_same_metrics(actual, expected, f"step {step}")

    # Only rank 0 wrote: one metrics line per step, each checkpoint and grid once.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-000000.png", "step-000002.png"]

    # Launch 2: resume on 2 ranks for up to 2 more steps; rank 1 alone gets a Ctrl-C during
    # step 3. Both ranks stop after step 3 and rank 0 saves it; without the shared stop flag
    # rank 0 would wait in step 4's collectives for a rank that has left.
    second = tmp_path / "second"
    second.mkdir()
    done, _ = torchrun(["cli", "train", "--resume", str(run_dir), "--steps", "4", "--no-progress"],
                       env={DUMP_ENV: str(second), SIGINT_ENV: "1:1"})
    assert done.returncode != 0, output(done)  # an interrupted run exits 130 on every rank
    assert "interrupted" in done.stdout, output(done)
    dumps = _dumps(second)
    _assert_ranks_agree(dumps)
    assert dumps[0]["step"] == 3 and len(dumps[0]["history"]) == 1, output(done)
    _assert_same_metrics(dumps[0]["history"][0], reference[2], "step 3 after resume")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]

    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "checkpoints" / "step-000003" / "policy.safetensors"))
    _assert_close_weights(saved, reference_weights, initial)
    _assert_close_weights(dumps[0]["policy"], reference_weights, initial)


@pytest.mark.slow
def test_a_reward_error_on_one_rank_ends_the_whole_job(tmp_path):
    done, elapsed = torchrun(["cli", "train", "--config", str(_config_file(tmp_path)),
                              "--out", str(tmp_path / "run"), "--steps", "3", "--no-progress"],
                             env={FAIL_RANK_ENV: "1"}, timeout=120)
    assert done.returncode != 0, output(done)
    assert "reward 'probe' raised RuntimeError: probe failure injected on rank 1" in done.stderr, output(done)
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after rank 1 failed"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step completed anywhere


@pytest.mark.slow
def test_zero_sharded_optimizer_matches_one_process_and_checkpoints_the_whole_state(
        tmp_path, probe_registered, monkeypatch):
    """optimizer_sharding="zero": each rank keeps half of AdamW's moments, yet the steps equal a
    single-process AdamW run and the checkpoint holds every moment (gathered on rank 0). With the
    held-out evaluation every step (3 images split 1 / 2 over the ranks, scores gathered) and the
    weight EMA: the same numbers as one process, and the best checkpoint (a collective: the
    sharded state is consolidated) written by rank 0 without a hang."""
    evaluation = {"eval_every": 1, "eval_max_prompts": 3, "eval_images_per_prompt": 1, "ema_decay": 0.9}
    reference, initial, reference_weights = _single_process_reference(tmp_path, 2, monkeypatch, **evaluation)
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    done, _ = torchrun(["cli", "train", "--config", str(_config_file(tmp_path)), "--out", str(run_dir),
                        "--steps", "2", "--set", "optimizer_sharding=zero", "--no-progress",
                        *[arg for key, value in evaluation.items() for arg in ("--set", f"{key}={value}")]],
                       env={DUMP_ENV: str(dump)})
    assert done.returncode == 0, output(done)
    dumps = _dumps(dump)
    _assert_ranks_agree(dumps)
    assert [d["optimizer"] for d in dumps] == ["ZeroRedundancyOptimizer"] * 2
    local = [d["local_moments"] for d in dumps]
    for step, (actual, expected) in enumerate(zip(dumps[0]["history"], reference), start=1):
        _assert_same_metrics(actual, expected, f"step {step}")
    _assert_close_weights(dumps[0]["policy"], reference_weights, initial)
    evaluated = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                 for run in (run_dir, tmp_path / "single")]
    assert [row["step"] for row in evaluated[0]] == [row["step"] for row in evaluated[1]] == [0, 1, 2]
    for two, one in zip(*evaluated):
        for key in (k for k in one if k.startswith("eval/") and k != "eval/composite"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
    composites = [row["eval/composite"] for row in evaluated[0]]
    best = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["best"]
    assert best["step"] == composites.index(max(composites))

    from marble_kit.checkpoint import load_checkpoint

    sharded = load_checkpoint(run_dir / "checkpoints" / "step-000002")[1]["optimizer"]
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "step-000002")[1]["optimizer"]
    assert sharded["param_groups"] == single["param_groups"]
    assert sorted(sharded["state"]) == sorted(single["state"]) and len(single["state"]) > 1
    assert sum(local) == len(single["state"]) and max(local) < len(single["state"]), local  # really sharded
    assert all(float(sharded["state"][i]["step"]) == float(m["step"]) == 2.0 for i, m in single["state"].items())
    for key in ("exp_avg", "exp_avg_sq"):  # float rounding of the 2-rank batch split, as for the weights
        actual, expected = (torch.cat([state["state"][i][key].reshape(-1) for i in sorted(single["state"])])
                            for state in (sharded, single))
        assert (actual - expected).norm() <= 1e-2 * expected.norm(), key


def _two_processes_against_one(tmp_path: Path, monkeypatch, steps: int, **extra) -> list[dict]:
    """Train ``steps`` steps on 2 gloo ranks and in this process with the same settings; assert
    the ranks agree, the metrics and weights equal one process's; return rank 0's history."""
    reference, initial, reference_weights = _single_process_reference(tmp_path, steps, monkeypatch, **extra)
    dump = tmp_path / "dump"
    dump.mkdir()
    done, _ = torchrun(["cli", "train", "--config", str(_config_file(tmp_path, **extra)),
                        "--out", str(tmp_path / "run"), "--steps", str(steps), "--no-progress"],
                       env={DUMP_ENV: str(dump)})
    assert done.returncode == 0, output(done)
    dumps = _dumps(dump)
    _assert_ranks_agree(dumps)
    for step, (actual, expected) in enumerate(zip(dumps[0]["history"], reference), start=1):
        _assert_same_metrics(actual, expected, f"step {step}")
    _assert_close_weights(dumps[0]["policy"], reference_weights, initial)
    return dumps[0]["history"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_a_sampled_gram(tmp_path, probe_registered, monkeypatch):
    """gram_rows < 1 on 2 gloo ranks equals one process: the sample is drawn for the global
    batch, and the fused gradient's sampled part (from the reduced per-reward gradients and
    anchor, SPEC §1.6) and its other rows' backward (reduced over ranks) add up as in one."""
    history = _two_processes_against_one(tmp_path, monkeypatch, 2, gram="affine", gram_rows=0.5,
                                         timesteps_per_image=2, kl=1e-2, checkpoint_every=0, sample_every=0)
    assert [m["backward_passes"] for m in history] == [pytest.approx(2.0)] * 2  # 1 + 2·0.5


@pytest.mark.slow
def test_two_flux_processes_match_one_process(tmp_path, tiny_flux_dir, probe_registered, monkeypatch):
    """The tiny random FLUX.1 (tests/tiny_flux.py) on 2 gloo ranks equals one process: nothing
    of the distributed step is SD3's (affine Gram every step, groups split across the ranks)."""
    from tiny_flux import TINY_FLUX_OPTIONS

    history = _two_processes_against_one(
        tmp_path, monkeypatch, 2, policy="flux", policy_options={"path": str(tiny_flux_dir), **TINY_FLUX_OPTIONS},
        gram="affine", sample_steps=2, checkpoint_every=0, sample_every=0)
    assert [m["gram_mode"] for m in history] == ["affine", "affine"]


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "cli":
        cli_worker(rest)
    elif mode == "collectives":
        collectives_worker(rest[0])
    elif mode == "hang":
        hang_worker()
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
