"""The image and the cluster definitions in docker/ stay in step with the project.

There is no Docker engine and no cluster here, so the files are read instead: the Dockerfile with
BuildKit's own parser (the `dockerfile` package), cluster.yaml through Ray's offline cluster-config
validation, rayjob.yaml as plain YAML. Each is checked against setup.cfg and against the others,
so that a Ray pin, a Python or a package version that moves without docker/ fails here.
"""

from __future__ import annotations

import ast
import configparser
import copy
import importlib.metadata
import posixpath
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
RAY_CONSTRAINTS_FILE = "/home/ray/requirements_compiled.txt"
BASE_IMAGE = re.compile(
    r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<platform>cpu|gpu|cu\d+)"
)


# ---------------------------------------------------------------------------- project metadata


@cache
def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def package_version() -> str:
    return setup_cfg()["metadata"]["version"]


def ray_requirement() -> Requirement:
    lines = setup_cfg()["options"]["install_requires"].strip().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    (ray,) = [req for req in requirements if req.name == "ray"]
    return ray


def classifiers() -> list[str]:
    return setup_cfg()["metadata"]["classifiers"].strip().splitlines()


# ---------------------------------------------------------------------------- the Dockerfile


@cache
def instructions() -> tuple:
    dockerfile = pytest.importorskip(
        "dockerfile", reason="parses the Dockerfile: pip install dockerfile (dev extra)"
    )
    return tuple(dockerfile.parse_file(str(DOCKERFILE)))


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" else text


def build_args() -> dict[str, str]:
    """Default values of the ARG instructions (the ones before FROM are the FROM's)."""
    args = {}
    for ins in instructions():
        if ins.cmd == "ARG":
            for value in ins.value:
                name, _, default = value.partition("=")
                args[name] = _unquote(default)
    return args


