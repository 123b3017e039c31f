"""The held-out evaluation (during training and `marble eval`) against training's own scoring:

* the Δ of a reward is taken over the images both evaluations scored, and no composite (so no
  best checkpoint) is reported while a trained reward scored nothing;
* rewards score through the trainer's RewardScoring: `reward_threads` threads, `offload`
  visits, a failure as a one-line RewardFailure naming the reward;
* a reward that fails in the evaluation of step s keeps step s (logged and checkpointed), and
  `--resume` runs that evaluation first: the run ends as the one that never failed.
"""

from __future__ import annotations

import json
import math
import threading
from typing import ClassVar

import pytest
import torch
from cli_runs import marble, metric_lines

from marble_kit.checkpoint import list_checkpoints, load_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.distributed import Distributed
from marble_kit.evaluate import TrainingEvaluation, composite_score, eval_prompt_sets, reward_rows
from marble_kit.registry import PluginInfo, get_registry
from marble_kit.trainer import RewardFailure, Trainer, build_components

NAN = float("nan")


class Probe:
    """An eval-only reward that records where and in which thread it scores, and fails while
    ``Probe.broken`` is set (a class switch: the CLI builds its own instance)."""

    name = "probe"
    broken = False
    calls: ClassVar[list[tuple[str, str]]] = []

    def __init__(self):
        self.device = torch.device("cpu")

    def __call__(self, images, prompts):
        if Probe.broken:
            raise ValueError("the probe is down")
        Probe.calls.append(("score", threading.current_thread().name))
        return images.mean(dim=(1, 2, 3))

    def to(self, device):
        self.device = torch.device(device)
        Probe.calls.append(("to", str(self.device)))
        return self


@pytest.fixture
def probe():
    registry = get_registry()
    registry.entries["reward"].pop("probe", None)
    registry.add(PluginInfo("reward", "probe", Probe, "records its calls", "tests", __name__))
    Probe.broken, Probe.calls = False, []
    yield Probe
    Probe.broken = False
    registry.entries["reward"].pop("probe", None)


TINY = dict(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2, steps=3,
            checkpoint_every=0, sample_every=0, eval_every=1, eval_max_prompts=2, eval_images_per_prompt=2,
            eval_rewards=["probe"], rewards=["color", "shape", "centering"])


def _evaluation(tmp_path, **overrides) -> tuple[Trainer, TrainingEvaluation]:
    config = TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **overrides})
    components = build_components(config)
    trainer = Trainer(config, components)
    evaluation = TrainingEvaluation(config, components.rewards + components.eval_rewards,
                                    [*config.rewards, *config.eval_rewards], eval_prompt_sets(config), Distributed())
    return trainer, evaluation


# ------------------------------------------------------------------ Δ and composite

def test_the_delta_is_taken_over_the_images_both_evaluations_scored():
    base = torch.tensor([[1.0, 10.0, NAN, 3.0]])
    tuned = torch.tensor([[2.0, NAN, 4.0, 3.0]])   # image 1 lost in the fine-tuned run, 2 in the base
    row = reward_rows(["r"], base, tuned)[0]
    assert (row["n"], row["n_base"], row["n_tuned"]) == (2, 3, 3)
    assert (row["base_mean"], row["tuned_mean"]) == (2.0, 2.5)  # images 0 and 3 only
    assert row["delta"] == 0.5 and row["base_std"] == 1.0 and row["delta_in_base_std"] == 0.5


def test_no_composite_while_a_trained_reward_scored_nothing():
    base = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    tuned = torch.tensor([[1.0, 3.0], [NAN, NAN], [2.0, 4.0]])
    rows = reward_rows(["a", "b", "extra"], base, tuned)
    assert math.isnan(composite_score(rows, ["a", "b"]))       # b scored no image
    assert composite_score(rows, ["a"]) == 1.0                 # an eval-only reward never counts
    assert math.isnan(composite_score(rows[:1], ["a", "c"]))   # c was not evaluated at all
    assert composite_score(reward_rows(["a", "b"], base[:2], base[:2] + 1), ["a", "b"]) == 1.0


def test_an_evaluation_without_composite_picks_no_best_checkpoint_and_says_why(tmp_path, probe):
    trainer, evaluation = _evaluation(tmp_path)
    evaluation.run(trainer, 0, tmp_path / "run")
    lost = trainer.rewards[1]  # shape: a batch lost, as with on_error = "nan"
    lost.score = lambda images, prompts: torch.full((images.shape[0],), NAN)
    metrics, best = evaluation.run(trainer, 1, tmp_path / "run")
    assert math.isnan(metrics["eval/composite"]) and not best and evaluation.best_step == 0
    assert "composite – (shape scored no image: no best checkpoint)" in evaluation.summary(metrics, 1, best)
    report = json.loads((tmp_path / "run" / "eval" / "step-000001" / "eval.json").read_text())
    assert report["composite"] is None and report["unscored"] == ["shape"]


