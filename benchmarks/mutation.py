"""Mutation testing of one module at a time, fast enough for a small machine.

    python benchmarks/mutation.py lightning_reg/functional/calibration.py [more modules...]

`mutmut run` from the project root (pyproject's `[tool.mutmut]`) mutates all of `functional/` and `callbacks/`
and first traces the whole test suite to learn which tests reach which function; on 2 cores that stats run alone
takes longer than the default test run. This script runs the same mutmut per module instead: it copies the project
into `mutants-work/<module>/`, narrows `[tool.mutmut]` there to that one module and to the test files that exercise
it (`TESTS` below, or `--tests`), runs `mutmut run --max-children 1` (each mutant still runs only the tests that
reached the mutated function), and prints the counts and the survivors. The numbers go to
benchmarks/results/mutation.md by hand, with the survivors read and either killed by a test or explained.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "mutants-work"
COPIED = ["lightning_reg", "zoo", "tests", "benchmarks", "examples", "data", "pyproject.toml", "README.md", "docs"]

# The test files that exercise each module (a module's own tests, those of its callback or nn wrapper, and the
# examples that import it). mutmut still picks, per mutant, the tests of this selection that reached the function.
_MIXING_TESTS = [
    "tests/functional/test_mixup.py",
    "tests/functional/test_cutmix.py",
    "tests/functional/test_label_smoothing.py",
    "tests/test_targets.py",
    "tests/test_argument_checks.py",
]
# The mixing and smoothing callbacks and their private helpers: the callbacks' Trainer tests (about 12 s in all).
_MIXING_CALLBACK_TESTS = [
    "tests/callbacks/test_mixup.py",
    "tests/callbacks/test_cutmix.py",
    "tests/callbacks/test_label_smoothing.py",
    "tests/callbacks/test_regmixup.py",
    "tests/callbacks/test_target_mode.py",
    "tests/callbacks/test_contract.py",
    "tests/callbacks/test_callback_arguments.py",
    "tests/callbacks/test_mixing_draws.py",
    "tests/test_argument_checks.py",
]
_MIXING_CALLBACKS = ["mixup", "cutmix", "mixup_cutmix", "regmixup", "label_smoothing", "_mixing", "_buffer"]
_MIXING_CALLBACKS += ["_num_classes", "_smoothing"]
TESTS: dict[str, list[str]] = {
    "lightning_reg/functional/uncertainty.py": [
        "tests/test_uncertainty_metrics.py",
        "tests/functional/test_mc_dropout.py",
        "tests/functional/test_calibration.py",
    ],
    # Not the callback's Trainer tests: every mutant of `fit_temperature` would run all of them (a minute each).
    "lightning_reg/functional/calibration.py": ["tests/functional/test_calibration.py"],
    "lightning_reg/functional/selective.py": ["tests/test_selective_metrics.py"],
    "lightning_reg/functional/bn_recalibration.py": ["tests/functional/test_bn_recalibration.py"],
    "lightning_reg/functional/label_smoothing.py": ["tests/functional/test_label_smoothing.py"],
    "lightning_reg/functional/locked_dropout.py": ["tests/nn/test_locked_dropout.py"],
    "lightning_reg/functional/recurrent_dropout.py": ["tests/nn/test_recurrent_dropout.py"],
    "lightning_reg/functional/weight_drop.py": ["tests/nn/test_weight_drop.py"],
    "lightning_reg/functional/regmixup.py": ["tests/callbacks/test_regmixup.py"],
    "lightning_reg/functional/mixup.py": ["tests/functional/test_mixup.py"],
    "lightning_reg/functional/cutmix.py": ["tests/functional/test_cutmix.py"],
    "lightning_reg/functional/mc_masks.py": ["tests/functional/test_mc_masks.py"],
    # The mask helper of weight_drop, locked_dropout and mc_masks: their tests (seconds).
    "lightning_reg/functional/_bernoulli.py": [
        "tests/functional/test_bernoulli.py",
        "tests/nn/test_weight_drop.py",
        "tests/nn/test_locked_dropout.py",
        "tests/functional/test_mc_masks.py",
    ],
    # Not the callback's Trainer tests (tests/callbacks/test_mc_dropout*.py): every mutant of `mc_dropout_predict`
    # reaches them; the functional tests take about 3 s in all.
    "lightning_reg/functional/mc_dropout.py": [
        "tests/functional/test_mc_dropout.py",
        "tests/functional/test_mc_prefix.py",
        "tests/functional/test_mc_masks.py",
        "tests/functional/test_mc_messages.py",
        "tests/functional/test_mc_sites.py",
    ],
    # The private helpers of the mixing and smoothing functions: the functional tests of their callers (seconds).
    "lightning_reg/functional/_checks.py": _MIXING_TESTS,
    "lightning_reg/functional/_targets.py": _MIXING_TESTS,
    "lightning_reg/functional/_draws.py": _MIXING_TESTS,
    "lightning_reg/functional/_apply.py": _MIXING_TESTS,
    "lightning_reg/callbacks/bn_recalibration.py": ["tests/callbacks/test_bn_recalibration.py"],
    "lightning_reg/callbacks/temperature_scaling.py": ["tests/callbacks/test_temperature_scaling.py"],
    "lightning_reg/callbacks/bn_stats_monitor.py": ["tests/callbacks/test_bn_stats_monitor.py"],
    "lightning_reg/callbacks/regularization_check.py": ["tests/test_regularization_check.py"],
    **{f"lightning_reg/callbacks/{name}.py": _MIXING_CALLBACK_TESTS for name in _MIXING_CALLBACKS},
    "lightning_reg/callbacks/_strategy.py": [
        *_MIXING_CALLBACK_TESTS,
        "tests/callbacks/test_bn_recalibration.py",
        "tests/distributed/test_strategies.py",
    ],
    "lightning_reg/callbacks/mc_dropout.py": [
        "tests/callbacks/test_mc_dropout.py",
        "tests/callbacks/test_mc_dropout_detection.py",
        "tests/callbacks/test_mc_dropout_masks.py",
        "tests/callbacks/test_mc_dropout_arguments.py",
        "tests/callbacks/test_mc_dropout_plots.py",
    ],
}

# The multi-process tests are left out: under mutmut's tracing one of them takes a minute, and every surviving
# mutant would run it again. Their code paths (collectives) are therefore not scored here.
# (Every multi-process test has one of these in its name: the single-process tests of tests/distributed/ stay in.)
DESELECT = "not ddp and not two_ranks and not two_process and not 2_process"

_SECTION = re.compile(r"^\[tool\.mutmut\]\n(?:(?!^\[).*\n?)*", re.MULTILINE)


def _mutmut_section(module: str, tests: list[str], distributed: bool = False) -> str:
    deselect = "" if distributed else f'"-k", "{DESELECT}", '
    return (
        "[tool.mutmut]\n"
        'source_paths = ["lightning_reg"]\n'
        f"only_mutate = {json.dumps([module])}\n"
        'also_copy = ["zoo", "benchmarks", "examples", "data", "docs", "README.md"]\n'
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "--no-header", "-m", "not slow and not gpu", '
        f'{deselect}"-W", "ignore::pytest.PytestUnraisableExceptionWarning"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        "use_git_change_detection = false\n"
    )


def run_module(
    module: str,
    tests: list[str],
    fresh: bool,
    survivors_only: bool = False,
    distributed: bool = False,
    only: list[str] | None = None,
) -> dict[str, object]:
    """Run mutmut on one module in its own scratch copy; return the counts and the survivors.

    With ``survivors_only``, only the previous run's survivors run again, against the current tests (the way to
    check that new tests kill them without rerunning every mutant). With ``distributed``, the multi-process tests
    are kept too (each mutant that reaches them then starts its own process group: seconds to a minute each);
    ``only`` narrows a survivors rerun to the mutants whose names contain one of its strings.
    """
    if not (ROOT / module).is_file():
        raise SystemExit(f"Expected a module file under {ROOT}, but got {module!r}.")
    missing = [t for t in tests if not (ROOT / t).exists()]
    if missing:
        raise SystemExit(f"Expected existing test files for {module}, but these are missing: {missing}.")
    work = WORK / Path(module).with_suffix("").as_posix().replace("/", ".")
    again: list[str] = []
    if survivors_only:
        previous = work / "result.json"
        if not previous.exists():
            raise SystemExit(f"Expected an earlier run of {module} in {work} for --survivors, but found none.")
        again = list(json.loads(previous.read_text())["survivors"])
        if only:  # those of the named functions (substrings of the mutant names)
            again = [name for name in again if any(part in name for part in only)]
        fresh = False
    base = work
    if distributed:  # its own copy: other pytest arguments make mutmut start every mutant afresh
        work = work.with_name(work.name + ".distributed")
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, work / name
        if dst.exists() and src.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst)
    pyproject = work / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(_SECTION.sub(_mutmut_section(module, tests, distributed), text, count=1))

    mutmut = [sys.executable, "-m", "mutmut"]
    start = time.monotonic()
    subprocess.run([*mutmut, "run", "--max-children", "1", *again], cwd=work, check=False)
    wall = time.monotonic() - start
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True)
    status: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        name, _, state = line.strip().rpartition(": ")
        if name:
            status[name] = state
    counts: dict[str, int] = {}
    for state in status.values():
        counts[state] = counts.get(state, 0) + 1
    killed = counts.get("killed", 0)
    counted = len(status) - counts.get("skipped", 0)
    result = {
        "module": module,
        "tests": tests,
        "mutants": counted,
        "counts": counts,
        "score": round(100 * killed / counted, 1) if counted else None,
        "survivors": sorted(n for n, s in status.items() if s not in ("killed",)),
        "wall_s": round(wall),
    }
    if survivors_only:
        # the mutants not rerun were killed by the base run: its kills, plus the survivors the rerun's tests now kill
        previous = json.loads((base / "result.json").read_text())
        rerun_killed = sorted(n for n in again if status.get(n) == "killed")
        total_killed = previous["counts"].get("killed", 0) + len(rerun_killed)
        result.update(
            mutants=previous["mutants"],
            counts={"killed": total_killed, "survived": previous["mutants"] - total_killed},
            score=round(100 * total_killed / previous["mutants"], 1),
            survivors=sorted(set(previous["survivors"]) - set(rerun_killed)),
        )
        result["killed_by_multi_process_tests" if distributed else "killed_by_the_rerun"] = rerun_killed
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


# What every multi-process test has in its name (the complement of DESELECT).
MULTI_PROCESS = "ddp or two_ranks or two_process or 2_process"


def _changed_lines(diff: list[str]) -> list[str]:
    return sorted(line[1:].strip() for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def _applied_as_shown(name: str, work: Path, before: str, after: str) -> bool:
    """Whether the source changed by exactly the lines of the mutant's own diff (``mutmut show``)."""
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True, text=True)
    applied = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return _changed_lines(list(applied)) == _changed_lines(shown.stdout.splitlines()[1:])


