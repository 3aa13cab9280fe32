"""The deployment files in deploy/: the container image, Compose and Kubernetes.

Fast tests lint and validate them offline with tools of the `test` extra, each a wheel that
carries its binary or its schemas: hadolint (the Dockerfile), shellcheck (the image's
entrypoint), Docker Compose's own `config` (compose.yaml against the Compose schema, variables
resolved) and kubernetes-validate (every manifest against the Kubernetes OpenAPI schemas,
strictly: an unknown field fails), on the files and on what `kubectl kustomize` renders.
Structural tests then hold the files to the contract they share with the image and the
server: ports, tokens, the data volume, probes, grace periods and the hardening.

The slow tests build deploy/Dockerfile unchanged with podman (on these machines, which have
no Docker engine and reach no registry, ../shared/tools/standin-python-base.sh installs podman
and builds a local python:3.11-slim-bookworm; .ci/run calls it) and use the image as a user
would, from the host through the SDK: fast start on the kernels compiled into the image,
upload, train, infer, a restart on the same volume, SIGTERM draining a running job, a
read-only root filesystem, and the pod settings of deploy/k8s/statefulset.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cnnd.client import Client, CnndError, Unauthenticated
from tests.conftest import REQUIRE_ALL, ROOT, SMALL_SPEC, free_port, need_program, wait_for

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = [K8S, K8S / "scale-out"]
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27,
# StatefulSet PVC retention exists since 1.27) and the newest schemas the validator bundles.
K8S_VERSIONS = ["1.30", "1.37"]
GRACE_SECONDS = 20.0  # `cnnd serve --grace-seconds` default: how long SIGTERM may take
IMAGE_CMD = ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464",
             "--data-dir", "/data"]  # fmt: skip
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
STANDIN = "../shared/tools/standin-python-base.sh"
CONTAINERS_CONF = Path("/tmp/ctr/containers.conf")  # written by the stand-in script
IMAGE = "localhost/cnnd:test"
TOKEN = "test-admin-token-0123456789"
SERVING_WITHIN = 15.0  # seconds from `podman run` to SERVING, with the image's kernels


def skip_or_fail(message: str) -> None:
    """As conftest.need_program: skip, or fail under CNND_REQUIRE_ALL=1 (CI)."""
    if REQUIRE_ALL:
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """A linter of the test extra: beside this interpreter (CI runs .venv/bin/python without
    activating the venv, so it is not on PATH), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else need_program(name)


