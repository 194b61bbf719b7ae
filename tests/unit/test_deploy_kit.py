"""The deployment kit in workers/: every file parses, has what it must, and agrees with the CLI.

No network and no container engine: YAML is read with PyYAML, systemd units with configparser,
the Containerfile line by line. Every ``--option`` of a ``taskmesh`` command and every
``TASKMESH_*`` variable that the kit mentions is checked against the real typer app, so the kit
cannot drift from the code. ``systemd-analyze verify`` and ``kubectl kustomize`` run too when
they are installed.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from taskmesh.cli import app

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "workers"
SYSTEMD = KIT / "systemd"
WORKER_UNIT = SYSTEMD / "taskmesh-worker@.service"
BROKER_UNIT = SYSTEMD / "taskmesh-broker.service"
WORKER_ENV = SYSTEMD / "worker.env.example"
BROKER_ENV = SYSTEMD / "broker.env.example"
CONTAINERFILE = KIT / "container" / "Containerfile"
COMPOSE = KIT / "compose" / "compose.yaml"
K8S = KIT / "kubernetes"
KIT_FILES = [
    WORKER_UNIT,
    BROKER_UNIT,
    WORKER_ENV,
    BROKER_ENV,
    CONTAINERFILE,
    COMPOSE,
    *sorted(K8S.glob("*.yaml")),
    KIT / "README.md",
]

# The CurveZMQ key files: listed, commented out, in worker.env.example.
KEY_VARS = frozenset({"TASKMESH_CURVE_SECRET", "TASKMESH_BROKER_KEY"})

# `taskmesh CMD ...` in free text (shell lines, comments, scripts); an image tag may follow the
# name (`taskmesh:0.1.0 worker --concurrency 8`). The words end at a shell operator.
INVOCATION_RE = re.compile(r"(?<![\w/.-])taskmesh(?::[\w.-]+)?[ \t]+([a-z][^\n|;&>)`]*)")
OPTION_RE = re.compile(r"^--[a-z][a-z0-9-]*")
VAR_RE = re.compile(r"\bTASKMESH_[A-Z0-9_]+\b")


# ------------------------------------------------------------------------------ the real CLI


@functools.cache
def cli() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Each command's long options and TASKMESH_* variables, read from the typer app.

    A command of a group is named with a space (``keys generate``); the group itself has none.
    """
    commands = {}
    pending = [("", typer.main.get_command(app))]
    while pending:
        prefix, group = pending.pop()
        for name, command in group.commands.items():  # type: ignore[attr-defined]
            if hasattr(command, "commands"):
                pending.append((f"{prefix}{name} ", command))
            else:
                commands[f"{prefix}{name}"] = parameters(command)
    return commands


def parameters(command: Any) -> tuple[frozenset[str], frozenset[str]]:
    options = {"--help"}
    envvars = set()
    for param in command.params:
        options.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            envvars.add(envvar)
        elif envvar:
            envvars.update(envvar)
    return frozenset(options), frozenset(envvars)


def command_of(words: list[str]) -> tuple[str | None, int]:
    """The command that ``words`` (what follows ``taskmesh``) name, and how many words it took."""
    for size in (2, 1):
        name = " ".join(words[:size])
        if len(words) >= size and name in cli():
            return name, size
    return None, 0


def options_of(command: str) -> frozenset[str]:
    return cli()[command][0]


def vars_of(*commands: str) -> frozenset[str]:
    return frozenset().union(*(cli()[c][1] for c in commands))


def all_vars() -> frozenset[str]:
    return vars_of(*cli())


def check_argv(argv: list[str], where: str) -> str:
    """``argv`` runs ``taskmesh COMMAND --options...``; every long option must exist."""
    assert argv, f"{where}: empty command"
    assert Path(argv[0]).name == "taskmesh", f"{where}: {argv} does not run taskmesh"
    command, size = command_of(argv[1:])
    assert command, f"{where}: {argv} names no taskmesh command"
    for arg in argv[1 + size :]:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert option in options_of(command), f"{where}: `taskmesh {command}` has no {option}"
    return command


def check_text(text: str, where: str) -> list[str]:
    """Check every ``taskmesh CMD --option`` written in free text; return the commands seen."""
    text = text.replace("\\\n", " ")  # shell line continuations
    seen = []
    for match in INVOCATION_RE.finditer(text):
        words = match.group(1).split()
        command, size = command_of(words)
        if command is None:
            continue  # prose such as "the taskmesh image"
        seen.append(command)
        for token in words[size:]:
            found = OPTION_RE.match(token.strip("\"'[],"))
            if found:
                option = found.group()
                assert option in options_of(command), (
                    f"{where}: `taskmesh {command}` has no {option}: {match.group().strip()}"
                )
    return seen


