"""The console of `lbs-tune run` and `lbs-tune resume`: what a person watching a sweep reads.

By default Ray's own output is off (its configuration table, the config table of every trial,
its progress tables, the trials' relayed stdout and stderr, its traceback of every failed trial);
Ray's warnings still show. In its place, `Console` (a Ray Tune callback) prints one line per trial
event that matters (started where, reached the target, finished, diverged, errored, retrying), a
compact status every `STATUS_S` seconds (outcome counts, the best value of the sweep's metric per
batch size, trials per hour, time left), and at the end the table of `lbs-tune status` and the
next command. On a terminal the status is one block redrawn in place below the event lines; in a
log file it is a plain line, printed when it changed. `verbose` keeps Ray's own output instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from lbs_tune.config import BRANCH_KEY, SweepSpec
from lbs_tune.errors import UserError, cut, printable
from lbs_tune.experiment import ERROR_FILE, count_outcomes
from lbs_tune.names import comparison, direction, meets
from lbs_tune.storage import Location

STATUS_S = 30.0  # a status line (log file) or a new start flushed, at most this often
REDRAW_S = 1.0  # the live block on a terminal is redrawn this often
HEARTBEAT_S = 600.0  # in a log file, an unchanged status is printed again after this long
ERROR_CHARS = 200  # the error line of a failed trial is cut to this length
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
# Cursor up n lines (the console writes whole lines: it is at a line's start), clear to the end
# of the screen.
UP_AND_CLEAR = "\x1b[{n}A\x1b[J"


def ray_init_options(verbose: bool, address: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `ray.init` for the console: {'log_to_driver': bool}.

    The trials' stdout and stderr reach this terminal only with `verbose` (they stay in Ray's
    worker-*.out logs otherwise); errors that Ray pushes to the driver (a worker that died, a node
    that was lost) show either way. Through Ray Client (`ray://`) the sweep runs on the cluster
    and its console reaches this terminal only as relayed output, so it stays on.
    """
    client = bool(address) and str(address).startswith("ray://")
    return {"log_to_driver": bool(verbose or client)}


def error_line(text: str) -> str:
    """The line of an error.txt that says what went wrong: its last non-blank line (a Python
    traceback ends with the exception, Ray's own failures with their cause), printable and cut
    to ERROR_CHARS; '' for an empty text."""
    lines = [line.strip() for line in printable(text).splitlines() if line.strip()]
    return cut(lines[-1], ERROR_CHARS) if lines else ""