def run(
    *cmd: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


# --- the Dockerfile --------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), one list per stage."""
    stages: list[list[tuple[str, str]]] = []
    line = ""
    for raw in DOCKERFILE.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            line += text[:-1] + " "
            continue
        instruction, _, args = (line + text).partition(" ")
        line = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def final_stage() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for instruction, args in dockerfile_stages()[-1]:
        out.setdefault(instruction, []).append(args)
    return out


def image_user() -> tuple[int, int]:
    (user,) = final_stage()["USER"]
    uid, gid = user.split(":")
    return int(uid), int(gid)


def test_hadolint_passes() -> None:
    r = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs its rules (a passing no-op would prove nothing)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    r = run(tool("hadolint"), "--no-color", str(bad))
    assert r.returncode != 0 and "DL3008" in r.stdout, r.stdout


def test_entrypoint_passes_shellcheck() -> None:
    r = run(tool("shellcheck"), "--shell=sh", str(ENTRYPOINT))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_contract() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: the runtime stage takes only the venv"
    # Every stage starts from the base image or from an earlier stage.
    names: set[str] = set()
    for stage in stages:
        base, *alias = stage[0][1].split(" AS ")
        assert base == "python:3.11-slim-bookworm" or base in names, base
        names.update(alias)
    assert stages[-1][0][1] == "python:3.11-slim-bookworm"
    final = final_stage()
    copies = final["COPY"]
    venv = [
        c for c in copies if c.startswith("--from=") and c.split()[-1].rstrip("/") == "/opt/cnnd"
    ]
    assert venv, "the runtime stage takes the venv from the build stages"
    assert not any("pip install" in r for r in final["RUN"]), "the runtime stage installs nothing"
    assert any("libgomp1" in r for r in final["RUN"]), "Numba's omp threading layer needs it"
    uid, _ = image_user()
    assert uid != 0
    # The kernels are compiled as the serving user, after the last change to the installed
    # package, and nothing but metadata follows: the Numba cache must match the files.
    body = stages[-1]
    warm = body.index(("RUN", "python -m cnnd.core.warmup"))
    assert body.index(("USER", f"{uid}:{image_user()[1]}")) < warm
    after = {instruction for instruction, _ in body[warm + 1 :]}
    assert after <= {"VOLUME", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}, after
    assert json.loads(final["ENTRYPOINT"][0]) == ["cnnd-entrypoint"]  # exec form: PID 1
    assert json.loads(final["CMD"][0]) == IMAGE_CMD
    assert json.loads(final["VOLUME"][0]) == ["/data"]
    assert final["EXPOSE"][0].split() == ["50051", "9464"]
    assert "cnnd health" in " ".join(json.loads(final["HEALTHCHECK"][0].split("CMD ", 1)[1]))
    # The entrypoint hands over to the server with exec, so SIGTERM reaches `cnnd serve`.
    assert ENTRYPOINT.read_text().rstrip().endswith('exec cnnd serve "$@"')


# --- Compose ---------------------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's short-syntax volumes."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]  # type: ignore[misc]


def test_compose_structure() -> None:
    """Everything a service refers to exists: named volumes and secrets are declared, bind
    mounts exist, dependencies are services; and the three services agree with each other
    and with the image."""
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"cnnd", "prometheus", "grafana"}
    for name, service in services.items():
        for source, _ in volume_mounts(service):
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: volume {source}"
        for ref in service.get("secrets", []):
            secret = ref if isinstance(ref, str) else ref["source"]
            assert secret in compose.get("secrets", {}), f"{name}: secret {secret}"
        for env_file in service.get("env_file", []):
            assert (DEPLOY / env_file).exists(), f"{name}: {env_file}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on {dependency}"

    cnnd = services["cnnd"]
    assert (DEPLOY / cnnd["build"]["context"] / cnnd["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "command" not in cnnd  # the image's CMD: all interfaces, needs the token below
    assert "CNND_ADMIN_TOKEN" in cnnd["environment"]
    assert dict(volume_mounts(cnnd))  # a named volume ...
    assert [t for s, t in volume_mounts(cnnd) if s in compose["volumes"]] == [
        "/data"
    ]  # ... at /data
    assert cnnd["read_only"] is True and cnnd["tmpfs"] == ["/tmp"]
    assert cnnd["cap_drop"] == ["ALL"]
    assert float(cnnd["stop_grace_period"].removesuffix("s")) > GRACE_SECONDS
    for service in services.values():  # published on the host's loopback only
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", []))

    # Prometheus loads deploy/prometheus/prometheus.yml, whose rule files sit beside it and
    # whose target is the cnnd service's metrics port.
    prom = services["prometheus"]
    mounts = {t: s for s, t in volume_mounts(prom)}
    config_path = next(
        a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file=")
    )
    config_dir = Path(config_path).parent.as_posix()
    host_dir = DEPLOY / mounts[config_dir]
    config = yaml.safe_load((host_dir / Path(config_path).name).read_text())
    for rule_file in config["rule_files"]:
        assert (host_dir / rule_file).is_file(), rule_file
    metrics_port = IMAGE_CMD[IMAGE_CMD.index("--metrics-port") + 1]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]  # fmt: skip
    assert targets == [f"cnnd:{metrics_port}"]

    # Grafana: the provisioned data source is the prometheus service, and the dashboard
    # provider reads the directory where deploy/grafana/dashboards is mounted.
    grafana = services["grafana"]
    mounts = {t: s for s, t in volume_mounts(grafana)}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cnnd.yml").read_text())[
        "providers"
    ]
    dashboards = DEPLOY / mounts[provider["options"]["path"]]
    assert [json.loads(p.read_text())["uid"] for p in dashboards.glob("*.json")] == ["cnnd"]


