"""Export (issue 28 item 1): every exporter, with the default backend and each backend that runs on the CPU, gives a
graph of standard operators (no ``effdense::`` op) whose output is the eager model's: the ONNX file run in
onnxruntime, the TorchScript module and the ``torch.export`` program run in Python."""
from __future__ import annotations

import warnings

import pytest
import torch
from utils import randomize_bn, rel_err

import effdense
from effdense import EfficientDenseNet, backends

onnx = pytest.importorskip("onnx", reason="pip install effdense[export]")
ort = pytest.importorskip("onnxruntime", reason="pip install effdense[export]")
pytest.importorskip("onnxscript", reason="pip install effdense[export]")

RTOL = 1e-5  # float32, relative to the output's norm; the same math in another op order or runtime


def _torch_export(model, x, tmp_path):
    program = torch.export.export(model, (x,))
    ops = [str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
           for n in gm.graph.nodes if n.op == "call_function"]  # also inside subgraphs (higher-order ops)
    return program.module(), ops


def _jit_ops(module) -> list[str]:
    return [n.kind() for n in module.inlined_graph.nodes()]


def _jit_trace(model, x, tmp_path):
    traced = torch.jit.trace(model, x, check_trace=False)
    return traced, _jit_ops(traced)


def _jit_script(model, x, tmp_path):
    scripted = torch.jit.script(model)

    def run(inp):
        # the graph as scripted, without the profiling executor's first-run passes (seconds on the big presets)
        with torch.jit.optimized_execution(False):
            return scripted(inp)
    return run, _jit_ops(scripted)


def _onnx(dynamo: bool, **options):
    def export(model, x, tmp_path):
        path = str(tmp_path / "model.onnx")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, verbose=False, **options)
        graph = onnx.load(path).graph
        ops = [f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node]
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(inp):
            return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inp.numpy()})[0])
        return run, ops
    return export


#: exporter label: ``export(model, x, tmp_path) -> (callable running the exported graph, its op names)``
EXPORTERS = {
    "torch.export": _torch_export,
    "onnx-dynamo": _onnx(True),
    "onnx-torchscript": _onnx(False),
    "jit.trace": _jit_trace,
    "jit.script": _jit_script,
    # the ONNX exporters write the eval-mode graph unless told otherwise (torch's TrainingMode.EVAL default)
    "onnx-torchscript-train": _onnx(False, training=torch.onnx.TrainingMode.TRAINING),
}
#: exporters that keep the model's mode: a model in training mode exports its training-mode graph
TRAIN_MODE_EXPORTERS = ["torch.export", "jit.trace", "jit.script", "onnx-torchscript-train"]
EVAL_EXPORTERS = [e for e in EXPORTERS if e != "onnx-torchscript-train"]
#: backends to run on the CPU ("auto" is the default; triton runs on the CPU only under its interpreter)
CPU_BACKENDS = ["auto", "naive", "checkpoint", "torch", "cpp"]


def _model(build, backend: str = "auto") -> EfficientDenseNet:
    """A model in eval mode with non-trivial BN statistics and affine parameters (so eval mode is a real test)."""
    torch.manual_seed(0)
    return randomize_bn(build()).set_backend(backend).eval()


def _check_export(model: EfficientDenseNet, exporter: str, x: torch.Tensor, tmp_path) -> None:
    """Export ``model`` and check its graph holds no effdense op and gives the eager output."""
    with torch.no_grad():
        expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* are deprecated in torch 2.13
            run, ops = EXPORTERS[exporter](model, x, tmp_path)
        assert ops, f"{exporter}: an empty graph"
        foreign = sorted({op for op in ops if "effdense" in op.lower()})
        assert not foreign, f"{exporter}: non-standard ops left in the graph: {foreign}"
        got = run(x)
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    assert err < RTOL, f"{exporter}: relative error {err:.2e} against eager"


def _skip_unavailable(backend: str) -> None:
    why = None if backend == "auto" else backends.unavailable_reason(backend, "cpu", torch.float32)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run on the CPU: {why}")


def _small_bc() -> EfficientDenseNet:
    return effdense.densenet_cifar(depth=16, growth_rate=6, num_classes=5)  # DenseNet-BC, 2 layers per block


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("exporter", EVAL_EXPORTERS)
def test_exporter_x_backend(exporter, backend, tmp_path):
    """Table: every exporter x every CPU backend ("auto" is the default), on a small DenseNet-BC."""
    _skip_unavailable(backend)
    _check_export(_model(_small_bc, backend), exporter, torch.randn(2, 3, 32, 32), tmp_path)


#: label: (model builder, input shape): the layouts the presets are made of, small
VARIANTS = {
    "cifar-plain": (lambda: effdense.densenet_cifar(depth=13, growth_rate=4, bottleneck=False), (2, 3, 32, 32)),
    "imagenet-stem": (lambda: EfficientDenseNet(8, (2, 1, 2), 16, num_classes=7), (1, 3, 64, 64)),
    "no-top-avg": (lambda: EfficientDenseNet(8, (2, 2), 16, include_top=False), (1, 3, 64, 64)),
    "no-top-max": (lambda: EfficientDenseNet(8, (2, 2), 16, include_top=False, global_pool="max"), (1, 3, 64, 64)),
    "no-top-map": (lambda: EfficientDenseNet(8, (2, 2), 16, include_top=False, global_pool=None), (1, 3, 64, 64)),
    "dropout": (lambda: effdense.densenet_cifar(depth=16, growth_rate=6, drop_rate=0.2), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("exporter", EVAL_EXPORTERS)
def test_variant_exports(variant, exporter, tmp_path):
    """Table: every exporter x the model layouts (stems, plain layers, no classifier, each global pool), default
    backend."""
    build, shape = VARIANTS[variant]
    _check_export(_model(build), exporter, torch.randn(shape), tmp_path)


@pytest.mark.parametrize("backend", ["auto", "checkpoint"])
@pytest.mark.parametrize("exporter", TRAIN_MODE_EXPORTERS)
def test_training_mode_export(exporter, backend, tmp_path):
    """A model in training mode exports its training-mode graph (batch statistics) in standard ops, equal to the eager
    model in training mode."""
    _skip_unavailable(backend)
    _check_export(_model(_small_bc, backend).train(), exporter, torch.randn(2, 3, 32, 32), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(effdense.MODELS))
def test_preset_scripts(preset, tmp_path):
    """Every named preset, default backend, through torch.jit.script (the exporter that compiles every module's
    forward, so the one a preset's structure could break); batch 1, 16x16 (CIFAR) or 32x32 (ImageNet): the smallest
    inputs whose last dense block still sees 4x4 / 1x1 pixels, to keep the eager runs of the big presets short."""
    model = _model(effdense.MODELS[preset])
    size = 16 if model.features.conv0.kernel_size == (3, 3) else 32
    _check_export(model, "jit.script", torch.randn(1, 3, size, size), tmp_path)