def duration(seconds: float) -> str:
    """'45s', '12m05s', '3h07m' for a number of seconds."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _value(value: Any) -> str:
    """A config value in a trial's label: numbers short (a searched learning rate has 17
    digits), the rest as text."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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

    spec, experiment: the sweep and its folder. verbose: keep Ray's own output (then this
    prints only the header and the end). table: a function from the experiment's URI to the
    table of `lbs-tune status`, printed by `finish`. stream: where to print (default: stdout at
    `fit`). every_s, redraw_s: the status and live-block periods. clock: seconds, monotonic.
    """

    def __init__(
        self,
        spec: SweepSpec,
        experiment: Location,
        *,
        verbose: bool = False,
        table: Callable[[str], str] | None = None,
        stream: TextIO | None = None,
        every_s: float = STATUS_S,
        redraw_s: float = REDRAW_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec = spec
        self.experiment = experiment
        self.verbose = verbose
        self.table = table
        self.stream = stream
        self.every_s = every_s
        self.redraw_s = redraw_s
        self.clock = clock
        self.lock = threading.RLock()
        self.total = spec.trial_count
        # What tells the trials apart in their lines: grid keys, then searched keys.
        self.keys = [*spec.grid, *(spec.search.space if spec.search else ())]
        self.keys += [f"{BRANCH_KEY}.label"] if spec.branch else []  # a branched sweep's place
        self.batch_sizes = sorted({config.batch_size for config in spec.trials})
        self.trials: list[Any] = []
        self.block = 0  # lines of the live block now on the terminal
        self.started_at = clock()
        self.progress_at_start: float | None = None
        self.last_status = self.last_redraw = self.last_line = self.started_at
        self.last_key: tuple | None = None
        # Events held back for a while, to say more in fewer lines. Trial id -> (Trial,
        # 'started', 'resumed' or 'restarted'): started, printed at its first report (which says
        # where it runs) or at the next status. Trial id -> (Trial, step, value): reached the
        # target, printed at the next status or as part of the trial's last line.
        self.unannounced: dict[str, tuple[Any, str]] = {}
        self.targets: dict[str, tuple[Any, Any, float]] = {}
        self.reached: set[str] = set()
        self.failed: set[str] = set()

    # ------------------------------------------------------------------ The runner's calls

    def fit(self, tuner) -> Any:
        """Run `tuner.fit()` (a new or a restored Tuner) with this console; return its results.

        Without `verbose` the Tuner's RunConfig gets this callback and verbosity 0, and Ray's
        output is quieted while it runs (see QUIET_RAY_ENV); on a terminal, other output to
        stdout and stderr erases the live block first, so it is never overwritten.
        """
        # The console itself writes to the real stream, also while stdout is guarded.
        self.stream = self.stream or sys.stdout
        self._print(f"sweep {self.spec.name}: {self.total} trials in {self.experiment.uri}")
        # A Tuner driven through Ray Client runs on the cluster: it keeps Ray's output.
        local = getattr(tuner, "_local_tuner", None)
        if self.verbose or local is None:
            return tuner.fit()
        self._print(
            f"trial output: worker-*.out in {_ray_logs()} on each node (--verbose prints it here)"
        )
        run_config = local.get_run_config()
        # A restored Tuner brings the RunConfig of the run that created it: replace its console.
        others = [c for c in run_config.callbacks or [] if not isinstance(c, Console)]
        run_config.callbacks = [*others, self]
        run_config.verbose = 0
        self.started_at = self.last_status = self.last_redraw = self.last_line = self.clock()
        with _environ(QUIET_RAY_ENV), self._guarded():
            try:
                return tuner.fit()
            finally:
                with self.lock:
                    self.erase()
                    self._flush()
                    if self.trials:
                        self._write([self._status_line()])

    def finish(self, summary: str) -> None:
        """Print the table of `lbs-tune status`, the sweep's `summary` line and the next
        command."""
        if self.table is not None:
            try:
                self._print("", self.table(self.experiment.uri), "")
            except (UserError, OSError) as exc:
                self._print(f"(no status table: {cut(str(exc))})")
        self._print(summary, f"next: lbs-tune report {self.experiment.uri}")

    # ------------------------------------------------------------------ Ray Tune's calls

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        if trial.trial_id in self.failed:
            kind = "restarted"
        elif trial.last_result.get("step") is not None:
            kind = "resumed"  # it reported in an earlier run of the sweep
        else:
            kind = "started"
        self.unannounced[trial.trial_id] = (trial, kind)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._see(trials)
        replayed = bool(result.get("replayed"))
        if not replayed and trial.trial_id in self.unannounced:
            self._announce(trial, self._where(result))
        target = self.spec.target
        value = result.get(target.metric) if target else None
        if value is None or trial.trial_id in self.reached or not self._reaches(value):
            return
        self.reached.add(trial.trial_id)
        # A replayed report was printed by the run that made it.
        if not replayed:
            self.targets[trial.trial_id] = (trial, result.get("step"), value)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        self._announce_if_needed(trial)
        result = trial.last_result
        steps = f"step {result.get('step')}/{result.get('total_steps')}"
        held = self.targets.pop(trial.trial_id, None)
        reached = f"; target at step {held[1]}" if held else ""
        if result.get("diverged"):
            loss = _number(result.get("train/loss"))
            self._event("diverged", trial, f"at {steps} (train/loss {loss}){reached}")
            return
        metric = self.spec.metric.name
        best = (trial.metric_analysis.get(metric) or {}).get(self.spec.metric.mode)
        self._event(
            "finished",
            trial,
            f"{metric} {_number(result.get(metric))} (best {_number(best)}) at {steps}{reached}",
        )

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        self._flush(trial.trial_id)
        failures = trial.num_failures
        self._event(
            "errored",
            trial,
            f"after {failures} failure{'s' * (failures != 1)}: {self._failure(trial)}",
        )

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._see(trials)
        self._flush(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._event(
            "retrying",
            trial,
            f"retry {trial.num_failures} of {self.spec.max_failures} from its last checkpoint, "
            f"after: {self._failure(trial)}",
        )

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._see(trials)
        self.tick()

    # ------------------------------------------------------------------ Status

    def tick(self) -> None:
        """The periodic part: flush starts and print the status (a log file) every every_s,
        redraw the live block (a terminal) every redraw_s."""
        now = self.clock()
        with self.lock:
            if now - self.last_status >= self.every_s:
                self.last_status = now
                self._flush()
                if not self._tty():
                    self._plain_status(now)
            if self._tty() and now - self.last_redraw >= self.redraw_s:
                self.erase()
                self._draw()

    def _plain_status(self, now: float) -> None:
        counts, best, _ = self._status_parts()
        key = (counts, best)
        if key != self.last_key or now - self.last_line >= HEARTBEAT_S:
            self.last_key, self.last_line = key, now
            self._write([self._status_line()])

    def _status_line(self) -> str:
        counts, best, pace = self._status_parts()
        return f"status: {counts}; {best}; {pace}"

    def _status_parts(self) -> tuple[str, str, str]:
        """('5 done, 2 running, ...', 'best val/accuracy 16: 0.81, 32: -', 'elapsed ...')."""
        outcomes = count_outcomes(
            (t.status, bool(t.last_result.get("diverged"))) for t in self.trials
        )
        running = sum(1 for t in self.trials if t.status == "RUNNING")
        ended = outcomes["finished"] + outcomes["diverged"] + outcomes["errored"]
        pending = max(0, self.total - ended - running)
        counts = (
            f"{outcomes['finished']} done, {running} running, {pending} pending, "
            f"{outcomes['errored']} errored, {outcomes['diverged']} diverged"
        )
        metric, mode = self.spec.metric.name, self.spec.metric.mode
        better = max if mode == "max" else min
        best: dict[int, float] = {}
        for t in self.trials:
            value = (t.metric_analysis.get(metric) or {}).get(mode)
            if value is not None:
                size = t.config["batch_size"]
                best[size] = better(best.get(size, value), value)
        by_size = ", ".join(f"{b}: {_number(best.get(b))}" for b in self.batch_sizes)
        return counts, f"best {metric} by batch size {by_size}", self._pace()

    def _progress(self) -> float:
        """Trials done, each running one counted by the fraction of its step budget done."""
        done = 0.0
        for t in self.trials:
            if t.status in ("TERMINATED", "ERROR"):
                done += 1
            elif t.status == "RUNNING":
                result = t.last_result
                step, budget = result.get("step"), result.get("total_steps")
                done += min(1.0, step / budget) if step and budget else 0.0
        return done

    def _pace(self) -> str:
        """'elapsed 3m12s, 14.1 trials/h, ~1h10m left', from the progress since this console
        first saw the trials (a resumed sweep's finished trials are not this run's pace)."""
        done = self._progress()
        elapsed = self.clock() - self.started_at
        text = f"elapsed {duration(elapsed)}"
        gained = done - (self.progress_at_start or 0.0)
        if gained <= 0 or elapsed <= 0:
            return text
        per_h = gained / elapsed * 3600
        text += f", {per_h:,.0f} trials/h" if per_h >= 100 else f", {per_h:.3g} trials/h"
        left = self.total - done
        return f"{text}, ~{duration(left / per_h * 3600)} left" if left > 0 else text

    def _see(self, trials: list) -> None:
        """Keep Tune's list of trials (every call brings it)."""
        self.trials = trials
        if self.progress_at_start is None:
            self.progress_at_start = self._progress()

    # ------------------------------------------------------------------ Lines

    def _label(self, trial) -> str:
        point = [f"{k}={printable(_value(_dotted(trial.config, k)))}" for k in self.keys]
        return f"{trial.trial_id} ({' '.join(point) or 'base config'})"

    @staticmethod
    def _where(result: dict) -> str:
        host = printable(str(result.get("host") or "?"))
        node = printable(str(result.get("node_id") or ""))[:8]
        gpus = printable(str(result.get("gpu_ids") or ""))
        return (
            f"on {host}"
            + (f" node {node}" if node else "")
            + (f", gpu {gpus}" if gpus else ", cpu")
        )

    @staticmethod
    def _placement(trial) -> str:
        """'wants 1 CPU, 0.25 GPU': what is known of a trial before it reports."""
        wanted = trial.placement_group_factory.required_resources
        return "wants " + ", ".join(f"{n:g} {k}" for k, n in sorted(wanted.items()) if n)

    def _announce(self, trial, where: str) -> None:
        _, kind = self.unannounced.pop(trial.trial_id)
        self._event(kind, trial, where)

    def _announce_if_needed(self, trial) -> None:
        if trial.trial_id in self.unannounced:
            self._announce(trial, self._placement(trial))

    def _flush(self, trial_id: str | None = None) -> None:
        """Print the held-back events (of one trial, or all): starts, then targets reached. A
        restart after a failure waits for its first report (its 'retrying' line said the
        rest); one that fails again before it has no line of its own."""
        for key, (trial, kind) in list(self.unannounced.items()):
            if trial_id not in (None, key):
                continue
            if kind != "restarted":
                self._announce(trial, self._placement(trial))
            elif trial_id is not None:
                del self.unannounced[key]
        for key, (trial, step, value) in list(self.targets.items()):
            if trial_id in (None, key):
                del self.targets[key]
                target = self.spec.target
                self._event(
                    "target",
                    trial,
                    f"{target.metric} {value:.4g} {comparison(target.metric, ascii=True)} "
                    f"{target.value:g} at step {step}",
                )

    def _event(self, kind: str, trial, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self._write([f"{stamp} {kind:<9} {self._label(trial)}  {text}"])

    def _failure(self, trial) -> str:
        """'<the error's line>; full error: <the trial's error.txt in the experiment>'."""
        # Tune writes the error into the trial's staging folder on this machine before it calls
        # back; the experiment folder gets its copy at the next sync.
        try:
            text = Path(trial.error_file).read_text(errors="replace")
        except (TypeError, OSError):  # no file: Tune wrote none for this failure
            text = ""
        where = self.experiment.join(trial.storage.trial_dir_name, ERROR_FILE).uri
        return f"{error_line(text) or 'no error text'}; full error: {printable(where)}"

    def _reaches(self, value: float) -> bool:
        target = self.spec.target
        return meets(value, target.value, direction(target.metric))

    # ------------------------------------------------------------------ The terminal

    def _tty(self) -> bool:
        stream = self.stream or sys.stdout
        return stream.isatty() and os.environ.get("TERM") != "dumb"

    def _print(self, *lines: str) -> None:
        """Lines with no live block below them (the header, the end)."""
        with self.lock:
            self.erase()
            self._write(list(lines))

    def _write(self, lines: list[str]) -> None:
        """Event or status lines above the live block (redrawn below them on a terminal)."""
        stream = self.stream or sys.stdout
        with self.lock:
            drawn = self.block
            self.erase()
            stream.write("".join(f"{line}\n" for line in lines))
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
        counts, best, pace = self._status_parts()
        width = max(20, shutil.get_terminal_size().columns - 1)
        # A line longer than the terminal would wrap, and the block could not be erased whole.
        lines = [
            *textwrap.wrap(f"{self.spec.name}: {counts}", width, subsequent_indent="  "),
            *textwrap.wrap(pace, width, subsequent_indent="  "),
            *textwrap.wrap(best, width, subsequent_indent="  "),
        ]
        stream = self.stream or sys.stdout
        stream.write("".join(f"{line}\n" for line in lines))
        stream.flush()
        self.block = len(lines)
        self.last_redraw = self.clock()

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """On a terminal: stdout, stderr and the logging handlers that write to them erase the
        live block before they write."""
        if not self._tty():
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
