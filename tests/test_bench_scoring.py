"""The scoring section of `marble bench speed`: speed ratios and predictions from alternating
samples, and a smoke run of the three variants against a reward served on 127.0.0.1."""

import pytest

from marble_kit.bench.scoring import ScoringSettings, run_scoring_benchmark, summarize_scoring
from marble_kit.errors import MarbleError
from marble_kit.registry import build
from marble_kit.serve import serving_in_thread


def test_ratios_are_within_round_and_the_prediction_follows_the_phases():
    def sample(step, rollout=1.0, rewards=2.0, update=0.5):
        return {"step": step, "rollout": rollout, "rewards": rewards, "update": update}

    samples = {"sequential": [sample(4.0), sample(8.0)], "concurrent": [sample(2.0), sample(4.0)],
               "async": [sample(1.0), sample(2.0)]}
    rows = {row["variant"]: row for row in summarize_scoring(samples, {"a": 1.5, "b": 0.5})}
    assert rows["concurrent"]["speed_step"] == 2.0 and rows["async"]["speed_step"] == 4.0
    assert rows["async"]["saved_per_step_s"] == pytest.approx(4.5)  # median of 3 and 6
    # sequential: 1 + (1.5 + 0.5) + 0.5 = 3.5; concurrent 1 + 1.5 + 0.5 = 3; async max(1, 1.5) + 0.5 = 2
    assert rows["concurrent"]["expected_speed_step"] == pytest.approx(3.5 / 3.0)
    assert rows["async"]["expected_speed_step"] == pytest.approx(3.5 / 2.0)
    with pytest.raises(MarbleError, match="rounds must be ≥ 1"):
        ScoringSettings(rounds=0)


def test_the_three_variants_run_against_a_served_reward(tmp_path):
    settings = ScoringSettings(rounds=1, warmup=0, prompts_per_step=1, images_per_prompt=2, sample_steps=1,
                               rewards=["brightness", "remote:brightness"], prompts=["colors"])
    with serving_in_thread("brightness", build("reward", "brightness")) as url:
        report = run_scoring_benchmark(settings, urls={"remote:brightness": url})
    assert [row["variant"] for row in report["rows"]] == ["sequential", "concurrent", "async"]
    assert set(report["reward_seconds"]) == {"brightness", "remote:brightness"}
    assert all(row["steps"] == 1 and row["median_step_s"] > 0 for row in report["rows"])
    assert report["rows"][0]["speed_step"] == 1.0
