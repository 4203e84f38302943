"""An OpenAI-compatible HTTP server for AF3 (extra `server`): `edge-af3 serve`, `serve(config)`."""

from __future__ import annotations

import logging
import sys

from ..errors import EdgeAF3Error, MissingDependencyError


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"the server needs {e.name}: pip install 'edge-af3[server]'") from None


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
    app = create_app(config)
    server = uvicorn.Server(
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
    state = app.state.af3
    state.on_failed = lambda: setattr(server, "should_exit", True)
    logger.info("listening on http://%s:%d (model loading: GET /health says 503 until ready)", host, port)
    server.run()
    if state.error is not None:
        if isinstance(state.error, EdgeAF3Error):
            raise state.error
        raise RuntimeError(f"the model failed to load: {state.error}") from state.error
