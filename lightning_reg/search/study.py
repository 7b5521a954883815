"""``lightning-reg search``: an Optuna study whose trials are ``lightning-reg fit`` runs of one config.

The config is parsed once by the ``LightningCLI`` parser into a complete config (every default filled in);
the space is checked against it; each trial is that config with the sampled values, fitted through the same
``LightningCLI`` as ``lightning-reg fit``, with :class:`~lightning_reg.search.pruning.TrialPruning` reporting
the monitored metric to Optuna. The study lives in an Optuna storage (SQLite in the output folder by default),
so rerunning the command resumes it and N workers on one storage fill one study.

DDP inside a trial (``--trainer.strategy ddp --trainer.devices N``): Lightning starts ranks 1..N-1 by re-running
this command. Those ranks never talk to Optuna: the first trial's complete config reaches them through the
environment Lightning copies to them, later ones by a broadcast from rank 0 over the process group that the
first trial set up, and ``None`` ends them. So every rank trains the same sampled values, and only rank 0
reports, once per validation.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from argparse import ArgumentError
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml

from lightning_reg.cli import LightningRegCLI, cli
from lightning_reg.search.pruning import TrialPruning
from lightning_reg.search.space import SearchSpace, SearchSpaceError

if TYPE_CHECKING:
    import optuna
    from lightning.pytorch.cli import LightningCLI

__all__ = ["ConfigError", "complete_config", "make_storage", "require_optuna", "search", "search_cli"]

Sampler = Literal["tpe", "grid", "random"]
Pruner = Literal["median", "none"]
Mode = Literal["min", "max"]

INSTALL_HINT = (
    'lightning-reg search needs Optuna, an optional extra: pip install "lightning-reg[search]" (or pip install optuna).'
)
# Rank 0 -> the ranks Lightning starts for a DDP trial: the first trial's config, as JSON.
HANDOFF_ENV = "LIGHTNING_REG_SEARCH_TRIAL"
# Arguments of the search command that belong to the trials' `lightning-reg fit`.
_FIT_KEYS = ("--trainer", "--model", "--data", "--seed_everything", "--optimizer", "--lr_scheduler")
HEARTBEAT_SECONDS = 60


class ConfigError(ValueError):
    """A config (or command-line override) that ``lightning-reg fit`` would reject."""


def require_optuna() -> Any:
    """Import Optuna, or raise ``ModuleNotFoundError`` that says what to install."""
    try:
        import optuna
    except ImportError as error:
        raise ModuleNotFoundError(INSTALL_HINT) from error
    return optuna


# --- configs through the LightningCLI parser ----------------------------------------------------------------


class _ParseOnlyCLI(LightningRegCLI):
    """Parses and completes a config with ``lightning-reg fit``'s parser; instantiates nothing."""

    def instantiate_classes(self) -> None:
        """Nothing to build: only the parsed config is wanted."""


class _TrialCLI(LightningRegCLI):
    """``lightning-reg fit`` of one trial; refuses the launchers whose ranks cannot report to the study."""

    def before_fit(self) -> None:
        """Refuse spawn/fork launchers: their rank 0 is not this process, so it holds no Optuna trial."""
        from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

        if isinstance(self.trainer.strategy.launcher, _MultiProcessingLauncher):
            raise ValueError(
                f"A search trial cannot run under {type(self.trainer.strategy).__name__} with a spawn/fork launcher "
                "(ddp_spawn, ddp_fork, ddp_notebook): its ranks are new processes that cannot report to the study. "
                "Use `--trainer.strategy ddp`, whose rank 0 is the search process itself."
            )


def complete_config(args: Sequence[str]) -> dict[str, Any]:
    """The complete config (every default filled in) that ``lightning-reg fit <args>`` would run.

    Raises:
        ConfigError: the arguments do not parse.

    Example:
        >>> config = complete_config(["--model=CNNClassifier", "--data=DigitsDataModule"])
        >>> config["model"]["init_args"]["dropout"], config["trainer"]["max_epochs"]
        (0.3, None)
    """
    try:
        with _quiet_cli():
            parsed = cli(list(args), run=False, cli_class=_ParseOnlyCLI, parser_kwargs={"exit_on_error": False})
    except ArgumentError as error:
        raise ConfigError(f"The config does not parse ({' '.join(args)}): {error}") from error
    # Keep None values: `trainer.gradient_clip_val: null` is a searchable path. (jsonargparse >= 4.49 renamed
    # `skip_none` to `skip_unset`.)
    try:
        dumped = parsed.parser.dump(parsed.config, skip_unset=False)
    except TypeError:  # jsonargparse < 4.49
        dumped = parsed.parser.dump(parsed.config, skip_none=False)
    return dict(yaml.safe_load(dumped))


