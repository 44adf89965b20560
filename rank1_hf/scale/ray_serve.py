"""The HTTP rerank server on Ray Serve: the same FastAPI app as ``rank1-hf serve``, one ranker per replica.

:func:`application` is a Serve deployment of :class:`Rank1Replica`, an ingress whose app is
:func:`rank1_hf.serve.create_app` on the replica's own ranker (built in the replica, after the model
loads: the app needs a loaded ranker). So every route, the API key, the body and queue limits and the
Prometheus metrics are the server's own; each replica has its own engine, and ``/metrics`` shows the
counts of the replica that answers (Ray's own ``ray_serve_*`` metrics cover the whole deployment).

Replicas: a fixed number, or (min, max) for Serve's autoscaling on ongoing requests. A replica that dies is
replaced by the Serve controller; requests go to the live replicas meanwhile. ``max_ongoing_requests``
is high by default (Serve's is 5): a replica's engine judges best with many requests in it at once.

With a store, every replica opens the same SQLite file: replicas on one machine (or a filesystem with
working locks) only.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from ..options import JudgeOptions, LoadOptions
from ..serve import ServeSettings, create_app
from .ray_batch import load_ranker

logger = logging.getLogger(__name__)

#: The application's (and deployment's) name in Serve.
APP_NAME = "rank1"


@serve.ingress()  # no app yet: __serve_build_asgi_app__ builds it in each replica, on its ranker
class Rank1Replica:
    """One Serve replica: a ranker (its own engine) and the rerank app on it."""

    def __init__(self, model: str, load: LoadOptions, judge: JudgeOptions, settings: ServeSettings,
                 store: str | None = None, threads: int | None = None) -> None:
        self.ranker = load_ranker(model, load, judge, threads, store=store)
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        # The app's lifespan warms the engine up and, at shutdown, stops it and closes the store.
        return create_app(self.ranker, self.settings)


def application(model: str, load: LoadOptions | None = None, judge: JudgeOptions | None = None,
                settings: ServeSettings | None = None, *, replicas: int | tuple[int, int] = 1,
                gpus_per_replica: float | None = None, cpus_per_replica: float = 1.0,
                max_ongoing_requests: int = 64, store: str | None = None, threads: int | None = None) -> Any:
    """The Serve application (for ``serve.run``): ``replicas`` of :class:`Rank1Replica`.

    gpus_per_replica: default 1 when the Ray cluster (initialized first) has GPUs, else none.
    replicas: N, or (min, max) to autoscale on ongoing requests (about half of ``max_ongoing_requests``
        per replica).
    """
    import ray

    from ..errors import Rank1Error

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    options: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        "max_ongoing_requests": max_ongoing_requests,
    }
    if isinstance(replicas, int):
        if replicas < 1:
            raise Rank1Error(f"replicas must be at least 1, got {replicas}")
        options["num_replicas"] = replicas
    else:
        low, high = replicas
        if not 1 <= low <= high:
            raise Rank1Error(f"replicas must be MIN-MAX with 1 <= MIN <= MAX, got {low}-{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1, max_ongoing_requests // 2)}
    deployment = serve.deployment(Rank1Replica).options(**options)
    return deployment.bind(model, load or LoadOptions(), judge or JudgeOptions(), settings or ServeSettings(),
                           store, threads)


def start(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/``; returns once every replica
    is up (its model loaded)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("rank1 on Ray Serve at http://%s:%d", host, port)
