"""An OpenAI-compatible HTTP server for AF3 (extra `server`): `edge-af3 serve`, `serve(config)`."""

from __future__ import annotations

import errno
import logging
import signal
import sys

from ..errors import EdgeAF3Error, MissingDependencyError, OptionsError


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"the server needs {e.name}: pip install 'edge-af3[server]'") from None


def _check_bind(host: str, port: int) -> None:
    """Bind the address once ourselves: a port in use or an address not of this machine is an
    OptionsError naming it, not a traceback after start-up."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OptionsError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            hint = " (another server? --port picks another)" if e.errno == errno.EADDRINUSE else ""
            raise OptionsError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None


def serve(config, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM: stop taking requests, finish those in flight (up to
    `config.timeout` seconds), then exit. Raises the load error if the model could not be loaded."""
    _require()
    import uvicorn

    from .app import create_app

    logger = logging.getLogger("edge_af3.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    logger.propagate = False
    _check_bind(host, port)  # a port in use is one line before the model loads
    app = create_app(config)
    state = app.state.af3

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                busy = (state.scheduler.in_flight + state.scheduler.queued) if state.scheduler else 0
                logger.info(
                    "%s: draining — no new requests; waiting up to %g s for %d in flight",
                    signal.Signals(sig).name,
                    config.timeout,
                    busy,
                )
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=config.timeout,
            lifespan="on",
        )
    )
    state.on_failed = lambda: setattr(server, "should_exit", True)
    logger.info("listening on http://%s:%d (model loading: GET /health says 503 until ready)", host, port)
    server.run()
    if state.error is not None:
        if isinstance(state.error, EdgeAF3Error):
            raise state.error
        raise RuntimeError(f"the model failed to load: {state.error}") from state.error
