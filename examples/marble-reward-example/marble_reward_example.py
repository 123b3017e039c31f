"""A third-party marble-kit reward: how much redder than green/blue an image is."""

from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward


class Redness(Reward):
    name = "redness"

    def __init__(self, strength: float = 1.0):
        self.strength = strength

    def score(self, images, prompts):
        red, green, blue = images.mean(dim=(2, 3)).unbind(dim=1)
        return self.strength * (red - (green + blue) / 2)


@hookimpl
def register_rewards(register):
    register("redness", Redness, description="Mean red minus mean of green and blue (example plugin).")
