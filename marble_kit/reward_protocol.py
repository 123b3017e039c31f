"""Constants of the reward-service protocol (version 1), importable without torch (the CLI
reads them at start-up); the codec and client are in :mod:`marble_kit.remote`, the server in
:mod:`marble_kit.serve`, the whole protocol in docs/reward-services.md."""

PROTOCOL_VERSION = 1
INFO_ROUTE, SCORE_ROUTE, HEALTH_ROUTE = "/v1/info", "/v1/score", "/health"
ENCODINGS = ("float32", "uint8", "png")
TOKEN_ENV = "MARBLE_REWARD_TOKEN"
ON_ERROR = ("raise", "nan")
# reward_options of a `remote:NAME` reward that only say how to reach its server: they may
# change between a run and its resume (the run fingerprint leaves them out).
TRANSPORT_OPTIONS = ("url", "timeout", "retries", "backoff", "token", "token_env")
RETRY_STATUS = (429, 502, 503, 504)  # a busy or restarting server: worth another try
# `marble serve-reward` defaults
DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_MB = 256.0
DEFAULT_MAX_BATCH = 256