def compose_config(env_file: Path, home: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: a token in the developer's shell must not make the file pass.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    return run(tool("docker-compose"), "--env-file", str(env_file), "--file", str(COMPOSE),
               "config", "--format", "json", env=env)  # fmt: skip


def test_compose_config_is_valid(tmp_path: Path) -> None:
    """Docker Compose itself parses the file, validates it against the Compose schema and
    resolves it (no engine needed for `config`)."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"CNND_ADMIN_TOKEN={TOKEN}\nGRAFANA_ADMIN_PASSWORD=test-password\n")
    r = compose_config(env_file, tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    cnnd = config["services"]["cnnd"]
    assert cnnd["environment"]["CNND_ADMIN_TOKEN"] == TOKEN
    assert Path(cnnd["build"]["context"]) == ROOT
    assert [(v["type"], v["target"]) for v in cnnd["volumes"]] == [("volume", "/data")]
    assert {v["source"] for s in config["services"].values() for v in s.get("volumes", [])
            if v["type"] == "volume"} <= set(config["volumes"])  # fmt: skip
    binds = [v for s in config["services"].values() for v in s.get("volumes", [])
             if v["type"] == "bind"]  # fmt: skip
    assert binds and all(Path(v["source"]).exists() and v["read_only"] for v in binds)


def test_compose_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    r = compose_config(empty, tmp_path)
    assert r.returncode != 0
    assert "CNND_ADMIN_TOKEN" in r.stderr and "GRAFANA_ADMIN_PASSWORD" in r.stderr


# --- Kubernetes ------------------------------------------------------------------------------


def kustomization_docs(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists, read file by file (no kubectl needed)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [d for f in kustomization["resources"]
            for d in yaml.safe_load_all((directory / f).read_text()) if d]  # fmt: skip


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def validate_k8s(doc: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {e}") from e


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_k8s_manifests_validate(directory: Path, version: str) -> None:
    for doc in kustomization_docs(directory):
        validate_k8s(doc, version)


def test_k8s_validation_is_strict() -> None:
    """An unknown field fails: the schemas are the strict ones, not a permissive subset."""
    import kubernetes_validate

    (sts,) = [d for d in kustomization_docs(K8S) if d["kind"] == "StatefulSet"]
    sts = json.loads(json.dumps(sts))
    sts["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_k8s_kustomize_renders_valid_manifests(directory: Path) -> None:
    """What `kubectl apply -k` would send: the kustomization rendered by kubectl's built-in
    kustomize, every object valid, labelled, and nothing lost or added."""
    r = run(need_program("kubectl"), "kustomize", str(directory))
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert by_kind(rendered).keys() == by_kind(kustomization_docs(directory)).keys()
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cnnd"
        validate_k8s(doc, K8S_VERSIONS[-1])


def cnnd_workload(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(workload, pod spec, the cnnd container) of a kustomization."""
    (workload,) = [
        d
        for d in kustomization_docs(directory)
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == "cnnd"
    ]
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return workload, pod, container


