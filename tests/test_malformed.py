"""Hostile and malformed sweep files (issue 11): every one is refused before anything starts.

Each file is run as `lbs-tune run FILE --storage <a path under a file> --address <a port nobody
listens on>`, in this process. A refused file exits 2 with one line of at most 300 characters on
stderr (no traceback, no control character), within 5 s and 500 MB, and writes nothing. A file
that were valid would fail on the storage instead (checked before Ray starts), also with exit 2
and nothing written: so the line must not be about --storage or --address, which proves that
validation refused the file. (Not only the address: in a test run where a Ray test came first,
this process is connected to the shared cluster, and `start_ray` then ignores --address.)

The files are the issue's cases, and mutations of every shipped sweep file that cannot make a
valid file: unknown keys, out-of-range, infinite, NaN or mistyped values at known keys, unknown
choices, syntax that is always broken, repeated keys, empty or repeated grid values, control
characters, bytes that are not UTF-8, `--set` overrides of the same kinds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lbs_tune.cli import main
from lbs_tune.spec import load_spec

SWEEPS_DIR = Path(__file__).parent.parent / "sweeps"
SHIPPED = {p.name: p.read_text() for p in sorted(SWEEPS_DIR.glob("*.yaml"))}
MAX_SECONDS = 5.0
MAX_BYTES = 500 * 2**20
MAX_LINE = 300
# Any C0 or C1 control character (tab included) but the newline that ends the line.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _unused_port() -> int:
    with socket.socket() as s:  # free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADDRESS = f"127.0.0.1:{_unused_port()}"


# ============================================================================ Measuring one run


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds, after the body, the peak growth of this process's memory in
    bytes while the body ran: of its resident set where Linux can reset the high-water mark
    (that sees pydantic's Rust and every C allocation, and costs nothing), else tracemalloc's
    peak (which slows pure-Python YAML parsing many times over)."""
    found = [0]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
    except OSError:
        tracemalloc.start()
        try:
            yield found
        finally:
            found[0] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return
    yield found
    found[0] = (_status_kb("VmHWM") - before) * 1024


def _status_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str
    seconds: float
    peak_bytes: int
    written: list[str]


def run_file(content: bytes, args: tuple[str, ...] = (), name: str = "sweep.yaml") -> Outcome:
    """`lbs-tune run` of a sweep file holding `content` (with `args`, e.g. `--set`), its storage
    a path under a file, joining ADDRESS, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, blocker = Path(tmp) / name, Path(tmp) / "a-file"
        spec.write_bytes(content)
        blocker.write_text("not a folder")
        storage = blocker / "storage"
        argv = ["run", str(spec), "--storage", str(storage), "--address", ADDRESS, *args]
        out, err = io.StringIO(), io.StringIO()
        with peak_memory() as peak:
            started = time.monotonic()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            seconds = time.monotonic() - started
        written = sorted(set(os.listdir(tmp)) - {name, "a-file"})
        if blocker.read_text() != "not a folder":
            written.append("a-file")
    return Outcome(code, out.getvalue(), err.getvalue(), seconds, peak[0], written)


def assert_refused(outcome: Outcome, case: str) -> str:
    """The refusal that every malformed file gets; returns its one line."""
    assert outcome.code == 2, (case, outcome.code, outcome.err[-2000:])
    assert "Traceback" not in outcome.err, (case, outcome.err[-2000:])
    assert outcome.err.count("\n") == 1 and outcome.err.endswith("\n"), (case, outcome.err[:2000])
    line = outcome.err[:-1]
    assert line.startswith("lbs-tune: error: "), (case, line)
    assert f"--address {ADDRESS}" not in line, f"{case}: validation let it through: {line}"
    assert "--storage " not in line, f"{case}: validation let it through: {line}"
    assert len(line) <= MAX_LINE, (case, len(line), line)
    assert not CONTROL.search(line), (case, line)
    assert outcome.out == "", (case, outcome.out[:500])
    assert outcome.written == [], (case, outcome.written)
    assert outcome.seconds <= MAX_SECONDS, (case, f"{outcome.seconds:.1f} s")
    assert outcome.peak_bytes <= MAX_BYTES, (case, f"{outcome.peak_bytes / 2**20:.0f} MiB")
    return line


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Every shipped file loaded once: the zoo checks import torch and build each model once
    per process, which no malformed file should be timed for. Each file is valid: run, it is
    refused only for its storage."""
    for name, text in SHIPPED.items():
        load_spec(SWEEPS_DIR / name)
        outcome = run_file(text.encode())
        assert outcome.code == 2 and outcome.written == [], (name, outcome.err)
        assert "/a-file/storage: cannot write there" in outcome.err, (name, outcome.err)


