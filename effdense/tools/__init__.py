"""Tools users run to inspect and measure effdense; building or training a model never imports them.

* :mod:`.info` — ``python -m effdense.info``: versions, devices, which backend runs where; the environment record
  stored beside every result.
* :mod:`.demo` — ``python -m effdense.demo``: one training step per backend, peak memory and step time.
* :mod:`.measure` — the memory a training step takes, counted from PyTorch's allocator (CPU) or CUDA's.
* :mod:`.launches` — kernel launches and host syncs of a training step, counted on the profiler.
* :mod:`.aot` — ``python -m effdense.tools.aot``: the Triton kernels a training step launches, compiled for a GPU
  target without one (registers, spills, NaN-propagating max instructions).
"""
