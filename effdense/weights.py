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
        if os.path.isdir(path):
            raise IsADirectoryError(f"weights path {path!r} is a directory; expected a weights file (a state_dict "
                                    "saved with torch.save)")
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


#: a dense layer's key: its block and its index in the block
LAYER_KEY = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")
#: ANSI terminal escapes (torch's messages may bold a phrase): never inside a one-line error
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def architecture(state: Mapping) -> tuple | None:
    """``(stem, k, layers per block, bottleneck)`` of the DenseNet a state_dict holds, read from its keys and
    shapes; None when it is not a DenseNet's."""
    layers: dict[int, int] = {}
    for key in state:
        match = LAYER_KEY.match(key)
        if match:
            block, layer = int(match.group(1)), int(match.group(2))
            layers[block] = max(layers.get(block, 0), layer)
    first = "features.denseblock1.denselayer1."
    bottleneck = first + "conv2.weight" in state
    conv = state.get(first + ("conv2.weight" if bottleneck else "conv1.weight"))
    if not layers or conv is None:
        return None
    stem = "imagenet" if "features.norm0.weight" in state else "cifar"
    return stem, int(conv.shape[0]), tuple(layers[b] for b in sorted(layers)), bottleneck


def describe(arch: tuple) -> str:
    """An :func:`architecture` in words, by its name where it is one of ``effdense.MODELS``."""
    from .models import IMAGENET_CONFIGS, MODELS, cifar_block_config, densenet_depth  # models imports this module
    stem, k, blocks, bottleneck = arch
    named = {("imagenet", cfg[0], cfg[1], True): name for name, cfg in IMAGENET_CONFIGS.items()}
    named |= {("cifar", fn.config[1], cifar_block_config(fn.config[0], fn.config[2]), fn.config[2]): name
              for name, fn in MODELS.items() if hasattr(fn, "config")}
    depth = densenet_depth(blocks, bottleneck)
    detail = f"depth {depth}, k={k}, blocks {'-'.join(map(str, blocks))}" + ("" if bottleneck else ", no bottleneck")
    if arch in named:
        return f"{named[arch]} ({detail}; effdense.{named[arch]}())"
    if stem == "cifar" and len(blocks) == 3 and len(set(blocks)) == 1:
        return (f"a CIFAR DenseNet ({detail}; effdense.densenet_cifar(depth={depth}, growth_rate={k}"
                + ("" if bottleneck else ", bottleneck=False") + "))")
    return f"a DenseNet with the {stem} stem ({detail})"


def _mismatch(model: nn.Module, state: dict, path: str) -> str | None:
    """One line naming how ``state`` (keys already renamed) does not fit ``model``, or None if it fits."""
    own = model.state_dict()
    theirs, ours = architecture(state), architecture(own)
    if theirs is not None and ours is not None and theirs != ours:
        return (f"weights file {path} holds {describe(theirs)}, but this model is {describe(ours)}: build the "
                "file's model to load it")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    parts = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
             ((missing, "keys missing"), (unexpected, "unexpected keys"), (shapes, "shape mismatches")) if keys]
    if not parts:
        return None
    hint = ""
    if not missing and not unexpected and all(s.startswith("classifier.") for s in shapes):
        hint = (f"; the file has {state['classifier.weight'].shape[0]} classes: pass "
                f"num_classes={state['classifier.weight'].shape[0]}, or include_top=False for features")
    return f"weights file {path} does not fit this model: " + "; ".join(parts) + hint


def _is_training_checkpoint(path: str) -> bool:
    """Whether ``path`` is a torch.save zip whose pickle names the entries of an effdense-train checkpoint; read
    with pickletools, which runs nothing."""
    import pickletools
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            pickle = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            names = {arg for op, arg, _ in pickletools.genops(archive.read(pickle)) if isinstance(arg, str)}
    except Exception:  # noqa: BLE001 - not a zip, no pickle, a broken pickle: not a readable checkpoint
        return False
    return {"model", "optimizer", "model_spec", "global_step"} <= names


def load_weights(model: nn.Module, weights, arch: str | None = None) -> nn.Module:
    """Load a weights file into ``model`` strictly: torchvision's published ``densenet*.pth`` (legacy keys),
    gpleiss/efficient_densenet_pytorch's checkpoints, any torchvision or effdense ``state_dict``. ``weights`` as in
    :func:`weights_path`. With ``include_top=False`` the file's classifier is ignored. Errors are one line."""
    path = weights_path(weights, arch)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: say which file and why, in one line
        if _is_training_checkpoint(path):
            raise ValueError(f"weights file {path} is an effdense-train checkpoint (weights with optimizer and run "
                             f"state): evaluate it with effdense-eval {path}, or load the state_dict under its "
                             "'model' key (effdense.train.checkpoints.load(PATH)['model'])") from None
        first = ANSI_ESCAPE.sub("", str(err)).strip().splitlines()[0] if str(err).strip() else ""
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
