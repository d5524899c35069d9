"""The training and evaluation program: ``effdense-train`` (``python -m effdense.train``) and ``effdense-eval``.

Split by concern, as timm's ``train.py`` and its ``utils/``:

* :mod:`.run` — one run (:class:`~.run.Run`), :func:`~.run.train` and the command's ``main``;
* :mod:`.cli` — arguments, presets, the paper's recipe; :mod:`.model` — the model a run trains;
* :mod:`.data` — datasets and the batched augmentation; :mod:`.step` — a training step, evaluation, the loss watch;
* :mod:`.schedule` — seeds and the learning-rate schedule; :mod:`.checkpoints` — crash-safe files;
  :mod:`.resume` — ``--resume``; :mod:`.rundir` — the output folder (lock, ``--overwrite``, room);
  :mod:`.logs` — CSV/JSON logs, curves, TensorBoard;
* :mod:`.distributed` — ``torchrun``, ``--device``, ``--sync-bn``; :mod:`.baselines` — the non-DenseNet models;
* :mod:`.eval` — ``effdense-eval``.

The program builds on the library (:mod:`effdense.models`, :mod:`effdense.backends`); nothing in the library
imports it.
"""
from .run import main, train

__all__ = ["main", "train"]