def flag(container: dict[str, Any], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_k8s_pod_fits_the_image(directory: Path) -> None:
    """Both kustomizations run the image the same way: its entrypoint (which seeds the Numba
    cache; a `command` would bypass it), its user, a read-only root with writable emptyDirs
    for /tmp and the cache, ports and probes that match the flags, and enough time to drain."""
    workload, pod, c = cnnd_workload(directory)
    resources = by_kind(kustomization_docs(directory))
    assert "command" not in c
    assert pod["enableServiceLinks"] is False  # else CNND_PORT=tcp://... breaks `cnnd serve`
    assert pod["automountServiceAccountToken"] is False
    uid, gid = image_user()
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid)
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e for e in c["env"]}
    cache = env["NUMBA_CACHE_DIR"]["value"]
    (cache_mount,) = [p for p in mounts if cache.startswith(p + "/")]
    assert "emptyDir" in volumes[mounts[cache_mount]]
    assert float(pod["terminationGracePeriodSeconds"]) > float(flag(c, "grace-seconds"))
    assert set(c["resources"]) == {"requests", "limits"}
    assert env["NUMBA_NUM_THREADS"]["value"] == str(c["resources"]["limits"]["cpu"])
    port, metrics = int(flag(c, "port")), int(flag(c, "metrics-port"))
    assert flag(c, "host") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": port, "metrics": metrics}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics)
    # Listening on all interfaces needs a token: an admin token from a Secret of the
    # kustomization (development values; replaced in production).
    ref = env["CNND_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert len(resources[("Secret", ref["name"])]["stringData"][ref["key"]]) >= 16
    service = resources[("Service", "cnnd")]
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {port, metrics}


def test_k8s_single_node_keeps_its_data() -> None:
    """One pod (SQLite allows one server per data dir) with a persistent volume at --data-dir."""
    sts, pod, c = cnnd_workload(K8S)
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 1
    services = {name for kind, name in by_kind(kustomization_docs(K8S)) if kind == "Service"}
    assert sts["spec"]["serviceName"] in services
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[flag(c, "data-dir")] == claim["metadata"]["name"]
    assert claim["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


# --- README -------------------------------------------------------------------------------


def readme_commands(title: str) -> list[list[str]]:
    """The commands of README's ``## title`` section: continuations joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, title
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_readme_docker_commands_fit_the_image() -> None:
    commands = readme_commands("Run with Docker")
    assert ["docker", "build", "-f", "deploy/Dockerfile", "-t", "cnnd", "."] in commands
    (run_,) = [c for c in commands if c[:2] == ["docker", "run"]]
    words = [w for w in run_[2:-1] if w != "-d"]  # the one option without a value
    options = dict(zip(words[::2], words[1::2], strict=True))
    assert run_[-1] == "cnnd" and options["-e"] == "CNND_ADMIN_TOKEN"  # the token, from env
    assert options["-p"].endswith(":50051") and options["-v"].endswith(":/data")
    assert float(options["--stop-timeout"]) > GRACE_SECONDS
    # deploy/.env as README writes it holds exactly the variables compose.yaml requires.
    (printf,) = [c for c in commands if "printf" in c]
    written = re.findall(r"([A-Z_]+)=%s", printf[printf.index("printf") + 1])
    assert written == re.findall(r"\$\{(\w+):\?", COMPOSE.read_text())
    (up,) = [c for c in commands if c[:2] == ["docker", "compose"]]
    assert up[up.index("--env-file") + 1] == "deploy/.env"
    assert ROOT / up[up.index("-f") + 1] == COMPOSE
    assert "/deploy/.env" in (ROOT / ".gitignore").read_text().split()


def test_readme_kubernetes_commands_fit_the_manifests() -> None:
    commands = readme_commands("Run on Kubernetes")
    assert ["kubectl", "apply", "-k", "deploy/k8s"] in commands
    workload, _, _ = cnnd_workload(K8S)
    assert [
        "kubectl",
        "rollout",
        "status",
        f"statefulset/{workload['metadata']['name']}",
    ] in commands
    (health,) = [c for c in commands if "health" in c]
    token = health[0].removeprefix("CNND_TOKEN=")
    secret = by_kind(kustomization_docs(K8S))[("Secret", "cnnd-tokens")]
    assert secret["stringData"]["admin"] == token


# --- the image, built and run with podman ------------------------------------------------------


class Podman:
    def __init__(self, exe: str, env: dict[str, str]) -> None:
        self.exe, self.env = exe, env

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        r = run(self.exe, *args, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)}: exit {r.returncode}\n{r.stderr[-4000:]}"
            )
        return r

    def logs(self, name: str) -> str:
        r = self("logs", name, check=False)
        return r.stdout + r.stderr

    def exit_code(self, name: str) -> int:
        return int(self("inspect", "--format", "{{.State.ExitCode}}", name).stdout)


@pytest.fixture(scope="module")
def podman() -> Podman:
    exe = need_program("podman")
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and CONTAINERS_CONF.exists():
        env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    p = Podman(exe, env)
    if p("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        skip_or_fail(f"no {BASE_IMAGE} image for podman (run {STANDIN}; .ci/run does)")
    return p


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/Dockerfile built unchanged from the repository root. Layers are cached, so a
    rerun rebuilds only what changed (about a minute when cnnd's sources did: the kernels
    are compiled again). Docker format: OCI images have no HEALTHCHECK."""
    started = time.monotonic()
    r = podman("build", "--format", "docker", "--file", str(DOCKERFILE), "--tag", IMAGE,
               str(ROOT), check=False, timeout=1500)  # fmt: skip
    log = tmp_path_factory.mktemp("image") / "build.log"
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"podman build failed ({log}):\n{(r.stdout + r.stderr)[-4000:]}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nimage {IMAGE} built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture
def names(podman: Podman) -> Iterator[str]:
    """A unique prefix for this test's containers and volumes, all removed afterwards."""
    prefix = f"cnnd-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    containers = podman("ps", "--all", "--format", "{{.Names}}", check=False).stdout.split()
    volumes = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    # --volumes: also the anonymous volume a container without one gets for the image's /data.
    for command, listed in ((("rm", "--force", "--volumes"), containers),
                            (("volume", "rm", "--force"), volumes)):  # fmt: skip
        mine = [n for n in listed if n.startswith(prefix)]
        if mine:
            podman(*command, *mine, check=False)


def start(
    podman: Podman, name: str, image: str, *options: str, args: tuple[str, ...] = ()
) -> tuple[str, float]:
    """`podman run -d` with gRPC published on a free loopback port: (target, start time)."""
    port = free_port()
    started = time.monotonic()
    podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:50051",
           *options, image, *args)  # fmt: skip
    return f"127.0.0.1:{port}", started


def seconds_to_serving(podman: Podman, name: str, target: str, started: float) -> float:
    with Client(target, timeout=5) as c:
        try:
            c.wait_until_ready(60)
        except CnndError as e:
            raise AssertionError(f"{name} not SERVING: {e}\n{podman.logs(name)}") from e
    return time.monotonic() - started


def stop(podman: Podman, name: str, timeout: int) -> float:
    """`podman stop`: SIGTERM, then SIGKILL after ``timeout`` s. Asserts a clean exit (0,
    which a SIGKILL would not give); returns the seconds it took."""
    started = time.monotonic()
    podman("stop", "--time", str(timeout), name, timeout=timeout + 30)
    took = time.monotonic() - started
    logs = podman.logs(name)
    assert podman.exit_code(name) == 0, logs
    assert "received SIGTERM; draining" in logs and "cnnd stopped" in logs, logs
    return took


SLOW_EPOCHS = 60  # 10-30 s: long enough to be stopped in the middle
SLOW_SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_config_and_contents(podman: Podman, image: str) -> None:
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    c = config["Config"]
    uid, gid = image_user()
    assert c["User"] == f"{uid}:{gid}"
    assert c["Entrypoint"] == ["cnnd-entrypoint"] and c["Cmd"] == IMAGE_CMD
    assert set(c["ExposedPorts"]) == {"50051/tcp", "9464/tcp"} and set(c["Volumes"]) == {"/data"}
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "cnnd", "health"]
    # Lean: the server and the PostgreSQL driver (scale-out), no extras, no build tools; the
    # kernels compiled, owned by the user that serves.
    probe = (
        "import importlib.util as u, json, os, cnnd.server.store.postgres\n"
        "cache = os.environ['NUMBA_CACHE_DIR']\n"
        "print(json.dumps({'extras': [m for m in ('torch', 'pytest', 'sklearn', 'matplotlib',"
        " 'pip', 'setuptools') if u.find_spec(m)], 'uid': os.getuid(),"
        " 'kernels': sum(f.endswith('.nbc') for _, _, fs in os.walk(cache) for f in fs),"
        " 'cache_owner': os.stat(cache).st_uid, 'data': oct(os.stat('/data').st_mode & 0o777)}))"
    )
    r = podman("run", "--rm", "--entrypoint", "python", image, "-c", probe)
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["extras"] == [] and found["uid"] == uid == found["cache_owner"]
    assert found["kernels"] > 20 and found["data"] == "0o700"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_container_refuses_to_listen_without_a_token(
    podman: Podman, image: str, names: str
) -> None:
    """The image's CMD listens on all interfaces: without authentication that is refused."""
    name = f"{names}-open"
    podman("run", "--name", name, image, check=False, timeout=60)
    assert podman.exit_code(name) == 2
    assert "refusing to listen" in podman.logs(name)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_container_lifecycle(podman: Podman, image: str, names: str, digits) -> None:  # type: ignore[no-untyped-def]
    """Start fast, train and infer; SIGTERM in the middle of a job drains it (exit 0); a new
    container on the same volume has the model, infers identically and finishes the job; a
    container with a read-only root filesystem does too."""
    x, y = digits
    volume = f"{names}-data"
    podman("volume", "create", volume)
    common = ("--env", f"CNND_ADMIN_TOKEN={TOKEN}", "--volume", f"{volume}:/data",
              "--stop-timeout", "30")  # fmt: skip
    timings: dict[str, float] = {}

    # 1. A fresh container: SERVING within seconds, since the kernels come compiled.
    first = f"{names}-a"
    target, started = start(podman, first, image, *common)
    timings["serving (first start)"] = seconds_to_serving(podman, first, target, started)
    with Client(target, timeout=30) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_models()
    with Client(target, token=TOKEN, timeout=60) as c:
        data = c.upload_dataset(x, y, name="digits")
        c.create_model(SMALL_SPEC, name="small", seed=0)
        job = c.train("small", data, epochs=3, batch_size=32, lr=0.1).wait(progress=False)
        assert job.state == "SUCCEEDED", job.failure_reason
        result = c.infer("small", x[:64])
        assert result.logits.shape == (64, 10)
        assert (result.classes == y[:64]).mean() > 0.5
    assert podman("healthcheck", "run", first, check=False).returncode == 0  # the HEALTHCHECK
    with Client(target, token=TOKEN, timeout=60) as c:
        # A job still running when the container is stopped (an epoch takes 0.2-1 s).
        c.create_model(SLOW_SPEC, name="slow", seed=1)
        slow = c.train("slow", data, epochs=SLOW_EPOCHS, batch_size=16, lr=0.05, momentum=0.9,
                       validation=0.2, checkpoint_every=1)  # fmt: skip
        wait_for(lambda: c.get_job(slow.id).progress.epoch >= 3, timeout=180, interval=0.05,
                 what="the slow job's third epoch")  # fmt: skip
    timings["stop while training"] = stop(podman, first, 30)
    assert timings["stop while training"] < GRACE_SECONDS
    assert "checkpointed and queued for the next start" in podman.logs(first)

    # 2. A second container on the same volume: the model, the same answers, the job resumed.
    second = f"{names}-b"
    target, started = start(podman, second, image, *common)
    timings["serving (restart)"] = seconds_to_serving(podman, second, target, started)
    with Client(target, token=TOKEN, timeout=60) as c:
        assert {m.name for m in c.list_models()} == {"small", "slow"}
        np.testing.assert_array_equal(c.infer("small", x[:64]).logits, result.logits)
        resumed = c.wait_job(slow.id, progress=False, timeout=300)
        assert resumed.state == "SUCCEEDED", resumed.failure_reason
        assert resumed.attempts >= 2
        assert [e.epoch for e in resumed.history] == list(range(1, SLOW_EPOCHS + 1))
    timings["stop idle"] = stop(podman, second, 30)

    # 3. A read-only root filesystem with a tmpfs at /tmp, as `docker run --read-only
    # --tmpfs /tmp` gives (podman would add more tmpfs mounts by default; not here). The
    # entrypoint copies the compiled kernels to /tmp: still SERVING within seconds.
    third = f"{names}-ro"
    target, started = start(podman, third, image, *common, "--read-only",
                            "--read-only-tmpfs=false", "--tmpfs", "/tmp")  # fmt: skip
    timings["serving (read-only root)"] = seconds_to_serving(podman, third, target, started)
    with Client(target, token=TOKEN, timeout=60) as c:
        np.testing.assert_array_equal(c.infer("small", x[:64]).logits, result.logits)
        job = c.train("small", data, epochs=1, batch_size=32, lr=0.1).wait(progress=False)
        assert job.state == "SUCCEEDED", job.failure_reason  # /data is writable
    assert podman("exec", third, "ls", "/tmp/cnnd-numba").stdout.split()
    assert podman("exec", third, "touch", "/opt/x", check=False).returncode != 0
    timings["stop read-only"] = stop(podman, third, 30)

    print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
    for k, v in timings.items():
        if k.startswith("serving"):
            assert v < SERVING_WITHIN, f"{k}: {v:.1f} s"


