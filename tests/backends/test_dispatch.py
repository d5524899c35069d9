"""Backend selection: explicit names, "auto", the EFFDENSE_BACKEND override, reasons, and effdense.info."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import effdense
from effdense import backends
from effdense.backends.base import Backend


def _block():
    return effdense.EfficientDenseBlock(2, 4, bn_size=2, growth_rate=3)


def test_auto_picks_a_memory_efficient_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    name = _block().which_backend(torch.randn(2, 4, 3, 3))
    assert backends.BACKENDS[name].memory_efficient
    assert "cpu" in backends.BACKENDS[name].auto_devices
    for earlier in backends.AUTO_ORDER[:backends.AUTO_ORDER.index(name)]:
        assert earlier not in backends.BACKENDS or backends.unavailable_reason(earlier, "cpu") is not None \
            or "cpu" not in backends.BACKENDS[earlier].auto_devices, earlier


def test_env_var_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "naive")
    block = _block()
    assert block.which_backend(torch.randn(2, 4, 3, 3)) == "naive"
    block.backend = "checkpoint"
    assert block.which_backend(torch.randn(2, 4, 3, 3)) == "checkpoint"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _block()(torch.randn(2, 4, 3, 3))


def test_bad_env_var_fails_where_the_model_is_built(monkeypatch):
    """Named, at construction (not at the first forward); an explicitly named backend does not read it."""
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    for build in (_block, lambda: effdense.densenet_cifar(depth=10, growth_rate=4)):
        with pytest.raises(ValueError, match=r"^EFFDENSE_BACKEND='bogus': unknown backend 'bogus'; expected one of "
                                             r"naive, checkpoint, torch"):
            build()
    assert effdense.densenet_cifar(depth=10, growth_rate=4, backend="naive").blocks()[0].backend == "naive"


def test_unavailable_backend_explains_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    fake = Backend("fake", "never runs", True, lambda x, layers: x, lambda dev, dt: "needs a flux capacitor")
    monkeypatch.setitem(backends.BACKENDS, "fake", fake)
    monkeypatch.setattr(backends, "AUTO_ORDER", ["fake", "torch"])
    block = _block()
    assert block.which_backend(torch.randn(2, 4, 3, 3)) == "torch"
    block.backend = "fake"
    with pytest.raises(RuntimeError, match=r"backend 'fake' cannot run on cpu .*flux capacitor.*torch: available"):
        block(torch.randn(2, 4, 3, 3))


def test_every_backend_gives_the_same_state_dict_keys():
    keys = {b: list(effdense.densenet_cifar(depth=10, growth_rate=4, backend=b).state_dict())
            for b in ("naive", "checkpoint", "torch", "auto")}
    assert len({tuple(v) for v in keys.values()}) == 1


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "effdense.info"], capture_output=True, text=True, check=True).stdout
    assert "torch " in out and "effdense" in out
    for name in backends.names():
        assert f"\n{name} " in out, name
