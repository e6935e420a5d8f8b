"""How `raycls serve` hosts the app (raycls.deliver.app): a registry of engines, picked by `--engine`.

    local   FastAPI under uvicorn in this process, the model called inline: one model on one machine, no
            cluster to pay for (measured: benchmarks/serve_load.py, README "Handing the winner over")
    ray     a Ray Serve application: `--address` (a cluster), `--replicas`, `--max-replicas` (autoscaling),
            requests batched across callers

Both answer the same routes with the same token, limits, errors and request log, and both stop on SIGTERM or
Ctrl-C after writing the request log's last rows.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raycls.deliver.app import Endpoint, ServeOptions, build_app
from raycls.errors import RayclsError
from raycls.registry import Registry


@dataclass(frozen=True)
class Hosting:
    """Where and on what the app runs (the engine's part; ServeOptions is the app's)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas: int | None = None
    address: str | None = None  # a Ray cluster


# An engine serves until SIGTERM or Ctrl-C, calling `ready(url)` once requests are answered.
Engine = Callable[[ServeOptions, Hosting, Callable[[str], None]], None]
ENGINES: Registry[Engine] = Registry("serve engine")


def url_of(hosting: Hosting) -> str:
    return f"http://{hosting.host}:{hosting.port}"


# ------------------------------------------------------------------------------------------------ local
def local_server(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """A uvicorn.Server for the app (its `run()` blocks; uvicorn turns SIGTERM and SIGINT into a graceful
    shutdown when it runs in the main thread, and the app's shutdown writes the request log)."""
    import uvicorn

    endpoint = Endpoint(options, engine="local")
    app = build_app(endpoint, endpoint.infer_inline)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))


@ENGINES.register("local")
def serve_local(options: ServeOptions, hosting: Hosting, ready: Callable[[str], None]) -> None:
    needs_ray = {
        "--address": hosting.address,
        "--replicas": hosting.replicas if hosting.replicas > 1 else None,
        "--max-replicas": hosting.max_replicas,
    }
    asked = [name for name, value in needs_ray.items() if value]
    if asked:
        raise RayclsError(f"--engine local serves one process on this machine; {', '.join(asked)} need --engine ray")
    server = local_server(options, hosting.host, hosting.port)

    def announce() -> None:  # uvicorn has no hook for "listening"; it sets `started` then
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            ready(url_of(hosting))

    threading.Thread(target=announce, daemon=True).start()
    server.run()


# -------------------------------------------------------------------------------------------------- ray
@ENGINES.register("ray")
def serve_ray(options: ServeOptions, hosting: Hosting, ready: Callable[[str], None]) -> None:
    from raycls.deliver.model import load_trial_model
    from raycls.deliver.serve import deploy, stop
    from raycls.tune.cluster import init_ray

    load_trial_model(
        options.storage, options.experiment, options.trial
    )  # a missing trial fails here, before Ray starts
    init_ray(hosting.address, needed_cpus=hosting.replicas + 2)
    # SIGTERM ends the wait like Ctrl-C, so that Serve stops its replicas gracefully (their logs written).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy(
            options, host=hosting.host, port=hosting.port, replicas=hosting.replicas, max_replicas=hosting.max_replicas
        )
        ready(url_of(hosting))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
