"""deploy/systemd: every unit passes `systemd-analyze verify`, runs a verb our command line takes with the config
of its instance, stops with SIGTERM (which that verb handles), and never restarts on a bad configuration."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from injector import exits
from injector.cli import STOPPABLE, build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
INSTALLED = "/opt/rucio-injector/bin/rucio-injector"


def service(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser["Service"]


def test_there_is_a_unit_for_each_long_running_verb():
    assert [u.name for u in UNITS] == [f"rucio-injector-{v}@.service" for v in ("cleanup", "ingest", "reconcile",
                                                                                 "watch")]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_finds_nothing(unit: Path, tmp_path: Path):
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze (Debian package systemd) is needed to check the units"
    here = Path(sys.executable).parent / "rucio-injector"  # the installed command, where this test runs
    (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(here)))
    instance = tmp_path / unit.name.replace("@.", "@lapalma.")
    done = subprocess.run([verify, "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_its_verb_with_its_instances_config_and_stops_it_cleanly(unit: Path):
    s = service(unit)
    command = shlex.split(s["ExecStart"])
    assert command[0] == INSTALLED
    args = build_parser().parse_args(command[1:])
    verb = unit.name.removeprefix("rucio-injector-").removesuffix("@.service")
    assert args.verb == verb and args.config == "/etc/rucio-injector/%i.toml"
    assert verb in STOPPABLE and s["KillSignal"] == "SIGTERM", "SIGTERM finishes the batch and exits 0"
    assert s["RestartPreventExitStatus"] == str(exits.BAD_CONFIG), "a bad config is not retried forever"
    assert s["Restart"] == "on-failure" and s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    if verb == "reconcile":
        assert args.every == 600


def rendered() -> list[dict]:
    """deploy/kubernetes as kubectl renders it (kustomize built in)."""
    import yaml

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/kubernetes"
    done = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "kubernetes")], capture_output=True,
                          text=True, timeout=120, check=True)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_kubernetes_manifests_run_each_verb_with_the_mounted_config_and_probe_its_metrics_port():
    import tomllib

    from injector.config import parse
    from injector.topology import permissions

    docs = rendered()
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    settings = parse(tomllib.loads(cm["data"]["injector.toml"]))
    ports = {"ingest": settings.metrics.ingest_port, "cleanup": settings.metrics.cleanup_port,
             "reconcile": settings.metrics.reconcile_port}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == [f"rucio-injector-{v}" for v in ("cleanup", "ingest", "reconcile")]
    roles = set(permissions(settings))
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        args = build_parser().parse_args(c["args"])
        assert f"rucio-injector-{args.verb}" == name
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_dir, config_file = args.config.rsplit("/", 1)
        assert mounts["config"] == config_dir and config_file in cm["data"]
        assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"], "the generated ConfigMap"
        (port,) = c["ports"]
        assert (port["name"], port["containerPort"]) == ("metrics", ports[args.verb])
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        env = {e["name"]: e["value"] for e in c["env"]}
        secret_dir, _ = env["RUCIO_INJECTOR_BROKER_PASSWORD_FILE"].rsplit("/", 1)
        assert mounts["passwords"] == secret_dir and "secret" in volumes["passwords"], "passwords from a Secret"
        user = env["RUCIO_INJECTOR_BROKER_URL"].split("//")[1].split("@")[0]
        assert user.removeprefix("rucio-injector-") in roles, "each verb runs as a broker role's user"
        assert env["RUCIO_CONFIG"].startswith(mounts["rucio-cfg"] + "/")
        assert c["securityContext"]["readOnlyRootFilesystem"] and mounts["tmp"] == "/tmp"
        assert d["spec"]["replicas"] == (1 if args.verb == "reconcile" else 2)
        if args.verb == "reconcile":
            assert args.every == 600
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "rucio-injector", "the metrics Service selects the pod"
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert svc["spec"]["selector"] == {"app.kubernetes.io/part-of": "rucio-injector"}
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": svc["spec"]["ports"][0]["name"], "path": "/metrics"}]


PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "rucio-injector.json"


def exported() -> set[str]:
    """Every series name the running processes' registries export: ingest and cleanup (their workers, built as
    `rucio-injector ingest|cleanup` builds them), reconcile --every and watch (its outbox gauge)."""
    from consumers.services import cleanup_worker, ingest_worker
    from injector.config import parse
    from injector.metrics import Metrics
    from injector.testing import FakeRucio
    from operations.reconcile import _SweepMetrics
    from tests.conftest import STREAMS

    s = parse(STREAMS)
    watch = Metrics("watch")
    watch.track_outbox(lambda: 0.0)
    registries = [ingest_worker(s, FakeRucio()).metrics.registry, cleanup_worker(s, FakeRucio()).metrics.registry,
                  _SweepMetrics(s, 600, port=0).metrics.registry, watch.registry]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for r in registries for family in r.collect()
            for suffix in suffixes.get(family.type, ("",))}


def used(text: str) -> set[str]:
    import re

    return set(re.findall(r"\brucio_injector_[a-z0-9_]+", text))


def test_every_metric_the_alerts_and_the_dashboard_use_is_exported():
    import json

    rules = (PROMETHEUS / "alerts.yaml").read_text()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert len(used(rules)) >= 6 and len(used(exprs)) >= 9
    assert not (used(rules) | used(exprs)) - exported()


def test_the_dashboard_shows_what_operators_watch():
    import json

    titles = " / ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"])
    for what in ("Files per stage", "Dead letters", "Dead-letter queue depth", "Rucio availability",
                 "Oldest unprocessed", "Reconcile findings"):
        assert what in titles


def test_promtool_checks_the_rules_and_fires_each_alert_in_its_tests():
    import yaml

    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed to check the alert rules"
    check = subprocess.run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yaml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", "alerts-test.yaml"], cwd=PROMETHEUS, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
              for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROMETHEUS / "alerts-test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert alerts == tested, "every alert has a test that fires it"
