"""Loading weight files into effdense models, strictly and without downloading.

Files from torchvision (its published ``densenet*.pth``, whose legacy keys ``norm.1``/``conv.1`` predate dots being
forbidden in module names), from gpleiss/efficient_densenet_pytorch (``norm_final`` for ``norm5``), any torchvision
or effdense ``state_dict``, wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` or with DDP's ``module.`` prefix.
A file that does not fit says how in one line.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

#: torchvision's pattern for the keys of its published weight files, saved when module names could still hold dots
#: (``denselayer1.norm.1.weight`` for ``denselayer1.norm1.weight``; its ``_load_state_dict``), and num_batches_tracked
LEGACY_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
#: modules other implementations name differently: gpleiss/efficient_densenet_pytorch calls norm5 ``norm_final``
RENAMED_MODULES = {"features.norm_final.": "features.norm5."}


def rename_legacy_keys(state_dict: dict, prefix: str = "") -> dict:
    """Rename, in place, the legacy keys under ``prefix`` (:data:`LEGACY_LAYER_KEY`, :data:`RENAMED_MODULES`)
    to this module tree's; returns ``state_dict``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        match = LEGACY_LAYER_KEY.match(local)
        if match:
            local = match.group(1) + match.group(2)
        for old, new in RENAMED_MODULES.items():
            if local.startswith(old):
                local = new + local[len(old):]
        if prefix + local != key:
            if prefix + local in state_dict:
                raise ValueError(f"the state_dict holds both {key!r} and {prefix + local!r}, the same tensor")
            state_dict[prefix + local] = state_dict.pop(key)
    return state_dict


#: torchvision's ImageNet weights (the files ``torchvision.models.densenet*(weights="IMAGENET1K_V1")`` downloads)
TORCHVISION_WEIGHTS = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet161": "https://download.pytorch.org/models/densenet161-8d451a50.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "densenet201": "https://download.pytorch.org/models/densenet201-c1103571.pth",
}


def hub_checkpoints() -> str:
    """The folder where ``torch.hub`` (and torchvision) keep downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def weights_path(weights, arch: str | None = None) -> str:
    """The file ``weights`` names: a path; a bare file name also found in :func:`hub_checkpoints`;
    ``"IMAGENET1K_V1"``/``"DEFAULT"`` (or a torchvision ``Weights`` member) for torchvision's file of ``arch`` there.
    Never downloads: a missing file raises ``FileNotFoundError`` naming where it was looked for and its URL."""
    url = getattr(weights, "url", None) or (TORCHVISION_WEIGHTS.get(arch) if weights in ("DEFAULT", "IMAGENET1K_V1")
                                            else None)
    if weights in ("DEFAULT", "IMAGENET1K_V1") and url is None:
        raise ValueError(f"weights={weights!r} names torchvision's ImageNet weights, which exist for "
                         f"{', '.join(TORCHVISION_WEIGHTS)}, not for {arch or 'this model'}; pass a file path")
    name = os.fspath(weights) if url is None else url.rsplit("/", 1)[1]
    candidates = [name] if url is None else []
    if os.path.basename(name) == name:
        candidates.append(os.path.join(hub_checkpoints(), name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    source = url or next((u for u in TORCHVISION_WEIGHTS.values() if u.endswith("/" + os.path.basename(name))),
                         None)
    fetch = f"download {source} into {hub_checkpoints()} or pass its path" if source else "check the path"
    raise FileNotFoundError(f"weights file {name!r} not found (looked for {' and '.join(map(repr, candidates))}): "
                            f"{fetch} (effdense never downloads)")


def _state_dict_in(obj, path: str) -> dict:
    """The state_dict inside a loaded file: the file itself, or its ``state_dict``/``model`` entry; a ``module.``
    prefix (``DataParallel``, DDP) is dropped."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state_dict (a dict of tensors), but a {type(obj).__name__}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict, path: str) -> str | None:
    """One line naming how ``state`` (keys already renamed) does not fit ``model``, or None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    parts = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
             ((missing, "keys missing"), (unexpected, "unexpected keys"), (shapes, "shape mismatches")) if keys]
    if not parts:
        return None
    hint = ""
    if "classifier.weight" in state and "classifier.weight" in own and \
            state["classifier.weight"].shape != own["classifier.weight"].shape:
        hint = (f"; the file has {state['classifier.weight'].shape[0]} classes: pass "
                f"num_classes={state['classifier.weight'].shape[0]}, or include_top=False for features")
    return f"weights file {path} does not fit this model: " + "; ".join(parts) + hint


def load_weights(model: nn.Module, weights, arch: str | None = None) -> nn.Module:
    """Load a weights file into ``model`` strictly: torchvision's published ``densenet*.pth`` (legacy keys),
    gpleiss/efficient_densenet_pytorch's checkpoints, any torchvision or effdense ``state_dict``. ``weights`` as in
    :func:`weights_path`. With ``include_top=False`` the file's classifier is ignored. Errors are one line."""
    path = weights_path(weights, arch)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: say which file and why, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"weights file {path} cannot be read as a state_dict with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {first}); an effdense-train checkpoint is evaluated with "
                         "effdense-eval") from None
    state = rename_legacy_keys(_state_dict_in(obj, path))
    if not getattr(model, "include_top", True):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    problem = _mismatch(model, state, path)
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state, strict=True)
    return model


def with_weights(model: nn.Module, weights, arch: str | None) -> nn.Module:
    return model if weights is None else load_weights(model, weights, arch)
