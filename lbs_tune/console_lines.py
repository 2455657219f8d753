"""What the console of `lbs-tune run` says, as functions of plain trial states: no Ray, no
terminal, no clock (the callback in `lbs_tune.console` turns Ray's Trials into `TrialState`s,
forwards their events to `Events` and writes the lines it gets back).

A sweep's `Plan` is what is known before it starts (its trials per batch size, its target, a
searched sweep's objective, each grid point's estimated cost); a `TrialState` is one trial now.
From them: one line per trial event, the status line (a log file) or block (a terminal) with the
outcome counts, the best result per batch size and the time left.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from lbs_tune.config import BRANCH_KEY
from lbs_tune.errors import cut, printable
from lbs_tune.experiment import count_outcomes
from lbs_tune.names import Mode, comparison, get_dotted, hashable, set_dotted
from lbs_tune.studies import (
    Objective,
    StudyRecord,
    finite_number,
    objective_for,
    target_objective,
    told,
)
from lbs_tune.sweep import SweepSpec

ERROR_CHARS = 200  # the error line of a failed trial is cut to this length
ENDED = ("TERMINATED", "ERROR")


# ============================================================================ Plain data


class Plan(NamedTuple):
    """What the console knows of a sweep before it starts (`plan_of` makes it from a spec)."""

    name: str
    metric: str  # the sweep's metric and its better direction
    mode: Mode
    keys: tuple[str, ...]  # what tells the trials apart in their lines: grid, then searched keys
    grid: tuple[str, ...]  # the grid keys, whose values place a trial at its grid point
    points: dict[tuple, int]  # a trial's values of the grid keys -> its grid point
    sizes: tuple[int, ...]  # each grid point's batch size
    per_point: int  # trials per grid point
    total: int  # SweepSpec.trial_count
    per_size: dict[int, int]  # batch size -> trials of that batch size
    costs: tuple[float, ...]  # estimated cost of one trial of each grid point (any unit)
    target: Objective | None  # the sweep's target, as a steps-to-target objective
    tuned: Objective | None  # a searched sweep's objective
    max_failures: int


class Reached(NamedTuple):
    """The first report that met the target: its step and its value of the target's metric."""

    step: int
    value: float


class TrialState(NamedTuple):
    """One trial as the console sees it."""

    id: str
    state: str  # Ray's: PENDING, RUNNING, PAUSED, TERMINATED or ERROR
    config: dict[str, Any]  # the nested trial config (a searched one has search.point)
    result: dict[str, Any]  # its last report, {} before the first
    # The best value it reported of the sweep's metric and of the target's, by name.
    best: dict[str, float] = {}  # noqa: RUF012 (never changed: a state is made anew)
    reached: Reached | None = None


class Progress(NamedTuple):
    """How much of a sweep is done: in trials (a running one by the fraction of its step budget
    done) and in estimated cost (each trial weighted by its grid point's cost)."""

    trials: float
    cost: float


def plan_of(spec: SweepSpec, costs: Sequence[float] | None = None) -> Plan:
    """The Plan of a checked sweep; `costs`: one trial's estimated cost at each grid point, in
    `spec.trials` order (lbs_tune.runner.trial_costs), or None for the same cost everywhere."""
    configs = [trial.model_dump(mode="json") for trial in spec.trials]
    grid = tuple(spec.grid)
    points = {tuple(hashable(get_dotted(c, k)) for k in grid): i for i, c in enumerate(configs)}
    sizes = Counter(trial.batch_size for trial in spec.trials)
    target = None if spec.target is None else target_objective(spec.target)
    search = spec.search
    return Plan(
        name=spec.name,
        metric=spec.metric.name,
        mode=spec.metric.mode,
        # A branched sweep's trials are told apart by their place in it (reference, probe, arm).
        keys=(
            *grid,
            *(search.space if search else ()),
            *((f"{BRANCH_KEY}.label",) if spec.branch else ()),
        ),
        grid=grid,
        points=points,
        sizes=tuple(trial.batch_size for trial in spec.trials),
        per_point=spec.trials_per_point,
        total=spec.trial_count,
        per_size={size: n * spec.trials_per_point for size, n in sorted(sizes.items())},
        costs=tuple(costs) if costs is not None else (1.0,) * len(configs),
        target=target,
        tuned=objective_for(search, spec.metric, spec.target) if search else None,
        max_failures=spec.max_failures,
    )


