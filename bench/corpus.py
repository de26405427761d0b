"""The diagnosis on programs and faults nobody on this project wrote: healthy programs from published packages
(bench/corpus/programs.py) and faults made from them by DeepCrime's mutation operators (bench/corpus/faults.py).

    pip install -r bench/corpus/requirements.txt && pip install --no-deps d2l==1.0.3
    python bench/corpus.py                  # the development part (about 6 minutes on 2 CPU cores)
    python bench/corpus.py --part 2         # the second part (held out until its one scoring, 2026-12-07)
    python bench/corpus.py --part 3         # the third part (held out until its one scoring, 2026-12-07)
    python bench/corpus.py --part 4         # the fourth part (held out until its one scoring, 2026-12-07)
    python bench/corpus.py --part 5         # the fifth part (held out until its one scoring, 2026-12-07)
    python bench/corpus.py --part 6         # the sixth part, held out: written before any of it was diagnosed
    python bench/corpus.py --only lenet_HLR_x30 sb3_ppo --story

Per run: the program, the operator, the first warning the diagnosis gave (its first finding that is not a
consequence of another, notes left aside), and the verdict: for a healthy program "ok" (no warning) or "FALSE
ALARM"; for a fault "right" (a rule that names the fault's cause, with a suggestion that would fix it), "symptom"
(a finding that states a symptom and what to check, naming no cause), "silent" (no warning), or "WRONG" (a
cause that is not the fault's: misleading); then the program's outcome (how well it learnt) and the seconds it
took. The totals follow. A program that dies (SAC's policy turned NaN) is scored on what the monitor wrote
before it did, as its user would read it.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "corpus")]
import faults  # noqa: E402
import programs  # noqa: E402
from diagnosis_suite import first_problem  # noqa: E402

from gradwatch.diagnosis import saved_findings  # noqa: E402


def fault(name):
    """The fault `name` (program, operator, change, rules that name it) of any part; None for a program."""
    parts = (faults.FAULTS, faults.HELD_OUT, faults.THIRD, faults.FOURTH, faults.FIFTH, faults.SIXTH)
    return next((part[name] for part in parts if name in part), None)


PARTS = {
    1: [*faults.HEALTHY, *faults.FAULTS],
    2: [*faults.HELD_OUT_HEALTHY, *faults.HELD_OUT],
    3: [*faults.THIRD_HEALTHY, *faults.THIRD],
    4: [*faults.FOURTH_HEALTHY, *faults.FOURTH],
    5: [*faults.FIFTH_HEALTHY, *faults.FIFTH],
    6: [*faults.SIXTH_HEALTHY, *faults.SIXTH],
}


def run(name, log_dir):
    """Run one healthy program or fault; returns (its findings, its outcome)."""
    program, _, change, _ = fault(name) or (name, "-", programs.Change(), ())
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        try:
            outcome = getattr(programs, program)(log_dir, change)
        except Exception as error:  # the program died (SAC's policy of NaN): what the monitor said is scored
            outcome = f"CRASHED: {error!r}"[:100]
    return saved_findings(os.path.join(log_dir, "diagnosis.json"), 10**9), outcome


def verdict(name, first):
    """How the first warning `first` (or None) answers run `name`."""
    entry = fault(name)
    if entry is None:  # a healthy program
        return "ok" if first is None else "FALSE ALARM"
    if first is None:
        return "silent"
    if first.rule in faults.SYMPTOMS or first.evidence.get("cause", "") is None:
        return "symptom"  # a symptom, and what to check: no cause named
    named = first.rule + "".join(f":{flag}" for flag in faults.CAUSE_FLAGS if first.evidence.get(flag))
    if isinstance(first.evidence.get("cause"), str):  # the cause a finding names among its rule's
        named += f":{first.evidence['cause']}"
    return "right" if named in entry[3] else "WRONG"


def smoke(names):
    """Run each and print its outcome alone, no findings: whether a program runs and a fault harms it, without
    scoring the diagnosis (what a held-out part may be checked with before it is scored)."""
    for name in names:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as log_dir:
            try:
                outcome = run(name, log_dir)[1]
            except Exception as error:
                outcome = f"CRASHED: {error!r}"
        print(f"{name:24}{time.perf_counter() - start:5.0f}  {outcome}", flush=True)


def score(names, story=False):
    counts = {}
    print(f"{'run':24}{'program':24}{'op':5}{'first warning':22}{'verdict':13}{'s':>5}  outcome")
    started = time.perf_counter()
    for name in names:
        entry = fault(name) or (name, "-")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as log_dir:
            try:
                findings, outcome = run(name, log_dir)
            except Exception as error:  # a program that crashed is reported, and the others go on
                findings, outcome = [], f"CRASHED: {error!r}"
                traceback.print_exc()
        first = first_problem(findings)
        said = verdict(name, first)
        counts[said] = counts.get(said, 0) + 1
        print(f"{name:24}{entry[0]:24}{entry[1]:5}{first.rule if first else '-':22}{said:13}"
              f"{time.perf_counter() - start:5.0f}  {outcome}", flush=True)  # fmt: skip
        for finding in findings if story else ():
            print(f"    {finding}")
    return counts, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", type=int, choices=sorted(PARTS), default=1,
                        help="1: the development part; 2: the second part (held out until 2026-12-07); "
                        "3 to 5: the third to fifth parts (held out until their one scoring, 2026-12-07); 6: the "
                        "sixth part, held out (score it once)")  # fmt: skip
    parser.add_argument("--only", nargs="*", help="only these runs (names from the tables)")
    parser.add_argument("--story", action="store_true", help="print every finding of each run")
    parser.add_argument("--smoke", action="store_true", help="run them and print their outcomes alone")
    args = parser.parse_args()
    names = PARTS[args.part]
    if args.smoke:
        return smoke(args.only or names)
    counts, seconds = score(args.only or names, args.story)
    healthy = sum(counts.get(key, 0) for key in ("ok", "FALSE ALARM"))
    faulty = sum(counts.values()) - healthy
    print(f"\nhealthy programs with a warning: {counts.get('FALSE ALARM', 0)} of {healthy}; faults: "
          f"{counts.get('right', 0)} right, {counts.get('WRONG', 0)} wrong, {counts.get('symptom', 0)} "
          f"symptom only, {counts.get('silent', 0)} silent, of {faulty}; {seconds:.0f} s in all")  # fmt: skip


if __name__ == "__main__":
    main()