# ============================================================================ The issue's cases


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _laughs(levels: int, indent: str = "") -> str:
    """Lines of nested aliases: level i is a list of nine aliases of level i-1, so the last one
    stands for 9**levels values."""
    lines = [f"{indent}&l0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"{indent}&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "".join(line + "\n" for line in lines)


QUICKSTART = SHIPPED["quickstart.yaml"]
CIFAR = SHIPPED["cifar10.yaml"]
# Half a KB that YAML expands to 9**10 (3.5 billion) values.
BILLION_LAUGHS = "name: laughs\nbase: {epochs: 1}\nx:\n" + _laughs(10, "  - ")


def grid_laughs(levels: int) -> str:
    """quickstart.yaml with a grid of seeds that are nested aliases (9**levels values)."""
    return _replace(QUICKSTART, "grid:\n", "grid:\n  seed:\n" + _laughs(levels, "    - "))


def quickstart(old: str, new: str) -> bytes:
    """quickstart.yaml with `old` replaced by `new`."""
    return _replace(QUICKSTART, old, new).encode()


# (case, file content, extra arguments, a text the one line must hold)
ISSUE_CASES: list[tuple[str, bytes, tuple[str, ...], str]] = [
    ("billion laughs", BILLION_LAUGHS.encode(), (), "aliases"),
    ("nested aliases in a grid value", grid_laughs(6).encode(), (), "aliases"),
    ("nested aliases in a grid value, fewer than the budget", grid_laughs(5).encode(), (), "seed"),
    ("latin-1", (QUICKSTART + "description: caf\xe9\n").encode("latin-1"), (), "UTF-8"),
    ("utf-16", QUICKSTART.encode("utf-16"), (), "UTF-8"),
    ("utf-16 without BOM", QUICKSTART.encode("utf-16-le"), (), "sweep.yaml"),
    ("nesting 20000 deep", b"name: deep\nbase: " + b"[" * 20000 + b"]" * 20000, (), "nest"),
    ("integer of 5000 digits", quickstart("seed: 0", "seed: " + "7" * 5000), (), "sweep.yaml"),
    ("NUL byte", quickstart("seed: 0", "seed: 0\0"), (), "sweep.yaml"),
    ("seed -1", quickstart("seed: 0", "seed: -1"), (), "seed"),
    ("lr.base .inf", quickstart("base: 0.01", "base: .inf"), (), "lr.base"),
    ("eval_every .inf", quickstart("eval_every: 0.5", "eval_every: .inf"), (), "eval_every"),
    ("checkpoint_every .inf", quickstart("checkpoint_every: 2", "checkpoint_every: .inf"), (),
     "checkpoint_every"),
    ("resources.gpu .nan", quickstart("cpu: 1", "cpu: 1\n  gpu: .nan"), (), "resources.gpu"),
    ("resources.gpu {32: .nan}", _replace(CIFAR, "{32: 0.25,", "{32: .nan,").encode(), (),
     "resources.gpu"),
    ("resources.gpu 1.5", quickstart("cpu: 1", "cpu: 1\n  gpu: 1.5"), (), "resources.gpu"),
    ("resources.cpu .inf", quickstart("cpu: 1", "cpu: .inf"), (), "resources.cpu"),
    *[
        (f"data.samples {v}", quickstart("samples: 20000", f"samples: {v}"), (), "data.samples")
        for v in ("1e12", "1.0e12", "1.0e+12", "1000000000000")
    ],
    ("300-character name", quickstart("quickstart", "q" * 300), (), "name"),
    ("base.batch_size 0 under a grid of batch sizes",
     quickstart("batch_size: 16\n", "batch_size: 0\n"), (), "batch_size"),
    ("base.lr.milestones out of order under a grid of milestones",
     quickstart("warmup_epochs: 0", "warmup_epochs: 0\n    milestones: [0.75, 0.5]")
     .replace(b"grid:\n", b"grid:\n  lr.milestones: [[0.5]]\n"), (), "milestones"),
    ("grid over foo.bar", quickstart("grid:\n", "grid:\n  foo.bar: [1, 2]\n"), (), "foo"),
    ("unknown key under target", quickstart("target:\n", "target:\n  colour: red\n"), (),
     "known: metric, value"),
    ("--set base.lr=5", QUICKSTART.encode(), ("--set", "base.lr=5"), "base.lr"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "content", "args", "expected"), [pytest.param(*c, id=c[0]) for c in ISSUE_CASES]
)
def test_the_issue_cases_are_refused_in_one_line(case, content, args, expected):
    line = assert_refused(run_file(content, args), case)
    assert expected in line, (case, line)


# ============================================================================ Mutations


@dataclass(frozen=True)
class Case:
    """A malformed sweep file: how it was made, its bytes and extra arguments of `run`."""

    how: str
    content: bytes
    args: tuple[str, ...] = ()


INF, NAN = math.inf, math.nan
# Wrong values at known keys (dotted, from the top of the file): each is out of range, infinite,
# NaN, of the wrong type or an unknown choice, so the file is invalid whatever else it holds.
BAD_VALUES: dict[str, list[Any]] = {
    "name": ["", "-x", "a b", "a/b", "../up", ".hidden", "n" * 101, 5, None, [1], {"a": 1}],
    "description": [5, [1], {"a": 1}],
    "schedule": ["fastest", 1, None],
    "max_concurrent": [0, -1, 10**6 + 1, 1.5, "x", INF],
    "max_failures": [-1, 10_001, 1.5, "x", None],
    "metric": [5, "x", [1]],
    "metric.name": [1, None],
    "metric.mode": ["maximum", 1, None],
    "target": [5, "x", {}],
    "target.metric": [1],
    "target.value": [INF, -INF, NAN, "x", None, [1]],
    "resources": [5, "x", [1]],
    "resources.cpu": [0, -1, 10_001, INF, NAN, "x", None],
    "resources.gpu": [-1, INF, NAN, "x", {"x": 1}, {"32": -1}, {"32": NAN}, {"32": 1.5}],
    "grid": [5, "x", [1]],
    "base": [5, "x", [1]],
    "base.dataset": ["cifar11", "imagenet", 5, None],
    "base.model": ["resnet21", 5, None],
    "base.batch_size": [0, -1, 2**31 + 1, 1.5, "x", INF, NAN, None, [16]],
    "base.seed": [-1, 2**63, 1.5, "x", INF, NAN, None],
    "base.epochs": [0, -1, 2e6, INF, NAN, "x"],
    "base.steps": [0, -1, 10**12 + 1, 1.5, INF, "x"],
    "base.examples": [0, -1, 10**12 + 1, 1.5, INF, "1e12"],
    "base.eval_every": [0, -1, 2e6, INF, NAN, "x", None],
    "base.eval_batch_size": [0, -1, 2**31 + 1, INF, "x", None],
    "base.checkpoint_every": [0, -1, 2e6, INF, NAN, "x", None],
    "base.keep_checkpoints": [0, -1, 1.5, "x"],
    "base.precision": ["fp8", "half", 16, None],
    "base.device": ["tpu", "gpu", 0],
    "base.channels_last": ["maybe", 2, [1]],
    "base.max_device_batch": [0, -1, 2**31 + 1, "x"],
    "base.ghost_batch_size": [0, -1, 2**31 + 1, "x"],
    "base.label_smoothing": [-0.1, 1, INF, NAN, "x"],
    "base.divergence_loss": [0, -1, INF, NAN, "x"],
    "base.data": [5, "x", [1]],
    "base.data.dir": [5, [1], {"a": 1}],
    "base.data.download": ["maybe", 2],
    "base.data.val_fraction": [-0.1, 1, 1.5, INF, NAN, "x"],
    "base.data.samples": [0, -1, 10**7 + 1, 1e12, "1e12", INF, NAN],
    "base.data.crop_padding": [-1, 1.5, "x"],
    "base.data.flip": ["maybe", 2],
    "base.data.shape": [[], [0], [-1, 2], [3, 70_000], "x", [1.5]],
    "base.data.classes": [1, 0, 10**7, "x", INF],
    "base.optimizer": [5, "sgd", [1]],
    "base.optimizer.name": ["adam", "sgdm", 1, None],
    "base.optimizer.momentum": [-0.1, 1, 1.5, INF, NAN, "x"],
    "base.optimizer.nesterov": ["maybe", 2],
    "base.optimizer.weight_decay": [-1, INF, NAN, "x"],
    "base.optimizer.betas": [[0.9], [0.9, 0.99, 0.999], "x", [INF, 0.9], [0.9, NAN]],
    "base.optimizer.eps": [0, -1, INF, NAN],
    "base.optimizer.trust_coefficient": [0, -1, INF, NAN],
    "base.lr": [5, "x", [1]],
    "base.lr.base": [0, -1, INF, NAN, "x", None],
    "base.lr.base_batch_size": [0, -1, 2**31 + 1, INF, "x"],
    "base.lr.scaling": ["linearly", "square", 1, None],
    "base.lr.warmup_epochs": [-1, 2e6, INF, NAN, "x"],
    "base.lr.warmup_from": ["one", 0],
    "base.lr.decay": ["exp", "cosin", 1],
    "base.lr.milestones": [[0], [1.5], [0.75, 0.5], "x", [NAN]],
    "base.lr.gamma": [0, -1, INF, NAN],
}
# Keys whose choices are few enough to list: an unknown one gets any text.
CHOICE_KEYS = [
    "base.dataset",
    "base.model",
    "base.precision",
    "base.device",
    "base.optimizer.name",
    "base.lr.scaling",
    "base.lr.decay",
    "base.lr.warmup_from",
    "metric.mode",
    "schedule",
]
# The sections whose known keys are few enough to list, where a key can be unknown.
SMALL_SECTIONS = ["", "base.data", "base.optimizer", "base.lr", "metric", "target", "resources"]
# Lines that no YAML parser accepts wherever they stand, or that add the unknown key zz_snippet.
SNIPPETS = [
    "zz_snippet: [1, 2",
    "zz_snippet: {a: 1",
    'zz_snippet: "never closed',
    "zz_snippet: *nowhere",
    "zz_snippet: !!python/object/apply:os.system ['echo pwned']",
    "zz_snippet: a: b",
    "zz_snippet: [1, 2]]",
    "zz_snippet: @reserved",
    "zz_snippet: `backtick",
    "- zz_item",
    "%YAML 1.1",
    "---\nzz_snippet: 1",
    "...\nzz_snippet: 1",
    "\tzz_snippet: 1",
]
# Characters YAML refuses in a stream, and bytes that are never part of UTF-8.
CONTROLS = [chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x9B)]
NOT_UTF8 = [b"\xff", b"\xfe", b"\xc0", b"\xc1", b"\xf8", b"\x80"]
KEY_LINE = re.compile(r"^ *[A-Za-z_][A-Za-z0-9_.]*:( .*)?$")
assert all('"' not in text for text in SHIPPED.values()), "the never-closed string would close"


