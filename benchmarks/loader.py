"""The ``loader`` suite: how many images per second ``--dataset folder`` decodes and augments, per worker, beside the
training step rate of the model it feeds, so a user can tell whether data or model is the bottleneck.

The images are JPEGs written for the run: crops of scikit-learn's two sample photographs (``load_sample_images``,
427x640) where scikit-learn is installed, else smooth generated images, at ``source`` size (about an ImageNet
photograph's) and JPEG ``quality``. Each row streams them through :class:`effdense.train.data.folder.ImageFiles`
(PIL decode, EXIF, RGB, ``transforms.v2`` RandomResizedCrop to ``size``, flip, normalization) with ``workers``
DataLoader processes: one untimed epoch starts the persistent workers, then ``epochs`` epochs are timed. The
``model`` row is a training step of ``model`` at ``size`` (:class:`benchmarks.common.Step`, random data).
``--set workers=[]`` measures the model alone, ``--set model=null`` the loader alone. The loader needs torchvision
and pillow (``effdense[vision]``); without them its row says so.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .common import Step, backend_unavailable, build_model, median_ms


def _sources(n: int, size: tuple[int, int], seed: int = 0):
    """``n`` PIL images of ``size`` (width, height): random crops of scikit-learn's sample photographs, or smooth
    random images without scikit-learn; and which of the two."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_sample_images
        photos, kind = [torch.tensor(a) for a in load_sample_images().images], "sklearn sample photographs"
    except ImportError:
        low = torch.rand(4, 3, 12, 16, generator=g)
        up = torch.nn.functional.interpolate(low, size=(size[1] * 2, size[0] * 2), mode="bicubic")
        photos, kind = [(up[i].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0) for i in range(4)], "generated"
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        top = int(torch.randint(p.shape[0] - size[1] + 1, (1,), generator=g))
        left = int(torch.randint(p.shape[1] - size[0] + 1, (1,), generator=g))
        out.append(Image.fromarray(p[top:top + size[1], left:left + size[0]].contiguous().numpy()))
    return out, kind


def _loader_row(files, cfg: dict, workers: int, device: torch.device) -> dict:
    from effdense.train.data import folder as F
    tf = F.transform(cfg["size"], F.IMAGENET_MEAN, F.IMAGENET_STD, train=True)
    split = F.ImageFiles([(f, 0) for f in files], tf, workers=workers)
    list(split.stream(cfg["batch"], device, shuffle=True))               # start the workers, warm the caches
    t0 = time.perf_counter()
    n = sum(len(y) for e in range(cfg["epochs"]) for _, y in split.stream(cfg["batch"], device, shuffle=True,
                                                                           epoch=e + 1))
    seconds = time.perf_counter() - t0
    rate = n / seconds
    return dict(kind="loader", workers=workers, batch=cfg["batch"], size=cfg["size"], images=n, seconds=seconds,
                images_per_s=rate, images_per_s_per_worker=rate / max(workers, 1), status="ok")


def _model_row(cfg: dict, device: torch.device) -> dict:
    backend, batch = cfg["model_backend"], cfg["model_batch"]
    row = dict(kind="model", model=cfg["model"], backend=backend, batch=batch, size=cfg["size"])
    why = backend_unavailable(backend, device, torch.float32)
    if why is not None:
        return dict(row, status=f"unavailable: {why}")
    step = Step(build_model(cfg["model"], None, 0, backend, device), batch, cfg["size"], "fp32", device)
    ms = median_ms(step.step, device, warmup=1, reps=cfg["model_reps"])
    return dict(row, step_ms=ms, images_per_s=batch * 1e3 / ms, status="ok")


def loader(device: torch.device, quick: bool, backends: list[str], overrides: dict | None = None,
           rows: list | None = None) -> tuple[dict, list[dict]]:
    """Loader images/s with each worker count, and the model's training images/s (see the module)."""
    from .suites import _begin, _override
    cfg = dict(images=64, source=[500, 375], quality=90, size=224, batch=16, epochs=2, workers=[0, 1, 2],
               model="densenet121", model_backend="cpp" if "cpp" in backends else backends[0], model_batch=8,
               model_reps=2)
    if quick:
        cfg.update(images=16, batch=4, epochs=1, workers=[0, 1], size=64, model_batch=2)
    cfg = _override(cfg, overrides)
    rows = _begin(rows, cfg)
    from effdense.train.data import DataError
    from effdense.train.data.folder import require_vision
    try:
        if cfg["workers"]:
            require_vision()
    except DataError as err:
        rows.append(dict(kind="loader", status=f"unavailable: {err}"))
    if cfg["workers"] and not rows:
        with tempfile.TemporaryDirectory(prefix="effdense-loader-") as tmp:
            images, cfg["source_kind"] = _sources(cfg["images"], tuple(cfg["source"]))
            files = [os.path.join(tmp, f"{i}.jpg") for i in range(len(images))]
            for img, path in zip(images, files):
                img.save(path, quality=cfg["quality"])
            cfg["mean_file_bytes"] = sum(os.path.getsize(f) for f in files) / len(files)
            for workers in cfg["workers"]:
                rows.append(_loader_row(files, cfg, workers, device))
    if cfg["model"]:
        rows.append(_model_row(cfg, device))
    return cfg, rows