def told_before(studies: Sequence[StudyRecord], plan: Plan) -> list[TrialState]:
    """The trials and confirmation runs that a searched sweep's studies (`read_studies`) were
    told before this run, as ended trials at their grid point (a steps-to-target one that
    COMPLETEd reached the target at its steps). Ray's state lacks those told after Ray last
    saved it: `Console.states` adds the ones Ray does not know."""
    found = []
    for study in studies:
        # Its batch size from the plan: the grid point holds it only where the grid varies it.
        config: dict[str, Any] = {"batch_size": plan.sizes[study.index]}
        for key, value in study.point.items():
            set_dotted(config, key, value)
        config["search"] = {"point": study.index}
        for trial in study.runs():
            if not told(trial):
                continue
            reached = None
            steps = plan.tuned is not None and plan.tuned.kind == "steps_to_target"
            if steps and trial["state"] == "COMPLETE":
                reached = Reached(int(trial["value"]), trial.get("at_value") or plan.tuned.target)
            result = {"diverged": bool(trial.get("diverged"))}
            found.append(
                TrialState(trial["ray_trial_id"], "TERMINATED", config, result, reached=reached)
            )
    return found


def point_of(config: dict[str, Any], plan: Plan) -> int | None:
    """The grid point of a trial config: a searched trial's search.point, else the point of its
    grid values (None for a config of no point of the plan)."""
    searched = config.get("search")
    if isinstance(searched, dict) and isinstance(searched.get("point"), int):
        return searched["point"]
    return plan.points.get(tuple(hashable(get_dotted(config, k)) for k in plan.grid))


# ============================================================================ Pieces


