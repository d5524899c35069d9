"""Developer tools of effdense: info, demo, the memory profilers, the launch counter, the Triton AOT listing."""
