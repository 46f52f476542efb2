"""launch/k8s/: the Kubernetes manifests are what the published Kubeflow CRDs accept, and their pods train and resume.

No cluster runs here, so this proves what can be proven without one:

- schema: ``trainjob.yaml`` (Kubeflow Trainer v2) and ``pytorchjob-elastic.yaml`` (training-operator v1)
  validate against the ``openAPIV3Schema`` of the CRDs copied into ``launch/k8s/schemas/`` (source named in
  launch/k8s/schemas/README.md), strictly: an unknown field is an error, as with ``kubectl apply --validate=strict``; a broken
  manifest (a wrong type, a misspelt field, a missing required field) is refused;
- pods: the TrainJob's two pods run as two process trees on this machine, each started with only the
  environment the torch-distributed runtime and Kubernetes give a pod (``PET_*``, ``HOSTNAME``,
  ``KUBERNETES_SERVICE_*``, ``JOB_COMPLETION_INDEX``, the manifest's own ``env``, ``PATH``/``HOME`` from the
  image) and the manifest's exact ``command`` and ``args`` (``/runs``, the volume, mapped to a folder here;
  tiny-run overrides appended). One pod gets the kubelet's SIGTERM (eviction, preemption), both are started
  again; later one pod is SIGKILLed with all its processes (a lost node), both are started again (as the
  JobSet restarts a failed job); the final fp64 weights equal an uninterrupted 2-rank run's;
- elastic pods: the PyTorchJob's two workers with the variables training-operator v1.9 sets for an elastic
  job (``PET_RDZV_ENDPOINT``, ``PET_NNODES=1:2``, ...): worker 1 SIGKILLed, worker 0 re-forms alone and
  resumes; worker 1 started again (``restartPolicy: OnFailure``) rejoins; the same final weights.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .agents import AgentGroup
from .helpers import ROOT, TINY, assert_ok, free_port, run_cli, without_exit_barrier_race
from .test_elastic import _listening, assert_same_training

K8S = ROOT / "launch" / "k8s"
SCHEMAS = K8S / "schemas"
MANIFESTS = {"trainjob.yaml": "trainer.kubeflow.org_trainjobs.yaml",
             "pytorchjob-elastic.yaml": "kubeflow.org_pytorchjobs.yaml"}


# ----- schema ---------------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties and does
    not keep unknown fields: the API server would silently drop a misspelt field (or refuse it under
    ``--validate=strict``); here it is an error."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_schema(crd_file: str) -> tuple[str, str, dict[str, Any]]:
    """(apiVersion, kind, strict JSON schema) of the served version of a CRD file."""
    crd = yaml.load((SCHEMAS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v.get("served", True) and v.get("storage", True)]
    schema = strict(version["schema"]["openAPIV3Schema"])
    return f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"], schema


def schema_errors(manifest: dict[str, Any], crd_file: str) -> list[str]:
    """Every reason the API server (with strict field validation) would refuse ``manifest``; [] if none."""
    jsonschema = pytest.importorskip("jsonschema", reason="the [test] extra installs jsonschema")
    api_version, kind, schema = crd_schema(crd_file)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    if (manifest.get("apiVersion"), manifest.get("kind")) != (api_version, kind):
        errors.append(f"apiVersion/kind {manifest.get('apiVersion')}/{manifest.get('kind')} is not the CRD's "
                      f"{api_version}/{kind}")
    return errors


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_the_published_crd(name):
    assert schema_errors(load(name), MANIFESTS[name]) == []


def _trainer(m: dict[str, Any]) -> dict[str, Any]:
    return m["spec"]["trainer"]


def _pod(m: dict[str, Any]) -> dict[str, Any]:
    return m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


BROKEN = {  # name -> (manifest, how to break it, a word the error must name)
    "trainjob numNodes as a string": ("trainjob.yaml", lambda m: _trainer(m).update(numNodes="two"), "numNodes"),
    "trainjob command as a string": ("trainjob.yaml", lambda m: _trainer(m).update(command="torchrun -m ddp_train"),
                                     "command"),
    "trainjob misspelt field": ("trainjob.yaml", lambda m: _trainer(m).update(comand=["torchrun"]), "comand"),
    "trainjob grace period as a string": (
        "trainjob.yaml", lambda m: m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"][0]["template"]["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="2m"),
        "terminationGracePeriodSeconds"),
    "trainjob runtimeRef without name": ("trainjob.yaml", lambda m: m["spec"]["runtimeRef"].pop("name"), "name"),
    "pytorchjob replicas as a string": (
        "pytorchjob-elastic.yaml", lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="2"),
        "replicas"),
    "pytorchjob elastic minReplicas as a string": (
        "pytorchjob-elastic.yaml", lambda m: m["spec"]["elasticPolicy"].update(minReplicas="1"), "minReplicas"),
    "pytorchjob volume mount without path": (
        "pytorchjob-elastic.yaml", lambda m: _pod(m)["containers"][0]["volumeMounts"][0].pop("mountPath"),
        "mountPath"),
    "pytorchjob wrong kind": ("pytorchjob-elastic.yaml", lambda m: m.update(kind="TFJob"), "TFJob"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_refused(case):
    name, breaks, word = BROKEN[case]
    manifest = copy.deepcopy(load(name))
    breaks(manifest)
    errors = schema_errors(manifest, MANIFESTS[name])
    assert errors and any(word in e for e in errors), errors


# ----- two pods on this machine --------------------------------------------------------------------------

EPOCHS, STEPS_PER_EPOCH = 8, 160 // 32  # synthetic_size=200: 160 training images, global batch 32
# The tiny fp64 run of tests/test_elastic.py, appended to the manifest's args (later overrides win).
OVERRIDES = [*TINY, "data.name=synthetic", "data.augment=false", "train.precision=fp64", "checkpoint.every_steps=1",
             "dist.backend=gloo", "dist.hang_timeout_s=10", f"train.epochs={EPOCHS}"]
RESUMED = re.compile(r"resumed from epoch \d+ step \d+ \(global step (\d+)\)")
GRACE_S = 120  # what the kubelet would wait after its SIGTERM (checked against the manifest below)


def container(manifest: dict[str, Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """The pod's container: command, args and its own env (the TrainJob's trainer, the PyTorchJob's worker)."""
    spec = _trainer(manifest) if manifest["kind"] == "TrainJob" else _pod(manifest)["containers"][0]
    return spec["command"], spec["args"], {e["name"]: e["value"] for e in spec.get("env", [])}


