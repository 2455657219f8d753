"""The console of `lbs-tune run` and `lbs-tune resume`: what a person watching a sweep reads.

By default Ray's own output is off (its configuration table, the config table of every trial,
its progress tables, the trials' relayed stdout and stderr, its traceback of every failed trial,
its INFO log lines and Optuna's, its notes that a step of its loop was slow); Ray's other
warnings still show. In its place `Console`, a Ray Tune callback, prints one line per trial event
that matters (started where, reached the target, finished, missed, diverged, errored, retrying),
a compact status every `STATUS_S` seconds (outcome counts, the best result per batch size, trials
per hour, time left), and at the end the table of `lbs-tune status` and the next command. On a
terminal the status is one block redrawn in place below the event lines; in a log file it is a
plain line, printed when it changed. `--verbose` keeps Ray's own output instead.

What is said is `lbs_tune.console_lines` (pure functions of plain trial states); this module
turns Ray's Trials into those states, forwards the events and owns the stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ray.tune import Callback

from lbs_tune import console_lines as lines
from lbs_tune.environ import environ
from lbs_tune.errors import UserError, cut
from lbs_tune.experiment import ERROR_FILE
from lbs_tune.storage import Location
from lbs_tune.sweep import SweepSpec

STATUS_S = 30.0  # a status line (log file) or a new start flushed, at most this often
REDRAW_S = 1.0  # the live block on a terminal is redrawn this often
HEARTBEAT_S = 600.0  # in a log file, an unchanged status is printed again after this long
# While the sweep runs without --verbose: Ray's old output engine at verbosity 0 prints nothing
# (its new engine prints its tables even at 0); the controller logs no traceback per failed
# trial (the console prints its line and where the rest is); no warning that snapshots come
# often (every checkpoint rotation forces one, as the runner's num_to_keep asks: not the user's
# to fix, and three lines each time).
QUIET_RAY_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
# Loggers quieted to warnings while a sweep runs without --verbose: Ray's ("Wrote the latest
# version of all result files ...") and Optuna's ("A new study created in RDB ...", in colour).
QUIET_LOGGERS = ("ray", "optuna")
# Ray Tune's note that a step of its loop took over 0.5 s ("The `process_trial_result`
# operation took 0.6 s, which may be a performance bottleneck"): on a busy driver, the
# searcher's database writes; not the user's to fix.
SLOW_LOGGER = "ray.tune.utils.util"
SLOW_NOTE = "which may be a performance bottleneck"
# Cursor up n lines (the console writes whole lines: it is at a line's start), clear to the end
# of the screen.
UP_AND_CLEAR = "\x1b[{n}A\x1b[J"

T = TypeVar("T")


def ray_init_options(verbose: bool, address: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `ray.init` for the console: {'log_to_driver': bool} and, when
    quiet, {'logging_level': WARNING}.

    The trials' stdout and stderr reach this terminal only with `verbose` (they stay in Ray's
    worker-*.out logs otherwise); errors that Ray pushes to the driver (a worker that died, a node
    that was lost) show either way. Ray's INFO lines ("Started a local Ray instance", with colour
    codes) only with `verbose`. Through Ray Client (`ray://`) the sweep runs on the cluster
    and its console reaches this terminal only as relayed output, so it stays on.
    """
    client = bool(address) and str(address).startswith("ray://")
    loud = bool(verbose or client)
    return {"log_to_driver": loud, **({} if loud else {"logging_level": logging.WARNING})}