def duration(seconds: float) -> str:
    """'45s', '12m05s', '3h07m' for a number of seconds."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def error_line(text: str) -> str:
    """The line of an error.txt that says what went wrong: its last non-blank line (a Python
    traceback ends with the exception, Ray's own failures with their cause), printable and cut
    to ERROR_CHARS; '' for an empty text."""
    lines = [line.strip() for line in printable(text).splitlines() if line.strip()]
    return cut(lines[-1], ERROR_CHARS) if lines else ""


def number(value: Any) -> str:
    """A metric value in a line: 4 significant digits, '-' for none."""
    return "-" if value is None else f"{value:.4g}"


def _value(value: Any) -> str:
    # A searched learning rate has 17 digits: numbers short, the rest as text.
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label(trial: TrialState, keys: Sequence[str]) -> str:
    """'c0ffe_00003 (batch_size=64 lr.scaling=linear)': the trial id and its values of `keys`,
    printable ('base config' for a sweep without keys)."""
    point = [f"{k}={printable(_value(get_dotted(trial.config, k)))}" for k in keys]
    return f"{trial.id} ({' '.join(point) or 'base config'})"


def event_line(stamp: str, kind: str, trial: TrialState, keys: Sequence[str], text: str) -> str:
    """'12:04:05 finished  <label>  <text>': one event of one trial."""
    return f"{stamp} {kind:<9} {label(trial, keys)}  {text}"


def where(result: dict[str, Any]) -> str:
    """'on gpu-node-3 node 9f8e7d6c, gpu 2': where a report says its trial runs."""
    host = printable(str(result.get("host") or "?"))
    node = printable(str(result.get("node_id") or ""))[:8]
    gpus = printable(str(result.get("gpu_ids") or ""))
    return f"on {host}" + (f" node {node}" if node else "") + (f", gpu {gpus}" if gpus else ", cpu")


def wants(resources: dict[str, float]) -> str:
    """'wants 1 CPU, 0.25 GPU': what is known of a trial before it reports."""
    return "wants " + ", ".join(f"{n:g} {k}" for k, n in sorted(resources.items()) if n)


def failure(error: str, error_file: str) -> str:
    """'<the error's line>; full error: <error_file>' (error: the text of the trial's error.txt,
    '' where it wrote none)."""
    return f"{error_line(error) or 'no error text'}; full error: {printable(error_file)}"


def reaches(target: Objective, result: dict[str, Any]) -> Reached | None:
    """The Reached of a report that meets `target`, else None."""
    value = finite_number(result.get(target.metric))
    if value is None or not target.meets(value):
        return None
    return Reached(result.get("step"), value)


def target_text(target: Objective, reached: Reached) -> str:
    """'val/accuracy 0.51 >= 0.5 at step 45'."""
    op = comparison(target.metric, ascii=True)
    return f"{target.metric} {reached.value:.4g} {op} {target.target:g} at step {reached.step}"


def _steps(result: dict[str, Any]) -> str:
    return f"step {result.get('step')}/{result.get('total_steps')}"


def ending(trial: TrialState, plan: Plan, held: Reached | None = None) -> tuple[str, str]:
    """(kind, text) of the line of a trial that ended (not in error). `held`: a target reached
    whose line was held back, said here.

    A searched sweep of steps to target says 'reached' (the target at step N, first, as its
    study counts it), 'diverged' or 'missed' (with the best value it got); other sweeps say
    'diverged' or 'finished' (the metric's last and best values, the step of the target if
    reached)."""
    result, tuned = trial.result, plan.tuned
    searched = tuned is not None and tuned.kind == "steps_to_target"
    if searched and trial.reached is not None:
        op = comparison(tuned.metric, ascii=True)
        value = f"{tuned.metric} {trial.reached.value:.4g} {op} {tuned.target:g}"
        return "reached", f"the target at step {trial.reached.step} ({value})"
    at = f"; target at step {held.step}" if held else ""
    if result.get("diverged"):
        loss = number(result.get("train/loss"))
        return "diverged", f"at {_steps(result)} (train/loss {loss}){at}"
    if searched:
        best = number(trial.best.get(tuned.metric))
        return "missed", f"the target (best {best}) at {_steps(result)}"
    last = number(result.get(plan.metric))
    best = number(trial.best.get(plan.metric))
    return "finished", f"{plan.metric} {last} (best {best}) at {_steps(result)}{at}"


# ============================================================================ Events


class Events:
    """The event lines of a sweep, from its trials' events in Ray Tune's order. Each method
    takes the time stamp of its lines and returns them (none, one or a few).

    Some events are held back to say more in fewer lines: a start is said at the trial's first
    report (which says where it runs) or at the next `flush`; a target reached is said at the
    next flush or as part of the trial's last line. A restart after a failure waits for its
    first report (its 'retrying' line said the rest)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.unannounced: dict[str, tuple[TrialState, str, str]] = {}  # id: trial, kind, wants
        self.held: dict[str, tuple[TrialState, Reached]] = {}  # targets not said yet
        self.reached: dict[str, Reached] = {}  # every trial's first report that met the target
        self.failed: set[str] = set()

    def _line(self, stamp: str, kind: str, trial: TrialState, text: str) -> str:
        return event_line(stamp, kind, trial, self.plan.keys, text)

    def start(self, trial: TrialState, placement: str) -> None:
        """A trial starts (or starts again); `placement` is its `wants` text."""
        if trial.id in self.failed:
            kind = "restarted"
        elif trial.result.get("step") is not None:
            kind = "resumed"  # it reported in an earlier run of the sweep
        else:
            kind = "started"
        self.unannounced[trial.id] = (trial, kind, placement)

    def result(self, stamp: str, trial: TrialState, result: dict[str, Any]) -> list[str]:
        """A report of a trial (`trial` as it was before it). A replayed report (a resumed
        trial sends its earlier reports again) was said by the run that made it."""
        replayed = bool(result.get("replayed"))
        lines = []
        if not replayed and trial.id in self.unannounced:
            lines.append(self._announce(stamp, trial.id, where(result)))
        target = self.plan.target
        hit = reaches(target, result) if target and trial.id not in self.reached else None
        if hit is not None:
            self.reached[trial.id] = hit
            # A searched steps-to-target trial stops at this report: its last line says it.
            searched = self.plan.tuned is not None and self.plan.tuned.kind == "steps_to_target"
            if not replayed and not searched:
                self.held[trial.id] = (trial, hit)
        return lines

    def complete(self, stamp: str, trial: TrialState) -> list[str]:
        """A trial ended, finished or diverged (`trial` with its last report)."""
        lines = self._announce_if_needed(stamp, trial.id)
        held = self.held.pop(trial.id, (None, None))[1]
        kind, text = ending(trial._replace(reached=self.reached.get(trial.id)), self.plan, held)
        return [*lines, self._line(stamp, kind, trial, text)]

    def error(self, stamp: str, trial: TrialState, failures: int, why: str) -> list[str]:
        """A trial ended in ERROR after `failures` failures; `why` is its `failure` text."""
        lines = self.flush(stamp, trial.id)
        text = f"after {failures} failure{'s' * (failures != 1)}: {why}"
        return [*lines, self._line(stamp, "errored", trial, text)]

    def recover(self, stamp: str, trial: TrialState, failures: int, why: str) -> list[str]:
        """A trial failed and is retried from its last checkpoint."""
        lines = self.flush(stamp, trial.id)
        self.failed.add(trial.id)
        text = (
            f"retry {failures} of {self.plan.max_failures} from its last checkpoint, after: {why}"
        )
        return [*lines, self._line(stamp, "retrying", trial, text)]

    def flush(self, stamp: str, trial_id: str | None = None) -> list[str]:
        """The held-back lines (of one trial, or all): starts, then targets reached. A restart
        that fails again before its first report has no line of its own."""
        lines = []
        for key, (_, kind, _) in list(self.unannounced.items()):
            if trial_id not in (None, key):
                continue
            if kind != "restarted":
                lines.append(self._announce(stamp, key, None))
            elif trial_id is not None:
                del self.unannounced[key]
        for key, (trial, hit) in list(self.held.items()):
            if trial_id in (None, key):
                del self.held[key]
                lines.append(self._line(stamp, "target", trial, target_text(self.plan.target, hit)))
        return lines

    def _announce(self, stamp: str, trial_id: str, at: str | None) -> str:
        trial, kind, placement = self.unannounced.pop(trial_id)
        return self._line(stamp, kind, trial, at or placement)

    def _announce_if_needed(self, stamp: str, trial_id: str) -> list[str]:
        if trial_id in self.unannounced:
            return [self._announce(stamp, trial_id, None)]
        return []


