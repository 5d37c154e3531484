"""The console while a study runs: one line per finished trial and a Rich progress display
(trials done / pruned / failed, best so far), read from the study's storage so that trials
of every worker show up; and the tables at the end."""
from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.tune import space as sp
from pipeline.tune.outputs import _fmt, feasible
from pipeline.tune.storage import FAIL_REASON, open_storage
from pipeline.tune.study import Tuner


def trial_line(tuner: Tuner, t) -> str:
    a = t.user_attrs
    state = t.state.name
    sampled = a.get("sampled") or sp.assignments_of(t.params, tuner.params)
    params = " ".join(f"{k}={_fmt(v)}" for k, v in sampled.items())
    head = f"trial {t.number:>3}  {state:<8}"
    if state == "COMPLETE":
        per_seed = a.get("values_per_seed") or {}
        vals = []
        for o, v in zip(tuner.objectives, t.values):
            seeds = per_seed.get(o.metric, [])
            vals.append(f"{o.metric}={_fmt(v)}" + (f" ({', '.join(_fmt(x) for x in seeds)})" if len(seeds) > 1 else ""))
        if tuner.constraints and not feasible(t):
            vals.append("[infeasible]")
        body = "  ".join(vals)
    elif state == "PRUNED":
        p = a.get("pruned_at") or {}
        body = f"at step {p.get('step')}" + (f": {tuner.t.pruner.metric or tuner.objectives[0].metric}="
                                             f"{_fmt(p.get('value'))}" if "value" in p else "")
    else:
        body = str(a.get(FAIL_REASON, ""))
    secs = a.get("seconds")
    return f"{head}  {body}  | {params}" + (f"  {secs:.1f}s" if isinstance(secs, (int, float)) else "")


class Monitor:
    """Polls the study (its own storage connection) and prints what finished since."""

    def __init__(self, tuner: Tuner, console: Console | None = None, interval: float = 1.0):
        import optuna

        self.tuner, self.interval = tuner, interval
        self.console = console or Console(highlight=False)
        self.study = optuna.load_study(study_name=tuner.study_name,
                                       storage=open_storage(tuner.t.storage, tuner.study_dir))
        self.seen: set[int] = {t.number for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-monitor", daemon=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console, transient=True)
        self.task = None

    def status(self) -> tuple[int, str]:
        from collections import Counter

        from pipeline.tune.outputs import ranked
        from pipeline.tune.storage import counts_toward_budget

        trials = self.study.get_trials(deepcopy=False)
        states = Counter(t.state.name for t in trials if counts_toward_budget(t))
        done = states["COMPLETE"] + states["PRUNED"] + states["FAIL"]
        best = ranked(self.tuner, self.study)
        if best and not self.tuner.multi:
            b = f"best {_fmt(best[0].value)} (trial {best[0].number})"
        elif best:
            b = f"Pareto front: {len(best)} trials"
        else:
            b = "best -"
        return done, (f"done {states['COMPLETE']}  pruned {states['PRUNED']}  failed {states['FAIL']}  "
                      f"running {states['RUNNING']}  | {b}")

    def poll(self) -> None:
        for t in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                self.progress.console.print(trial_line(self.tuner, t), markup=False, highlight=False, soft_wrap=True)
        done, text = self.status()
        if self.task is not None:
            self.progress.update(self.task, completed=done, status=text)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the display never stops a study
                pass

    def __enter__(self) -> "Monitor":
        done, text = self.status()
        self.progress.start()
        self.task = self.progress.add_task(f"study {self.tuner.study_name}", total=self.tuner.t.n_trials,
                                           completed=done, status=text)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.poll()
        finally:
            self.progress.stop()
            self.console.print(f"study {self.tuner.study_name}: {self.status()[1]}", markup=False, soft_wrap=True)


def print_results(tuner: Tuner, doc: dict, tests: dict | None, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    metrics = [o.metric for o in tuner.objectives]
    if tests:
        table = Table(title=f"study {tuner.study_name!r}: best configuration(s) on tuning seeds "
                            f"{list(tuner.t.seeds)} and test seeds {list(tuner.t.test_seeds)}")
        table.add_column("trial")
        for m in metrics:
            table.add_column(f"{m} tuning", justify="right")
            table.add_column(f"{m} test (mean +- std)", justify="right")
            table.add_column("gap", justify="right")
        for c in tests.values():
            cells = [str(c["trial"])]
            for m in metrics:
                tu, te = c["tuning"].get(m, {}), c["test"].get(m, {})
                cells += [_fmt(tu.get("mean")), f"{_fmt(te.get('mean'))} +- {_fmt(te.get('std'))}" if te else "failed",
                          _fmt(c["gap"].get(m))]
            table.add_row(*cells)
        console.print(table)
    if tuner.multi:
        console.print(f"Pareto front: trials {[p['trial'] for p in doc.get('pareto_front', [])]}, hypervolume "
                      f"{_fmt(doc.get('hypervolume'))} (reference {doc.get('hypervolume_reference')})", markup=False, soft_wrap=True)
    elif doc.get("best"):
        console.print(f"best: trial {doc['best']['trial']}  {metrics[0]}={_fmt(doc['best']['value'])}", markup=False,
                      soft_wrap=True)
    else:
        console.print("no trial completed" + (" within the constraints" if tuner.constraints else ""), markup=False)
    if (tuner.study_dir / "best.yaml").is_file():
        console.print(f"best.yaml: {tuner.study_dir / 'best.yaml'}\n  run it: python -m pipeline --config-dir "
                      f"{tuner.study_dir} experiment=best", markup=False, soft_wrap=True)
    console.print(f"outputs: {tuner.study_dir}", markup=False, soft_wrap=True)
