"""Weight files from the ecosystem: torchvision's published files (legacy ``norm.1`` keys), torch.hub's cache,
gpleiss/efficient_densenet_pytorch checkpoints (``norm_final``), wrapped state dicts; one-line errors, never a
download."""
from __future__ import annotations

import re

import pytest
import torch

import effdense
from effdense import weights

LEGACY_NAMES = {"norm1": "norm.1", "relu1": "relu.1", "conv1": "conv.1", "norm2": "norm.2", "relu2": "relu.2",
                "conv2": "conv.2"}


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so a key loaded into the wrong place shows."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def legacy(state: dict) -> dict:
    """A state dict as torchvision's published files have it: ``denselayer1.norm.1.weight`` for
    ``denselayer1.norm1.weight`` (the inverse of torchvision's regex) and no num_batches_tracked (pre-0.4.1)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.)(norm1|relu1|conv1|norm2|relu2|conv2)\.",
                     lambda m: m.group(1) + LEGACY_NAMES[m.group(2)] + ".", key)
        out[key] = value
    return out


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def densenet121():
    return randomized(effdense.densenet121())


def test_torchvision_legacy_keys_load_strictly(densenet121, tmp_path):
    sd = legacy(densenet121.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd and not any("norm1" in k for k in sd)
    model = effdense.densenet121()
    model.load_state_dict(sd, strict=True)  # the hook renames; the caller's dict is untouched
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    assert_same_state(model, densenet121)
    torch.save(sd, tmp_path / "densenet121-a639ec97.pth")
    assert_same_state(effdense.densenet121(weights=tmp_path / "densenet121-a639ec97.pth"), densenet121)


def test_torch_hub_cache_and_torchvision_names(densenet121, tmp_path, monkeypatch):
    """A bare file name is also looked for in torch.hub's checkpoints folder, where torchvision downloads to;
    "IMAGENET1K_V1" names torchvision's file there."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        effdense.densenet121(weights="IMAGENET1K_V1")
    assert str(err.value) == (
        f"weights file 'densenet121-a639ec97.pth' not found (looked for "
        f"'{tmp_path / 'hub' / 'checkpoints' / 'densenet121-a639ec97.pth'}'): download "
        f"https://download.pytorch.org/models/densenet121-a639ec97.pth into {tmp_path / 'hub' / 'checkpoints'} or "
        "pass its path (effdense never downloads)")
    with pytest.raises(FileNotFoundError, match=r"looked for 'densenet121-a639ec97.pth' and .*hub/checkpoints/"
                                                r"densenet121-a639ec97.pth'\): download https://download.pytorch.org"):
        effdense.densenet121(weights="densenet121-a639ec97.pth")
    cached = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    torch.save(legacy(densenet121.state_dict()), cached)
    assert {weights.weights_path(w, "densenet121") for w in ("densenet121-a639ec97.pth", "IMAGENET1K_V1", "DEFAULT")} \
        == {str(cached)}
    assert_same_state(effdense.densenet121(weights="IMAGENET1K_V1"), densenet121)


def gpleiss_keys(state: dict) -> dict:
    """gpleiss/efficient_densenet_pytorch's names: features.norm_final for features.norm5."""
    return {k.replace("features.norm5.", "features.norm_final."): v for k, v in state.items()}


@pytest.mark.parametrize("old_layers", [False, True], ids=["current", "with-legacy-layer-keys"])
def test_gpleiss_checkpoint_loads_and_computes_the_same_function(tmp_path, old_layers):
    """Its default DenseNet-BC-100 (k=12) has 596 keys; renamed, they fit, and the model computes the same function
    in float64 (its older release also had torchvision's legacy layer keys)."""
    ref = randomized(effdense.densenet_cifar(depth=100, growth_rate=12)).double()
    sd = gpleiss_keys(ref.state_dict())
    assert len(sd) == 596 and "features.norm_final.running_var" in sd
    torch.save(legacy(sd) if old_layers else sd, tmp_path / "model.dat")
    model = effdense.densenet_cifar(depth=100, growth_rate=12, weights=tmp_path / "model.dat").double().eval()
    assert_same_state(model, ref)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_wrapped_state_dicts_and_feature_models(tmp_path):
    ref = randomized(effdense.densenet_cifar(depth=10, growth_rate=4))
    ddp = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": ddp, "epoch": 3}, tmp_path / "wrapped.pt")
    assert_same_state(effdense.densenet_cifar(depth=10, growth_rate=4, weights=tmp_path / "wrapped.pt"), ref)
    model = effdense.densenet_cifar(depth=10, growth_rate=4)
    assert effdense.load_weights(model, str(tmp_path / "wrapped.pt")) is model
    assert_same_state(model, ref)
    features = effdense.densenet_cifar(depth=10, growth_rate=4, include_top=False, weights=tmp_path / "wrapped.pt")
    assert "classifier.weight" not in features.state_dict()  # the file's classifier is left out


