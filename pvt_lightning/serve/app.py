"""Settings -> a running LitServer: ``POST /predict``, ``GET /health`` (200 once every worker has loaded the
model, 503 before) and ``GET /info`` (the model's classes and preprocessing).

    from pvt_lightning.serve.app import ServeSettings, serve

    serve(ServeSettings("model.onnx", port=8000, max_batch_size=16, batch_timeout=0.002))

The model file and the operating point are checked here, in the calling process, before any worker starts:
a wrong file is one error message, not a worker dying at start-up.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from pvt_lightning.errors import MissingExportDependency, UsageError

EXTRA_HINT = 'pip install "pvt-lightning[serve]"'
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""What LitServe binds to: the loopback interface (the default), or every interface."""


@dataclass
class ServeSettings:
    """Everything the server needs; ``cli/serve.py``'s ServeConfig maps its flags onto these."""

    model: str
    operating_point: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    accelerator: str = "auto"
    devices: int | str = "auto"
    workers_per_device: int = 1
    max_batch_size: int = 16
    batch_timeout: float = 0.002
    timeout: float = 30.0
    api_servers: int | None = None
    threads: int | None = None
    top_k: int = 5
    max_upload_bytes: int = 32 * 2**20
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    log_level: str = "warning"


def require_litserve() -> Any:
    try:
        import litserve
    except ImportError as err:
        raise MissingExportDependency(f"litserve is not installed; serving needs the serve extra: {EXTRA_HINT}") from err
    return litserve


def check_settings(settings: ServeSettings) -> None:
    if settings.host not in HOSTS:
        raise UsageError(f"--host {settings.host}: LitServe binds to one of {', '.join(HOSTS)} (127.0.0.1: this "
                         "machine only; 0.0.0.0 / ::: every interface)")
    if not 1024 <= settings.port <= 65535:
        raise UsageError(f"--port {settings.port}: choose a port from 1024 to 65535")
    if settings.batch_timeout >= settings.timeout:
        raise UsageError(f"--batch-timeout {settings.batch_timeout} must be shorter than --timeout {settings.timeout}")


def build_server(settings: ServeSettings):
    """The LitServer for ``settings`` (not started): model file and operating point read and checked first."""
    ls = require_litserve()
    from pvt_lightning.evaluation.report import OperatingPoint
    from pvt_lightning.serve.api import ClassifierAPI
    from pvt_lightning.serve.model import model_info
    from pvt_lightning.serve.preprocess import ImagePipeline
    from pvt_lightning.serve.upload import STATE_KEY, UploadSettings

    check_settings(settings)
    info = model_info(settings.model)
    if settings.operating_point:
        OperatingPoint.load(settings.operating_point, info.class_names)  # DataError now, not in every worker
    api = ClassifierAPI(str(info.path), settings.operating_point, top_k=settings.top_k, threads=settings.threads,
                        max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout)
    server = ls.LitServer(api, accelerator=settings.accelerator, devices=settings.devices,
                          workers_per_device=settings.workers_per_device, timeout=settings.timeout,
                          model_metadata=info.describe())
    pipeline = ImagePipeline(info.preprocessing, settings.max_image_pixels or None)
    setattr(server.app.state, STATE_KEY, UploadSettings(pipeline, settings.max_upload_bytes))
    return server


def serve(settings: ServeSettings) -> None:
    """Build and run the server until SIGINT or SIGTERM (both shut the workers down)."""
    run_server(build_server(settings), settings)


def run_server(server, settings: ServeSettings) -> None:
    """Run a ``build_server`` server until SIGINT or SIGTERM (both shut the workers down)."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt  # LitServe's graceful shutdown path (it handles Ctrl-C)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked HTTP server process: end as by default
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, interrupt)
    server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers,
               log_level=settings.log_level, generate_client_file=False)
