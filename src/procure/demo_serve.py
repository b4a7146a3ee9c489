"""`procure demo --serve`: after the demo's story, its facilitator and mock vendors stay up and
the dashboard (with a worker, so runs started from it advance) serves its store until Ctrl+C."""

from __future__ import annotations

import time

from rich.console import Console

from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import Store


def serve_until_interrupted(
    settings: Settings, store: Store, *, port: int, console: Console
) -> None:
    """Serve on 127.0.0.1:`port`; return on Ctrl+C (SIGINT) once the server has stopped."""
    server = serve(create_app(settings, store, worker=WorkerConfig(poll_interval_s=0.5)), port)
    try:
        console.rule("dashboard")
        # Printed once the server accepts connections: scripts may wait for this line.
        console.print(f"dashboard {server.url}/ (Ctrl+C to stop)", soft_wrap=True)
        console.file.flush()
        while server.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        server.stop()
