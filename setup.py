"""effdense: memory-efficient DenseNets for PyTorch.

Install with ``pip install --no-build-isolation .`` so the build sees the PyTorch already installed
(an isolated build would download a new one).
"""
from __future__ import annotations

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "effdense", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="effdense",
    version=_version(),
    description="Memory-efficient DenseNets for PyTorch: linear memory in depth, fused BN-ReLU-Conv kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["effdense", "effdense.*"]),
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ['triton>=3.2; platform_system == "Linux"'],
        "train": ["tqdm", "scikit-learn"],
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest>=7", "pytest-timeout", "numpy", "tqdm", "scikit-learn",
                 'triton>=3.2; platform_system == "Linux"'],
    },
    entry_points={"console_scripts": ["effdense-train = effdense.train:main", "effdense-eval = effdense.eval:main"]},
    zip_safe=False,
)