# ------------------------------------------------------------------------------ readers


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def read_env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """The active VAR=value lines, and the names of commented-out ``#VAR=`` lines."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if match := re.fullmatch(r"#\s*(TASKMESH_[A-Z0-9_]+)=.*", line):
            commented.add(match.group(1))
        elif line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not VAR=value: {line!r}"
            active[key.strip()] = value.strip()
    return active, commented


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined and comments dropped."""
    lines = [
        line for line in CONTAINERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@functools.cache
def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for (k, _), obj in k8s_objects().items() if k == kind]


def deployment(name: str) -> dict[str, Any]:
    return k8s_objects()[("Deployment", name)]


def container(name: str) -> dict[str, Any]:
    (only,) = deployment(name)["spec"]["template"]["spec"]["containers"]
    return only


def k8s_argv(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", ["taskmesh"]), *c.get("args", [])]  # the image's entrypoint


def compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return ["taskmesh", *(shlex.split(command) if isinstance(command, str) else command)]


def probe_commands(c: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in c, f"container {c['name']} has no {probe}"
        yield probe, c[probe]["exec"]["command"]


# ------------------------------------------------------------------------------ the CLI itself


def test_the_cli_introspection_sees_the_commands_the_kit_uses() -> None:
    assert {"broker", "worker", "status"} <= set(cli())
    assert {"--broker", "--json"} <= options_of("status")
    assert {"--bind", "--journal", "--insecure"} <= options_of("broker")
    assert {"TASKMESH_BROKER", "TASKMESH_CONCURRENCY", "TASKMESH_QUEUES"} <= vars_of("worker")


@pytest.mark.parametrize("path", sorted(KIT.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------------------------ systemd


def test_worker_unit_is_a_restarting_hardened_template() -> None:
    unit = read_unit(WORKER_UNIT)
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service.get("RestartSec")
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1
    assert service["EnvironmentFile"] == "/etc/taskmesh/worker.env"
    argv = shlex.split(service["ExecStart"])
    assert check_argv(argv, "ExecStart") == "worker"
    assert argv[argv.index("--name") + 1] == "%i", "the instance name is the worker name"
    # graceful shutdown: SIGTERM to the supervisor only, time to finish, then SIGKILL
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert service["TimeoutStopSec"]
    # a dedicated user, and hardening that leaves forking executors alone
    assert service["User"] not in ("", "root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["StateDirectory"]
    assert service["WorkingDirectory"].startswith("%S/")
    for breaks_tasks in ("MemoryDenyWriteExecute", "PrivateDevices", "RemoveIPC", "DynamicUser"):
        assert breaks_tasks not in service, f"{breaks_tasks} breaks tasks or sibling workers"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_broker_unit_keeps_its_journal_in_its_state_directory() -> None:
    unit = read_unit(BROKER_UNIT)
    service = unit["Service"]
    assert check_argv(shlex.split(service["ExecStart"]), "ExecStart") == "broker"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"]
    assert service["User"] not in ("", "root", "0")
    state = service["StateDirectory"]
    key, _, journal = service["Environment"].partition("=")
    assert key == "TASKMESH_JOURNAL" and key in vars_of("broker")
    assert journal.startswith(f"%S/{state}/"), "the journal must live in the state directory"
    assert service["EnvironmentFile"].startswith("-"), "broker.env is optional"


def test_env_examples_list_the_settings_and_only_real_variables() -> None:
    active, commented = read_env_file(WORKER_ENV)
    assert {"TASKMESH_BROKER", "TASKMESH_CONCURRENCY", "TASKMESH_QUEUES"} <= set(active)
    assert commented >= KEY_VARS
    assert active.keys() | commented <= vars_of("worker")

    active, commented = read_env_file(BROKER_ENV)
    assert active.keys() | commented <= vars_of("broker")
    assert {"TASKMESH_BIND", "TASKMESH_INSECURE"} <= active.keys() | commented

    # the flags named beside the variables (full `taskmesh ...` commands are checked elsewhere)
    for path, command in ((WORKER_ENV, "worker"), (BROKER_ENV, "broker")):
        bare = INVOCATION_RE.sub("", path.read_text())
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", bare):
            assert option in options_of(command), f"{path.name}: no `taskmesh {command} {option}`"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at a real executable
    for unit in (WORKER_UNIT, BROKER_UNIT):
        text = unit.read_text().replace("/opt/taskmesh/bin/taskmesh", sys.executable)
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", "taskmesh-broker.service", "taskmesh-worker@w1.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # systemd older than 254 warns about the backoff keys and ignores them, by design
    tolerated = re.compile(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'")
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "taskmesh-" in line and not tolerated.search(line)
    ]
    assert not problems, "\n".join(problems)
    if done.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()[:300]}")


# ------------------------------------------------------------------------------ container


def test_containerfile_builds_a_non_root_taskmesh_image_with_a_healthcheck() -> None:
    instructions = containerfile_instructions()
    words = [word for word, _ in instructions]
    assert words[0] == "FROM"
    assert instructions[0][1] == "python:3.11-slim"
    args = dict(instructions)  # the last of each instruction wins, as in a build
    assert any(word == "RUN" and "pip install ." in rest for word, rest in instructions)
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert json.loads(args["ENTRYPOINT"]) == ["taskmesh"]
    assert check_argv(["taskmesh", *json.loads(args["CMD"])], "CMD") == "worker"
    assert args["STOPSIGNAL"] == "SIGTERM"
    healthcheck = args["HEALTHCHECK"]
    assert "CMD" in healthcheck.split()
    assert "status" in check_text(healthcheck, "HEALTHCHECK")
    # the Kubernetes manifests rely on this uid
    for name in ("taskmesh-broker", "taskmesh-worker"):
        pod = deployment(name)["spec"]["template"]["spec"]
        assert str(pod["securityContext"]["runAsUser"]) == user


# ------------------------------------------------------------------------------ compose


def test_compose_runs_a_broker_and_a_scalable_worker_service() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    broker, worker = services["broker"], services["worker"]

    argv = compose_argv(broker)
    assert check_argv(argv, "broker command") == "broker"
    assert argv[argv.index("--bind") + 1] == "tcp://0.0.0.0:5555"
    assert "--insecure" in argv
    journal = argv[argv.index("--journal") + 1]
    volume, _, mount = broker["volumes"][0].partition(":")
    assert volume in compose["volumes"], "the journal must be on a named volume"
    assert journal.startswith(mount.rstrip("/") + "/")
    comment = COMPOSE.read_text().lower()
    assert "private network" in comment and "keys" in comment, "say when --insecure is fine"

    assert check_argv(compose_argv(worker), "worker command") == "worker"
    assert worker["environment"]["TASKMESH_BROKER"] == "tcp://broker:5555"
    assert set(worker["environment"]) <= vars_of("worker")
    assert "container_name" not in worker and "ports" not in worker, "--scale needs neither"
    assert worker["depends_on"]["broker"]["condition"] == "service_healthy"
    assert worker["stop_grace_period"]

    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        assert check_argv(test[1:], f"{name} healthcheck") == "status"
        assert "--json" in test
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
        assert service["image"] == services["broker"]["image"]


# ------------------------------------------------------------------------------ kubernetes


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(kind for kind, _ in k8s_objects())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim", "Service"]


def test_broker_is_one_recreated_pod_with_its_journal_on_a_claim() -> None:
    spec = deployment("taskmesh-broker")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    c = container("taskmesh-broker")
    argv = k8s_argv(c)
    assert check_argv(argv, "broker args") == "broker"
    journal = argv[argv.index("--journal") + 1]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    (pvc,) = objects_of_kind("PersistentVolumeClaim")
    mounts = [m for m in c["volumeMounts"] if claims.get(m["name"]) == pvc["metadata"]["name"]]
    assert mounts and journal.startswith(mounts[0]["mountPath"].rstrip("/") + "/")
    assert pod["securityContext"]["fsGroup"], "the claim must be writable by the image's user"
    assert pod["terminationGracePeriodSeconds"] >= 10

    (service,) = objects_of_kind("Service")
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    assert argv[argv.index("--bind") + 1].endswith(f":{port['port']}")

    for probe, command in probe_commands(c):
        assert check_argv(command, f"broker {probe}") == "status" and "--json" in command


def test_workers_have_resources_probes_graceful_shutdown_and_a_configmap() -> None:
    spec = deployment("taskmesh-worker")["spec"]
    pod = spec["template"]["spec"]
    c = container("taskmesh-worker")
    assert check_argv(k8s_argv(c), "worker args") == "worker"
    assert c["image"] == container("taskmesh-broker")["image"]
    images = {i["name"] for i in load_yaml(K8S / "kustomization.yaml")["images"]}
    assert c["image"] in images
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    assert pod["terminationGracePeriodSeconds"] >= 30

    for probe, command in probe_commands(c):
        assert command[:2] == ["sh", "-c"], f"{probe}: a shell script (see the next test)"
        script = command[2]
        assert "status" in check_text(script, probe)
        assert "taskmesh status --broker" in script and "--json" in script

    (configmap,) = objects_of_kind("ConfigMap")
    refs = [e["configMapRef"]["name"] for e in c["envFrom"]]
    assert refs == [configmap["metadata"]["name"]]
    assert set(configmap["data"]) <= vars_of("worker")
    assert {e["name"] for e in c.get("env", [])} <= vars_of("worker")
    # the probes look for this name in the broker's list of workers
    (name,) = [e for e in c["env"] if e["name"] == "TASKMESH_WORKER_NAME"]
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (service,) = objects_of_kind("Service")
    expected = f"tcp://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert configmap["data"]["TASKMESH_BROKER"] == expected
    assert all(isinstance(v, str) for v in configmap["data"].values()), (
        "ConfigMap values are strings"
    )


@pytest.fixture()
def fake_taskmesh(tmp_path: Path) -> dict[str, str]:
    """A ``taskmesh`` on PATH that answers ``status`` from a file, or fails like no broker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "taskmesh"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2 $3 $4" = "status --broker $TASKMESH_BROKER --json" ] || exit 3\n'
        '[ -f "$FAKE_SNAPSHOT" ] || { echo "taskmesh: no broker answered" >&2; exit 1; }\n'
        'cat "$FAKE_SNAPSHOT"\n'
    )
    script.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "TASKMESH_BROKER": "tcp://taskmesh-broker:5555",
        "TASKMESH_WORKER_NAME": "taskmesh-worker-abc12",
        "FAKE_SNAPSHOT": str(tmp_path / "snapshot.json"),
    }


@pytest.mark.parametrize(
    ("listed", "ready", "alive"),
    [
        (None, 1, 0),  # no broker: not ready, but restarting would not help
        (["taskmesh-worker-abc12", "other"], 0, 0),
        (["other"], 1, 1),  # the broker answers and has forgotten this worker
        ([], 1, 1),
    ],
)
def test_worker_probes_decide_as_documented(
    fake_taskmesh: dict[str, str], listed: list[str] | None, ready: int, alive: int
) -> None:
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    if listed is not None:
        workers = [{"name": n, "state": "alive"} for n in listed]
        Path(fake_taskmesh["FAKE_SNAPSHOT"]).write_text(json.dumps({"workers": workers}))
    c = container("taskmesh-worker")
    codes = {}
    for probe, command in probe_commands(c):
        done = subprocess.run(
            command, env=fake_taskmesh, capture_output=True, text=True, timeout=30
        )
        assert done.returncode in (0, 1), f"{probe}: {done.returncode} {done.stderr}"
        codes[probe] = done.returncode
    assert codes == {"readinessProbe": ready, "livenessProbe": alive}


def test_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    built = list(yaml.safe_load_all(done.stdout))
    assert len(built) == len(k8s_objects())
    images = {
        c["image"]
        for obj in built
        if obj["kind"] == "Deployment"
        for c in obj["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1 and ":" in images.pop()


# ------------------------------------------------------------------------------ drift


def structured_invocations() -> Iterator[tuple[str, list[str]]]:
    for unit in (WORKER_UNIT, BROKER_UNIT):
        yield unit.name, shlex.split(read_unit(unit)["Service"]["ExecStart"])
    instructions = dict(containerfile_instructions())
    yield (
        "Containerfile",
        [*json.loads(instructions["ENTRYPOINT"]), *json.loads(instructions["CMD"])],
    )
    for name, service in load_yaml(COMPOSE)["services"].items():
        yield f"compose {name}", compose_argv(service)
        yield f"compose {name} healthcheck", service["healthcheck"]["test"][1:]
    for name in ("taskmesh-broker", "taskmesh-worker"):
        c = container(name)
        yield f"{name} container", k8s_argv(c)
        for probe, command in probe_commands(c):
            if command[0] == "taskmesh":
                yield f"{name} {probe}", command


def test_every_command_and_option_in_the_kit_exists_in_the_cli() -> None:
    seen = set()
    for where, argv in structured_invocations():
        seen.add(check_argv(argv, where))
    for path in KIT_FILES:
        seen.update(check_text(path.read_text(), path.name))
    assert {"broker", "worker", "status"} <= seen


@pytest.mark.parametrize("path", KIT_FILES, ids=lambda p: p.name)
def test_every_taskmesh_variable_in_the_kit_exists_in_the_cli(path: Path) -> None:
    text = path.read_text()
    # the multi-host launcher's own settings are read by workers/netns.py, not by taskmesh
    launcher = set(VAR_RE.findall((KIT / "netns.py").read_text()))
    unknown = set(VAR_RE.findall(text)) - all_vars() - launcher
    assert not unknown, f"{path.name} uses variables taskmesh does not read: {sorted(unknown)}"


@pytest.mark.parametrize("path", KIT_FILES, ids=lambda p: p.name)
def test_kit_files_hold_no_path_of_the_machine_they_were_written_on(path: Path) -> None:
    text = path.read_text()
    assert str(ROOT) not in text
    assert not re.search(r"/home/\w|/Users/\w", text)
