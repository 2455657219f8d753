"""Ray, started or joined for a sweep: a local cluster on the loopback with the dashboard on
(token authentication as Ray sets it up), or an existing cluster at an address that is checked
before Ray's own minutes of retrying. The runner calls `start_ray`; nothing here knows sweeps.
"""

from __future__ import annotations

import os
import socket
import sys

from lbs_tune.errors import UserError


def check_reachable(address: str, timeout_s: float = 10) -> None:
    """A one-line UserError at once for a host:port nobody listens on (Ray itself retries for
    minutes). `auto` and addresses without a port are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"--address {address}: cannot join the Ray cluster (nothing answers at {host}:{port}: "
            f"{exc.strerror or exc}); start it with `ray start --head` or check the address"
        ) from None


def _use_token_if_there() -> None:
    """Ray turns token auth on by itself only for clusters it finds; with an explicit address it
    must be told, so use the token whenever one is there (RAY_AUTH_MODE still wins). Ray has no
    public call for this: without its private one (a Ray other than 2.60), say how to do it."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        if "RAY_AUTH_MODE" not in os.environ:
            print(
                "lbs-tune: warning: this Ray cannot be told to use ~/.ray/auth_token; if the "
                "cluster asks for a token, set RAY_AUTH_MODE=token",
                file=sys.stderr,
            )
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_ray(
    address: str | None = None,
    cpus: int | None = None,
    gpus: int | None = None,
    log_to_driver: bool = True,
    logging_level: int | None = None,
) -> None:
    """Join the cluster at `address`, or start a local one with the dashboard on. The trials'
    stdout and stderr reach this process only with `log_to_driver`; Ray's logger of this
    process is at `logging_level` (Ray's default if None).

    A local Ray listens on the loopback only (GCS, raylets, workers, the metrics endpoint, the
    dashboard): Ray takes 127.0.0.1 as its node address when told this machine is no cluster
    node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray and by every process it starts).
    Trials see the environment of the node they run on: a local cluster's nodes inherit this
    process's (LBS_DATA_DIR included); a cluster's nodes have their own (see docker/).
    """
    if not address:
        os.environ[LOCAL_ONLY] = "0"
    import ray

    if ray.is_initialized():
        return
    options = {"log_to_driver": log_to_driver}
    if logging_level is not None:
        options["logging_level"] = logging_level
    if address:
        _use_token_if_there()
        check_reachable(address)
        try:
            context = ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"--address {address}: cannot join the Ray cluster ({reason})"
            ) from None
    else:
        _loopback_in_this_process()
        # address="local": always a new cluster, never one that happens to run on this machine.
        context = ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **options,
        )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
        print(f"  {_auth_mode()}")


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_in_this_process() -> None:
    """Ray reads LOCAL_ONLY when it is imported: if it was imported before (a test, a notebook),
    set what it read. Without that module (another Ray), the loopback is not guaranteed."""
    try:
        from ray._private import ray_constants
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def _auth_mode() -> str:
    """One line that says how to sign in to the dashboard, from the mode Ray really runs in."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return "sign in with the token in ~/.ray/auth_token if the dashboard asks for one"
    if is_token_auth_enabled():
        return (
            "token authentication is on: sign in with the token in ~/.ray/auth_token "
            "(`ray get-auth-token` prints it)"
        )
    return (
        "token authentication is OFF (RAY_AUTH_MODE=disabled or a cluster without a token): "
        "whoever reaches the dashboard controls the cluster"
    )
