"""Hook specifications of the ``marble`` pluggy project.

A plugin is any module (or object) with functions named like the hooks below, decorated with
``marble_kit.hookimpl``. Packages expose it through the ``marble`` entry-point group::

    [project.entry-points.marble]
    my_rewards = "my_package.plugin"

Each hook receives a ``register`` callback: ``register(name, factory, description="...")``.
``factory(**options)`` builds the component; ``options`` come from the TOML config or from
``--reward-opt name.key=value`` on the command line (values are parsed as TOML scalars).
"""

import pluggy

hookspec = pluggy.HookspecMarker("marble")
hookimpl = pluggy.HookimplMarker("marble")


@hookspec
def register_rewards(register):
    """Register reward models.

    ``factory(**options)`` returns a :class:`marble_kit.rewards.Reward`, or any callable
    ``reward(images, prompts) -> Tensor[B]`` (images float in [0, 1], NCHW; higher is better;
    NaN for samples the reward does not apply to). A plain callable is wrapped in a
    :class:`marble_kit.rewards.CallableReward` named after the registered name; anything that
    is not callable is refused when the reward is built.
    """


@hookspec
def register_balancers(register):
    """Register balancers.

    ``factory(num_rewards, **options)`` returns a :class:`marble_kit.balancing.Balancer`
    mapping the per-reward Gram matrix to loss weights.
    """


@hookspec
def register_policies(register):
    """Register policies (trainable diffusion models).

    ``factory(**options)`` returns a :class:`marble_kit.policy.Policy`.
    """