def trainjob_env(manifest: dict[str, Any], rank: int, port: int) -> dict[str, str]:
    """The torch-distributed runtime's variables (kubeflow/trainer pkg/constants: TorchEnv*); the master address
    is node 0's pod, here this machine."""
    trainer = _trainer(manifest)
    return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
            "JOB_COMPLETION_INDEX": str(rank)}  # an Indexed Job's pod (JobSet)


def pytorchjob_env(manifest: dict[str, Any], rank: int, port: int) -> dict[str, str]:
    """What training-operator v1.9 sets for a worker of an elastic, worker-only PyTorchJob
    (pkg/controller.v1/pytorch/envvar.go and elastic.go): no rank, the rendezvous at worker 0's pod (here this
    machine, on the manifest's container port)."""
    policy = manifest["spec"]["elasticPolicy"]
    [port_spec] = _pod(manifest)["containers"][0]["ports"]
    assert port_spec["name"] == "pytorchjob-port"  # the port the operator takes the endpoint's from
    env = {"PYTHONUNBUFFERED": "1", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_BACKEND": policy["rdzvBackend"],
           "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
           "PET_MAX_RESTARTS": str(policy["maxRestarts"]), "PET_NPROC_PER_NODE": str(policy["nProcPerNode"])}
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    return env


