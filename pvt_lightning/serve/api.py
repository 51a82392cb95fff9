"""The LitAPI: batches of preprocessed crops -> logits -> probabilities, top classes and decisions as JSON.

One inference worker (``workers_per_device`` of them per device) runs ``setup`` once, then per batch that
LitServe gathers (up to ``max_batch_size`` requests, waiting at most ``batch_timeout`` seconds for more):
``decode_request`` per request, ``batch``, ``predict``, ``unbatch``, ``encode_response`` per request.
Requests arrive already decoded and cropped (``serve.upload``), so nothing here can fail on a user's file.

No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s annotation object to
build the endpoint.
"""

import signal
from typing import Any, Optional

import litserve as ls
import torch

from pvt_lightning.evaluation.operating_point import ABSTAIN
from pvt_lightning.serve.preprocess import normalize
from pvt_lightning.serve.upload import ImageUpload


class ClassifierAPI(ls.LitAPI):
    """Serves one model file; ``operating_point``: an operating_point.json applied as ``predict`` applies it
    (probabilities ``softmax(logits / T)``, a ``decision`` per image: a class or "abstain")."""

    def __init__(self, model_path: str, operating_point: Optional[str] = None, top_k: int = 5,
                 threads: Optional[int] = None, max_batch_size: int = 1, batch_timeout: float = 0.0):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_path, self.operating_point_path = str(model_path), operating_point
        self.top_k, self.threads = top_k, threads

    def setup(self, device: str) -> None:
        from pvt_lightning.evaluation.operating_point import OperatingPoint
        from pvt_lightning.serve.model import load_model, model_info

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's shutdown terminates workers
        info = model_info(self.model_path)
        self.class_names = list(info.class_names)
        self.mean, self.std = info.preprocessing.mean, info.preprocessing.std
        self.model = load_model(self.model_path, device=device, threads=self.threads)
        self.model_device = torch.device(device)
        self.point = (OperatingPoint.load(self.operating_point_path, self.class_names)
                      if self.operating_point_path else None)
        self.thresholds = list(self.point.thresholds.values()) if self.point else None
        self.multilabel, self.threshold = info.task == "multilabel", info.threshold

    def decode_request(self, request: ImageUpload, **kwargs: Any) -> torch.Tensor:
        return torch.from_numpy(request["image"])  # uint8 (3, H, W)

    def batch(self, inputs: list) -> torch.Tensor:
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """uint8 (B, 3, H, W), or one (3, H, W) without batching -> probabilities (B, C) / (C,) on the CPU."""
        from pvt_lightning.evaluation.calibration import calibrated_probs

        single = x.ndim == 3
        images = normalize((x[None] if single else x).to(self.model_device), self.mean, self.std)
        logits = self.model(images).float().cpu()
        temperature = self.point.temperature if self.point else 1.0
        probs = (logits / temperature).sigmoid() if self.multilabel else calibrated_probs(logits, temperature)
        return probs[0] if single else probs

    def unbatch(self, output: torch.Tensor) -> list:
        return list(output)

    def encode_response(self, probs: torch.Tensor, **kwargs: Any) -> dict:
        """``{"top": [{"class", "probability"}...], "probabilities": {class: p}, "decision"}`` (decision only
        with an operating point); multi-label: sigmoid probabilities and ``"labels"``, every class over its
        threshold, instead of a decision."""
        from pvt_lightning.evaluation.operating_point import decide

        k = min(self.top_k, len(self.class_names))
        values, indices = probs.topk(k)
        every = probs.tolist()
        response: dict = {
            "top": [{"class": self.class_names[i], "probability": p} for p, i in zip(values.tolist(), indices.tolist())],
            "probabilities": dict(zip(self.class_names, every)),
        }
        if self.multilabel:  # every label at or above its threshold (the operating point's, else the model's)
            from pvt_lightning.evaluation.multilabel import over_thresholds

            over = over_thresholds(probs[None], self.thresholds if self.point else self.threshold)[0]
            response["labels"] = [name for name, on in zip(self.class_names, over.tolist()) if on]
        elif self.point is not None:
            chosen = int(decide(probs[None], self.thresholds)[0])
            response["decision"] = ABSTAIN if chosen < 0 else self.class_names[chosen]
        return response