def expand(text: str, args: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME where NAME is known; leave shell variables alone."""

    def value(match: re.Match) -> str:
        return args.get(match.group(1) or match.group(2), match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def base_image() -> re.Match:
    (frm,) = [ins for ins in instructions() if ins.cmd == "FROM"]
    image = expand(frm.value[0], build_args())
    match = BASE_IMAGE.fullmatch(image)
    assert match, f"FROM {image}: expected rayproject/ray:<ray>-py<python>-<platform>"
    return match


def env() -> dict[str, str]:
    values = {}
    for ins in instructions():
        if ins.cmd == "ENV":
            pairs = ins.value
            values.update({pairs[i]: _unquote(pairs[i + 1]) for i in range(0, len(pairs), 2)})
    return values


def workdir() -> str:
    return [ins for ins in instructions() if ins.cmd == "WORKDIR"][-1].value[0]


def runs() -> list[str]:
    return [ins.value[0] for ins in instructions() if ins.cmd == "RUN"]


def test_base_image_is_the_ray_release_setup_cfg_pins():
    ray = base_image()["ray"]
    assert ray_requirement().specifier.contains(ray), (
        f"base image has Ray {ray}, setup.cfg asks for ray{ray_requirement().specifier}"
    )
    # `ray up` and `ray job submit` run on the user's machine, with the Ray this project pins.
    assert importlib.metadata.version("ray") == ray


def test_base_image_python_is_the_project_python():
    match = base_image()
    python = f"{match['py']}.{match['minor']}"
    assert f"Programming Language :: Python :: {python}" in classifiers()
    assert Version(python) in SpecifierSet(setup_cfg()["options"]["python_requires"])
    ruff = re.search(r'^target-version\s*=\s*"(\w+)"', (ROOT / "ruff.toml").read_text(), re.M)
    assert ruff and ruff[1] == f"py{match['py']}{match['minor']}"


def test_base_image_has_cuda():
    assert base_image()["platform"] != "cpu"


def test_image_runs_as_the_ray_user():
    users = [ins for ins in instructions() if ins.cmd == "USER"]
    assert users, "the image should say USER ray rather than inherit whatever the base sets"
    assert all(ins.value[0] in ("ray", "1000") for ins in users), [u.value for u in users]
    last_run = max(ins.start_line for ins in instructions() if ins.cmd == "RUN")
    assert users[-1].start_line > last_run, "end with USER ray, after every RUN"


def test_image_installs_the_project_with_the_ray_constraints():
    copies = [ins for ins in instructions() if ins.cmd == "COPY" and ins.value[0] == "."]
    assert len(copies) == 1, "COPY the build context (the repository root) once"
    target = copies[0].value[-1]
    assert "--chown=ray:users" in copies[0].flags
    # The working directory is the checkout, so that `lbs-tune run sweeps/...` resolves there.
    assert workdir() == target
    args = build_args()
    installs = [expand(run, args | env()) for run in runs() if "pip install" in run]
    assert installs, "no RUN pip install"
    install = installs[0]
    assert RAY_CONSTRAINTS_FILE in install, "pin against the constraints file of the Ray image"
    assert re.search(rf"pip install [^;]*-c \S+[^;]*\s{re.escape(target)}\s", install)
    assert not re.search(r"\s(-e|--editable)\s", install), "install the project, not editable"


def test_image_environment():
    values = env()
    assert posixpath.isabs(values["LBS_DATA_DIR"])
    assert values["RAY_AUTH_MODE"] == "token"
    # The image has no .git; sweeps record the commit it was built from.
    assert values["LBS_GIT_COMMIT"] == "${GIT_COMMIT}"


def file_datasets() -> set[str]:
    """Datasets read from files (lbs_tune.formats), not generated like mnist1d.

    Read from the source of lbs_tune/formats.py, whose _FORMATS is a dict literal, because
    importing it imports torchvision, which alone takes longer than this whole file should.
    """
    tree = ast.parse((ROOT / "lbs_tune" / "formats.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Assign):
            targets = node.targets
        else:
            continue
        if (
            any(isinstance(t, ast.Name) and t.id == "_FORMATS" for t in targets)
            and isinstance(node.value, ast.Dict)
            and all(isinstance(key, ast.Constant) for key in node.value.keys)
        ):
            return {key.value for key in node.value.keys}
    from lbs_tune.formats import DATASET_NAMES  # the source changed shape: ask the module

    return set(DATASET_NAMES)


def test_image_bakes_the_datasets_of_the_ready_sweeps():
    known = file_datasets()
    assert "cifar10" in known
    baked = build_args()["DATASETS"].split()
    assert set(baked) <= known, baked
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        base = spec.get("base", {})
        if base.get("data", {}).get("download"):
            continue
        datasets = [base.get("dataset"), *spec.get("grid", {}).get("dataset", [])]
        for name in datasets:
            if name in known:
                assert name in baked, f"{path.name} reads {name}: add it to ARG DATASETS"


# ---------------------------------------------------------------------------- .dockerignore

# Docker reads .dockerignore at the root of the build context, or, with BuildKit, the
# Dockerfile-specific docker/Dockerfile.dockerignore instead. Both must say the same.
IGNORE_FILES = [ROOT / ".dockerignore", DOCKER / "Dockerfile.dockerignore"]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_patterns(path: Path) -> list[tuple[bool, str]]:
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().strip("/"))
        patterns.append((negated, pattern))
    return patterns


def ignored(patterns: list[tuple[bool, str]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negated, pattern in patterns:
        regex = _glob_regex(pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def test_both_ignore_files_say_the_same():
    root, dockerfile_specific = (ignore_patterns(path) for path in IGNORE_FILES)
    assert root == dockerfile_specific


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "results/cifar10/experiment_state.json",
        "ray_results/x/result.json",
        "lbs_results/x",
        "runs/quickstart/metrics.jsonl",
        "data/cifar-10-batches-py/data_batch_1",
        "lbs_tune/__pycache__/cli.cpython-311.pyc",
        "tests/stale.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "lbs_tune.egg-info/PKG-INFO",
        "build/lib/lbs_tune/cli.py",
        "dist/lbs_tune-0.1.0-py3-none-any.whl",
        "auth_token",
    ],
)
def test_ignore_files_leave_out(path):
    for file in IGNORE_FILES:
        assert ignored(ignore_patterns(file), path), f"{file.name} lets {path} in"


def test_ignore_files_keep_what_the_build_needs():
    needed = ["setup.cfg", "pyproject.toml", "README.md"]
    for folder in ("lbs_tune", "analysis"):
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "sweeps").glob("*.yaml")]
    needed = [path for path in needed if "__pycache__" not in path]
    for file in IGNORE_FILES:
        patterns = ignore_patterns(file)
        assert not [path for path in needed if ignored(patterns, path)], file.name


def test_ignore_files_cover_what_git_ignores():
    for line in (ROOT / ".gitignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        name = line.strip("/")
        samples = [name.replace("*", "x"), "pkg/" + name.replace("*", "x")] if "*" in name else []
        samples = samples or [name + "/file"]
        for file in IGNORE_FILES:
            patterns = ignore_patterns(file)
            assert all(ignored(patterns, sample) for sample in samples), f"{file.name}: {line}"


# ---------------------------------------------------------------------------- cluster.yaml


@cache
def cluster() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


def run_options(config: dict, *keys: str) -> list[str]:
    return [opt for key in keys for opt in config["docker"].get(key, [])]


def cluster_storage() -> str:
    options = run_options(cluster(), "run_options")
    (storage,) = [o.split("=", 1)[1] for o in options if o.startswith("--env LBS_STORAGE=")]
    return storage


def test_cluster_config_passes_ray_validation():
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, check the
    # docker section, then validate against Ray's ray-schema.json.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster())))


def test_cluster_runs_the_lbs_tune_image():
    image = cluster()["docker"]["image"]
    assert image.endswith(f"/lbs-tune:{package_version()}"), image
    assert cluster()["docker"]["container_name"]


def test_cluster_keeps_token_authentication_on():
    config = cluster()
    assert "--env RAY_AUTH_MODE=token" in run_options(config, "run_options")
    mounts = config["file_mounts"]
    assert any(
        remote.endswith(".ray/auth_token") and local == "~/.ray/auth_token"
        for remote, local in mounts.items()
    ), mounts
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert starts and all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts), key


def test_cluster_head_starts_ray_with_the_dashboard():
    (start,) = [cmd for cmd in cluster()["head_start_ray_commands"] if "ray start" in cmd]
    args = shlex.split(start.split(";")[-1])
    assert "--head" in args
    assert "--include-dashboard=true" in args
    assert "--dashboard-host=0.0.0.0" in args
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in args


def test_cluster_workers_join_the_head():
    (start,) = [cmd for cmd in cluster()["worker_start_ray_commands"] if "ray start" in cmd]
    assert "--address=$RAY_HEAD_IP:6379" in start.split()


def test_cluster_workers_have_gpus():
    config = cluster()
    workers = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    assert workers
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, name
        assert node["max_workers"] >= 1, name
    worker_options = run_options(config, "run_options", "worker_run_options")
    assert "--gpus all" in worker_options
    for key in ("head_run_options", "worker_run_options"):
        options = run_options(config, "run_options", key)
        assert any(opt.startswith("--shm-size") for opt in options), key


def test_cluster_storage_is_shared():
    assert cluster_storage().startswith("s3://")


# ---------------------------------------------------------------------------- rayjob.yaml


@cache
def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def entrypoint_storage() -> str:
    args = shlex.split(rayjob()["spec"]["entrypoint"])
    return args[args.index("--storage") + 1]


def pods() -> list[dict]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_rayjob_is_a_kuberay_rayjob():
    assert rayjob()["apiVersion"] == "ray.io/v1"
    assert rayjob()["kind"] == "RayJob"


def test_rayjob_runs_the_cifar10_sweep_on_its_cluster():
    args = shlex.split(rayjob()["spec"]["entrypoint"])
    assert args[:5] == ["lbs-tune", "run", "sweeps/cifar10.yaml", "--address", "auto"]
    assert (ROOT / "sweeps" / "cifar10.yaml").is_file()
    # The storage survives the cluster, and the cluster launcher uses the same one.
    assert entrypoint_storage().startswith("s3://")
    assert entrypoint_storage() == cluster_storage()


def test_rayjob_entrypoint_parses_with_the_cli():
    from lbs_tune.cli import build_parser

    args = shlex.split(rayjob()["spec"]["entrypoint"])
    parsed = vars(build_parser().parse_args(args[1:]))
    assert parsed["command"] == "run"
    assert str(parsed["spec"]) == "sweeps/cifar10.yaml"
    assert parsed["address"] == "auto"
    assert parsed["storage"] == entrypoint_storage()


def test_rayjob_cleans_up_and_retries():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1


def test_rayjob_ray_version_is_the_image_ray():
    version = str(rayjob()["spec"]["rayClusterSpec"]["rayVersion"])
    assert version == base_image()["ray"]
    assert ray_requirement().specifier.contains(version)


def test_rayjob_keeps_token_authentication_on():
    auth = rayjob()["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token"
    assert auth["secretName"]


def test_rayjob_pods_run_the_cluster_image():
    for pod in pods():
        for container in pod["containers"]:
            assert container["image"] == cluster()["docker"]["image"]
            assert container.get("workingDir", workdir()) == workdir()


def test_rayjob_head_serves_the_dashboard():
    params = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0"


def test_rayjob_workers_have_gpus():
    groups = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        gpus = int(resources["limits"]["nvidia.com/gpu"])
        assert gpus >= 1, group["groupName"]
        # Kubernetes requires GPU requests, when given, to equal the limits.
        assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
        assert group["maxReplicas"] >= 1
