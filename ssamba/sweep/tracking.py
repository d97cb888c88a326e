"""MLflow: the only module that imports it. The sweep's run layout, written and read here.

Layout (docs/architecture.md section 5.5):
- one experiment per sweep script (``ssamba-<factor>`` unless ``--experiment``), tagged
  ``ssamba.sweep=1``, ``ablation.factor``, ``mlflow.experimentKind`` (machine learning) and described
  (``mlflow.note.content``);
- one parent run per sweep (``sweep.role=parent``, ``sweep.id``, ``ablation.factor``, ``sweep.arms``
  (JSON, natural order), ``sweep.reference_arm``, ``sweep.tasks`` (JSON), ``sweep.preset``, ``git.commit``,
  a description), with each arm's summary at the end (metrics ``arm/<arm>/...``);
  a resumed sweep continues its parent run;
- one child run per trial (``mlflow.parentRunId``, ``sweep.role=trial``, ``sweep.id``, ``ablation.factor``,
  ``ablation.arm``, ``seed``, ``git.commit``, ``trial.key``, ``trial.status``), holding every config
  value as a dotted param; metrics ``pretrain/...``, ``ft/<task>/...`` (``ft/<task>/final`` is the
  task's headline number), ``cost/...``; a retried or resumed trial continues its own run.

With no URI the store is ``sqlite:///<cwd>/mlflow.db`` (what ``mlflow ui`` run there shows), resolved to
an absolute path so that Ray workers in other directories write to the same database.

Param and tag values are scrubbed of URI passwords and of the values of secret-named environment
variables; no environment variable is logged. ``python -m ssamba.sweep.tracking ui`` serves a store's UI (and
REST API) with ``mlflow server``, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ssamba.base import names as N
from ssamba.base.errors import ConfigError

DEFAULT_DB = "mlflow.db"
SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential", "auth")


def resolve_uri(uri: str | None = None, cwd: str | os.PathLike | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store; relative paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    base = Path(cwd or os.getcwd())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if not Path(rel).is_absolute():
            return f"sqlite:///{(base / rel).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:") :] if uri.startswith("file:") else uri
        path = path[2:] if path.startswith("//") else path  # file:///abs -> /abs (empty authority)
        return Path(base / path).resolve().as_uri()
    return uri


def artifact_root(uri: str) -> str | None:
    """For a local sqlite store: ``<db folder>/mlartifacts`` (absolute), else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def is_secret(key: str) -> bool:
    low = key.lower()
    return any(w in low for w in SECRET_WORDS)


# Environment variables whose values never reach MLflow: *TOKEN*, *SECRET*, *PASSWORD*, *KEY*, ...
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):[^/@\s]+@")


