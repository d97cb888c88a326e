"""The Ray a sweep runs on: joined (``RAY_ADDRESS``, a ``ray job submit``) or started here on 127.0.0.1, pinned
for every process the sweep starts; and the reaper of placement groups whose trial has gone."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from ssamba.base.errors import SSAMBAError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submitted_job() -> dict:
    """What Ray's job supervisor hands the driver of a ``ray job submit`` (``runtime_env``, ``metadata``);
    empty outside a submitted job."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")


def _check_submitted_here(job: dict, gcs: str) -> None:
    """Refuse to run a submitted job on a cluster that has no record of it. Ray 2.60's job supervisor gives
    the job's driver ``$RAY_ADDRESS`` by discovery: the cluster last started with ``ray start`` in the
    supervisor node's temp folder. Two clusters that share a temp folder (the default ``/tmp/ray``) make
    it hand a job submitted to the first the address of the second (measured), where it would run."""
    if not job:
        return
    from ray._private import ray_constants
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY, JobInfoStorageClient
    from ray.experimental.internal_kv import _internal_kv_exists

    job_id = (job.get("metadata") or {}).get(JOB_ID_METADATA_KEY)
    key = JobInfoStorageClient.JOB_DATA_KEY.format(job_id=job_id)
    if job_id and not _internal_kv_exists(key, namespace=ray_constants.KV_NAMESPACE_JOB):
        raise SSAMBAError(
            f"job {job_id} was not submitted to the Ray cluster at {gcs}, the address Ray's job supervisor "
            "gave it: that is the cluster last started with the same temp folder, not the one the job was "
            "submitted to. Start each Ray cluster on this machine with its own `ray start --temp-dir`."
        )


def start_ray(num_cpus: int | None = None, quiet: bool = False, dashboard_host: str = "127.0.0.1") -> str:
    """Join the cluster of a ``ray job submit`` (or ``$RAY_ADDRESS``), else start a local Ray on loopback.

    Either way every Ray process of the sweep is pinned to that one cluster. Where no address is given,
    Ray finds one itself, and with several Rays on the machine it takes "the latest cluster", which may be
    someone else's: Ray Train's placement-group cleaner (a detached actor) asks the state API about its
    controller with no address, and that API reads ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``,
    else discovers. A local Ray's dashboard gets a port chosen here and ``$RAY_API_SERVER_ADDRESS`` names
    it before Ray starts, so every Ray process (a child of this one) inherits it. A joined cluster's
    processes were started by ``ray start``: its GCS address, resolved once here, goes to this process and
    to all of them as ``$RAY_ADDRESS`` (theirs through the job's runtime environment, which every task and
    actor of the sweep inherits), with ``$RAY_API_SERVER_ADDRESS`` emptied so that a value inherited from
    the shell that started the cluster cannot point them elsewhere: the state API then asks that GCS for
    the dashboard's address. A Ray Client address (``ray://``) is joined as given."""
    joining = bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
    if not joining:
        # single-machine mode: every Ray process on 127.0.0.1 (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return "existing"
    if joining:
        address = os.environ.get("RAY_ADDRESS") or None
        if address and "://" in address:
            ray.init(log_to_driver=not quiet)
            return "cluster"
        from ray._private.services import canonicalize_bootstrap_address_or_die

        gcs = canonicalize_bootstrap_address_or_die(address)  # resolved once, here ("auto" included)
        pinned = {"RAY_ADDRESS": gcs, "RAY_API_SERVER_ADDRESS": ""}
        job = _submitted_job()
        taken = (job.get("runtime_env") or {}).get("env_vars") or {}  # Ray refuses a variable set twice
        runtime_env = {"env_vars": {k: v for k, v in pinned.items() if k not in taken}}
        os.environ.update(pinned)
        ray.init(address=gcs, log_to_driver=not quiet, runtime_env=runtime_env)
        try:
            _check_submitted_here(job, gcs)
        except SSAMBAError:
            ray.shutdown()
            raise
        return "cluster"
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host=dashboard_host,
        dashboard_port=port,
        log_to_driver=not quiet,
    )
    return "local"


def reap_orphan_placement_groups() -> list[str]:
    """Remove every placement group whose creating actor has died; return their ids.

    Ray Train 2.60 hands a worker group's placement group to its clean-up actor only once the workers
    have started, so a Train controller that dies while they start (its node lost) leaves the group
    holding its CPUs for the rest of the sweep, and the retried trials wait for them forever (measured:
    two 1-CPU nodes, one killed). A group whose creator is dead is never used again. Tune's own groups
    are created by the driver (no creator actor) and are left alone.
    """
    import ray
    from ray._private.state import state  # the GCS table names each group's creator; the public one does not
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData as PG
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = PG.FromString(raw)
        creator = pg.creator_actor_id
        if (
            pg.state != PG.REMOVED
            and not pg.is_detached
            and pg.creator_actor_dead
            and creator
            and not ray.ActorID(creator).is_nil()
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed.append(pg.placement_group_id.hex())
    return removed


def orphan_reaper(every_s: float = 5.0):
    """A Tune callback that runs :func:`reap_orphan_placement_groups` every few seconds (and turns itself
    off, saying so, if Ray's internals changed)."""
    from ray import tune

    class OrphanPlacementGroupReaper(tune.Callback):
        last, enabled = 0.0, True

        def on_step_begin(self, iteration, trials, **info):
            if not self.enabled or time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            try:
                for pg in reap_orphan_placement_groups():
                    print(f"removed placement group {pg}: its Ray Train controller died (node lost?)", flush=True)
            except Exception as exc:  # noqa: BLE001 - a private Ray API: never let it stop a sweep
                self.enabled = False
                print(
                    f"warning: orphan placement-group clean-up disabled ({type(exc).__name__}: {exc})",
                    file=sys.stderr,
                    flush=True,
                )

    return OrphanPlacementGroupReaper()
