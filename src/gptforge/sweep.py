"""Hyperparameter search: an Optuna study over config overrides, minimising validation loss (or, with
`objective="val_bpb"` / `--objective val_bpb`, validation bits per byte, which compares trials that
search the tokenizer).

    gptforge sweep --config configs/tinyshakespeare-char.toml --trials 20 --budget-per-trial 300steps \\
        --space 'optim.lr=log:1e-4..3e-3' --space 'model.dropout=0,0.1,0.2' --space 'model.n_head=4,6,8'

    from gptforge.sweep import sweep
    result = sweep("configs/x.toml", ["optim.lr=log:1e-4..3e-3"], n_trials=8, out="sweeps/lr")
    print(result.best_value, result.best_params)

Each trial is an ordinary training run (`gptforge.train.trainer.train`) in `SWEEP/trials/NNNN`
with the sampled values applied as `section.key=value` overrides on top of the base config. The
trainer calls our eval hook after every evaluation; we report the validation loss to Optuna and
raise `optuna.TrialPruned` when the pruner says the trial is hopeless, which stops that run.

Outcomes. Optuna has four final states; we map ours onto them so that `--trials N` counts every
trial that ran to an answer, and only trials that never got one (killed) are re-run:
- complete: trained to its budget; the value is its best validation loss (the `best` checkpoint).
- pruned: stopped early by the pruner (Optuna state PRUNED).
- skipped: the sampled combination is not a valid config (e.g. n_embd not divisible by n_head).
  Optuna state PRUNED with user attrs `outcome="skipped"` and `reason=<the config error>`: a
  PRUNED trial without intermediate values is ranked worst by the TPE sampler, which is what we
  want for an invalid region, and it does not crash the sweep.
- failed: training raised a GptforgeError (e.g. the loss became NaN at a huge learning rate).
  Also PRUNED with `outcome="failed"` and the reason, for the same reasons.
- FAIL (Optuna's): the process died mid-trial (kill -9, Ctrl-C). `--resume` marks trials left
  RUNNING as FAIL and re-queues their parameters, so nothing finished is lost or re-run.

Files in SWEEP: `study.db` (SQLite storage unless --storage), `base.toml` (the resolved base
config), `trials/NNNN/` (run directories), `trials.csv`, `best.toml`, `history.png`, `params.png`.
The search is here; the space syntax and the study storage are gptforge.sweep_space, the table,
trials.csv, best.toml and the plots gptforge.sweep_report.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError

# The space syntax and the study's storage (gptforge.sweep_space), the table, best.toml and the plots
# (gptforge.sweep_report): their public names stay importable from here.
from gptforge.sweep_report import SweepResult, TrialRow, format_table, report
from gptforge.sweep_space import (
    _ATTR,
    OBJECTIVES,
    Param,
    _fmt,
    _load_settings,
    _override,
    _storage,
    parse_budget,
    parse_space,
)

__all__ = ["OBJECTIVES", "PRUNERS", "Param", "SweepResult", "TrialRow", "format_table", "parse_budget",
           "parse_space", "report", "run_worker", "sweep"]

# Trial states that count towards --trials (RUNNING too, so parallel workers do not overshoot).
_COUNTED = ("COMPLETE", "PRUNED", "RUNNING")
PRUNERS = ("median", "halving", "none")


# --------------------------------------------------------------------------------------------- study


def _pruner(name: str, startup_trials: int):
    import optuna

    if name == "median":
        # n_warmup_steps=1: never prune on the step-0 evaluation, where every trial is random.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise GptforgeError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


def _count(study, states: Sequence[str]) -> int:
    from optuna.trial import TrialState

    wanted = tuple(TrialState[s] for s in states)
    return len(study.get_trials(deepcopy=False, states=wanted))


def _fail_stale_trials(study, storage) -> int:
    """Mark trials left RUNNING by a killed sweep as FAIL, and queue the parameters of every FAIL
    trial (killed, or interrupted by Ctrl-C) that has not been re-run yet. Returns how many."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # What Optuna's own fail_stale_trials does, without waiting for a heartbeat to go stale.
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    for t in failed:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return len(failed)


# --------------------------------------------------------------------------------------------- objective


