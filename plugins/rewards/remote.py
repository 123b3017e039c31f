"""`remote:NAME`: reward NAME scored by a reward server (`marble serve-reward NAME`).

``--rewards remote:ocr --reward-opt remote:ocr.url=http://127.0.0.1:8765``; the client and the
protocol are in :mod:`marble_kit.remote`, the server in :mod:`marble_kit.serve`.
"""

from __future__ import annotations

import math

from marble_kit.hookspecs import hookimpl
from marble_kit.remote import RemoteReward


def build_remote(reward: str, url: str, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 on_error: str = "raise", encoding: str = "float32", token: str | None = None,
                 token_env: str = "MARBLE_REWARD_TOKEN", batch_size: int = 0) -> RemoteReward:
    """Connect to the server of ``reward`` at ``url`` (checked now: reachable, same protocol,
    the same reward, the token accepted).

    Args:
        url: the server's base URL (its startup line prints it).
        timeout: seconds to wait for one reply; retries: further tries of a failed request,
            after backoff·2^i seconds.
        on_error: "raise" (stop the run with a one-line error) or "nan" (that batch scores NaN,
            with a warning, counted in reward_failures/remote:NAME).
        encoding: images as "float32" (lossless: the scores equal the in-process reward's),
            "uint8" or "png" (a quarter of the bytes; the reward sees quantized pixels).
        token, token_env: the server's --token, or the environment variable holding it.
        batch_size: most images per request (0: as many as the server's limits allow).
    """
    if isinstance(on_error, float) and math.isnan(on_error):
        on_error = "nan"  # `--reward-opt remote:X.on_error=nan` reads as TOML's float nan
    return RemoteReward(reward, url, timeout=timeout, retries=retries, backoff=backoff, on_error=on_error,
                        encoding=encoding, token=token, token_env=token_env, batch_size=batch_size)


@hookimpl
def register_rewards(register):
    register("remote:*", build_remote,
             description="remote:NAME — reward NAME from a `marble serve-reward NAME` server (option url).")
