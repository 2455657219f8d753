"""The sweep record's provenance of each run, and a finished sweep that `resume` and `run` leave
alone: read from the folder without Ray, the record untouched (tests on the committed real
sweep folders, and on a record written by record_start)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, QUICKSTART_TINY, TINY_EXPERIMENTS

from analysis.html import machines_html
from lbs_tune.experiment import STATE_FILE
from lbs_tune.provenance import cpu_model, cudnn_version, provenance, summary_lines
from lbs_tune.record import finished_sweep, read_record, record_start
from lbs_tune.spec import load_spec
from lbs_tune.storage import locate

REPO = Path(__file__).parent.parent


# ---------------------------------------------------------------------------- Provenance


def test_each_run_of_a_sweep_records_its_versions_and_machine(tmp_path):
    experiment = locate(tmp_path / "sweep")
    spec = load_spec(QUICKSTART, QUICKSTART_TINY)
    first = record_start(
        experiment, spec.model_dump(mode="json"), spec.digest(), None, [], machine=provenance()
    )
    record_start(experiment, first["spec"], first["digest"], first, [], machine=provenance())
    record = read_record(experiment)
    assert len(record["runs"]) == 2
    machine = record["runs"][1]["machine"]
    assert machine["python"] == platform.python_version()
    assert torch.__version__.startswith(machine["packages"]["torch"])
    for name in ("torchvision", "ray", "optuna"):
        assert machine["packages"][name] == metadata.version(name)
    assert machine["cuda"] == torch.version.cuda
    assert machine["cpu"]["cores"] == os.cpu_count() and machine["cpu"]["model"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert len(machine["gpus"]) == gpus
    assert machine["host"] == platform.node()
    lines = summary_lines(machine)
    assert lines[0].startswith(f"Python {platform.python_version()}; torch ")
    assert f"{os.cpu_count()} cores" in " ".join(lines)
    assert ("GPUs none" in lines) == (gpus == 0)
    # The report shows each run's.
    shown = machines_html(record)
    assert shown.count("<li>run of ") == 2 and f"Python {platform.python_version()}" in shown
    assert machines_html({"runs": [{"started": "2026-01-01T00:00:00+00:00"}]}) == ""


def test_the_cpu_model_comes_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC 9654 96-Core Processor\n"
    )
    assert cpu_model(str(cpuinfo)) == "AMD EPYC 9654 96-Core Processor"
    assert cpu_model(str(tmp_path / "none")) == (platform.processor() or platform.machine())


def test_a_record_of_runs_before_provenance_shows_what_it_has():
    assert summary_lines({}) == []
    lines = summary_lines(
        {"cuda": None, "cudnn": None, "gpus": [{"name": "NVIDIA H200", "memory_bytes": 150 << 30}]}
    )
    assert lines == ["CUDA none (CPU build), cuDNN none", "GPUs NVIDIA H200 (150 GiB)"]
    # torch.backends.cudnn.version() of cuDNN 9.1.0 and of 8.9.2.
    assert cudnn_version(90100) == "9.1.0" and cudnn_version(8902) == "8.9.2"


# ---------------------------------------------------------------------------- Finished sweeps


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / "results" / name
    shutil.copytree(TINY_EXPERIMENTS / name, target)
    return target


def _lbs_tune(tmp: Path, *commands: list[str]) -> tuple[list[int], str, bool]:
    """Each `lbs-tune ARGS` of `commands` in turn in one fresh Python whose $TMPDIR is `tmp`
    (where a Ray it started would make its folder): (their exit codes, what they printed,
    whether Ray was imported); prints the seconds each took."""
    probe = (
        "import json, sys, time; from lbs_tune.cli import main\n"
        "codes = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    started = time.monotonic(); codes.append(main(args))\n"
        "    print(f'took {time.monotonic() - started:.1f} s', file=sys.stderr)\n"
        "print(json.dumps({'codes': codes, 'ray': 'ray' in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)},
        timeout=120,
    )
    print(done.stderr)
    facts = json.loads(done.stdout.splitlines()[-1])
    return facts["codes"], done.stdout, facts["ray"]


def test_resume_and_run_of_a_finished_sweep_say_so_without_ray(tmp_path):
    experiment = _copy("quickstart", tmp_path)
    before = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file()}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    overrides = [a for o in QUICKSTART_TINY for a in ("--set", o)]
    codes, out, ray = _lbs_tune(
        tmp,
        ["resume", str(experiment)],
        ["run", str(QUICKSTART), *overrides, "--storage", str(experiment.parent)],
    )
    assert codes == [0, 0] and not ray
    finished = "sweep quickstart is finished (10 finished, 2 diverged, 0 errored)"
    assert out.count(finished) == 2 and out.count(f"next: lbs-tune report {experiment}") == 2
    assert list(tmp.iterdir()) == []  # no Ray folder
    after = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file()}
    assert after == before  # the record and every other file byte for byte


def _set_state(experiment: Path, index: int, status: str) -> None:
    (state,) = [p for p in experiment.iterdir() if STATE_FILE.match(p.name)]
    content = json.loads(state.read_text())
    trial = json.loads(content["trial_data"][index][0])
    trial["status"] = status
    content["trial_data"][index][0] = json.dumps(trial)
    state.write_text(json.dumps(content))


def test_a_sweep_with_a_trial_not_ended_or_errored_is_not_finished(tmp_path):
    quickstart = _copy("quickstart", tmp_path)
    spec = load_spec(QUICKSTART, QUICKSTART_TINY)
    where = locate(quickstart)
    assert finished_sweep(where, spec.digest(), 12)
    assert finished_sweep(where, spec.digest(), 13) is None  # a trial not made yet
    assert finished_sweep(where, "another digest", 12) is None
    _set_state(quickstart, 3, "RUNNING")
    assert finished_sweep(where, spec.digest(), 12) is None
    broken = _copy("broken", tmp_path)
    digest = read_record(locate(broken))["digest"]
    assert finished_sweep(locate(broken), digest, 2) is None  # its errored trial is resumed
    no_state = _copy("quickstart", tmp_path / "other")
    for state in no_state.glob("experiment_state-*.json"):
        state.unlink()
    assert finished_sweep(locate(no_state), spec.digest(), 12) is None


@pytest.mark.ray
def test_a_real_sweep_records_its_machine(reference):
    (run,) = json.loads((reference / "lbs_sweep.json").read_text())["runs"]
    assert run["machine"]["packages"]["ray"] == metadata.version("ray")
    assert run["machine"]["cpu"]["cores"] == os.cpu_count()
