"""What a search leaves behind: the trials table (terminal, CSV, Markdown), ``best.yaml`` and PNG figures."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lightning_reg.search.space import SearchSpace

__all__ = ["best_config", "trial_rows", "write_figures", "write_report"]

# fANOVA importances on fewer complete trials are noise; Optuna computes them anyway.
MIN_TRIALS_FOR_IMPORTANCES = 4


def _state(trial: FrozenTrial) -> str:
    return "SKIPPED" if trial.user_attrs.get("skipped") else trial.state.name


def _seconds(trial: FrozenTrial) -> float | None:
    if "seconds" in trial.user_attrs:
        return float(trial.user_attrs["seconds"])
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_rows(study: optuna.Study, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: number, each parameter, the metric (and other validation metrics), state and seconds."""
    monitor = study.user_attrs.get("monitor", "value")
    trials = study.get_trials(deepcopy=False)
    # The final validation's other metrics (val_acc, ...) beside the monitored one.
    extra = sorted({m for t in trials for m in t.user_attrs.get("metrics", {}) if m.startswith("val")} - {monitor})
    rows = []
    for trial in trials:
        if trial.user_attrs.get("skipped"):
            continue
        values = space.decode(trial.params)
        row: dict[str, Any] = {"trial": trial.number}
        row.update({name: values.get(name) for name in space.names})
        row[monitor] = trial.value
        row.update({m: trial.user_attrs.get("metrics", {}).get(m) for m in extra})
        row["state"] = _state(trial)
        seconds = _seconds(trial)
        row["seconds"] = round(seconds, 2) if seconds is not None else None
        rows.append(row)
    return rows


def best_config(study: optuna.Study, space: SearchSpace, base: Mapping[str, Any]) -> dict[str, Any]:
    """The complete config of the best trial: the search's base config with the best trial's values."""
    return space.apply(base, space.decode(study.best_trial.params))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(
    study: optuna.Study, space: SearchSpace, base: Mapping[str, Any], out: Path, *, figures: bool = True
) -> dict[str, Any]:
    """Write ``trials.csv``, ``summary.md``, ``best.yaml`` and the figures to ``out``; print the table.

    Returns:
        ``{"rows": ..., "best": FrozenTrial or None, "figures": {name: path or reason skipped}}``.
    """
    from rich.console import Console
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, space)
    monitor = study.user_attrs.get("monitor", "value")
    with (out / "trials.csv").open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    console = Console()
    table = Table(title=f"study {study.study_name!r}: {len(rows)} trials")
    for key in rows[0] if rows else ["trial"]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(_format(v) for v in row.values()))
    console.print(table)

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    summary = [f"# Search `{study.study_name}`\n", f"Monitor `{monitor}` ({study.direction.name.lower()}).\n"]
    if best is not None:
        best_values = space.decode(best.params)
        config = best_config(study, space, base)
        header = (
            f"# Best trial {best.number} of study {study.study_name!r}: {monitor} = {best.value:.6g}\n"
            f"# Values: {best_values}\n# Reproduce: lightning-reg fit --config {out / 'best.yaml'}\n"
        )
        (out / "best.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        console.print(f"best trial {best.number}: {monitor} = {best.value:.6g} with {best_values}")
        console.print(f"best config: {out / 'best.yaml'}")
        summary += [f"Best trial {best.number}: `{monitor}` = {best.value:.6g} with `{best_values}`.\n"]
    else:
        console.print("no trial completed: no best.yaml")
    summary += ["## Trials\n", _markdown(rows)]
    figure_paths = write_figures(study, out, space.names) if figures else {}
    if figure_paths:
        summary += ["## Figures\n"]
        for name, where in figure_paths.items():
            summary += [f"![{name}]({where.name})\n" if isinstance(where, Path) else f"- {name}: {where}\n"]
    (out / "summary.md").write_text("\n".join(summary))
    return {"rows": rows, "best": best, "figures": figure_paths}


def write_figures(study: optuna.Study, out: Path, names: list[str]) -> dict[str, Path | str]:
    """Optimization history, the metric against each parameter and parameter importances (Optuna's matplotlib).

    Returns:
        figure name -> the PNG written, or the reason it was skipped.
    """
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written: dict[str, Path | str] = {}
    if not complete:
        return {"figures": "skipped: no complete trial"}
    plots: dict[str, Any] = {
        "history": lambda: ovm.plot_optimization_history(study),
        "params": lambda: ovm.plot_slice(study),
    }
    if len(names) < 2:
        written["importances"] = "skipped: importances need at least 2 searched parameters"
    elif len(complete) < MIN_TRIALS_FOR_IMPORTANCES:
        written["importances"] = (
            f"skipped: importances need at least {MIN_TRIALS_FOR_IMPORTANCES} complete trials, got {len(complete)}"
        )
    else:
        plots["importances"] = lambda: ovm.plot_param_importances(study)
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot()
            except (ValueError, RuntimeError) as error:  # e.g. importances of a parameter that never varied
                written[name] = f"skipped: {error}"
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        path = out / f"{name}.png"
        # Not tight_layout: it moves the slice plot's colorbar over the last panel.
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written[name] = path
    return written