@contextlib.contextmanager
def _quiet_cli() -> Iterator[None]:
    """The search passes ``args`` on purpose: LightningCLI's warning about ``sys.argv`` also holding some is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        yield


def _check_values_fit_config(base: Mapping[str, Any], space: SearchSpace) -> None:
    """Type-check every parameter's extremes and choices by parsing the config with them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        for values in space.corners():
            path.write_text(yaml.safe_dump(space.apply(base, values), sort_keys=False))
            try:
                complete_config(["--config", str(path)])
            except ConfigError as error:
                message = f"The space's values {values} do not fit the config: {error.__cause__}"
                raise SearchSpaceError(message) from error


def _fit(config: Mapping[str, Any], callback: TrialPruning, config_path: Path | None = None) -> LightningCLI:
    """``lightning-reg fit --config <config>`` with the trial's reporting callback added."""
    with contextlib.ExitStack() as stack:
        if config_path is None:
            config_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        args = ["fit", "--config", str(config_path)]
        with _quiet_cli():
            return cli(args, cli_class=_TrialCLI, trainer_defaults={"callbacks": [callback]})


# --- DDP inside a trial -------------------------------------------------------------------------------------


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _handoff() -> dict[str, Any] | None:
    """The first trial's payload when this process is a rank > 0 that Lightning started for a DDP trial."""
    raw = os.environ.get(HANDOFF_ENV)
    if raw is None or (os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"):
        return None
    return dict(json.loads(raw))


def _follow(payload: Mapping[str, Any]) -> None:
    """Rank > 0 of DDP trials: fit each config rank 0 sends, until it sends ``None``."""
    config: Mapping[str, Any] | None = payload["config"]
    while config is not None:
        _fit(config, TrialPruning(None, payload["monitor"]))
        config = _broadcast(None)


class _Leader:
    """Rank 0's side of the hand-off to the ranks of DDP trials (a no-op for single-process trials)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def fit(self, config: Mapping[str, Any], callback: TrialPruning, config_path: Path) -> LightningCLI:
        if _distributed():  # ranks from an earlier DDP trial wait in `_follow` for this config
            _broadcast(dict(config))
            return _fit(config, callback, config_path)
        # Lightning copies this environment to the ranks it starts (then they are followers).
        os.environ[HANDOFF_ENV] = json.dumps({"config": dict(config), "monitor": self.monitor})
        try:
            return _fit(config, callback, config_path)
        finally:
            os.environ.pop(HANDOFF_ENV, None)

    def close(self) -> None:
        if _distributed():
            _broadcast(None)


def _refuse_external_ranks() -> None:
    """Several ranks started by torchrun or srun would each run their own search: the DDP trap, refused."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1) if "SLURM_PROCID" in os.environ else 1
    if world > 1 or slurm_tasks > 1:
        raise RuntimeError(
            f"lightning-reg search runs as one process per worker, but this is one of {max(world, slurm_tasks)} "
            "ranks started by torchrun or srun: each would sample its own values. Run one search process per "
            "worker (a SLURM job array with --ntasks=1, see examples/slurm/search_array.sbatch) and let Lightning "
            "start the ranks of a DDP trial (--trainer.strategy ddp --trainer.devices N)."
        )


# --- storage ------------------------------------------------------------------------------------------------


def make_storage(storage: str | Any | None, out: Path) -> Any:
    """An Optuna storage from a URL, ``journal:PATH`` / ``PATH.log`` (a journal file), or the default SQLite file.

    RDB storages (SQLite included) get heartbeats, so that the trial of a killed worker is marked failed and
    retried when the search is rerun.

    Example:
        >>> import tempfile
        >>> type(make_storage(None, Path(tempfile.mkdtemp()))).__name__
        'RDBStorage'
    """
    optuna = require_optuna()
    if storage is not None and not isinstance(storage, str):
        return storage
    if storage is not None and (storage.startswith("journal:") or ("://" not in storage and storage.endswith(".log"))):
        path = Path(storage.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    elif "://" in storage:
        url = storage
    else:
        raise ValueError(
            "Expected `storage` to be an Optuna storage URL (sqlite:///study.db, postgresql://..., mysql://...) "
            f"or a journal file (journal:PATH or PATH.log), but got {storage!r}."
        )
    # Several workers on one SQLite file wait for its lock instead of failing after SQLite's 5 s default.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # "heartbeat_interval is an experimental feature": Optuna's, not the user's
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS
        )


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat while it runs (RDB storages only)."""
    # RDBStorage's public heartbeat methods (Optuna's BaseHeartbeat lives in a private module).
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name="lightning-reg-search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- the search ---------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if isinstance(value, str) and value not in options:
        raise ValueError(f"Expected `{name}` to be one of {options}, but got {value!r}.")


def _check_study_matches(study: optuna.Study, attrs: Mapping[str, Any], where: str) -> None:
    """A resumed study must have been run with the same space, monitor and mode."""
    for key, value in attrs.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif json.dumps(stored, sort_keys=True) != json.dumps(value, sort_keys=True):
            raise ValueError(
                f"The study {study.study_name!r} in {where} was run with {key}={stored!r}, not {value!r}. Pass a new "
                "`--study-name` (or `--output-dir`) to start a new study, or the same settings to resume it."
            )


def search(
    config: str | Path,
    space: str | Path | Mapping[str, Any],
    *,
    n_trials: int | None = None,
    sampler: Sampler | Any = "tpe",
    storage: str | Any | None = None,
    study_name: str | None = None,
    pruner: Pruner | Any = "median",
    monitor: str = "val_loss",
    mode: Mode = "min",
    output_dir: str | Path | None = None,
    fit_args: Sequence[str] = (),
    seed: int | None = None,
    progress: bool = True,
    figures: bool = True,
) -> optuna.Study:
    """Search a ``lightning-reg fit`` config's hyperparameters with Optuna; returns the study.

    Each trial is ``lightning-reg fit --config <config> <fit_args>`` with the sampled values, reporting
    ``monitor`` to Optuna at each validation (pruned by ``pruner``); its value is ``monitor`` after the fit.
    ``n_trials`` counts the study's finished and running trials, so rerunning the same call resumes the study
    and runs only the missing ones; several workers on one ``storage`` fill one study. The output folder gets
    ``trials.csv``, ``summary.md``, ``best.yaml`` (``lightning-reg fit --config best.yaml`` reproduces the best
    trial), PNG figures and one folder per trial. See docs/search.md.

    Args:
        config: a ``lightning-reg fit`` YAML config.
        space: a space file (YAML) or mapping: config paths to distributions (see :mod:`lightning_reg.search.space`).
        n_trials: trials of the study in all (default: 20; with ``sampler="grid"``, every grid point).
        sampler: ``"tpe"``, ``"grid"`` (every point once, in file order), ``"random"``, or an Optuna sampler.
        storage: an Optuna storage URL, ``journal:PATH`` or ``PATH.log`` (journal file), or a storage object;
            default: ``sqlite:///<output_dir>/study.db``.
        study_name: default ``<config stem>-<space stem>``.
        pruner: ``"median"`` (Optuna's ``MedianPruner``), ``"none"``, or an Optuna pruner.
        monitor: the logged metric to optimize.
        mode: ``"min"`` or ``"max"``.
        output_dir: default ``lightning-reg-search/<study_name>``.
        fit_args: more ``lightning-reg fit`` arguments for every trial (``["--trainer.max_epochs=5"]``).
        seed: seed of the sampler (give each worker its own, or none).
        progress: show a progress bar over the trials (the trials' own progress bars are then turned off).
        figures: write the PNG figures.

    Returns:
        The ``optuna.Study``.

    Example:
        >>> study = search("examples/configs/cnn_small_digits.yaml", {"model.dropout": [0.1, 0.3]},
        ...                sampler="grid", fit_args=["--trainer.max_epochs=1"])  # doctest: +SKIP
        >>> study.best_params  # doctest: +SKIP
        {'model.dropout': 0.1}
    """
    payload = _handoff()
    if payload is not None:
        # A rank > 0 that Lightning started for a DDP trial by re-running this program: it serves the trials of
        # rank 0 and ends with them, before the caller's code after `search` would run on a second rank.
        _follow(payload)
        sys.exit(0)
    optuna = require_optuna()
    from optuna.trial import TrialState

    from lightning_reg.search.grid import OrderedGridSampler
    from lightning_reg.search.report import write_report

    _check_choice("sampler", sampler, get_args(Sampler))
    _check_choice("pruner", pruner, get_args(Pruner))
    _check_choice("mode", mode, get_args(Mode))
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"Expected `n_trials` >= 1, but got {n_trials!r}.")
    _refuse_external_ranks()

    # Everything that can be wrong with the config or the space fails here, before any trial.
    base = complete_config(["--config", str(config), *fit_args])
    if isinstance(space, str | Path):
        search_space = SearchSpace.from_file(space)
        space_stem = Path(space).stem
    else:
        search_space, space_stem = SearchSpace(dict(space)), "search"
    search_space.resolve(base)
    _check_values_fit_config(base, search_space)
    grid_sampler = None
    if sampler == "grid":
        points = search_space.size()
        target = min(n_trials or points, points)
        if n_trials is not None and n_trials > points:
            print(f"The grid has {points} points: the search runs {points} trials, not {n_trials}.")
        grid_sampler = OrderedGridSampler(search_space.grid(), size=target, seed=seed)
        sampler_obj = grid_sampler
    elif sampler == "tpe":
        target, sampler_obj = n_trials or 20, optuna.samplers.TPESampler(seed=seed)
    elif sampler == "random":
        target, sampler_obj = n_trials or 20, optuna.samplers.RandomSampler(seed=seed)
    else:
        target, sampler_obj = n_trials or 20, sampler
    if pruner == "median":
        pruner_obj = optuna.pruners.MedianPruner()
    elif pruner == "none":
        pruner_obj = optuna.pruners.NopPruner()
    else:
        pruner_obj = pruner

    name = study_name or f"{Path(config).stem}-{space_stem}"
    out = Path(output_dir) if output_dir is not None else Path("lightning-reg-search") / name
    out.mkdir(parents=True, exist_ok=True)
    storage_obj = make_storage(storage, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage_obj,
        sampler=sampler_obj,
        pruner=pruner_obj,
        study_name=name,
        direction="minimize" if mode == "min" else "maximize",
        load_if_exists=True,
    )
    attrs = {"monitor": monitor, "mode": mode, "space": search_space.spec}
    if isinstance(sampler, str):
        attrs["sampler"] = sampler
    _check_study_matches(study, attrs, str(storage or out / "study.db"))

    def remaining() -> int:
        if grid_sampler is not None:
            return len(grid_sampler.missing(study))
        taken = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        return max(target - len(taken), 0)

    leader = _Leader(monitor)
    optuna.storages.fail_stale_trials(study)  # trials of killed workers (RDB heartbeats) are missing, not taken
    with _progress(progress, total=target) as bar:
        bar.advance(target - remaining())
        try:
            while remaining() > 0:
                optuna.storages.fail_stale_trials(study)
                trial = study.ask()
                try:
                    if grid_sampler is not None and grid_sampler.chosen(trial.number) is None:
                        # Another worker took the last point between `remaining()` and `ask()`.
                        trial.set_user_attr("skipped", "no grid point left")
                        study.tell(trial, state=TrialState.FAIL)
                        break
                    _run_trial(study, trial, search_space, base, out, leader, monitor, progress, storage_obj, bar)
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    raise
        finally:
            leader.close()
    write_report(study, search_space, base, out, figures=figures)
    return study


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    space: SearchSpace,
    base: Mapping[str, Any],
    out: Path,
    leader: _Leader,
    monitor: str,
    progress: bool,
    storage: Any,
    bar: Any,
) -> None:
    from optuna.trial import TrialState

    values = space.suggest(trial)
    trial_dir = out / "trials" / f"trial_{trial.number:04d}"
    config = space.apply(base, values)
    config["trainer"]["default_root_dir"] = str(trial_dir)
    if progress:  # one live display at a time: the search's bar over trials
        config["trainer"]["enable_progress_bar"] = False
    trial.set_user_attr("dir", str(trial_dir))
    trial.set_user_attr("seed", base.get("seed_everything"))
    bar.describe(f"trial {trial.number}: {values}")
    callback = TrialPruning(trial, monitor, prune=not isinstance(study.pruner, _nop_pruner()))
    start = time.perf_counter()
    try:
        with _heartbeat(storage, trial._trial_id):
            result = leader.fit(config, callback, trial_dir / "trial_config.yaml")
    except BaseException as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
        raise
    trial.set_user_attr("seconds", time.perf_counter() - start)
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items() if v.numel() == 1}
    trial.set_user_attr("metrics", metrics)  # the other metrics of the final validation, for the table
    if callback.pruned_at_step is not None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        value = result.trainer.callback_metrics.get(monitor)
        if value is None:
            raise ValueError(
                f"The monitored metric {monitor!r} was not logged; logged metrics are "
                f"{sorted(result.trainer.callback_metrics)}. Pass `--monitor` with one of them."
            )
        study.tell(trial, float(value))
    bar.advance(1)


def _nop_pruner() -> type:
    import optuna

    return optuna.pruners.NopPruner


class _Bar:
    """The rich progress bar over trials (or nothing)."""

    def __init__(self, progress: Any | None, task: Any | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        yield _Bar(progress, progress.add_task("search", total=total))


# --- the command --------------------------------------------------------------------------------------------


def _split_fit_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The search's own arguments, and those of the trials' ``lightning-reg fit`` (``--trainer.*``, ..., ``--`` ...)."""
    own: list[str] = []
    fit: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--":
            fit += items[i + 1 :]
            break
        key = arg.split("=", 1)[0]
        if any(key == k or key.startswith(k + ".") for k in _FIT_KEYS):
            fit.append(arg)
            if "=" not in arg and i + 1 < len(items) and not items[i + 1].startswith("--"):
                fit.append(items[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, fit


def search_cli(args: Sequence[str]) -> None:
    """``lightning-reg search``: parse the options (jsonargparse, as LightningCLI) and run :func:`search`."""
    from jsonargparse import ArgumentParser

    own, fit_args = _split_fit_args(args)
    parser = ArgumentParser(
        prog="lightning-reg search",
        description="Search a lightning-reg fit config's hyperparameters with Optuna (see docs/search.md).",
        epilog="Arguments --trainer.*, --model.*, --data.*, --seed_everything and everything after `--` go to "
        "every trial's `lightning-reg fit`.",
    )
    parser.add_argument("--config", type=str, required=True, help="a lightning-reg fit YAML config")
    parser.add_argument("--space", type=str, required=True, help="the space file: config paths -> distributions")
    parser.add_argument("--n-trials", type=int | None, default=None, help="trials in all (grid: every point)")
    parser.add_argument("--sampler", type=Sampler, default="tpe")
    parser.add_argument("--storage", type=str | None, default=None, help="Optuna URL, journal:PATH or PATH.log")
    parser.add_argument("--study-name", type=str | None, default=None)
    parser.add_argument("--pruner", type=Pruner, default="median")
    parser.add_argument("--monitor", type=str, default="val_loss")
    parser.add_argument("--mode", type=Mode, default="min")
    parser.add_argument("--output-dir", type=str | None, default=None)
    parser.add_argument("--seed", type=int | None, default=None, help="the sampler's seed (one per worker)")
    parser.add_argument("--progress", type=bool, default=True)
    parser.add_argument("--figures", type=bool, default=True)
    options = parser.parse_args(own)
    try:
        search(
            options.config,
            options.space,
            n_trials=options.n_trials,
            sampler=options.sampler,
            storage=options.storage,
            study_name=options.study_name,
            pruner=options.pruner,
            monitor=options.monitor,
            mode=options.mode,
            output_dir=options.output_dir,
            fit_args=fit_args,
            seed=options.seed,
            progress=options.progress,
            figures=options.figures,
        )
    except ModuleNotFoundError as error:
        if str(error) != INSTALL_HINT:
            raise
        raise SystemExit(f"error: {error}") from None
    except (SearchSpaceError, ConfigError) as error:
        raise SystemExit(f"error: {error}") from None
