"""`align-serve`: the rollout server (routes, engines, weight receiver, image cache)."""

import runtime  # noqa: F401  (its start-up fixes, before anything imports vLLM)