# ============================================================================ Status


def _cost(trial: TrialState, plan: Plan) -> float:
    point = point_of(trial.config, plan)
    if point is None or not 0 <= point < len(plan.costs):
        return sum(plan.costs) / len(plan.costs) if plan.costs else 1.0
    return plan.costs[point]


def _fraction(trial: TrialState) -> float:
    """How much of its step budget a trial has done: 1 once it ended."""
    if trial.state in ENDED:
        return 1.0
    step, budget = trial.result.get("step"), trial.result.get("total_steps")
    return min(1.0, step / budget) if trial.state == "RUNNING" and step and budget else 0.0


def progress(trials: Sequence[TrialState], plan: Plan) -> Progress:
    """The sweep's Progress: a trial that ended counts whole (also one that stopped early at
    its target: its cost is no longer ahead), a running one by the fraction of its budget."""
    return Progress(
        sum(_fraction(t) for t in trials), sum(_fraction(t) * _cost(t, plan) for t in trials)
    )


def cost_left(trials: Sequence[TrialState], plan: Plan) -> float:
    """The estimated cost of what is left: the rest of each trial that has not ended, and each
    grid point's trials that do not exist yet (a searched sweep makes them as it goes)."""
    seen = Counter(point_of(t.config, plan) for t in trials)
    unseen = sum(c * max(0, plan.per_point - seen[p]) for p, c in enumerate(plan.costs))
    return unseen + sum((1 - _fraction(t)) * _cost(t, plan) for t in trials)


def pace(
    now: Progress, start: Progress, left: float, elapsed: float, working: float | None = None
) -> str:
    """'elapsed 3m12s, 14.1 trials/h, ~1h10m left': `elapsed` seconds, the trials done per hour
    since `start` (what this run did: a resumed sweep's finished trials are not its pace), and
    the time left as the cost `left` over the cost done per second since `start`. Both rates
    are over `working` seconds (default `elapsed`): the time since the first trial started,
    without Ray's start, a cost that is not ahead."""
    text = f"elapsed {duration(elapsed)}"
    working = elapsed if working is None else working
    gained = now.trials - start.trials
    if gained <= 0 or working <= 0:
        return text
    per_h = gained / working * 3600
    text += f", {per_h:,.0f} trials/h" if per_h >= 100 else f", {per_h:.3g} trials/h"
    rate = (now.cost - start.cost) / working
    if left <= 0 or rate <= 0:
        return text
    return f"{text}, ~{duration(left / rate)} left"


