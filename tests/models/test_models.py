"""Model family: parameter counts, depth rules, torchvision-compatible state_dicts, feature extraction."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import effdense
from effdense import EfficientDenseBlock, EfficientDenseNet

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"

# label: (constructor, expected parameter count); counts from the issue (torchvision's and the paper's)
PARAM_COUNTS = {
    "densenet121": (lambda: effdense.densenet121(num_classes=1000), 7_978_856),
    "densenet169": (lambda: effdense.densenet169(num_classes=1000), 14_149_480),
    "densenet201": (lambda: effdense.densenet201(num_classes=1000), 20_013_928),
    "densenet161": (lambda: effdense.densenet161(num_classes=1000), 28_681_000),
    "bc-100-k12": (lambda: effdense.densenet_cifar(depth=100, growth_rate=12, num_classes=10), 769_162),
    "bc-250-k24": (lambda: effdense.densenet_cifar(depth=250, growth_rate=24, num_classes=10), 15_324_406),
    "bc-190-k40": (lambda: effdense.densenet_cifar(depth=190, growth_rate=40, num_classes=10), 25_624_430),
    "plain-40-k12": (lambda: effdense.densenet_cifar(depth=40, growth_rate=12, bottleneck=False,
                                                     compression=1.0), 1_019_722),
    "plain-100-k12": (lambda: effdense.densenet_cifar(depth=100, growth_rate=12, bottleneck=False), 6_979_642),
    "plain-100-k24": (lambda: effdense.densenet_cifar(depth=100, growth_rate=24, bottleneck=False), 27_249_082),
}


@pytest.mark.parametrize("label", list(PARAM_COUNTS))
def test_parameter_count(label):
    build, expected = PARAM_COUNTS[label]
    assert sum(p.numel() for p in build().parameters()) == expected


@pytest.mark.parametrize("name", sorted(effdense.MODELS))
def test_named_models_build_and_run(name):
    model = effdense.MODELS[name](num_classes=7)
    size = 32 if model.features.conv0.kernel_size == (3, 3) else 64
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_densenet264_layout():
    model = effdense.densenet264()
    assert [len(b) for b in model.blocks()] == [6, 12, 64, 48]


@pytest.mark.parametrize("depth,bottleneck,per_block", [(100, True, 16), (40, False, 12), (250, True, 41),
                                                         (10, True, 1), (7, False, 1), (190, True, 31)])
def test_depth_rule(depth, bottleneck, per_block):
    assert effdense.cifar_block_config(depth, bottleneck) == (per_block,) * 3


@pytest.mark.parametrize("depth,bottleneck", [(41, False), (99, True), (42, True), (4, False), (0, True)])
def test_bad_depth_lists_valid_depths(depth, bottleneck):
    with pytest.raises(ValueError, match=r"depth .* must be .*N \+ 4"):
        effdense.densenet_cifar(depth=depth, bottleneck=bottleneck)


def test_cifar_stems():
    bc = effdense.densenet_cifar(depth=100, growth_rate=12)
    plain = effdense.densenet_cifar(depth=40, growth_rate=12, bottleneck=False)
    assert bc.features.conv0.out_channels == 24 and plain.features.conv0.out_channels == 16
    assert bc.features.conv0.kernel_size == (3, 3) and not hasattr(bc.features, "norm0")
    assert plain.features.denseblock1.denselayer1.conv1.kernel_size == (3, 3)
    assert not hasattr(plain.features.denseblock1.denselayer1, "norm2")


def _torchvision_keys():
    data = json.loads((FIXTURES / "torchvision_densenet121_keys.json").read_text())
    return [(k, tuple(shape)) for k, shape in data["keys"]]


def test_state_dict_keys_and_shapes_match_torchvision_densenet121():
    ours = [(k, tuple(v.shape)) for k, v in effdense.densenet121().state_dict().items()]
    assert ours == _torchvision_keys()


def test_torchvision_state_dict_loads_into_every_backend():
    """A state_dict with torchvision's keys (built from the fixture) loads strictly, and all backends give
    the same outputs from it."""
    torch.manual_seed(0)
    sd = {}
    for k, shape in _torchvision_keys():
        if not shape:
            sd[k] = torch.tensor(3)
        elif len(shape) == 4:      # conv: He-scaled so 121 layers stay finite
            sd[k] = torch.randn(shape) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif k.endswith(("running_var", "norm5.weight")) or (k.endswith("weight") and "norm" in k):
            sd[k] = torch.rand(shape) + 0.5
        else:
            sd[k] = 0.1 * torch.randn(shape)
    model = effdense.densenet121(num_classes=1000).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    outs = {b: model.set_backend(b)(x) for b in ("naive", "checkpoint", "torch")}
    for b in ("checkpoint", "torch"):
        torch.testing.assert_close(outs[b], outs["naive"], rtol=1e-4, atol=1e-4)


def test_block_state_dict_round_trip_between_backends():
    a = EfficientDenseBlock(3, 8, bn_size=2, growth_rate=4, backend="naive")
    b = EfficientDenseBlock(3, 8, bn_size=2, growth_rate=4, backend="torch")
    b.load_state_dict(a.state_dict(), strict=True)
    a.load_state_dict(b.state_dict(), strict=True)
    assert list(a.state_dict()) == [f"denselayer{i}.{m}.{p}" for i in (1, 2, 3) for m, ps in
                                    (("norm1", "wbmvn"), ("conv1", "w"), ("norm2", "wbmvn"), ("conv2", "w"))
                                    for p in [{"w": "weight", "b": "bias", "m": "running_mean", "v": "running_var",
                                               "n": "num_batches_tracked"}[c] for c in ps]]


def test_include_top_false_and_global_pool():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    full = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=3).eval()
    fmap = effdense.densenet_cifar(depth=10, growth_rate=4, include_top=False, global_pool=None).eval()
    pooled = effdense.densenet_cifar(depth=10, growth_rate=4, include_top=False, global_pool="max").eval()
    fmap.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("classifier")})
    pooled.load_state_dict(fmap.state_dict())
    assert "classifier.weight" not in fmap.state_dict()
    with torch.no_grad():
        f = fmap(x)
        assert f.shape == (2, full.num_features, 8, 8)
        torch.testing.assert_close(pooled(x), f.amax(dim=(2, 3)))
        torch.testing.assert_close(full(x), full.classifier(f.mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="global_pool"):
        EfficientDenseNet(global_pool="sum")


def test_memory_efficient_flag_selects_checkpoint():
    assert EfficientDenseBlock(2, 4, memory_efficient=True).backend == "checkpoint"
    assert all(b.backend == "checkpoint" for b in effdense.densenet121(memory_efficient=True).blocks())


def test_transition_pool_first_equals_torchvision_order():
    t = effdense.Transition(6, 3).double().eval()
    t.norm.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    torchvision_order = t.pool(t.conv(t.relu(t.norm(x))))
    torch.testing.assert_close(t(x), torchvision_order, rtol=1e-12, atol=1e-12)


try:
    import torchvision
except ImportError:  # CPU CI: torchvision has no CPU build here
    torchvision = None


@pytest.mark.skipif(torchvision is None, reason="torchvision is not installed")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_same_outputs_as_torchvision_densenet121(train):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).double().train(train)
    ours = effdense.densenet121().double().train(train)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for backend in ("naive", "torch"):
        torch.testing.assert_close(ours.set_backend(backend)(x), tv(x), rtol=1e-9, atol=1e-9)
    tv.load_state_dict(ours.state_dict(), strict=True)