def test_weights_that_do_not_fit_say_how_in_one_line(tmp_path):
    ten = effdense.densenet_cifar(depth=10, growth_rate=4)
    torch.save(ten.state_dict(), tmp_path / "ten.pt")
    torch.save({k: v for k, v in ten.state_dict().items() if not k.startswith("features.norm5.")},
               tmp_path / "partial.pt")
    cases = [  # (model kwargs and weights, message pattern)
        (dict(depth=10, growth_rate=4, num_classes=3, weights=tmp_path / "ten.pt"),
         re.escape(f"weights file {tmp_path / 'ten.pt'} does not fit this model: 2 shape mismatches (first: "
                   f"classifier.weight: [10, {ten.num_features}] in the file, [3, {ten.num_features}] in the model); "
                   "the file has 10 classes: pass num_classes=10, or include_top=False for features") + "$"),
        (dict(depth=10, growth_rate=4, weights=tmp_path / "partial.pt"),  # same architecture, keys missing
         re.escape(f"weights file {tmp_path / 'partial.pt'} does not fit this model: 4 keys missing (first: "
                   "features.norm5.weight)") + "$"),
        (dict(depth=10, growth_rate=4, weights=tmp_path / "junk.pt"),
         r"junk.pt cannot be read as a state_dict with torch.load\(weights_only=True\) \(UnpicklingError: "),
        (dict(depth=10, weights="IMAGENET1K_V1"), "names torchvision's ImageNet weights, which exist for densenet121"),
    ]
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            effdense.densenet_cifar(**kwargs)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("saved,build,theirs,ours", [
    (effdense.densenet169, effdense.densenet121,
     "densenet169 (depth 169, k=32, blocks 6-12-32-32; effdense.densenet169())",
     "densenet121 (depth 121, k=32, blocks 6-12-24-16; effdense.densenet121())"),
    (lambda: effdense.densenet_cifar(depth=16, growth_rate=4), lambda **kw: effdense.densenet_cifar(10, 4, **kw),
     "a CIFAR DenseNet (depth 16, k=4, blocks 2-2-2; effdense.densenet_cifar(depth=16, growth_rate=4))",
     "a CIFAR DenseNet (depth 10, k=4, blocks 1-1-1; effdense.densenet_cifar(depth=10, growth_rate=4))"),
    (lambda: effdense.densenet_cifar(depth=40, growth_rate=12, bottleneck=False, num_classes=100),
     lambda **kw: effdense.densenet_cifar(40, 12, **kw),
     "densenet40 (depth 40, k=12, blocks 12-12-12, no bottleneck; effdense.densenet40())",
     "a CIFAR DenseNet (depth 40, k=12, blocks 6-6-6; effdense.densenet_cifar(depth=40, growth_rate=12))"),
], ids=["169-into-121", "cifar-depth", "plain-into-bc"])
def test_another_architecture_is_named_not_a_class_count(tmp_path, saved, build, theirs, ours):
    """Before: "pass num_classes=1000" for a densenet169 file in densenet121() (both have 1000 classes)."""
    path = tmp_path / "w.pt"
    torch.save(saved().state_dict(), path)
    with pytest.raises(ValueError) as err:
        build(weights=path)
    assert str(err.value) == (f"weights file {path} holds {theirs}, but this model is {ours}: build the file's model "
                              "to load it")


def test_a_directory_is_not_a_weights_file(tmp_path):
    with pytest.raises(IsADirectoryError) as err:
        effdense.densenet_cifar(depth=10, growth_rate=4, weights=tmp_path)
    assert str(err.value) == (f"weights path {str(tmp_path)!r} is a directory; expected a weights file (a state_dict "
                              "saved with torch.save)")


def test_a_training_checkpoint_names_effdense_eval_and_its_model_key(tmp_path):
    """Before: torch's weights_only message, with its ANSI bold codes, inside the error."""
    import numpy as np
    model = effdense.densenet_cifar(depth=10, growth_rate=4)
    ckpt = {"model": model.state_dict(), "optimizer": {}, "model_spec": {"arch": "densenet_cifar"}, "global_step": 2,
            "rng": [{"numpy": np.random.get_state()}]}  # numpy's state: what weights_only refuses
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError) as err:
        effdense.densenet_cifar(depth=10, growth_rate=4, weights=tmp_path / "last.pt")
    assert str(err.value) == (f"weights file {tmp_path / 'last.pt'} is an effdense-train checkpoint (weights with "
                              f"optimizer and run state): evaluate it with effdense-eval {tmp_path / 'last.pt'}, or "
                              "load the state_dict under its 'model' key (effdense.train.checkpoints.load(PATH)"
                              "['model'])")
    torch.save({"other": np.random.get_state()}, tmp_path / "other.pt")  # any other file torch refuses
    with pytest.raises(ValueError, match=r"^weights file .*other.pt cannot be read as a state_dict") as err:
        effdense.densenet_cifar(depth=10, growth_rate=4, weights=tmp_path / "other.pt")
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