def test_held_out_prompts_that_a_trained_reward_never_judges_are_refused_up_front(tmp_path, probe):
    """eval_prompts tagged for color only while shape and centering train: no evaluation could
    ever have a composite, so the run is refused before it starts, in one line naming the reward;
    the same as `marble train` does, without a traceback. Eval-only rewards may judge nothing."""
    from marble_kit.errors import MarbleError

    with pytest.raises(MarbleError, match=r"trained reward 'shape' judges none of the 2 held-out prompts"):
        _evaluation(tmp_path, eval_prompts=["world_eval:color"])
    _evaluation(tmp_path, eval_prompts=["world_eval:color+shape+centering"])  # probe judges nothing: fine
    result = marble("train", "--steps", "1", "--set", "prompts_per_step=2", "--set", "images_per_prompt=2",
                    "--set", "sample_steps=1", "--set", "eval_every=1", "--set", 'eval_prompts=["world_eval:color"]',
                    "--no-progress", "--out", tmp_path / "cli")
    assert result.exit_code != 0 and "trained reward 'shape' judges none" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "cli" / "checkpoints").exists()


# ------------------------------------------------------------------ scored as in training

def test_the_evaluation_scores_in_the_trainers_reward_threads(tmp_path, probe):
    trainer, evaluation = _evaluation(tmp_path)
    evaluation.run(trainer, 0, tmp_path / "run")
    threads = {thread for kind, thread in probe.calls if kind == "score"}
    assert threads and all(name.startswith("marble-reward") for name in threads), threads
    trainer.config.reward_threads = 1
    probe.calls.clear()
    evaluation.run(trainer, 1, tmp_path / "run")
    assert {thread for _, thread in probe.calls} == {threading.current_thread().name}


def test_offloaded_rewards_visit_the_device_in_the_evaluation_too(tmp_path, probe):
    trainer, evaluation = _evaluation(tmp_path, reward_device="offload")
    probe.calls.clear()
    evaluation.run(trainer, 0, tmp_path / "run")  # 4 images: one batch
    assert probe.calls == [("to", "cpu"), ("score", "MainThread"), ("to", "cpu")]


def test_a_reward_failing_in_the_evaluation_is_a_reward_failure_naming_it(tmp_path, probe):
    trainer, evaluation = _evaluation(tmp_path)
    probe.broken = True
    with pytest.raises(RewardFailure, match=r"^reward 'probe' raised ValueError: the probe is down$"):
        evaluation.run(trainer, 0, tmp_path / "run")
    assert evaluation.base is None and evaluation.last_step is None


def test_marble_eval_of_an_offloaded_run(tmp_path, probe):
    run = tmp_path / "run"
    result = marble("train", "--out", run, "--steps", 1, "--no-progress", "--set", "reward_device=offload",
                    *(f"--set={key}={value}" for key, value in TINY.items()
                      if key not in ("steps", "eval_every", "eval_rewards", "rewards")))
    assert result.exit_code == 0, result.output
    probe.calls.clear()
    result = marble("eval", run, "--rewards", "color,probe", "--json")
    assert result.exit_code == 0, result.output
    assert probe.calls[:3] == [("to", "cpu"), ("to", "cpu"), ("score", "MainThread")]  # placed, visits


# ------------------------------------------------------------------ a failure in `marble train`

RUN = ["--no-progress", "--set", "prompts_per_step=2", "--set", "images_per_prompt=2",
       "--set", "timesteps_per_image=1", "--set", "sample_steps=2", "--set", "threads=1",
       "--set", "sample_every=0", "--set", "checkpoint_every=0", "--set", "eval_every=1",
       "--set", "eval_max_prompts=2", "--set", "eval_images_per_prompt=2", "--set", "eval_rewards=probe"]


def _break_after_step(monkeypatch, step: int) -> None:
    original = Trainer.step

    def step_then_break(trainer):
        metrics = original(trainer)
        Probe.broken = trainer.step_count == step
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_break)


def _without_clocks(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.parametrize("failing", [2, 3])  # an evaluation in the run, the final one
def test_a_failed_evaluation_keeps_its_step_and_a_resume_runs_it_first(tmp_path, probe, monkeypatch, failing):
    reference = tmp_path / "reference"
    assert marble("train", "--out", reference, "--steps", 3, *RUN).exit_code == 0
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _break_after_step(patch, failing)
        result = marble("train", "--out", run, "--steps", 3, *RUN)
    assert result.exit_code == 2  # a user-facing error
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: reward 'probe' raised ValueError: the probe is down; in the held-out "
                              f"evaluation of step {failing}: the run stopped after step {failing} "
                              "(checkpoint saved)"), result.output
    assert f"marble train --resume {run}" in message
    assert [c.name for c in list_checkpoints(run)][-1] == f"step-{failing:06d}"
    assert load_checkpoint(list_checkpoints(run)[-1])[1]["evaluation"]["last_step"] == failing - 1
    rows = metric_lines(run)
    assert rows[-1]["step"] == failing and "eval/composite" not in rows[-1]  # the step, not its evaluation
    assert not (run / "eval" / f"step-{failing:06d}").exists()

    probe.broken = False
    result = marble("train", "--resume", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run / "eval" / f"step-{failing:06d}" / "eval.json").is_file()
    assert _without_clocks(metric_lines(run)) == _without_clocks(metric_lines(reference))
    final = load_checkpoint(list_checkpoints(run)[-1])
    expected = load_checkpoint(list_checkpoints(reference)[-1])
    assert final[0]["step"] == 3 and final[1]["evaluation"]["last_step"] == 3
    assert all(torch.equal(final[1]["policy"][k], expected[1]["policy"][k]) for k in expected[1]["policy"])
    best, best_reference = (json.loads((r / "checkpoints" / "best" / "meta.json").read_text())["best"]
                            for r in (run, reference))
    assert best == best_reference
