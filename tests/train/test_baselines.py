"""The comparison CNNs build for 32x32 inputs, train a step, and run under the training command."""
import json

import pytest
import torch

from effdense import train
from effdense.train.baselines import BASELINES

#: parameter counts of the 10-class, 3-channel models (a change in an architecture shows here)
PARAMS = {"lenet5": 62_006, "alexnet": 36_054_858, "zfnet": 37_318_538, "vgg16": 14_724_042, "vgg19": 20_035_018,
          "googlenet": 5_871_914, "resnet50": 23_520_842}


@pytest.mark.parametrize("name", list(BASELINES))
def test_forward_backward_32x32(name):
    torch.manual_seed(0)
    model = BASELINES[name](num_classes=10, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_and_classes():
    assert BASELINES["lenet5"](num_classes=7, in_channels=1)(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert BASELINES["resnet50"](num_classes=100, in_channels=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 100)


def test_training_command_runs_a_baseline(tmp_path, capsys):
    out = tmp_path / "lenet"
    assert train.main(["--dataset", "synthetic", "--device", "cpu", "--arch", "lenet5", "--epochs", "1",
                       "--no-progress", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "parameters: 62,006" in stdout and "activation memory" not in stdout
    assert json.loads((out / "results.json").read_text())["model"] == "lenet5"
