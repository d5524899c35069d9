"""``effdense-train``: train a DenseNet (or a baseline CNN) on CIFAR-10/100, digits, Fashion-MNIST, synthetic data or
your own image folders (``--dataset folder``).

The defaults are the DenseNet paper's CIFAR recipe (Huang et al., 2017, section 4.2): SGD with Nesterov momentum
0.9, learning rate 0.1 divided by 10 at 50% and 75% of 300 epochs, weight decay 1e-4, batch 64, DenseNet-BC-100
(k=12), 4-pixel pad / random crop / horizontal flip. ``--dataset digits`` has a small preset that trains in a
few minutes on a CPU. Multi-GPU runs go through ``torchrun``; ``--batch-size`` is the total over all processes.

Writes into ``--output-dir``: ``last.pt`` every epoch (and every ``--save-every`` steps), ``best.pt`` by
validation accuracy (both atomic), ``log.csv``/``log.json`` per epoch, ``curves.png`` (with matplotlib), ``tb/``
(with tensorboard) and ``results.json``. ``--resume`` continues a run exactly where ``last.pt`` left it, and refuses
a checkpoint of a run with other arguments unless the change is named (``--allow-change epochs``). The folder is
the run's own (:mod:`.rundir`): locked while it runs, checked for writes and room before the first step, and a new
run refuses another run's files there unless ``--overwrite`` deletes them. The learning
rate follows its schedule per optimizer step, so a 1-epoch run has the recipe's shape too. A non-finite loss stops
the run; weights or running statistics that are not finite are never saved.

This module is the run itself (:class:`Run`, :func:`train`, :func:`main`); the rest of the program is beside it:
:mod:`.cli` (arguments), :mod:`.model`, :mod:`.data` and :mod:`.augment`, :mod:`.step` (one step, evaluation),
:mod:`.schedule`, :mod:`.checkpoints`, :mod:`.resume`, :mod:`.logs`, :mod:`.distributed`, :mod:`.baselines`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import backends
from ..backends import bn
from ..tools import info
from . import checkpoints, rundir
from .baselines import BASELINES
from .checkpoints import RUN_FILES
from .cli import model_label, parse_args, list_models
from .data import Augment, DataError, folder_options, load_dataset
from .distributed import check_replicas, convert_sync_bn, setup
from .logs import Logger, epoch_table, number
from .model import block_backend, build_model, model_spec, summarize
from .resume import check_resume, load_for_resume, restore
from .schedule import _generator, make_scheduler, seed_everything
from .step import CHECK_EVERY, Context, LossWatch, evaluate, nonfinite_tensors, train_step, window_rate


class NonFiniteError(RuntimeError):
    """A non-finite loss, weights or running statistics: the run stops, the message names the step and what was kept."""


def oom_message(args: argparse.Namespace) -> str:
    """What to do after CUDA ran out of memory; checkpoints are only ever replaced whole, so last.pt is intact."""
    last = os.path.join(args.output_dir, "last.pt")
    hint = " or a memory-efficient backend (--backend auto, torch, cpp or triton: memory linear in depth " \
        "instead of quadratic)" if args.arch not in BASELINES and args.backend in ("naive", "checkpoint") else ""
    state = (f"{last} is intact; continue with --resume" if os.path.exists(last)
             else "no checkpoint had been written yet")
    return (f"CUDA out of memory training {model_label(args)} at --batch-size {args.batch_size} with --backend "
            f"{args.backend}. Try a smaller --batch-size{hint}, or --amp bf16. {state}.")


class Run:
    """One training run: built from the arguments and the checkpoint ``--resume`` names (:meth:`__init__`), then
    stepped an epoch at a time (:meth:`run_epoch`) and finished (:meth:`finish`)."""

    def __init__(self, args: argparse.Namespace, command: Sequence[str] | None = None) -> None:
        self.args = args
        self.dist, self.device = setup(args)
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(args.seed)
        self.say = print if self.dist.main else (lambda *a, **k: None)
        resume = load_for_resume(args) if args.resume else None  # before the data: no download for a missing file
        if resume is not None:
            check_resume(*resume, args)
        self.lock = None
        self._on_main(self._claim_folder)  # before the data and any compute; released by close()
        try:
            self._build(resume, command)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: tuple[str, dict] | None, command: Sequence[str] | None) -> None:
        """Everything after the folder is claimed: data, model, optimizer, resumed state, room check, outputs."""
        args = self.args
        self._build_model()
        self._build_optimizer()
        self.state = {"epoch": 0, "step": 0, "global_step": 0, "best_acc": -1.0, "best_epoch": None, "history": [],
                      "meter": [0.0, 0.0, 0.0, 0.0]}
        self.saved = "no checkpoint had been written"  # what last.pt holds, for the non-finite message
        if resume is not None:
            restore(self, *resume)
        self._on_main(lambda: rundir.check_room(args.output_dir, rundir.checkpoint_bytes(self.model, self.opt,
                                                                                          args.momentum)))
        self.net = self.model  # the plain module: saved, evaluated
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model, backend=args.compile)
        self.train_step = train_step
        if args.cuda_graphs:
            from ..cuda_graphs import train_step_for
            try:
                self.train_step = train_step_for(self.device, self.amp_dtype, self.dist.world, args.compile)
            except ValueError as err:
                raise SystemExit(f"effdense-train: --cuda-graphs: {err}") from None
        self._prepare_outputs(command)
        self.watch = LossWatch(self.device)
        self.lr = self.opt.param_groups[0]["lr"]  # of the latest step
        self.stopped = bool(args.max_steps and self.state["global_step"] >= args.max_steps)

    def _on_main(self, fn) -> None:
        """Run ``fn`` on process 0; when it exits (a one-line ``SystemExit``), every process exits with it."""
        failure = None
        if self.dist.main:
            try:
                fn()
            except SystemExit as err:
                failure = err
        if self.dist.world > 1:
            failed = self.dist.all_reduce(torch.tensor([float(failure is not None)], device=self.device)).item()
            if failed and failure is None:
                raise SystemExit(f"effdense-train: process 0 stopped the run at its start (--output-dir "
                                 f"{self.args.output_dir}); see its message")
        if failure is not None:
            raise failure

    def _claim_folder(self) -> None:
        args = self.args
        self.lock = rundir.claim(args.output_dir, resume=bool(args.resume), overwrite=args.overwrite, say=self.say)

    def close(self) -> None:
        """Release the output folder's lock (process 0)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- building

    def _build_model(self) -> None:
        """The dataset (on the CPU), the model on the device and the backend its blocks run with."""
        args, device = self.args, self.device
        try:
            folder = dict(folder_options(vars(args)), world=self.dist.world) if args.dataset == "folder" else None
            data = load_dataset(args.dataset, args.data_dir, args.val_size, allow_download=not args.no_download,
                                folder=folder)
        except ValueError as err:  # e.g. --val-size larger than the training set
            raise SystemExit(f"effdense-train: {err}") from None
        self.spec = model_spec(args, data.num_classes, data.in_channels)
        model = build_model(self.spec, args.backend).to(device)
        if self.dist.world > 1:
            seed_everything(args.seed + self.dist.rank)  # different dropout masks per process, same initial weights
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
        dtype = self.amp_dtype or torch.float32
        try:  # a backend that cannot run here fails now, in one line, not at the first forward
            backend = block_backend(model, device, dtype)
        except RuntimeError as err:
            raise SystemExit(f"effdense-train: --backend {args.backend}: {err}") from None
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        world = self.dist.world
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} is the total over {world} processes and must divide "
                             "evenly")
        self.local_batch = args.batch_size // world
        self.say(f"model {model_label(args)} ({self.spec['arch']}), dataset {args.dataset}: {len(data.train)} train, "
                 f"{len(data.val) if data.val else 0} val, {len(data.test)} test, {data.num_classes} classes; "
                 f"device {device}, {world} process(es)")
        if args.sync_bn:
            if world > 1:
                model = convert_sync_bn(model, device, backend)
                backend = block_backend(model, device, dtype)  # "auto" may now pick another
            else:
                self.say("--sync-bn has no effect in a single process")
        if self.dist.main:
            self.say(summarize(model, data.in_channels, device, self.local_batch, dtype,
                               getattr(args, "image_size", None) or 32))
        self.steps_per_epoch = len(data.train) // args.batch_size
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")
        self.model, self.backend, self.data = model, backend, data

    def _build_optimizer(self) -> None:
        args = self.args
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                   nesterov=args.momentum > 0, weight_decay=args.weight_decay)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.sched = make_scheduler(self.opt, args.schedule, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None

    def _prepare_outputs(self, command: Sequence[str] | None) -> None:
        args, data = self.args, self.data
        if self.dist.main:  # the folder was created and locked by _claim_folder
            stale = checkpoints.remove_stale_temporaries(args.output_dir, RUN_FILES)
            if stale:
                self.say(f"removed {len(stale)} temporary file(s) a killed run left in {args.output_dir}: "
                         + ", ".join(stale))
        self.config = {k: v for k, v in vars(args).items()} | {
            "world_size": self.dist.world, "device": str(self.device),
            "backend_resolved": self.backend.name if self.backend else None}
        self.env = info.environment(self.device, command)
        title = (f"{args.dataset}: {model_label(args)}" + (f", backend {self.backend.name}" if self.backend else "")
                 + f", batch {args.batch_size}, {args.schedule} schedule")
        self.logger = Logger(args.output_dir, self.config | {"environment": self.env}, self.dist.main, title)
        for note in self.logger.notes:
            self.say(note)
        augment = Augment(data.mean, data.std, pad=4, flip=data.flip)
        self.ctx = Context(self.device, self.dist, augment, self.amp_dtype, args.channels_last)
        self.data = data.to(self.device)
        self.monitor = self.data.val if self.data.val is not None else self.data.test
        if self.data.val is None:
            self.say("no validation split (--val-size 0): best.pt is chosen by test accuracy")

    # -- checkpoints

    def check_finite(self) -> None:
        """Stop (``NonFiniteError``) at the first non-finite loss since the last check, naming its step."""
        bad = self.watch.first_bad(self.dist)
        if bad is None:
            return
        step, value = bad
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        value = value if not math.isfinite(value) else "not finite on another process"
        raise NonFiniteError(
            f"the training loss is {value} at step {step} (epoch {epoch + 1}, batch {batch + 1} of "
            f"{self.steps_per_epoch}): stopped, and nothing after it was saved; {self.saved}. A smaller --lr "
            f"(now {self.args.lr:g}) may help" + (", or --amp bf16 in place of fp16" if self.args.amp == "fp16"
                                                  else ""))

    def save(self, path: str, epoch: int, step: int) -> None:
        """Write a checkpoint of the run as it is after ``step`` steps of ``epoch``, unless a weight or a running
        statistic is not finite: then stop, keeping the file that is there."""
        self.check_finite()
        names = nonfinite_tensors(self.net.state_dict())
        bad = torch.tensor([len(names)], dtype=torch.float64, device=self.device)
        if self.dist.all_reduce(bad).item():  # every process stops, or none
            raise NonFiniteError(
                f"{len(names) or 'some'} weights or running statistics are not finite after step "
                f"{self.state['global_step']} ({', '.join(names[:3]) or 'on another process'}"
                f"{', ...' if len(names) > 3 else ''}): stopped without saving; {self.saved}")
        world, rngs = self.dist.world, [checkpoints.rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, checkpoints.rng_state())
        if self.dist.main:
            data, state = self.data, self.state
            checkpoints.atomic_save({
                "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": epoch, "step": step, "global_step": state["global_step"], "best_acc": state["best_acc"],
                "best_epoch": state["best_epoch"], "history": state["history"], "meter": state["meter"],
                "rng": rngs, "model_spec": self.spec,
                "dataset": {"name": data.name, "classes": data.classes, "mean": data.mean, "std": data.std},
                "args": self.config}, path)
        if os.path.basename(path) == "last.pt":
            self.saved = f"{path} from step {self.state['global_step']} is kept"

    def save_inside_epoch(self, meter: Tensor, tick: float) -> None:
        """last.pt in the middle of an epoch (``--save-every``, ``--max-steps``): the meter goes with it, so the
        resumed epoch's sums, and everything else, are bit-identical."""
        sums = meter.tolist()
        sums[3] += time.perf_counter() - tick
        self.state["meter"] = sums
        self.save(os.path.join(self.args.output_dir, "last.pt"), self.state["epoch"], self.state["step"])

    # -- the loop

    def run_epoch(self) -> bool:
        """Train the current epoch from where the state is; False when ``--max-steps`` ended the run inside it."""
        from tqdm.auto import tqdm

        args, state = self.args, self.state
        epoch, n_steps = state["epoch"], self.steps_per_epoch
        batches = self._batches(epoch, state["step"])
        meter = torch.tensor(state["meter"], dtype=torch.float64, device=self.device)  # loss sum, correct, n, seconds
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=n_steps, initial=state["step"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not self.dist.main or args.no_progress, leave=False, dynamic_ncols=True)
        tick = time.perf_counter()
        times, post = deque([tick], maxlen=CHECK_EVERY + 1), {}
        self.model.train()
        for step in range(state["step"], n_steps):
            x, y = next(batches)
            lr = self.opt.param_groups[0]["lr"]
            self.lr = lr.clone() if isinstance(lr, Tensor) else lr  # a device tensor with --cuda-graphs: no sync
            loss, logits = self.train_step(self.model, x, y, self.opt, self.scaler, self.ctx)
            self.sched.step()
            meter[:3] += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(),
                                      meter.new_tensor(len(y))])
            state["global_step"] += 1
            state["step"] = step + 1
            self.watch.add(loss, state["global_step"])
            self.stopped = bool(args.max_steps and state["global_step"] >= args.max_steps)
            save_now = (bool(args.save_every and state["global_step"] % args.save_every == 0)
                        and step + 1 < n_steps and not self.stopped)  # the epoch's end and --max-steps save anyway
            if len(self.watch.losses) >= CHECK_EVERY or self.stopped or save_now or step + 1 == n_steps:
                self.check_finite()
            times.append(time.perf_counter())
            if not bar.disable:
                self._progress(bar, post, meter, times, step, n_steps)
            bar.update(1)
            if save_now:
                self.save_inside_epoch(meter, tick)
            if self.stopped:
                break
        bar.close()
        if state["step"] < n_steps:  # --max-steps ended the run inside an epoch: save where it is
            self.save_inside_epoch(meter, tick)
            self.say(f"stopped after {state['global_step']} steps (--max-steps), inside epoch {epoch + 1}")
            return False
        meter[3] += time.perf_counter() - tick
        self.end_epoch(meter)
        return True

    def _batches(self, epoch: int, start: int):
        """``(inputs, labels)`` of this process for each step of ``epoch`` from step ``start``: the images of the
        epoch's permutation gathered and augmented on the device, or streamed from disk (``--dataset folder``)."""
        args, data, ctx = self.args, self.data, self.ctx
        if data.streaming:
            for x, y in data.train.stream(self.local_batch, self.device, self.dist.world, self.dist.rank, args.seed,
                                          shuffle=True, epoch=epoch, start=start):
                yield ctx.place(x), y.to(self.device, non_blocking=True)
            return
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        perm = torch.randperm(len(data.train), generator=_generator(args.seed, epoch)).to(self.device)
        for step in range(start, self.steps_per_epoch):
            idx = perm[step * args.batch_size + lo: step * args.batch_size + hi]
            params = ctx.augment.draw(args.batch_size, _generator(args.seed, epoch, step))[lo:hi]
            yield ctx.inputs(data.train.images[idx], params), data.train.labels[idx]

    def _progress(self, bar, post: dict, meter: Tensor, times: deque, step: int, n_steps: int) -> None:
        """The bar's numbers: img/s over the last steps every step (host clock, no sync), loss and accuracy every
        :data:`CHECK_EVERY` steps (a host sync)."""
        rate = window_rate(times, self.args.batch_size)
        if rate is not None:
            post["img/s"] = f"{rate:.0f}"
        if step % CHECK_EVERY == 0 or step + 1 == n_steps or self.stopped:
            loss_sum, correct, n = meter[:3].tolist()
            post.update(loss=number(loss_sum / n), acc=f"{correct / n:.2%}")
            if self.device.type == "cuda":
                post["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**20:.0f}MiB"
        bar.set_postfix(post, refresh=False)

    def end_epoch(self, meter: Tensor) -> None:
        """Validate, log, and write last.pt (and best.pt when validation accuracy improved)."""
        from tqdm.auto import tqdm

        args, state, device = self.args, self.state, self.device
        loss_sum, correct, n, seconds = self.dist.all_reduce(meter.clone()).tolist()
        seconds /= self.dist.world
        if self.dist.world > 1 and not args.sync_bn:  # evaluate every process with process 0's running statistics
            for buf in self.net.buffers():
                dist.broadcast(buf, 0)
        val_loss, val_acc = evaluate(self.net, self.monitor, self.ctx, args.eval_batch_size)
        epoch = state["epoch"]
        row = {"epoch": epoch + 1, "lr": float(self.lr), "train_loss": loss_sum / n, "train_acc": correct / n,
               "val_loss": val_loss, "val_acc": val_acc, "images_per_s": n / seconds, "seconds": seconds,
               "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
               "monitor": "val" if self.data.val is not None else "test"}
        if self.data.streaming:  # unreadable images skipped so far (--skip-bad-images), over all processes
            splits = {id(s): s for s in (self.data.train, self.data.val, self.data.test) if s is not None}
            skipped = torch.tensor([float(sum(len(s.skipped) for s in splits.values()))], device=device)
            row["skipped_images"] = int(self.dist.all_reduce(skipped).item())
        state["history"].append(row)
        state.update(epoch=epoch + 1, step=0, meter=[0.0, 0.0, 0.0, 0.0])
        improved = val_acc > state["best_acc"]
        if improved:
            state["best_acc"], state["best_epoch"] = val_acc, epoch + 1
        self.save(os.path.join(args.output_dir, "last.pt"), epoch + 1, 0)
        if improved:
            self.save(os.path.join(args.output_dir, "best.pt"), epoch + 1, 0)
        self.logger.epoch(state["history"])
        msg = (f"epoch {epoch + 1}/{args.epochs}: train loss {number(row['train_loss'])} acc {row['train_acc']:.2%}, "
               f"{row['monitor']} loss {number(val_loss)} acc {val_acc:.2%}, {row['images_per_s']:.0f} img/s"
               + (f", peak {row['peak_mem_mib']:.0f} MiB" if row["peak_mem_mib"] is not None else "")
               + (f", {row['skipped_images']} unreadable images skipped" if row.get("skipped_images") else ""))
        if self.dist.main:
            tqdm.write(msg)

    def finish(self) -> dict:
        """Test the last weights (and best.pt's), print the epoch table and write results.json."""
        args, state, data, ctx = self.args, self.state, self.data, self.ctx
        if self.dist.world > 1:
            check_replicas(self.net, self.dist, self.say)
        results = {"dataset": args.dataset, "model": model_label(args), "epochs_done": state["epoch"],
                   "global_step": state["global_step"]}
        results["test_loss"], results["test_acc"] = evaluate(self.net, data.test, ctx, args.eval_batch_size)
        best_path = os.path.join(args.output_dir, "best.pt")
        if state["best_epoch"] is not None and state["best_epoch"] != state["epoch"] and data.val is not None:
            if self.dist.world > 1:
                dist.barrier()
            best = copy.deepcopy(self.net)
            best.load_state_dict(checkpoints.load(best_path, self.device)["model"])
            results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
            results["best_test_loss"], results["best_test_acc"] = evaluate(best, data.test, ctx, args.eval_batch_size)
        elif state["best_epoch"] is not None:
            results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
            results["best_test_acc"] = results["test_acc"] if data.val is not None else None
        self.logger.close()
        if self.dist.main:
            if state["history"]:
                self.say(epoch_table(state["history"]))
            results["environment"] = self.env
            checkpoints.atomic_write_text(os.path.join(args.output_dir, "results.json"),
                                            json.dumps(results, indent=1))
            line = f"test accuracy: {results['test_acc']:.2%} (last weights"
            if results.get("best_test_acc") is not None:
                line += f"; best.pt from epoch {results['best_epoch']}: {results['best_test_acc']:.2%}"
            self.say(line + f"); outputs in {args.output_dir}")
        return results


def train(args: argparse.Namespace, command: Sequence[str] | None = None) -> dict:
    """Run the training command; returns the final results (also written to ``results.json``, with the
    environment record of :func:`effdense.tools.info.environment` and ``command``, default ``sys.argv``)."""
    run = Run(args, command)
    try:
        while run.state["epoch"] < args.epochs and not run.stopped:
            if not run.run_epoch():
                break
        return run.finish()
    finally:
        run.close()


@contextlib.contextmanager
def process_settings():
    """Restore on exit the process-wide settings a run changes (``--deterministic``, ``--threads``, cuDNN's
    autotuner), so that a run called in-process (``main(argv)``) leaves its caller as it found it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_num_threads(saved[3])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    try:  # a bad EFFDENSE_BACKEND fails before anything is loaded or downloaded
        backends.env_override()
    except ValueError as err:
        raise SystemExit(f"effdense-train: {err}") from None
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        with process_settings():
            train(args, ["effdense-train", *(sys.argv[1:] if argv is None else argv)])
        if dist.is_initialized():   # every rank's last collectives done before any tears the group down (a
            dist.barrier()          # gloo worker left holding one has aborted a rank at exit, after a good run)
    except (DataError, NotImplementedError, NonFiniteError) as err:
        raise SystemExit(f"effdense-train: {err}") from None
    except torch.OutOfMemoryError:
        raise SystemExit(f"effdense-train: {oom_message(args)}") from None
    finally:
        bn.disable_sync_stats()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
