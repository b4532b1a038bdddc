"""Joining Ray: the cluster of RAY_ADDRESS (inside `ray job submit`), else a fresh local instance."""

from __future__ import annotations

import os

_STARTED_RAY = False  # this process called ray.init (and so shuts Ray down when the job fails)


def init_ray(log_to_driver: bool = True, dashboard: bool = False) -> None:
    """Join the cluster of RAY_ADDRESS, else start a fresh local instance. DASHBOARD starts the local
    instance's dashboard, which Ray's state API needs (Ray Train's placement-group cleaner polls it)."""
    import ray

    global _STARTED_RAY
    if ray.is_initialized():
        return
    _STARTED_RAY = True
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)  # inside `ray job submit`, or pointed at a cluster
    else:
        # "local": always a fresh instance, never a cluster some earlier `ray start` left behind
        ray.init(address="local", include_dashboard=dashboard, log_to_driver=log_to_driver)


def stop_ray() -> None:
    """Shut down the Ray this process started (a local instance takes its workers with it), so nothing
    outlives a failed job. A Ray the caller started is left to the caller."""
    try:
        import ray

        if _STARTED_RAY and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