class _NotSlow(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return SLOW_NOTE not in record.getMessage()


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Ray's and Optuna's loggers at WARNING at least (QUIET_LOGGERS), without Tune's notes
    that a step was slow, and Ray's output engines quiet (QUIET_RAY_ENV); all as they were
    after."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(max(level, logging.WARNING))
    slow, note = logging.getLogger(SLOW_LOGGER), _NotSlow()
    slow.addFilter(note)
    try:
        with environ(QUIET_RAY_ENV):
            yield
    finally:
        slow.removeFilter(note)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def trial_state(trial, plan: lines.Plan, reached: lines.Reached | None) -> lines.TrialState:
    """The TrialState of a Ray Tune Trial: its id, state, config and last report, its best
    values of the sweep's and the target's metrics (Ray keeps them per metric), and `reached`."""
    names = {plan.metric: plan.mode}
    if plan.target is not None:
        names[plan.target.metric] = plan.target.mode
    analysis = trial.metric_analysis
    best = {m: (analysis.get(m) or {}).get(mode) for m, mode in names.items()}
    return lines.TrialState(
        id=trial.trial_id,
        state=trial.status,
        config=trial.config,
        result=trial.last_result or {},
        best={m: v for m, v in best.items() if v is not None},
        reached=reached,
    )


class _Guard:
    """A stream that erases the console's live block before anything else is written to the
    terminal (a Ray warning, a relayed error), so that text stays above the block."""

    def __init__(self, stream: TextIO, console: Console):
        self._stream = stream
        self._console = console

    def write(self, text: str) -> int:
        with self._console.lock:
            if text:
                self._console.erase()
            return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Console(Callback):
    """Prints a sweep's progress; a Ray Tune callback.

    spec, experiment: the sweep and its folder. table: a function from the experiment's URI to
    the table of `lbs-tune status`, printed by `finish`. costs: one trial's estimated cost at
    each grid point (lbs_tune.runner.trial_costs; None: the same everywhere), for the time left.
    stream: where to print (default: stdout at `fit`). every_s, redraw_s: the status and
    live-block periods. clock: seconds, monotonic. now: the time stamp of event lines.
    """

    def __init__(
        self,
        spec: SweepSpec,
        experiment: Location,
        *,
        table: Callable[[str], str] | None = None,
        costs: Sequence[float] | None = None,
        stream: TextIO | None = None,
        every_s: float = STATUS_S,
        redraw_s: float = REDRAW_S,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = lambda: datetime.now().strftime("%H:%M:%S"),
    ):
        self.plan = lines.plan_of(spec, costs)
        self.experiment = experiment
        self.table = table
        self.stream = stream
        self.every_s = every_s
        self.redraw_s = redraw_s
        self.clock = clock
        self.now = now
        self.lock = threading.RLock()
        self.events = lines.Events(self.plan)
        self.trials: list[Any] = []
        self.block = 0  # lines of the live block now on the terminal
        self.started_at = clock()
        self.start = lines.Progress(0.0, 0.0)  # at the first sight of the trials
        self.seen = False
        self.first_start: float | None = None  # when the first trial started
        self.last_status = self.last_redraw = self.last_line = self.started_at
        self.last_key: tuple | None = None
        # A resumed searched sweep's trials that its studies were told before this run.
        self.earlier: list[lines.TrialState] = []
        if spec.search is not None and experiment.is_local:
            from lbs_tune.studies import read_studies

            self.earlier = lines.told_before(read_studies(experiment.path), self.plan)

    # Ray pickles a Tuner's callbacks into its tuner.pkl (read only by Tuner.restore, which the
    # runner never calls): the copy holds the settings, not the lock or the open stream.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "lock": None, "stream": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.RLock())

    # ------------------------------------------------------------------ The runner's calls

    def fit(self, fit: Callable[[], T], quiet: bool) -> T:
        """Run `fit` (a Tuner's fit) and return what it returns. `quiet`: this console is the
        Tuner's callback and Ray's verbosity 0 (as lbs_tune.runner makes it): Ray's output and
        log lines are quieted while it runs (see quiet_logs); on a terminal, other output to
        stdout and stderr erases the live block first, so it is never overwritten."""
        # The console itself writes to the real stream, also while stdout is guarded.
        self.stream = self.stream or sys.stdout
        plan = self.plan
        self.print(f"sweep {plan.name}: {plan.total} trials in {self.experiment.uri}")
        if not quiet:
            return fit()
        self.print(
            f"trial output: worker-*.out in {_ray_logs()} on each node (--verbose prints it here)"
        )
        self.started_at = self.last_status = self.last_redraw = self.last_line = self.clock()
        with quiet_logs(), self.guarded():
            try:
                return fit()
            finally:
                with self.lock:
                    self.erase()
                    self._write(self.events.flush(self.now()))
                    if self.trials:
                        self._write([self._status_line()])

    def finish(self, summary: str) -> None:
        """Print the table of `lbs-tune status`, the sweep's `summary` line and the next
        command."""
        if self.table is not None:
            try:
                self.print("", self.table(self.experiment.uri), "")
            except (UserError, OSError) as exc:
                self.print(f"(no status table: {cut(str(exc))})")
        self.print(summary, f"next: lbs-tune report {self.experiment.uri}")

    # ------------------------------------------------------------------ Ray Tune's calls

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        if self.first_start is None:
            self.first_start = self.clock()
        wanted = trial.placement_group_factory.required_resources
        self.events.start(self._state(trial), lines.wants(wanted))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._see(trials)
        self._write(self.events.result(self.now(), self._state(trial), result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        self._write(self.events.complete(self.now(), self._state(trial)))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        why = self._failure(trial)
        self._write(self.events.error(self.now(), self._state(trial), trial.num_failures, why))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        why = self._failure(trial)
        self._write(self.events.recover(self.now(), self._state(trial), trial.num_failures, why))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._see(trials)
        self.tick()

    # ------------------------------------------------------------------ Status

    def tick(self) -> None:
        """The periodic part: flush held-back events and print the status (a log file) every
        every_s, redraw the live block (a terminal) every redraw_s."""
        now = self.clock()
        with self.lock:
            if now - self.last_status >= self.every_s:
                self.last_status = now
                self._write(self.events.flush(self.now()))
                if not self.tty():
                    self._plain_status(now)
            if self.tty() and now - self.last_redraw >= self.redraw_s:
                self.erase()
                self._draw()

    def states(self) -> list[lines.TrialState]:
        """Every trial Ray knows, as TrialStates, and those its studies were told before this
        run that Ray's restored state lacks."""
        known = [self._state(t) for t in self.trials]
        ids = {t.id for t in known}
        return known + [t for t in self.earlier if t.id not in ids]

    def _state(self, trial) -> lines.TrialState:
        return trial_state(trial, self.plan, self.events.reached.get(trial.trial_id))

    def _plain_status(self, now: float) -> None:
        states = self.states()
        key = (lines.counts(states, self.plan), lines.best_by_size(states, self.plan))
        if key != self.last_key or now - self.last_line >= HEARTBEAT_S:
            self.last_key, self.last_line = key, now
            self._write([self._status_line()])

    def _times(self) -> tuple[float, float]:
        """(seconds since the sweep started, seconds since its first trial started)."""
        now = self.clock()
        first = now if self.first_start is None else self.first_start
        return now - self.started_at, now - first

    def _status_line(self) -> str:
        return lines.status_line(self.states(), self.plan, self.start, *self._times())

    def _see(self, trials: list) -> None:
        """Keep Tune's list of trials (every call brings it)."""
        self.trials = trials
        if not self.seen:
            self.seen, self.start = True, lines.progress(self.states(), self.plan)

    def _failure(self, trial) -> str:
        # Tune writes the error into the trial's staging folder on this machine before it calls
        # back; the experiment folder gets its copy at the next sync.
        try:
            text = Path(trial.error_file).read_text(errors="replace")
        except (TypeError, OSError):  # no file: Tune wrote none for this failure
            text = ""
        error_file = self.experiment.join(trial.storage.trial_dir_name, ERROR_FILE)
        return lines.failure(text, error_file.uri)

    # ------------------------------------------------------------------ The terminal

    def tty(self) -> bool:
        """Whether the stream is a terminal that can redraw a block."""
        stream = self.stream or sys.stdout
        return stream.isatty() and os.environ.get("TERM") != "dumb"

    def print(self, *text: str) -> None:
        """Lines with no live block below them (the header, the end)."""
        with self.lock:
            self.erase()
            self._write(list(text))

    def _write(self, text: list[str]) -> None:
        """Event or status lines above the live block (redrawn below them on a terminal)."""
        if not text:
            return
        stream = self.stream or sys.stdout
        with self.lock:
            drawn = self.block
            self.erase()
            stream.write("".join(f"{line}\n" for line in text))
            if drawn:
                self._draw()
            stream.flush()

    def erase(self) -> None:
        """Remove the live block from the terminal (nothing if none is drawn)."""
        with self.lock:
            if self.block:
                (self.stream or sys.stdout).write(UP_AND_CLEAR.format(n=self.block))
                self.block = 0

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        elapsed, working = self._times()
        states = self.states()
        block = lines.status_block(states, self.plan, self.start, elapsed, width, working)
        stream = self.stream or sys.stdout
        stream.write("".join(f"{line}\n" for line in block))
        stream.flush()
        self.block = len(block)
        self.last_redraw = self.clock()

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """On a terminal: stdout, stderr and the logging handlers that write to them erase the
        live block before they write."""
        if not self.tty():
            yield
            return
        streams = {id(sys.stdout): sys.stdout, id(sys.stderr): sys.stderr}
        guards = {key: _Guard(stream, self) for key, stream in streams.items()}
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        handlers = [
            h
            for logger in loggers
            for h in getattr(logger, "handlers", [])
            if isinstance(h, logging.StreamHandler) and id(h.stream) in guards
        ]
        before = [(h, h.stream) for h in handlers]
        sys_before = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = guards[id(sys.stdout)], guards[id(sys.stderr)]
        for handler, stream in before:
            handler.setStream(guards[id(stream)])
        try:
            yield
        finally:
            sys.stdout, sys.stderr = sys_before
            for handler, stream in before:
                handler.setStream(stream)


def _ray_logs() -> str:
    """The folder of Ray's logs on this node (/tmp/ray/session_latest/logs if Ray cannot say)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except (ImportError, AttributeError):
        return "/tmp/ray/session_latest/logs"
