"""The `optuna-dashboard` command that `lbs-tune run` prints for a searched sweep works as printed
(the `dashboard` extra, in the `dev` one too): started on the loopback against a real optuna.db,
it lists the studies through its HTTP API."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
from conftest import free_port

from lbs_tune.studies import study_storage


def test_the_printed_optuna_dashboard_command_lists_the_studies(tmp_path):
    experiment = tmp_path / "my sweep"
    experiment.mkdir()
    storage = study_storage(experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for batch in (32, 64):
        study = optuna.create_study(study_name=f"batch_size={batch}", storage=storage.url)
        study.optimize(lambda t: (t.suggest_float("lr", 1e-3, 1.0, log=True) - 0.1) ** 2, 3)
    command = shlex.split(storage.dashboard)
    # The console script of this environment, as `pip install 'lbs-tune[dashboard]'` makes it.
    command[0] = str(Path(sys.executable).with_name(command[0]))
    port = free_port()
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline, listed = time.monotonic() + 60, None
        while listed is None and time.monotonic() < deadline and server.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/studies"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    listed = json.loads(answer.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert listed is not None, server.stderr.read().decode() if server.poll() else "no answer"
        studies = {s["study_name"]: s for s in listed["study_summaries"]}
        assert sorted(studies) == ["batch_size=32", "batch_size=64"]
    finally:
        server.terminate()
        server.wait(timeout=30)
