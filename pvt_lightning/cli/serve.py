"""``pvt-lightning serve``: a checkpoint or export behind an HTTP endpoint (LitServe), with dynamic batching.

    pvt-lightning serve --checkpoint runs/b0/version_0/checkpoints/best.ckpt --port 8000
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict

See docs/serving.md for the options, the JSON answered and client examples.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional, Union

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from pvt_lightning.cli.options import option
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from pvt_lightning.errors import UsageError
from pvt_lightning.serve.app import ServeSettings, build_server, run_server


@dataclass
class ServeConfig:
    """``pvt-lightning serve``'s options (flags, or keys of a ``--config`` YAML file)."""

    checkpoint: Optional[str] = option(None, "the model to serve: a training checkpoint (.ckpt) or an export "
                                       "(.onnx, .pt2)", "serve", metavar="CKPT_OR_EXPORT")
    operating_point: Optional[str] = option(None, "apply this operating_point.json as predict does: calibrated "
                                            "probabilities and a decision (a class or abstain) per image", "serve",
                                            metavar="FILE")
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = option("127.0.0.1", "interface to listen on (127.0.0.1: this "
                                                         "machine only)", "serve")
    port: PositiveInt = option(8000, "TCP port (1024-65535)", "serve")
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where the model runs", "serve")
    devices: Union[PositiveInt, Literal["auto"]] = option("auto", "how many devices (GPUs) to use", "serve")
    workers_per_device: PositiveInt = option(1, "inference worker processes per device, each with its own copy "
                                             "of the model", "serve")
    max_batch_size: PositiveInt = option(16, "dynamic batching: at most this many requests per forward pass "
                                         "(1: no batching)", "serve")
    batch_timeout: NonNegativeFloat = option(0.002, "dynamic batching: seconds to wait for more requests once "
                                             "one is in", "serve", metavar="SECONDS")
    timeout: PositiveFloat = option(30.0, "seconds a request may wait in the queue before a 504", "serve",
                                    metavar="SECONDS")
    api_servers: Optional[PositiveInt] = option(None, "HTTP server processes, which also decode and crop the "
                                                "images (default: one per inference worker)", "serve")
    threads: Optional[PositiveInt] = option(None, "intra-op threads per inference worker (default: torch's / "
                                            "onnxruntime's)", "serve")
    top_k: PositiveInt = option(5, "classes listed under \"top\" in each answer", "serve")
    max_upload_mb: PositiveFloat = option(32.0, "largest request body; larger uploads get a 413", "serve",
                                          metavar="MB")
    max_image_pixels: NonNegativeInt = option(DEFAULT_MAX_IMAGE_PIXELS, "pixel budget per image, read from its "
                                              "header before decoding (0: no limit); over it: 413", "serve")
    log_level: Literal["debug", "info", "warning", "error"] = option("warning", "server log level", "serve")


CONFIG = ServeConfig


def settings_of(config: ServeConfig):
    """The serve package's settings for ``config``."""
    return ServeSettings(
        model=config.checkpoint, operating_point=config.operating_point, host=config.host, port=config.port,
        accelerator=config.accelerator, devices=config.devices, workers_per_device=config.workers_per_device,
        max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, timeout=config.timeout,
        api_servers=config.api_servers, threads=config.threads, top_k=config.top_k,
        max_upload_bytes=int(config.max_upload_mb * 2**20), max_image_pixels=config.max_image_pixels or None,
        log_level=config.log_level)


def run(config: ServeConfig) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    if config.checkpoint is None:
        raise UsageError("--checkpoint is required: a .ckpt from training, or an .onnx / .pt2 export")
    settings = settings_of(config)
    server = build_server(settings)
    print(f"Serving {config.checkpoint} on http://{config.host}:{config.port}/predict (batches of up to "
          f"{config.max_batch_size}, {config.workers_per_device} worker(s) per device); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    run_server(server, settings)
    return 0