def redact_uri(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, wherever it occurs in ``text``."""
    return _URI_PASSWORD.sub(r"\g<head>:***@", text)


def environ_snapshot() -> dict[str, str]:
    """A copy of the environment that another thread may change meanwhile (MLflow's telemetry sets and unsets
    ``_MLFLOW_TELEMETRY_SESSION_ID`` from its own thread): iterating ``os.environ`` then raised KeyError
    (a variable gone between its name and its value) and failed a trial."""
    for _ in range(1000):
        try:
            names = list(os.environ)
        except RuntimeError:  # the mapping changed size while it was read
            continue
        return {k: v for k in names if (v := os.environ.get(k)) is not None}
    return dict(os.environ)  # (never reached in practice; never an empty answer: secrets must be found)


def scrub(text: str) -> str:
    """``text`` with URI passwords and the values of secret-named environment variables (8 characters or
    more, so that e.g. ``1`` or ``true`` are left alone) replaced by ``***``."""
    text = redact_uri(text)
    env = environ_snapshot()
    secrets = sorted({v for k, v in env.items() if len(v) >= 8 and SECRET_ENV.search(k)}, key=len, reverse=True)
    for value in secrets:
        if value in text:
            text = text.replace(value, "***")
    return text


class Tracker:
    """Thin wrapper over ``MlflowClient`` with the sweep layout's get-or-create semantics."""

    def __init__(self, uri: str | None = None):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    # ------------------------------------------------------------------------- experiments and runs
    def experiment(self, name: str, tags: dict[str, str] | None = None) -> str:
        """The experiment's id, created with ``tags`` if it does not exist; an existing one gets the tags it
        lacks (a description or kind set by hand in the UI is kept)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_root(self.uri), tags=tags or {})
            except Exception:  # a concurrent creator won the race
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        for key, value in (tags or {}).items():
            if key not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=flt, max_results=2)
        return runs[0].info.run_id if runs else None

    def parent_run(self, experiment: str, sweep_id: str):
        """The parent run (MLflow ``Run``) of sweep ``sweep_id`` in the experiment named ``experiment``, or None."""
        exp = self.client.get_experiment_by_name(experiment)
        run_id = exp and self.find_run(exp.experiment_id, {N.SWEEP_ID: sweep_id, N.ROLE: N.PARENT})
        return self.client.get_run(run_id) if run_id else None

    def trial_runs(self, experiment_id: str, sweep_id: str) -> list:
        """Every trial run of one sweep (MLflow ``Run`` objects)."""
        flt = f"tags.`{N.SWEEP_ID}` = '{sweep_id}' and tags.`{N.ROLE}` = '{N.TRIAL}'"
        return list(self.client.search_runs([experiment_id], filter_string=flt, max_results=10000))

    def get_or_create_run(
        self,
        experiment_id: str,
        *,
        key_tags: dict[str, str],
        name: str,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """The run whose tags include ``key_tags`` (continued, status back to RUNNING), else a new one.

        Returns ``(run_id, created)``. Params are logged once; a continued run keeps its params.
        """
        run_id = self.find_run(experiment_id, key_tags)
        created = run_id is None
        if created:
            run = self.client.create_run(experiment_id, tags={**key_tags, **(tags or {})}, run_name=name)
            run_id = run.info.run_id
            if params:
                self.log_params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(run_id, tags)
        return run_id, created

    # ------------------------------------------------------------------------- logging
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, scrub(_param_value(v))) for k, v in params.items() if not is_secret(k)]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100], synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [RunTag(k, scrub(str(v))) for k, v in tags.items() if not is_secret(k)]
        if items:
            self.client.log_batch(run_id, tags=items, synchronous=True)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500], synchronous=True)

    def log_metrics_once(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """:meth:`log_metrics`, leaving out every metric the run already holds at ``step`` (so a restarted
        worker or trial that repeats its last stage does not log its results twice)."""
        self.log_metrics(
            run_id,
            {k: v for k, v in metrics.items() if all(s != int(step) for s, _ in self.metric_history(run_id, k))},
            step=step,
        )

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------------------- reading
    def sweep_experiments(self) -> list[str]:
        """Ids of every experiment tagged as an ssamba sweep."""
        exps = self.client.search_experiments(filter_string=f"tags.`{N.EXPERIMENT_MARK}` = '1'")
        return [e.experiment_id for e in exps]

    def experiment_ids(self, names: list[str]) -> list[str]:
        out = []
        for n in names:
            exp = self.client.get_experiment_by_name(n)
            if exp is None:
                raise KeyError(f"no MLflow experiment named {n!r} in {self.uri}")
            out.append(exp.experiment_id)
        return out

    def runs_frame(self, experiment_ids: list[str], sweep_id: str | None = None) -> pd.DataFrame:
        """Every run of the experiments as a DataFrame: ``run_id``, ``status``, ``params.*``, ``tags.*``,
        ``metrics.*`` (final values), ``start_time``, ``end_time``."""
        flt = f"tags.`{N.SWEEP_ID}` = '{sweep_id}'" if sweep_id else ""
        rows = []
        token = None
        while True:
            page = self.client.search_runs(experiment_ids, filter_string=flt, max_results=1000, page_token=token)
            for r in page:
                row = {
                    "run_id": r.info.run_id,
                    "experiment_id": r.info.experiment_id,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "end_time": r.info.end_time,
                    "run_name": r.info.run_name,
                }
                row.update({f"params.{k}": v for k, v in r.data.params.items()})
                row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
                row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
                rows.append(row)
            token = page.token
            if not token:
                break
        return pd.DataFrame(rows)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


# ----------------------------------------------------------------------------- `python -m ssamba.sweep.tracking ui`
def runs_page(base_url: str, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI at ``base_url``.

    MLflow 3.17's UI opens an experiment on the view of its sidebar switch ("GenAI apps & agents", the
    default, or "Machine learning"), kept in the browser (``localStorage["mlflow.workflowType"]``) and
    overridden by the page's ``workflowType`` parameter; the experiment tag ``mlflow.experimentKind`` is
    not consulted while that switch exists. This link names the runs tab and the machine-learning view."""
    return f"{redact_uri(base_url).rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_start_command(uri: str) -> str:
    """The command that serves a database store's UI (``mlflow ui``), its URI made absolute."""
    return f"mlflow ui --backend-store-uri {redact_uri(resolve_uri(uri))}"


def ui_command(
    uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1, extra: list[str] | None = None
) -> list[str]:
    """The ``mlflow server`` command line (UI + REST API) for a store, bound to ``host``."""
    if "://" in uri and not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "file:")):
        raise ConfigError(
            f"the UI needs a database store (sqlite:///..., postgresql://...), got {redact_uri(uri)}; "
            f"fix: pass --backend-store-uri, or open {redact_uri(uri)} in a browser if it is a server"
        )
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(extra or []),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssamba.sweep.tracking", description="The sweeps' MLflow store: start its UI / tracking server."
    )
    sub = p.add_subparsers(dest="command", required=True)
    ui = sub.add_parser(
        "ui",
        help="start the MLflow UI and tracking server (mlflow server) for a store",
        description="Starts `mlflow server` for the store, bound to 127.0.0.1 unless --host says "
        "otherwise. Anything after -- goes to mlflow server (e.g. --allowed-hosts).",
    )
    ui.add_argument(
        "--backend-store-uri",
        help="sqlite:///..., postgresql://user@host/db; default: $MLFLOW_TRACKING_URI or sqlite mlflow.db here",
    )
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves every network, "
        "which needs your own access control in front)",
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, default=1, help="web workers (mlflow's default of 4 takes ~2 GB)")
    ui.add_argument("mlflow_args", nargs=argparse.REMAINDER, help="-- then more `mlflow server` options")
    args = p.parse_args(argv)
    extra = args.mlflow_args[1:] if args.mlflow_args[:1] == ["--"] else args.mlflow_args
    uri = resolve_uri(args.backend_store_uri)
    try:
        cmd = ui_command(uri, args.host, args.port, args.workers, extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no job runner: starts in ~5 s, ~0.5 GB
    print(f"MLflow UI for {redact_uri(uri)} on http://{args.host}:{args.port}", flush=True)
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    try:  # a link per sweep experiment, straight to its runs (not MLflow's default GenAI overview)
        if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///") :]).is_file():  # (never create it here)
            for exp in MlflowClient(tracking_uri=uri).search_experiments(
                filter_string=f"tags.`{N.EXPERIMENT_MARK}` = '1'", max_results=20
            ):
                print(f"  {exp.name}: {runs_page(base, exp.experiment_id)}", flush=True)
    except Exception:  # noqa: BLE001 - only links; the server itself says what is wrong with the store
        pass
    os.execve(cmd[0], cmd, env)  # replaces this process: its pid is the server's
    return 0


if __name__ == "__main__":
    sys.exit(main())