def counts(trials: Sequence[TrialState], plan: Plan) -> str:
    """'5 done, 2 running, 1 pending, 0 errored, 1 diverged' (a searched steps-to-target sweep:
    '3 reached, 2 missed, ...', as its trials' lines say); trials not made yet are pending."""
    searched = plan.tuned is not None and plan.tuned.kind == "steps_to_target"
    # A searched trial that reached the target counts as reached, as its study counts it.
    outcomes = count_outcomes(
        (t.state, bool(t.result.get("diverged")) and not (searched and t.reached)) for t in trials
    )
    running = sum(1 for t in trials if t.state == "RUNNING")
    ended = outcomes["finished"] + outcomes["diverged"] + outcomes["errored"]
    pending = max(0, plan.total - ended - running)
    rest = (
        f"{running} running, {pending} pending, {outcomes['errored']} errored, "
        f"{outcomes['diverged']} diverged"
    )
    if searched:
        hits = sum(1 for t in trials if t.state == "TERMINATED" and t.reached is not None)
        return f"{hits} reached, {outcomes['finished'] - hits} missed, {rest}"
    return f"{outcomes['finished']} done, {rest}"


def best_by_size(trials: Sequence[TrialState], plan: Plan) -> str:
    """The best result per batch size so far.

    A fixed-rule sweep: 'best val/accuracy by batch size 16: 0.81, 32: -'. A searched sweep,
    its objective with the trials done of each batch size: 'best steps to val/accuracy>=0.5
    (trials done/total) by batch size 16: 231 (3/8), 32: - (0/8)' (or 'best val/accuracy ...'
    for a metric objective, diverged trials left out)."""
    tuned = plan.tuned
    better = max if plan.mode == "max" else min
    best: dict[int, float] = {}
    for t in trials:
        if tuned is None:
            value = t.best.get(plan.metric)
        elif tuned.kind == "steps_to_target":
            value = t.reached.step if t.reached is not None else None
        else:
            value = None if t.result.get("diverged") else t.best.get(plan.metric)
        if value is not None:
            size = t.config["batch_size"]
            pick = min if tuned is not None and tuned.kind == "steps_to_target" else better
            best[size] = pick(best.get(size, value), value)
    if tuned is None:
        by_size = ", ".join(f"{b}: {number(best.get(b))}" for b in plan.per_size)
        return f"best {plan.metric} by batch size {by_size}"
    done = Counter(t.config["batch_size"] for t in trials if t.state in ENDED)
    by_size = ", ".join(
        f"{b}: {number(best.get(b))} ({done[b]}/{n})" for b, n in plan.per_size.items()
    )
    if tuned.kind == "steps_to_target":
        what = f"steps to {tuned.metric}{comparison(tuned.metric, ascii=True)}{tuned.target:g}"
    else:
        what = plan.metric
    return f"best {what} (trials done/total) by batch size {by_size}"


def status_line(
    trials: Sequence[TrialState],
    plan: Plan,
    start: Progress,
    elapsed: float,
    working: float | None = None,
) -> str:
    """The status as one line of a log file: 'status: <counts>; <best>; <pace>' (`start`,
    `elapsed`, `working`: see `pace`)."""
    now = progress(trials, plan)
    left = cost_left(trials, plan)
    return (
        f"status: {counts(trials, plan)}; {best_by_size(trials, plan)}; "
        f"{pace(now, start, left, elapsed, working)}"
    )


def status_block(
    trials: Sequence[TrialState],
    plan: Plan,
    start: Progress,
    elapsed: float,
    width: int,
    working: float | None = None,
) -> list[str]:
    """The status as the block of a terminal: '<sweep>: <counts>', the pace, the best; each
    wrapped to `width` columns (a line wider than the terminal would wrap, and the block could
    not be erased whole)."""
    now = progress(trials, plan)
    texts = (
        f"{plan.name}: {counts(trials, plan)}",
        pace(now, start, cost_left(trials, plan), elapsed, working),
        best_by_size(trials, plan),
    )
    return [line for text in texts for line in textwrap.wrap(text, width, subsequent_indent="  ")]
