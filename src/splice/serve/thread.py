"""Run the HTTP app on a background thread: for tests, benchmarks and notebooks (`splice serve` runs uvicorn itself)."""
from __future__ import annotations

import threading
import time

from splice.errors import SpliceError


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks); `with ServerThread(app) as url: ...`.

    Args:
        app: the ASGI app.
        host: where to listen (loopback by default).
        port: 0 picks a free port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="splice-http", daemon=True)
        self.url = ""

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SpliceError("the HTTP server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
