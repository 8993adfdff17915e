"""One prepared GPU check: every CUDA path verified against its CPU path, every speed goal
measured, one markdown report (docs/gpu_check.md says what each row means).

    python tools/gpu_check.py                      # CUDA machine: full sizes, <= 7 minutes
    python tools/gpu_check.py --device cpu --quick # the same code paths on a CPU, tiny sizes

Parts, in order: correctness (slic_torch, OAP fast = reference, CAST forward, the suite's
CUDA-only tests in a child pytest, one AMP training step of CASTMoCo, CASTSemanticSegmentor and
OAPSegmentor), then peak memory of a training step per config family at the per-GPU batch of
docs/distributed.md's 1- and 2-GPU commands, then speed (CAST vs ViT with superpixels, parts and
FPS share; OAP vs MaskCut; OAP's share of an OAPSegmentor step). A running clock shares what is left of ``--budget``
among the speed parts, which shrink their repetitions (or skip rows, marked so) to fit.

Report: ``--out``, default ``$OUT/gpu_check.md`` when ``$OUT`` is set, else
``output/gpu_check.md``; rewritten after every part and printed at the end.
``--out`` may name an existing folder: the report is then ``gpu_check.md`` inside it.
Exit status: 1 when a correctness row FAILs or any part raises (ERROR); 2 for bad arguments,
one ``error:`` line before any part runs (``--device cuda`` without CUDA, an ``--out`` that
cannot be written); 0 otherwise. A missed speed goal never fails the run.

``--write-stamp PATH`` records the commit and the source fingerprint (for a copy of the checkout
without ``.git``) and exits; ``dev/gpu_wheels.sh`` calls it.
"""
import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from . import REPO

T0 = time.perf_counter()
DEFAULT_STAMP = REPO / ".gpu_site" / "STAMP.json"
# (name, weight): shares of the time left for the speed parts
SPEED_PARTS = (("memory", 4.0), ("cast", 4.0), ("oap", 2.5), ("step", 3.0))
CORRECTNESS_PARTS = ("slic", "oap_eq", "cast_fwd", "amp", "suite")


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.md"
    return REPO / "output" / "gpu_check.md"


def parse_args(argv=None):
    from hiseg.cli import ArgumentParser, bounded

    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes (the CPU test of this script)")
    ap.add_argument("--out", type=Path, default=None,
                    help="report path, or an existing folder to write gpu_check.md in (default: see above)")
    ap.add_argument("--budget", type=bounded(float, 0, lo_open=True), default=None,
                    help="wall-time budget in seconds from the start (default: full 400, quick 110)")
    ap.add_argument("--stamp", type=Path, default=DEFAULT_STAMP, help="commit stamp read where git is absent")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=list(CORRECTNESS_PARTS) + [p for p, _ in SPEED_PARTS],
                    help="run only these parts (for development; a full run runs all)")
    ap.add_argument("--write-stamp", type=Path, default=None, metavar="PATH",
                    help="write the commit / fingerprint stamp to PATH and exit")
    return ap.parse_args(argv)