class Pods(AgentGroup):
    """A job's pods as process trees on this machine, each with only a pod's environment."""

    def __init__(self, folder: Path, manifest_file: str = "trainjob.yaml", nnodes: int = 2) -> None:
        super().__init__()
        self.manifest = load(manifest_file)
        self.command, args, self.manifest_env = container(self.manifest)
        self.operator_env = trainjob_env if self.manifest["kind"] == "TrainJob" else pytorchjob_env
        self.runs = folder / "runs"  # the PersistentVolumeClaim mounted at /runs
        self.args = [a.replace("=/runs", f"={self.runs}") for a in args] + OVERRIDES
        self.folder, self.nnodes, self.port = folder, nnodes, free_port()
        self.name = self.manifest["metadata"]["name"]
        self.run_name = next(a.split("=", 1)[1] for a in args if a.startswith("run_name="))
        self.started = 0

    def env(self, rank: int) -> dict[str, str]:
        """What a pod gets: the image's PATH/HOME, Kubernetes' variables, the manifest's env, the operator's."""
        home = self.folder / "home"
        home.mkdir(exist_ok=True)
        return {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",  # the image's python first
            "HOME": str(home),
            # JobSet's and the training-operator's pod host names
            "HOSTNAME": f"{self.name}-node-0-{rank}" if self.operator_env is trainjob_env else f"{self.name}-worker-{rank}",
            "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_PORT": "tcp://10.96.0.1:443",
            **self.manifest_env,
            **self.operator_env(self.manifest, rank, self.port),
        }

    def start(self, rank: int) -> subprocess.Popen:
        """Start pod ``rank``: the container's command as its first process, in a session of its own."""
        self.started += 1
        with open(self.log_path(self.started), "w") as log:
            pod = subprocess.Popen([*self.command, *self.args], cwd=ROOT, env=self.env(rank), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        pod.log_index = self.started  # type: ignore[attr-defined]
        self.agents.append(pod)
        return pod

    def start_all(self) -> list[subprocess.Popen]:
        return [self.start(rank) for rank in range(self.nnodes)]

    def log_path(self, index: int) -> Path:
        return self.folder / f"pod-start{index}.log"

    def log(self, pod: subprocess.Popen) -> str:
        return self.log_path(pod.log_index).read_text(errors="replace")  # type: ignore[attr-defined]

    def logs(self) -> str:
        return "\n".join(f"--- pod start {i}:\n{self.log_path(i).read_text(errors='replace')[-3000:]}"
                         for i in range(1, self.started + 1))

    def newest_step(self) -> int:
        steps = [int(p.stem.split("-")[1]) for p in (self.runs / self.run_name / "checkpoints").glob("step-*.pt")]
        return max(steps, default=0)

    def wait_for(self, done, timeout: float, what: str, pods: list[subprocess.Popen]) -> float:
        """Poll ``done`` until true (the time.time() it did); fails with the logs on a timeout or when ``pods``
        all ended first."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or all(p.poll() is not None for p in pods):
                pytest.fail(f"no {what} within {timeout:.0f} s (pods: {[p.poll() for p in pods]})\n{self.logs()}")
            time.sleep(0.02)
        return time.time()

    def wait_ended(self, pods: list[subprocess.Popen], timeout: float) -> list[int]:
        """Wait for the pods; after ``timeout`` kill what is left, as the kubelet does after the grace period."""
        deadline = time.monotonic() + timeout
        for pod in pods:
            try:
                pod.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(pod)
        return [p.returncode for p in pods]


def test_manifest_grace_period_covers_torchruns_own_wait():
    """torchrun waits 30 s for its workers after passing SIGTERM on; the kubelet must wait longer."""
    pod = load("trainjob.yaml")["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == GRACE_S > 30
    assert _pod(load("pytorchjob-elastic.yaml"))["terminationGracePeriodSeconds"] == GRACE_S
    assert {"resume=auto", "out_dir=/runs"} <= set(_trainer(load("trainjob.yaml"))["args"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (torchrun --standalone) of the manifests' training."""
    out = tmp_path_factory.mktemp("k8s_ref")
    res = run_cli([*Pods(out).args, f"out_dir={out}", "run_name=ref"], nproc=2)
    assert_ok(res)
    return out / "ref"


@pytest.mark.slow
def test_trainjob_pods_train_and_resume_after_sigterm_and_sigkill(tmp_path, reference):
    """Two pods; SIGTERM to one pod's first process, both started again; SIGKILL of one pod's processes, both
    started again; the run finishes with the weights of the uninterrupted run."""
    total = EPOCHS * STEPS_PER_EPOCH
    with Pods(tmp_path) as pods:
        # 1. Eviction: the kubelet's SIGTERM to pod 1's first process (torchrun); it passes it on.
        first = pods.start_all()
        pods.wait_for(lambda: pods.newest_step() >= 8, 180, "checkpoint of global step 8", first)
        term_at = time.time()
        os.kill(first[1].pid, signal.SIGTERM)
        codes = pods.wait_ended(first, GRACE_S)
        ended_at = time.time()
        stopped = pods.newest_step()
        logs = pods.log(first[0]) + pods.log(first[1])
        # Rank 0 (pod 0) writes the stop checkpoint for the signal that reached rank 1 (pod 1).
        stop = re.search(r"ddp_train: stopped by a signal to another rank; checkpoint \S+/step-0*(\d+)\.pt", logs)
        assert stop and int(stop.group(1)) == stopped, pods.logs()
        assert all(c not in (0, -signal.SIGKILL) for c in codes), (codes, pods.logs())  # ended within the grace
        # 2. The job restarts: both pods again, same command and env; they resume from the stop checkpoint.
        second = pods.start_all()
        restarted_at = time.time()
        resumed_at = pods.wait_for(lambda: RESUMED.search(pods.log(second[0])) is not None, 180, "resume", second)
        assert RESUMED.search(pods.log(second[0])).group(1) == str(stopped), pods.logs()
        pods.wait_for(lambda: pods.newest_step() >= stopped + 8, 180, f"checkpoint of step {stopped + 8}", second)
        # 3. A lost node: every process of pod 0 (rank 0, which holds the run folder's lock) SIGKILLed.
        kill_at = time.time()
        pods.kill(second[0])
        [survivor_code] = pods.wait_ended([second[1]], GRACE_S)
        assert survivor_code not in (0, -signal.SIGKILL), pods.logs()  # it noticed and ended by itself
        # 4. Both started again: the run resumes from the newest checkpoint and finishes.
        third = pods.start_all()
        third_at = time.time()
        resumed2_at = pods.wait_for(lambda: RESUMED.search(pods.log(third[0])) is not None, 180, "resume", third)
        assert pods.wait_ended(third, 300) == [0, 0], pods.logs()
        assert "Traceback" not in without_exit_barrier_race(pods.log(third[0]) + pods.log(third[1])), pods.logs()
    print(f"SIGTERM -> both pods ended {ended_at - term_at:.1f} s; restart -> resumed line {resumed_at - restarted_at:.1f} s "
          f"(SIGTERM -> resumed {resumed_at - term_at:.1f} s); SIGKILL -> resumed line {resumed2_at - kill_at:.1f} s "
          f"(restart -> resumed {resumed2_at - third_at:.1f} s)")
    assert_same_training(tmp_path / "runs" / pods.run_name, reference, total, world_size=2)


WORLD = re.compile(r"resumed from epoch \d+ step \d+ \(global step (\d+)\), world size (\d) -> (\d)")


@pytest.mark.slow
def test_elastic_pytorchjob_worker_lost_then_restarted_rejoins(tmp_path, reference):
    """The elastic PyTorchJob's two workers; worker 1 is SIGKILLed with all its processes: worker 0 re-forms
    alone and resumes; the kubelet starts worker 1 again (restartPolicy: OnFailure): the group stops with a
    checkpoint and re-forms at 2; the run finishes with the weights of the uninterrupted 2-rank run."""
    with Pods(tmp_path, "pytorchjob-elastic.yaml") as pods:
        first = pods.start(0)
        pods.wait_for(lambda: _listening(pods.port), 60, "worker 0 to host the c10d store", [first])
        second = pods.start(1)
        pods.wait_for(lambda: pods.newest_step() >= 8, 180, "checkpoint of global step 8", [first, second])
        kill_at = time.time()
        pods.kill(second)
        down_at = pods.wait_for(lambda: any(m.group(2, 3) == ("2", "1") for m in WORLD.finditer(pods.log(first))),
                                240, "worker 0 resumed alone", [first])
        again = pods.start(1)
        again_at = time.time()
        both = [first, again]
        up_at = pods.wait_for(lambda: any(m.group(2, 3) == ("1", "2") for p in both for m in WORLD.finditer(pods.log(p))),
                              240, "the group re-formed at 2", both)
        codes = pods.wait_ended(both, 300)
    print(f"elastic PyTorchJob: SIGKILL -> resumed alone {down_at - kill_at:.1f} s; worker restarted -> resumed at "
          f"2 {up_at - again_at:.1f} s")
    assert codes == [0, 0], pods.logs()
    assert_same_training(tmp_path / "runs" / pods.run_name, reference, EPOCHS * STEPS_PER_EPOCH, world_size=2)
