"""Build the C++/CUDA extension ``effdense._C`` after installing: ``python -m effdense.build_ext``.

For installs that went without it (an isolated ``pip install``, ``EFFDENSE_SKIP_EXT=1``, a failed optional
build, PyTorch upgraded since). The sources are those of the checkout (``csrc/`` beside the package) or the
copy a wheel carries (``effdense/_csrc/``). The library is compiled with ``torch.utils.cpp_extension``
(ninja when available) into the package directory when it is writable, else into a per-ABI folder of the
torch extensions cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, then
``effdense/<python tag>-torch<version>-<git hash>/``, as DeepSpeed's op builder does), where
:mod:`effdense._ext` also looks. Every build writes a manifest beside the library
(``_C.<tag>.manifest.json``: Python tag, torch version and git hash, CUDA version and architectures, project
commit, a digest of the sources). A library whose manifest names another torch build is not loaded; one built
from other sources is reported stale. Without ``--force`` the command keeps a library that matches and says
so, and rebuilds otherwise, saying why: on a GPU machine that received a prebuilt library this costs no build.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ._build import COMMAND, DEFAULT_ARCHS, EXT_NAME, cuda_archs, ensure, find_csrc, installed_library, needs_build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the installed library matches")
    ap.add_argument("--check", action="store_true", help="only say whether a rebuild is needed (exit 1 if so)")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--cuda", dest="cuda", action="store_true", default=None, help="require the CUDA part")
    grp.add_argument("--cpu", dest="cuda", action="store_false", help="build the CPU part only")
    ap.add_argument("--archs", help="CUDA architectures, e.g. '90' or '80;90+PTX' (default: this machine's "
                                    f"GPUs, else EFFDENSE_CUDA_ARCHS or {DEFAULT_ARCHS})")
    ap.add_argument("--dest", help="output folder (default: the package folder if writable, else the cache)")
    ap.add_argument("--jobs", help="parallel compile jobs (default: MAX_JOBS, else from cores and MemAvailable)")
    args = ap.parse_args(argv)
    if args.check:
        why = needs_build(installed_library(), find_csrc(), args.cuda)
        print("effdense: " + ("rebuild needed: " + "; ".join(why) if why else
                              f"{installed_library()} matches this environment"))
        return 1 if why else 0
    kw = {"cuda": args.cuda, "archs": cuda_archs(args.archs) if args.archs else None, "dest": args.dest,
          "jobs": args.jobs}
    try:
        path = ensure(force=args.force, **kw)
    except Exception as err:  # noqa: BLE001 - one line for the user; the compiler output is above it
        print(f"effdense: building {EXT_NAME} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    # load it in a fresh interpreter: this one may hold an older library, or none
    check = subprocess.run([sys.executable, "-c", "from effdense import _ext; print(_ext.status())"],
                           capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip()[-2000:])
    ok = check.returncode == 0 and check.stdout.startswith("effdense._C loaded")
    if ok and os.path.dirname(path) != os.path.dirname(installed_library() or ""):
        print(f"effdense: note: {installed_library()} is loaded before {path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
