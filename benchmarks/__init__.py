"""effdense benchmarks: ``python -m benchmarks [--suite NAME ...] [--quick]`` from the repository root.

Suites (see :mod:`benchmarks.suites`): ``memory`` (peak memory vs depth), ``speed`` (forward/backward/step
time), ``capacity`` (deepest model under a memory cap; CUDA), ``kernels`` (device ceilings, fused kernels vs
unfused sequences, step time over the roofline floor), ``peers`` (torchvision/timm DenseNet-121 in the same
process). Each run writes ``benchmarks/results/<device>/<suite>-<timestamp>.json``; :mod:`benchmarks.report`
turns the newest results into Markdown, PNG plots and the README's "Measured" section.
"""
