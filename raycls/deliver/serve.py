"""`raycls serve --engine ray`: the app (raycls.deliver.app) as a Ray Serve application.

Ray Serve rather than the local engine when the model needs a cluster: `--address`, several replicas, or
autoscaling with the queue; Serve runs, restarts and scales the replicas and batches requests across callers
(@serve.batch). Each replica keeps its own request log buffer and files (replicas never write to the same
file); Serve's graceful stop (`serve.shutdown`, which `raycls serve` runs on SIGTERM or Ctrl-C) writes them.
"""

# No `from __future__ import annotations`: Serve inspects the deployment's methods at runtime.

import os
from typing import Any

import numpy as np
from ray import serve

from raycls.deliver.app import Endpoint, ServeOptions, build_app

# Serve kills an HTTP proxy that is not ready 5 s after it starts; on a loaded machine or a busy node, starting
# the proxy's worker process alone can take longer (seen: the proxy killed before it ran, serve.start failing).
# Read by Serve's controller, which inherits the environment of the Ray started after this import.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


def max_ongoing(options: ServeOptions) -> int:
    """Requests a replica accepts at once. Serve's default (5) caps every batch at 5, whatever
    max_batch_size says: twice the batch lets one batch fill while the previous one runs."""
    return 2 * options.max_batch_size


@serve.deployment
@serve.ingress()
class RayclsService:
    def __init__(self, options: ServeOptions):
        self.endpoint = Endpoint(options, engine="ray")
        # The batch size and wait are per deployment options of the batched method.
        self._predict_batch.set_max_batch_size(options.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, images: list[np.ndarray]) -> list[tuple[dict[str, Any], int]]:
        return [(answer, len(images)) for answer in self.endpoint.answer(np.stack(images))]

    def __serve_build_asgi_app__(self):
        return build_app(self.endpoint, self._predict_batch)

    def __del__(self):
        # Serve's graceful replica stop: the buffered request log rows are written.
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.close()


def deploy(
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_replicas: int | None = None,
    name: str = "raycls",
    route_prefix: str = "/",
):
    """Start Serve's HTTP proxy on host:port and run the application (Ray must be initialised)."""
    serve.start(http_options={"host": host, "port": port})
    deployment = RayclsService.options(max_ongoing_requests=max_ongoing(options))
    if max_replicas and max_replicas > replicas:  # scale with the queue between the two bounds
        deployment = deployment.options(
            autoscaling_config={
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": options.max_batch_size,
            }
        )
    else:
        deployment = deployment.options(num_replicas=replicas)
    return serve.run(deployment.bind(options), name=name, route_prefix=route_prefix)


def stop() -> None:
    """Shut the Serve application and its HTTP proxy down (the Ray cluster lives on)."""
    serve.shutdown()
