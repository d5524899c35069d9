"""Under torch.compile the triton block's custom ops that write into a view of the feature buffer ``F`` (or the
gradient buffer ``G``) declare it in ``mutates_args``. Functionalization turns each such call into an
``auto_functionalized`` node that clones the mutated base, and inductor's reinplacing pass removes the clone
where the old value is not read again. A clone that survives is a copy of the whole buffer per call: per layer,
quadratic in depth. This counts the copies in the graphs inductor compiles (after reinplacing, when the
remaining ``auto_functionalized`` nodes are decomposed into clone + in-place op), on CPU: the kernels are
Triton's interpreter's, and they do not run (a dry run of :mod:`effdense.tools.launches`: compiling needs only
shapes)."""
from __future__ import annotations

import pytest
import torch

import effdense
from effdense import backends
from effdense.tools.launches import count_launches

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu"), torch.float32) is not None,
    reason="the triton backend on CPU needs Triton's interpreter (TRITON_INTERPRET=1 before import)")

COPIES = ("aten.clone", "aten.copy", "aten.copy_")
#: block shape (layers, input channels, growth rate, bottleneck factor, batch, image size): with three layers a
#: copy per layer shows as three or more, one per block (the incoming gradient) as one
SHAPE = (3, 8, 4, 2, 2, 5)


def _compiled_graphs(monkeypatch, layers, c0, k, bn_size, n, hw) -> list[torch.fx.Graph]:
    from torch._inductor import config
    from torch._inductor.fx_passes import post_grad
    if not hasattr(post_grad, "decompose_auto_functionalized"):
        pytest.fail("inductor's post-grad pass decompose_auto_functionalized is gone: find where reinplacing "
                    "ends in this torch version and capture the graph there")
    graphs: list[torch.fx.Graph] = []
    decompose = post_grad.decompose_auto_functionalized

    def capture(graph):
        out = decompose(graph)
        graphs.append(graph)        # forward, then backward: after reinplacing, clones made explicit
        return out

    monkeypatch.setattr(post_grad, "decompose_auto_functionalized", capture)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = effdense.EfficientDenseBlock(layers, c0, bn_size=bn_size, growth_rate=k, backend="triton")
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    x = torch.randn(n, c0, hw, hw, requires_grad=True)
    # compile, do not load a cached graph. config.patch, not monkeypatch: pytest >= 9.2 undoes a monkeypatched
    # attribute that lives in a ConfigModule's table (not its __dict__) by deleting it, for every later test
    with config.patch(fx_graph_cache=False):
        count_launches(lambda: compiled(x).sum().backward(), dry_run=True)
    torch._dynamo.reset()
    assert len(graphs) == 2, f"expected a forward and a backward graph, inductor compiled {len(graphs)}"
    return graphs


def _buffer_copies(graph: torch.fx.Graph, buffer_numel: int) -> list[str]:
    """Clone/copy nodes whose result is at least as large as ``F`` (``N * C * H * W``)."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).rsplit(".", 1)[0] in COPIES:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.numel() >= buffer_numel:
                found.append(f"{node.format_node()}  # {tuple(val.shape)}")
    return found


def _effdense_calls(graph: torch.fx.Graph) -> int:
    return sum(node.op == "call_function" and str(node.target).startswith("effdense.") for node in graph.nodes)


def test_no_per_layer_copy_of_the_feature_buffer(monkeypatch):
    """Forward: no copy of ``F``. Backward: at most one buffer-sized copy (the incoming gradient taken as ``G``:
    a graph input, so not reinplaceable), where a copy per layer would make three."""
    layers, c0, k, _, n, hw = SHAPE
    numel = n * (c0 + layers * k) * hw * hw
    fwd, bwd = _compiled_graphs(monkeypatch, *SHAPE)
    assert _effdense_calls(fwd) >= layers and _effdense_calls(bwd) >= layers, \
        "the graphs do not call the block's effdense ops"
    fwd_copies, bwd_copies = _buffer_copies(fwd, numel), _buffer_copies(bwd, numel)
    assert not fwd_copies, "the compiled forward copies F:\n" + "\n".join(fwd_copies)
    assert len(bwd_copies) <= 1, f"the compiled backward copies F/G {len(bwd_copies)} times:\n" + "\n".join(bwd_copies)


def test_the_count_sees_buffer_sized_copies_in_a_graph():
    """The detector itself, on any torch: a traced graph with a clone and a copy_ of ``F``'s size, and a small
    clone it must not count."""
    from torch.fx.experimental.proxy_tensor import make_fx
    numel = 2 * 3 * 4 * 4

    def f(buf, small):
        a = buf.clone()
        a.copy_(buf * 2)
        return a, small.clone()

    graph = make_fx(f)(torch.randn(2, 3, 4, 4), torch.randn(3)).graph
    assert len(_buffer_copies(graph, numel)) == 2


@pytest.mark.skipif(torch.__version__ < (2, 12), reason="measured: inductor 2.11 emits no buffer-sized clone even "
                    "with reinplacing switched off, so there is nothing for this check to see on it")
def test_the_count_sees_the_copies_when_nothing_is_reinplaced(monkeypatch):
    """The detector is live at its capture point: with inductor's reinplacing switched off every mutating call
    keeps its clone."""
    from torch._inductor.fx_passes import post_grad
    monkeypatch.setattr(post_grad, "reinplace_inplaceable_ops", lambda *args, **kwargs: None)
    layers, c0, k, _, n, hw = SHAPE
    fwd, _ = _compiled_graphs(monkeypatch, *SHAPE)
    assert len(_buffer_copies(fwd, n * (c0 + layers * k) * hw * hw)) >= layers