def k8s_pod_as_podman_options(volume: str) -> tuple[list[str], dict[str, str], list[str], int]:
    """deploy/k8s/statefulset.yaml's pod as podman options: (options, env, args, grace)."""
    _, pod, c = cnnd_workload(K8S)
    resources = by_kind(kustomization_docs(K8S))
    sc, csc = pod["securityContext"], c["securityContext"]
    options = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}", "--group-add", str(sc["fsGroup"])]
    if csc["readOnlyRootFilesystem"]:
        options += ["--read-only", "--read-only-tmpfs=false"]
    if not csc["allowPrivilegeEscalation"]:
        options += ["--security-opt", "no-new-privileges"]
    options += [f"--cap-drop={cap}" for cap in csc["capabilities"]["drop"]]
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            value = resources[("Secret", ref["name"])]["stringData"].get(ref["key"])
            if value is not None:  # else an optional key the development Secret leaves out
                env[e["name"]] = value
    options += [f"--env={k}={v}" for k, v in env.items()]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        if m["name"] in volumes:  # an emptyDir: a tmpfs of the same size
            size = volumes[m["name"]]["emptyDir"]["sizeLimit"].removesuffix("i").lower()
            options += ["--tmpfs", f"{m['mountPath']}:rw,size={size},mode=1777"]
        else:  # the volumeClaimTemplate
            options += ["--volume", f"{volume}:{m['mountPath']}"]
    return options, env, c["args"], int(pod["terminationGracePeriodSeconds"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_container_with_the_kubernetes_pod_settings(
    podman: Podman, image: str, names: str, digits
) -> None:  # type: ignore[no-untyped-def]
    """The StatefulSet's container as podman runs it: its user, read-only root, dropped
    capabilities, emptyDirs as tmpfs, its env (tokens from the development Secret) and args.
    It serves within seconds (the entrypoint seeded NUMBA_CACHE_DIR on the emptyDir), trains
    into the volume and drains within the termination grace period."""
    x, y = digits
    options, env, args, grace = k8s_pod_as_podman_options(f"{names}-pvc")
    podman("volume", "create", f"{names}-pvc")
    name = f"{names}-pod"
    target, started = start(podman, name, image, *options, args=tuple(args))
    took = seconds_to_serving(podman, name, target, started)
    print(f"\nSERVING {took:.1f} s after start with the pod's settings")
    assert took < SERVING_WITHIN
    cache = env["NUMBA_CACHE_DIR"]
    assert podman("exec", name, "ls", cache).stdout.split(), "the kernel cache was not seeded"
    with Client(target, token=env["CNND_ADMIN_TOKEN"], timeout=60) as c:
        data = c.upload_dataset(x[:400], y[:400], name="digits")
        c.create_model(SMALL_SPEC, name="small", seed=0)
        job = c.train("small", data, epochs=2, batch_size=32, lr=0.1).wait(progress=False)
        assert job.state == "SUCCEEDED", job.failure_reason
        assert c.infer("small", x[:8]).classes.shape == (8,)
    assert stop(podman, name, grace) < GRACE_SECONDS
    # --log-format=json from the manifest: one JSON object per line, for the cluster's logging.
    messages = [json.loads(line)["message"] for line in podman.logs(name).splitlines()
                if line.startswith("{")]  # fmt: skip
    assert "SERVING" in messages and "cnnd stopped" in messages