def main(argv=None, start: Optional[float] = None) -> int:
    """The check (see the module docstring); ``start``: the clock reading the run's budget and its
    start-up time count from (default: when this module was imported)."""
    args = parse_args(argv)
    from .provenance import environment_lines, provenance, write_stamp

    if args.write_stamp is not None:
        stamp = write_stamp(args.write_stamp)
        print(f"wrote {args.write_stamp}: commit {stamp['commit']}, fingerprint {stamp['fingerprint']}")
        return 0

    import torch

    from . import correctness, memory, speed
    from .budget import Budget
    from .precision import amp_dtype
    from .profiles import FULL, QUICK
    from .report import ERROR, Report, error_text

    from hiseg.cli import check_device, check_output_file
    from hiseg.errors import UsageError

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: gpu_check runs on cuda or cpu")
    out = args.out or default_out()
    if out.is_dir():  # a folder: the report goes inside it
        out = out / "gpu_check.md"
    check_output_file(out, "--out")  # UsageError: one line, exit status 2, before any part runs
    prof = QUICK if args.quick else FULL
    if args.quick and device.type == "cpu":
        # tiny tensors: one intra-op thread is faster, and far faster on a busy machine (idle
        # OpenMP threads spin); the full profile keeps torch's default
        torch.set_num_threads(1)
    budget = Budget(args.budget or prof.budget_s, start=T0 if start is None else start)
    wanted = set(args.only or (list(CORRECTNESS_PARTS) + [p for p, _ in SPEED_PARTS]))

    t_init = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()
        a = torch.randn(256, 256, device=device)
        (a @ a).sum().item()  # context, cuBLAS handle
    init_s = time.perf_counter() - t_init
    amp = amp_dtype(device)

    report = Report(out, f"GPU check ({prof.name} run on {device.type})")
    cmd = "python tools/gpu_check.py" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    report.header += [
        f"* command: `{cmd}`",
        f"* {provenance(args.stamp)}",
        *environment_lines(device),
        f"* profile `{prof.name}`, AMP dtype {str(amp).replace('torch.', '')}, wall budget {budget.total:.0f} s; "
        f"imports and device start-up took {budget.elapsed():.1f} s (CUDA init {init_s:.1f} s)",
        f"* started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    table = correctness.new_table(report)
    report.write()

    def run_part(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (one broken part must not hide the others)
            table.add(f"part '{name}'", ERROR, error_text(exc), "-", "-")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s (elapsed {budget.elapsed():.0f} s)",
              file=sys.stderr, flush=True)
        report.write()

    suite = correctness.SuiteRun() if "suite" in wanted else None
    if "slic" in wanted:
        run_part("slic_torch", lambda: correctness.check_slic(table, device, prof))
    if "oap_eq" in wanted:
        run_part("OAP fast = reference", lambda: correctness.check_oap(table, device, prof))
    if "cast_fwd" in wanted:
        run_part("CAST forward", lambda: correctness.check_cast_forward(table, device, prof))
    if "amp" in wanted:
        # the AMP steps must all run: they only stop when less than a third of the budget is left
        keep = lambda label: budget.left() > budget.total / 3  # noqa: E731
        run_part("AMP training steps", lambda: correctness.check_amp_steps(table, device, prof, amp, keep))
    if suite is not None:
        run_part("CUDA-only tests", lambda: suite.finish(table, device, timeout=max(10.0, budget.left() - 60)))

    speed_parts = [(n, w) for n, w in SPEED_PARTS if n in wanted]
    reserve = 5.0  # writing the report, printing
    for i, (name, weight) in enumerate(speed_parts):
        allot = budget.share(weight, sum(w for _, w in speed_parts[i:]), reserve)
        if name == "memory":
            fn = lambda: memory.memory_per_config(report, device, prof, amp, allot)  # noqa: E731
        elif name == "cast":
            fn = lambda: speed.speed_cast_vs_vit(report, device, prof, amp, budget, allot)  # noqa: E731
        elif name == "oap":
            fn = lambda: speed.speed_oap(report, device, prof, budget, allot)  # noqa: E731
        else:
            fn = lambda: speed.speed_oap_step(report, device, prof, amp, budget, allot)  # noqa: E731
        run_part(f"speed: {name} (allotted {allot:.0f} s)", fn)

    failures = report.failures()
    report.footer += [
        "## Result", "",
        f"* wall time {budget.elapsed():.1f} s (budget {budget.total:.0f} s)",
        f"* {'FAILED: ' + str(len(failures)) + ' row(s)' if failures else 'all correctness checks passed'}"
        + (": " + "; ".join(failures) if failures else ""),
    ]
    report.write()
    print(report.render())
    print(f"[gpu_check] report: {out}", file=sys.stderr)
    return 1 if failures else 0