def _objective(sweep_dir: Path, base_config: Path, params: Sequence[Param], budget: Sequence[str],
               log: Callable[[str], None], objective_key: str = "val_loss"):
    import optuna

    from gptforge.config import load_config
    from gptforge.train.trainer import train

    def objective(trial: optuna.Trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        overrides = [*budget, *(_override(k, v) for k, v in values.items())]
        trial.set_user_attr("overrides", overrides)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        try:  # an invalid combination (e.g. n_head not dividing the preset's n_embd) is skipped here
            config = load_config(base_config, overrides)
        except GptforgeError as e:
            trial.set_user_attr("outcome", "skipped")
            trial.set_user_attr("reason", str(e))
            log(f"trial {trial.number}: skipped ({shown}): {e}")
            raise optuna.TrialPruned(str(e)) from None

        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        evals: list[tuple[int, float]] = []

        label = OBJECTIVES[objective_key][0]

        def eval_hook(step: int, record: Mapping[str, Any]) -> None:
            val = record.get(objective_key)
            if val is None or not math.isfinite(val):
                return
            evals.append((step, float(val)))
            trial.report(float(val), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} with {label} {val:.4f}")

        log(f"trial {trial.number}: {shown}")
        t0 = time.time()
        outcome, reason = "interrupted", ""  # until train() returns or raises something we handle
        try:
            result = train(config, run_dir, eval_hook=eval_hook)
            outcome = "complete"
        except optuna.TrialPruned as e:
            outcome, reason = "pruned", str(e)
            raise
        except GptforgeError as e:
            # A diverged run (NaN loss) is an answer about that region, not a broken sweep.
            outcome, reason = "failed", str(e)
            raise optuna.TrialPruned(reason) from None
        finally:
            trial.set_user_attr("time_s", round(time.time() - t0, 2))
            trial.set_user_attr("outcome", outcome)
            if reason:
                trial.set_user_attr("reason", reason)
            if evals:
                trial.set_user_attr("steps", evals[-1][0])
                trial.set_user_attr("val_loss", min(v for _, v in evals))
            if outcome != "complete":
                log(f"trial {trial.number}: {outcome}: {reason}")

        trial.set_user_attr("steps", int(result.step))
        candidates = [v for _, v in evals]
        if objective_key == "val_loss" and result.val_loss is not None and math.isfinite(result.val_loss):
            candidates.append(float(result.val_loss))
        if not candidates:
            raise GptforgeError(f"a trial finished without a {label}; "
                                "the config must evaluate (train.eval_every) and have a validation split")
        value = min(candidates)
        trial.set_user_attr("val_loss", value)  # the objective's value (the attribute's name predates val_bpb)
        log(f"trial {trial.number}: {label} {value:.4f} after {result.step} steps "
            f"({time.time() - t0:.0f} s)")
        return value

    return objective



# --------------------------------------------------------------------------------------------- sweep


def sweep(
    config: str | Path | None,
    space: Sequence[str] = (),
    n_trials: int | None = None,
    out: str | Path = "sweeps/sweep",
    *,
    overrides: Sequence[str] = (),
    budget: str | None = None,
    resume: bool = False,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    pruner: str = "median",
    startup_trials: int = 2,
    seed: int = 0,
    enqueue: Sequence[Mapping[str, Any]] = (),
    verbose: bool = True,
    objective: str | None = None,
) -> SweepResult:
    """Run (or continue) a sweep and write its table, best config and plots.

    `config` + `overrides` is the base config, `space` the `--space` strings, `n_trials` the total
    number of trials the study should hold (finished, pruned and skipped ones count; killed ones
    do not). An existing study in `out` (or `storage`) is joined; `resume=True` also marks trials
    left RUNNING by a killed sweep as failed and runs their parameters again. `enqueue` lists
    parameter dicts to try first (e.g. a known-good baseline). Config, space, budget, trial count,
    pruner and seed may be omitted when continuing: they are read back from the study. `objective` is
    what is minimised: "val_loss" (nats/token, the default) or "val_bpb" (bits per byte, for a space
    that includes data.tokenizer or data.bpe_vocab_size, where losses per token do not compare).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study_name = study_name or sweep_dir.resolve().name
    log = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    if workers < 1:
        raise GptforgeError(f"--workers must be at least 1, got {workers}")

    store = _storage(storage, sweep_dir)
    existing = _load_settings(store, study_name)
    settings = _settings(config, overrides, space, n_trials, budget, pruner, startup_trials, seed, existing,
                         sweep_dir, objective)
    study = optuna.create_study(storage=store, study_name=study_name, direction="minimize",
                                load_if_exists=True)
    if existing is None:
        study.set_user_attr(_ATTR, settings)
    elif n_trials is not None and n_trials != existing["n_trials"]:
        study.set_user_attr(_ATTR, settings)  # a resumed sweep may be extended (or shortened)
    base_config = sweep_dir / "base.toml"
    base_config.write_text(settings["base_config"], encoding="utf-8")

    if resume:
        stale = _fail_stale_trials(study, store)
        if stale:
            log(f"sweep: {stale} trial(s) an interrupted sweep did not finish will run again")
    for params in enqueue:
        study.enqueue_trial(dict(params))

    done = _count(study, ("COMPLETE", "PRUNED"))
    log(f"sweep: study {study_name!r} in {sweep_dir}: {done} of {settings['n_trials']} trials done")
    if workers == 1:
        run_worker(sweep_dir, study_name, storage, worker=0, verbose=verbose)
    else:
        _spawn_workers(sweep_dir, study_name, storage, workers)
    result = report(sweep_dir, study_name, storage, verbose=verbose)
    return result


def _settings(config, overrides, space, n_trials, budget, pruner, startup_trials, seed, existing, sweep_dir,
              objective=None):
    """The sweep's settings: from the arguments, checked against (or filled from) an existing study."""
    if objective is not None and objective not in OBJECTIVES:
        raise GptforgeError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if existing is None:
        if not space:
            raise GptforgeError(f"no sweep in {sweep_dir} yet and nothing to search; "
                                "pass at least one --space KEY=RANGE (and --config FILE) to start one")
        if n_trials is None or n_trials < 1:
            raise GptforgeError("pass --trials N (at least 1) to start a sweep")
    params = [parse_space(s) for s in space]
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise GptforgeError(f"a --space key is given twice: {keys}")
    budget_overrides = parse_budget(budget)
    if pruner not in PRUNERS:
        raise GptforgeError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    # The base config: defaults < --config < overrides, as for `gptforge train`.
    given = existing is None or config is not None or bool(overrides)
    base_text = _resolved_toml(config, overrides, budget_overrides) if given else None
    if existing is not None:
        # Continuing: anything not given comes from the study; anything given must agree with it.
        if space and list(space) != existing["space"]:
            raise GptforgeError(f"the sweep in {sweep_dir} searches {existing['space']}, not {list(space)}; "
                                "use another --out (or --study) for a different space")
        if base_text is not None and base_text != existing["base_config"]:
            raise GptforgeError(f"the sweep in {sweep_dir} was started from a different base config "
                                f"(see {sweep_dir / 'base.toml'}); use another --out for a new one")
        if budget is not None and budget != existing["budget"]:
            raise GptforgeError(f"the sweep in {sweep_dir} uses --budget-per-trial {existing['budget']}, "
                                f"not {budget}")
        was = existing.get("objective", "val_loss")  # studies from before --objective minimised val_loss
        if objective is not None and objective != was:
            raise GptforgeError(f"the sweep in {sweep_dir} minimises {was}, not {objective}; use another --out "
                                "for a different objective")
        return {**existing, "objective": was, "n_trials": n_trials or existing["n_trials"]}
    return {"space": list(space), "budget": budget, "budget_overrides": budget_overrides,
            "base_config": base_text, "n_trials": n_trials, "pruner": pruner,
            "startup_trials": startup_trials, "seed": seed, "objective": objective or "val_loss"}


def _resolved_toml(config, overrides, budget_overrides) -> str:
    """The base config resolved to one TOML text, so every worker trains from the same thing."""
    import tempfile

    from gptforge.config import load_config

    cfg = load_config(config, [*overrides, *budget_overrides])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.toml"
        cfg.save(path)
        return path.read_text(encoding="utf-8")


def run_worker(sweep_dir: str | Path, study_name: str, storage: str | None = None, worker: int = 0,
               verbose: bool = True) -> None:
    """Run trials of an existing study until it holds its target number; one per process."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(sweep_dir)
    log = (lambda s: print(f"[worker {worker}] {s}" if worker else s, flush=True)) if verbose else (lambda s: None)
    store = _storage(storage, sweep_dir)
    settings = _load_settings(store, study_name)
    if settings is None:
        raise GptforgeError(f"no sweep named {study_name!r} in {storage or sweep_dir}")
    base_config = sweep_dir / "base.toml"
    if not base_config.exists():  # a worker on another machine sharing an RDB storage
        base_config.write_text(settings["base_config"], encoding="utf-8")
    params = [parse_space(s) for s in settings["space"]]
    # Distinct seeds per worker and per session, so workers and a resumed sweep do not replay the
    # same random start-up samples as the trials already in the study.
    study = optuna.load_study(study_name=study_name, storage=store)
    sampler_seed = settings["seed"] + 1000 * worker + len(study.trials)
    study = optuna.load_study(
        study_name=study_name, storage=store,
        # TPE's default of 10 random start-up trials is most of a small sweep: scale it down.
        sampler=optuna.samplers.TPESampler(seed=sampler_seed,
                                           n_startup_trials=max(2, min(10, settings["n_trials"] // 3))),
        pruner=_pruner(settings["pruner"], settings["startup_trials"]),
    )
    objective = _objective(sweep_dir, base_config, params, settings["budget_overrides"], log,
                           settings.get("objective", "val_loss"))
    target = settings["n_trials"]
    while _count(study, _COUNTED) < target:
        study.optimize(objective, n_trials=1)


def _spawn_workers(sweep_dir: Path, study_name: str, storage: str | None, workers: int) -> None:
    """Start `workers` processes of `gptforge sweep --worker I` on the shared study and wait."""
    env = dict(os.environ)
    if storage:
        env["GPTFORGE_SWEEP_STORAGE"] = storage  # not on the command line: it may hold a password
    # Share the CPU instead of every worker starting one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    n_gpus = _cuda_device_count()
    procs = []
    for i in range(workers):
        wenv = dict(env)
        if n_gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
            wenv["CUDA_VISIBLE_DEVICES"] = str(i % n_gpus)  # one GPU per worker, round robin
        cmd = [sys.executable, "-m", "gptforge", "sweep", "--worker", str(i + 1), "--out", str(sweep_dir),
               "--study", study_name]
        procs.append(subprocess.Popen(cmd, env=wenv))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    if any(codes):
        raise GptforgeError(f"sweep workers exited with {codes}; see their output above; "
                            "continue with --resume")


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs to share out
        return 0