def check_applied(module: str, tests: list[str], only: list[str]) -> dict[str, object]:
    """Rerun survivors against the multi-process tests without mutmut's trampolines: each mutant applied to the source.

    mutmut picks the tests of a mutant from a trace of the pytest process, which does not see code that runs only
    in the DDP worker processes (the all-gathers of a callback's epoch end, say), so it never runs those tests for
    it. Here each survivor of the base run whose name contains one of ``only`` is written into a scratch copy's
    source (``mutmut apply``), the selected multi-process tests run plainly there, and a failure counts as a kill.
    """
    work = WORK / Path(module).with_suffix("").as_posix().replace("/", ".")
    previous = work / "result.json"
    if not previous.exists():
        raise SystemExit(f"Expected an earlier run of {module} in {work}, but found none.")
    base = json.loads(previous.read_text())
    names = [name for name in base["survivors"] if any(part in name for part in only)]
    shutil.copytree(ROOT / "tests", work / "tests", dirs_exist_ok=True)  # the current tests
    source = work / module
    pristine = (ROOT / module).read_text()
    killed: list[str] = []
    unapplied: list[str] = []
    start = time.monotonic()
    try:
        for name in names:
            source.write_text(pristine)
            subprocess.run([sys.executable, "-m", "mutmut", "apply", name], cwd=work, check=True, capture_output=True)
            if not _applied_as_shown(name, work, pristine, source.read_text()):
                unapplied.append(name)  # `mutmut apply` replaced another function (one of the same name)
                print(f"{name}: not applied as `mutmut show` has it", flush=True)
                continue
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-k", MULTI_PROCESS, *tests],
                cwd=work,
                env={**os.environ, "PYTHONPATH": str(work)},
                capture_output=True,
                text=True,
            )
            if run.returncode == 1:  # tests failed (not 5, none collected; not 2, interrupted)
                killed.append(name)
            print(f"{name}: {'killed' if name in killed else f'survived (pytest exit {run.returncode})'}", flush=True)
    finally:
        source.write_text(pristine)
    total = base["counts"].get("killed", 0) + len(killed)
    result = {
        **base,
        "counts": {"killed": total, "survived": base["mutants"] - total},
        "score": round(100 * total / base["mutants"], 1),
        "survivors": sorted(set(base["survivors"]) - set(killed)),
        "killed_by_multi_process_tests_applied": killed,
        "not_applied": unapplied,
        "applied_wall_s": round(time.monotonic() - start),
    }
    previous.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="module files, e.g. lightning_reg/functional/calibration.py")
    parser.add_argument("--tests", nargs="+", help="test files to select from (default: TESTS[module])")
    parser.add_argument("--fresh", action="store_true", help="start from scratch (default: reuse earlier results)")
    parser.add_argument("--survivors", action="store_true", help="rerun only the last run's survivors")
    parser.add_argument(
        "--distributed", action="store_true", help="keep the multi-process tests (best with --survivors: slow)"
    )
    parser.add_argument("--only", nargs="+", help="with --survivors: rerun the survivors whose names contain these")
    parser.add_argument(
        "--applied",
        action="store_true",
        help="with --only: apply each such survivor to the source and run the multi-process tests plainly",
    )
    args = parser.parse_args()
    for module in args.modules:
        if args.tests is None and module not in TESTS:
            raise SystemExit(f"No test files known for {module!r}: pass --tests, or one of {sorted(TESTS)}.")
        if args.applied:
            if not args.only:
                raise SystemExit("Expected --only with --applied: the survivors to apply, by part of their names.")
            print(json.dumps(check_applied(module, args.tests or TESTS[module], args.only), indent=2), flush=True)
            continue
        result = run_module(
            module, args.tests or TESTS[module], args.fresh, args.survivors, args.distributed, args.only
        )
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