def yaml_text(value: Any) -> str:
    """`value` as one line of YAML (for --set): JSON, and YAML's names for inf and NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


def dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key of a sweep file's top level (sections are made, or replaced by a
    section where they hold a value)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[leaf] = value


def put_grid(data: dict[str, Any], key: str, values: list[Any]) -> None:
    if not isinstance(data.get("grid"), dict):
        data["grid"] = {}
    data["grid"][key] = values


short_names = st.one_of(
    st.from_regex(r"zz[a-z0-9_]{0,12}", fullmatch=True),
    # Hostile text: terminal escapes, control and invisible characters, any script (line breaks
    # and tabs apart: see `_line_break`).
    st.text(st.characters(exclude_characters="\n\t"), max_size=40).map(lambda s: "zz" + s),
    st.sampled_from(["zz\x1b]0;pwned\x07", "zz\x1b[2J", "zz\u202e\u200b", "zz\x00\x9b"]),
)
long_names = st.text(st.characters(exclude_characters="\n\t"), min_size=150, max_size=1000).map(
    lambda s: "zz" + s
)


def bad_value(draw, exclude: str = "") -> tuple[str, Any]:
    key = draw(st.sampled_from([k for k in BAD_VALUES if k.startswith(exclude)]))
    return key, draw(st.sampled_from(BAD_VALUES[key]))


# Each family draws (how, content, args) from a shipped file's name, text and parsed data; any
# of its files is invalid.


def _bad_value(draw, name, text, data):
    key, value = bad_value(draw)
    put(data, key, value)
    return f"{key}: {value!r}", dump(data), ()


def _bad_grid_value(draw, name, text, data):
    key, bad = bad_value(draw, "base.")
    key = key.removeprefix("base.")
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else {}
    values = list(grid.get(key) or [])
    values.insert(draw(st.integers(0, len(values))), bad)
    put_grid(data, key, values)
    return f"grid.{key}: {values!r}", dump(data), ()


def _bad_set(draw, name, text, data):
    args: list[str] = []
    for _ in range(draw(st.integers(1, 2))):
        key, value = bad_value(draw)
        if key.startswith("base.") and draw(st.booleans()):
            args += ["--set", f"grid.{key[5:]}={yaml_text([value])}"]
        else:
            args += ["--set", f"{key}={yaml_text(value)}"]
    return " ".join(args), text.encode(), tuple(args)


def _unknown_key(draw, name, text, data):
    section, key = draw(st.sampled_from(SMALL_SECTIONS)), draw(short_names)
    put(data, f"{section}.{key}" if section else key, draw(st.sampled_from([1, "x", None, [1]])))
    return f"{section}.{key!r}", dump(data), ()


def _unknown_choice(draw, name, text, data):
    key = draw(st.sampled_from(CHOICE_KEYS))
    put(data, key, draw(short_names))
    return f"{key}: unknown choice", dump(data), ()


def _grid_values(draw, name, text, data):
    # A sweep without a grid (a branched sweep) gets one, of the base's batch size.
    grid = data.setdefault("grid", {"batch_size": [data["base"].get("batch_size", 32)]})
    key = draw(st.sampled_from(sorted(grid)))
    values = list(grid[key])
    if draw(st.booleans()):
        values = []
    else:
        values.insert(draw(st.integers(0, len(values))), draw(st.sampled_from(values)))
    grid[key] = values
    return f"grid.{key}: {values!r}", dump(data), ()


def _snippet(draw, name, text, data):
    lines = text.splitlines(keepends=True)
    snippet = " " * draw(st.sampled_from([0, 0, 2, 4])) + draw(st.sampled_from(SNIPPETS))
    at = draw(st.integers(0, len(lines)))
    return (
        f"line {at + 1}: {snippet!r}",
        "".join([*lines[:at], snippet + "\n", *lines[at:]]).encode(),
        (),
    )


def _repeated_key(draw, name, text, data):
    lines = text.splitlines(keepends=True)
    at = draw(st.sampled_from([i for i, ln in enumerate(lines) if KEY_LINE.match(ln.rstrip())]))
    return (
        f"line {at + 1} twice: {lines[at]!r}",
        "".join([*lines[: at + 1], *lines[at:]]).encode(),
        (),
    )


def _not_utf8(draw, name, text, data):
    raw, byte = text.encode(), draw(st.sampled_from(NOT_UTF8))
    at = draw(st.integers(0, len(raw)))
    return f"{byte!r} at byte {at}", raw[:at] + byte + raw[at:], ()


def _with_bom(draw, name, text, data):
    encoding = draw(st.sampled_from(["utf-16", "utf-32", "cp1252"]))
    accent = "description: caf\xe9 cr\xe8me \u2013 br\xfbl\xe9e\n" if encoding == "cp1252" else ""
    return f"encoded as {encoding}", (text + accent).encode(encoding), ()


def _garbage(draw, name, text, data):
    noise, bad = draw(st.binary(max_size=2000)), draw(st.sampled_from(NOT_UTF8))
    at = draw(st.integers(0, len(noise)))
    return f"garbage {noise[:40]!r}...", noise[:at] + bad + noise[at:], ()


def _control(draw, name, text, data):
    char, at = draw(st.sampled_from(CONTROLS)), draw(st.integers(0, len(text)))
    return f"{char!r} at {at}", (text[:at] + char + text[at:]).encode(), ()


def _without_bom(draw, name, text, data):
    encoding = draw(st.sampled_from(["utf-16-le", "utf-16-be", "utf-32-le"]))
    return f"encoded as {encoding}", text.encode(encoding), ()


def _unknown_key_in_base(draw, name, text, data):
    key = draw(short_names)
    if draw(st.booleans()):
        put(data, f"base.{key}", 1)
        return f"base.{key!r}", dump(data), ()
    put_grid(data, key, [1])
    return f"grid.{key!r}", dump(data), ()


def _long_unknown_key(draw, name, text, data):
    section, key = draw(st.sampled_from(SMALL_SECTIONS)), draw(long_names)
    put(data, f"{section}.{key}" if section else key, 1)
    return f"{section}.{key[:40]!r}...", dump(data), ()


def _unknown_metric(draw, name, text, data):
    key = draw(st.sampled_from(["metric.name", "target.metric"]))
    value = draw(st.one_of(st.sampled_from(["accuracy", "val/acc", "loss"]), short_names))
    put(data, key, value)
    return f"{key}: {value}", dump(data), ()


def _grid_key_below_a_value(draw, name, text, data):
    key = draw(st.sampled_from(["lr.base", "optimizer.momentum", "data.val_fraction", "seed.x"]))
    put_grid(data, f"{key}.{draw(short_names)}", [1])
    return f"grid.{key}.<name>", dump(data), ()


def _line_break(draw, name, text, data):
    text = "zz" + draw(st.sampled_from(["\n", "\t", "\n\n"])) + draw(short_names)
    if draw(st.booleans()):
        section = draw(st.sampled_from(SMALL_SECTIONS))
        put(data, f"{section}.{text}" if section else text, 1)
        return f"{section}.{text!r}", dump(data), ()
    key = draw(st.sampled_from(["lr.scaling", "precision", "optimizer.name"]))  # not a choice
    put_grid(data, key, [text])
    return f"grid.{key}: [{text!r}]", dump(data), ()


def _gpu_above_one(draw, name, text, data):
    value = draw(st.sampled_from([1.5, 2.25, 3.75]))
    put(data, "resources.gpu", value)
    return f"resources.gpu: {value}", dump(data), ()


FAMILIES = {
    "bad value": _bad_value,
    "bad grid value": _bad_grid_value,
    "bad --set": _bad_set,
    "unknown key": _unknown_key,
    "unknown choice": _unknown_choice,
    "empty or repeated grid values": _grid_values,
    "broken syntax": _snippet,
    "repeated key": _repeated_key,
    "not UTF-8": _not_utf8,
    "UTF-16, UTF-32 or cp1252": _with_bom,
    "binary garbage": _garbage,
    "control character": _control,
    "UTF-16 or UTF-32 without BOM": _without_bom,
    "unknown key in base or the grid": _unknown_key_in_base,
    "long unknown key": _long_unknown_key,
    "unknown metric": _unknown_metric,
    "grid key below a base value": _grid_key_below_a_value,
    "line break or tab in a key or grid value": _line_break,
    "resources.gpu above 1, not whole": _gpu_above_one,
}
# Families that find a bug today, with the bug (the lead removes an entry once it is fixed).


@st.composite
def cases(draw, families: list[str]) -> Case:
    """A malformed sweep file made by one of `families` from a shipped file."""
    family = draw(st.sampled_from(families))
    name = draw(st.sampled_from(sorted(SHIPPED)))
    how, content, args = FAMILIES[family](draw, name, SHIPPED[name], yaml.safe_load(SHIPPED[name]))
    return Case(f"{name}, {family}: {how}", content, args)


def refuse_generated(families: list[str], examples: int, phases=tuple(Phase)) -> set[bytes]:
    """Runs `examples` files of `families` through `assert_refused`; returns their contents."""
    seen: set[bytes] = set()

    @settings(
        max_examples=examples,
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cases(families))
    def refused(case: Case) -> None:
        seen.add(b"\0".join([case.content, *(a.encode() for a in case.args)]))
        assert_refused(run_file(case.content, case.args), case.how)

    refused()
    return seen


def test_at_least_300_generated_malformed_files_are_refused_in_one_line():
    families = list(FAMILIES)
    # A few of the files drawn repeat one another.
    assert len(refuse_generated(families, 330)) >= 300
