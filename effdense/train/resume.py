"""``--resume``: the checkpoint it names, read before the dataset; the refusal of a checkpoint of another run (one
line per differing argument); and the changes ``--allow-change`` accepts."""
from __future__ import annotations

import argparse
import os

from . import checkpoints
from .cli import CHANGEABLE, RUN_KEYS, _flag_name
from .schedule import schedule_points

def resume_path(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, "last.pt") if args.resume == "last" else args.resume


def load_for_resume(args: argparse.Namespace) -> tuple[str, dict]:
    """The checkpoint ``--resume`` names, read before the dataset (a missing checkpoint is no reason to download)."""
    path = resume_path(args)
    if not os.path.isfile(path):
        what = (f"there is no {path} (no run has saved into --output-dir {args.output_dir})"
                if args.resume == "last" else f"checkpoint {path} does not exist")
        raise SystemExit(f"effdense-train: --resume: {what}; start the run without --resume, or name a checkpoint "
                         "with --resume PATH")
    try:
        ckpt = checkpoints.load(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"effdense-train: --resume: {err}") from None
    if "lr_lambdas" not in (ckpt.get("scheduler") or {}):
        raise SystemExit(f"effdense-train: --resume: {path} was written by an older effdense-train, whose learning "
                         "rate changed per epoch; it cannot be resumed exactly with the per-step schedule")
    return path, ckpt


def _flag(key: str) -> str:
    return "--bottleneck/--no-bottleneck" if key == "bottleneck" else "--" + _flag_name(key)


def resume_differences(saved: dict, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(refused, accepted)``: one line for each of :data:`RUN_KEYS` whose value differs from the checkpoint's run;
    accepted are those named by ``--allow-change``."""
    refused, accepted = [], []
    for key in RUN_KEYS:
        if key not in saved or saved[key] == getattr(args, key):
            continue
        line = f"{_flag(key)}: {saved[key]!r} in the checkpoint, {getattr(args, key)!r} now"
        if key in args.allow_change:
            accepted.append(line)
        else:
            refused.append(line + (f" (accept it with --allow-change {_flag_name(key)})" if key in CHANGEABLE
                                   else " (fixed for a run)"))
    return refused, accepted


def check_resume(path: str, ckpt: dict, args: argparse.Namespace) -> None:
    """Refuse to resume a checkpoint of a run with other arguments, listing each difference on its own line."""
    refused, _ = resume_differences(ckpt.get("args") or {}, args)
    if refused:
        raise SystemExit(f"effdense-train: --resume: {path} is a checkpoint of another run; these arguments "
                         "differ:\n  " + "\n  ".join(refused) + "\nResume with the checkpoint's values, or start a "
                         "new run in another --output-dir.")
    if args.epochs < ckpt["epoch"]:
        raise SystemExit(f"effdense-train: --resume: --epochs {args.epochs} is fewer than the {ckpt['epoch']} epochs "
                         f"{path} has already trained")


def spec_difference(saved: dict | None, spec: dict) -> str:
    """One line: how the model a checkpoint holds differs from the one these flags build."""
    if not saved or saved.get("arch") != spec["arch"]:
        return f"model {(saved or {}).get('arch')!r} in the checkpoint, {spec['arch']!r} now"
    old, new = saved.get("kwargs", {}), spec["kwargs"]
    return ", ".join(f"{k} {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
                     for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))


def restore(run, path: str, ckpt: dict) -> None:
    """Continue ``run`` (a :class:`~effdense.train.run.Run`) from ``ckpt``: weights, optimizer, schedule, counters
    and random states."""
    if ckpt.get("model_spec") != run.spec:  # e.g. the dataset's classes changed under the same flags
        raise SystemExit(f"effdense-train: --resume: {path} holds another model "
                         f"({spec_difference(ckpt.get('model_spec'), run.spec)}); resume with the flags of the "
                         "original run")
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.state.update({k: ckpt[k] for k in run.state})
    rng = ckpt["rng"]
    checkpoints.set_rng_state(rng[run.dist.rank] if run.dist.rank < len(rng) else rng[0])
    run.saved = f"{path} from step {run.state['global_step']} is kept"
    run.say(f"resumed from {path}: epoch {run.state['epoch']}, step {run.state['step']} of "
             f"{run.steps_per_epoch}")
    _, accepted = resume_differences(ckpt.get("args") or {}, run.args)
    if accepted:
        apply_changes(run, accepted)

def apply_changes(run, accepted: list[str]) -> None:
    """Apply to ``run`` the new values ``--allow-change`` accepted: optimizer hyperparameters from the next step,
    and the schedule recomputed over the new length and learning rate (stated, since the learning rate may jump)."""
    args, opt, sched = run.args, run.opt, run.sched
    before = opt.param_groups[0]["lr"]
    for group in opt.param_groups:
        group.update(initial_lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                     weight_decay=args.weight_decay)
    sched.base_lrs = [args.lr] * len(opt.param_groups)
    for group, fn in zip(opt.param_groups, sched.lr_lambdas):
        group["lr"] = args.lr * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    next_step = sched.last_epoch + 1
    run.say("accepted on resume (--allow-change): " + "; ".join(accepted))
    run.say(f"the schedule is now {schedule_points(args.schedule, run.total_steps)} ({args.epochs} epochs) "
             f"from lr {args.lr:g}: step {next_step} runs at lr {opt.param_groups[0]['lr']:.4g} (the checkpoint's "
             f"schedule: {before:.4g})")
