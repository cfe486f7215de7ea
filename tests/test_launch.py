"""Tests for the cloud launch scripts in launch/ (no gcloud, no network).

Every script runs under bash with a fake `gcloud` (and `git`) first on PATH.
The fakes record each call; with --dry-run nothing may be recorded.  The
printed `+ ...` lines are parsed with shlex and compared token by token; the
remote shell commands they carry are also executed locally (in a throw-away
HOME, with a fake python) to check the quoting end to end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
GPU = LAUNCH / "gpu_vm.sh"
COMMON = LAUNCH / "common.sh"

BASH = shutil.which("bash") or "bash"

TPU_BASE = ["--name", "my-tpu", "--zone", "us-central2-b"]
GPU_BASE = ["--name", "my-gpu", "--zone", "us-central1-a"]
GS = "gs://my-bucket/ccmr/run1"
# Passthrough arguments that need careful quoting on their way to the program.
TRICKY = ["--config.num_tasks=3", "--config.name=my run", "it's", '$HOME"`x`\\', "--config.empty="]


# ---------------------------------------------------------------------------
# harness


class Env:
    """A temp PATH with fake gcloud/git that log their calls as JSON lines."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.calls_file = tmp / "calls.jsonl"
        recorder = (
            f'{shlex.quote(sys.executable)} -c "import json, sys; '
            f"open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')\" "
            f"{shlex.quote(str(self.calls_file))}"
        )
        self._fake(
            "gcloud",
            f"""
            {recorder} gcloud "$@"
            case " $* " in *" describe "*) echo "${{FAKE_ACCEL:-v4-8}}" ;; esac
            if [ -n "${{FAKE_FAIL:-}}" ]; then
              case " $* " in *"$FAKE_FAIL"*) exit 1 ;; esac
            fi
            exit 0
            """,
        )
        self._fake("git", f'{recorder} git "$@"\nexit 0\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CCMR_", "FAKE_"))}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            TMPDIR=str(tmp),
            LC_ALL="C",
        )

    def _fake(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(0o755)

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def run(self, script: Path, *args: str, extra_env: dict | None = None):
        env = dict(self.env, **(extra_env or {}))
        res = subprocess.run(
            [BASH, str(script), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.tmp,
            timeout=30,
        )
        if "--dry-run" in args:
            assert self.calls() == [], "a command was executed under --dry-run"
            for line in res.stdout.splitlines():
                assert line.startswith("+ "), f"unexpected stdout line under --dry-run: {line!r}"
        return res


@pytest.fixture
def sh(tmp_path):
    return Env(tmp_path)


def commands(stdout: str) -> list[list[str]]:
    """Token lists of the printed `+ CMD` lines."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud(stdout: str) -> list[list[str]]:
    return [c for c in commands(stdout) if c and c[0] == "gcloud"]


def opt(cmd: list[str], flag: str) -> str:
    values = [t.split("=", 1)[1] for t in cmd if t.startswith(flag + "=")]
    assert len(values) == 1, (flag, cmd)
    return values[0]


def verb(cmd: list[str]) -> tuple[str, ...]:
    """('compute', 'tpus', 'tpu-vm', 'ssh') etc.: the words before the name."""
    words = []
    for t in cmd[1:]:
        if t.startswith("-") or t in {"my-tpu", "my-gpu"} or t.startswith(("/", "gs://")):
            break
        words.append(t)
    return tuple(words)


def ok(res) -> None:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def usage_error(res, *needles: str) -> None:
    assert res.returncode == 2, f"rc={res.returncode}\nstderr:\n{res.stderr}"
    assert "Usage:" in res.stderr
    for needle in needles:
        assert needle in res.stderr
    assert res.stdout == ""


TPU_SSH = ("compute", "tpus", "tpu-vm", "ssh")
TPU_SCP = ("compute", "tpus", "tpu-vm", "scp")


# ---------------------------------------------------------------------------
# generic


@pytest.mark.parametrize("script", [COMMON, TPU, GPU], ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run([BASH, "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_scripts_are_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(sh, script, flag):
    for args in ([flag], ["run", flag], ["create", "--name", "x", flag]):
        res = sh.run(script, *args)
        ok(res)
        assert res.stdout.startswith("Usage:")
        for word in ("create", "setup", "run", "fetch", "delete", "--dry-run", "--workdir"):
            assert word in res.stdout
    assert sh.calls() == []


@pytest.mark.parametrize(
    "script,args,needle",
    [
        (TPU, ["create", "--zone", "z", "--dry-run"], "--name"),
        (TPU, ["create", "--name", "n", "--dry-run"], "--zone"),
        (TPU, ["setup", "--zone", "z", "--dry-run"], "--name"),
        (TPU, ["run", *TPU_BASE, "--dry-run"], "--workdir"),
        (TPU, ["all", *TPU_BASE, "--dry-run"], "--workdir"),
        (TPU, ["fetch", "--dry-run"], "--workdir"),
        (TPU, ["fetch", "--workdir", "runs/x", "--dry-run"], "--name"),
        (TPU, ["delete", "--name", "n", "--dry-run"], "--zone"),
        (GPU, ["create", "--zone", "z", "--dry-run"], "--name"),
        (GPU, ["create", "--name", "n", "--dry-run"], "--zone"),
        (GPU, ["run", *GPU_BASE, "--dry-run"], "--workdir"),
        (GPU, ["all", *GPU_BASE, "--dry-run"], "--workdir"),
        (GPU, ["fetch", "--dry-run"], "--workdir"),
    ],
)
def test_missing_required_flag(sh, script, args, needle):
    res = sh.run(script, *args)
    usage_error(res, needle, "missing required flag")


N_Z = ["--name", "n", "--zone", "z"]


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "missing subcommand"),
        (["launch", *N_Z], "unknown subcommand: launch"),
        (["create", *N_Z, "--bogus"], "unknown option: --bogus"),
        (["create", "--zone", "z", "--name"], "--name needs a value"),
        (["create", "--zone", "z", "--name="], "--name needs a non-empty value"),
        (["create", *N_Z, "--keep=yes"], "--keep takes no value"),
        (["create", *N_Z, "extra"], "unexpected argument: extra"),
        (["create", *N_Z, "--spot", "--preemptible"], "mutually exclusive"),
    ],
)
def test_bad_arguments(sh, script, args, needle):
    usage_error(sh.run(script, "--dry-run", *args), needle)


def test_env_defaults(sh):
    res = sh.run(TPU, "delete", "--dry-run", extra_env={"CCMR_NAME": "my-tpu", "CCMR_ZONE": "europe-west4-a"})
    ok(res)
    assert gcloud(res.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=europe-west4-a", "--quiet"]
    ]


@pytest.mark.parametrize("script,base", [(TPU, TPU_BASE), (GPU, GPU_BASE)], ids=["tpu", "gpu"])
def test_project_flag_only_when_given(sh, script, base):
    for sub in ("all", "logs", "stop"):  # `all` = create, setup, run, fetch, delete
        args = [sub, *base, "--workdir", GS, "--dry-run"]
        res = sh.run(script, *args)
        ok(res)
        assert gcloud(res.stdout)
        assert not any(t.startswith("--project") for c in gcloud(res.stdout) for t in c), sub
        res = sh.run(script, *args, "--project", "my-proj")
        ok(res)
        for c in gcloud(res.stdout):
            assert c[-1] == "--project=my-proj", c


# ---------------------------------------------------------------------------
# TPU


def test_tpu_create(sh):
    res = sh.run(TPU, "create", *TPU_BASE, "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "my-tpu",
            "--zone=us-central2-b",
            "--accelerator-type=v4-8",
            "--version=tpu-ubuntu2204-base",
        ]
    ]


def test_tpu_create_options(sh):
    res = sh.run(
        TPU,
        "create",
        "--name=my-tpu",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--runtime-version",
        "v2-alpha-tpuv5-lite",
        "--spot",
        "--project",
        "p1",
        "--dry-run",
    )
    ok(res)
    assert gcloud(res.stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "my-tpu",
            "--zone=us-west4-a",
            "--accelerator-type=v5litepod-8",
            "--version=v2-alpha-tpuv5-lite",
            "--spot",
            "--project=p1",
        ]
    ]
    res = sh.run(TPU, "create", *TPU_BASE, "--preemptible", "--version", "my-version", "--dry-run")
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert cmd[-2:] == ["--version=my-version", "--preemptible"]


@pytest.mark.parametrize(
    "accel,version",
    [
        ("v2-8", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v4-64", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_default_version(sh, accel, version):
    res = sh.run(TPU, "create", *TPU_BASE, "--accelerator-type", accel, "--dry-run")
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert opt(cmd, "--accelerator-type") == accel
    assert opt(cmd, "--version") == version


def test_tpu_bad_accelerator_type(sh):
    usage_error(
        sh.run(TPU, "create", *TPU_BASE, "--accelerator-type", "v4", "--dry-run"), "--accelerator-type"
    )


def test_tpu_setup_copies_checkout(sh):
    res = sh.run(TPU, "setup", *TPU_BASE, "--dry-run")
    ok(res)
    cmds = commands(res.stdout)
    tarball = str(sh.tmp / "ccmr_jax-my-tpu.tar.gz")
    assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
    scp, ssh = gcloud(res.stdout)
    assert scp == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        "my-tpu:ccmr_jax.tar.gz",
        "--zone=us-central2-b",
        "--worker=all",
    ]
    assert ssh[:8] == ["gcloud", *TPU_SSH, "my-tpu", "--zone=us-central2-b", "--worker=all"]
    remote = opt(ssh, "--command")
    assert "tar -xzf ~/ccmr_jax.tar.gz -C ~/ccmr_jax" in remote
    assert "python3 -m venv ~/ccmr_venv" in remote
    assert '~/ccmr_venv/bin/python -m pip install -e ".[tpu,data]"' in remote
    assert remote.index("tar -xzf") < remote.index("pip install -e")


def test_tpu_setup_from_repo(sh):
    url = "https://github.com/example/ccmr_jax.git"
    res = sh.run(TPU, "setup", *TPU_BASE, "--repo", url, "--python", "python3.11", "--dry-run")
    ok(res)
    (ssh,) = gcloud(res.stdout)
    assert [c[0] for c in commands(res.stdout)] == ["gcloud"]  # no git archive, no scp
    assert verb(ssh) == TPU_SSH and "--worker=all" in ssh
    remote = opt(ssh, "--command")
    assert f"git clone --depth=1 {url} ~/ccmr_jax" in remote
    assert "python3.11 -m venv ~/ccmr_venv" in remote
    assert "apt_get install -y python3.11 python3.11-venv" in remote


def test_tpu_run(sh):
    res = sh.run(TPU, "run", *TPU_BASE, "--workdir", GS, "--dry-run", "--", *TRICKY)
    ok(res)
    describe, start, follow = gcloud(res.stdout)
    assert describe == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        "my-tpu",
        "--zone=us-central2-b",
        "--format=value(acceleratorType)",
    ]
    assert start[:8] == ["gcloud", *TPU_SSH, "my-tpu", "--zone=us-central2-b", "--worker=all"]
    remote = opt(start, "--command")
    assert (
        f"python -m ccmr_jax.main --config=configs/flickr.py --workdir={GS} --config.num_tasks=3 " in remote
    )
    assert "--config.multihost=True" not in remote  # v4-8 is a single host
    assert "nohup setsid bash -c" in remote and "~/ccmr_run.log" in remote
    assert follow[:8] == ["gcloud", *TPU_SSH, "my-tpu", "--zone=us-central2-b", "--worker=0"]
    assert "tail -n +1 -F --pid=" in opt(follow, "--command")


def test_tpu_run_multihost_and_config(sh):
    res = sh.run(
        TPU,
        "run",
        *TPU_BASE,
        "--accelerator-type",
        "v4-32",
        "--workdir",
        GS,
        "--config",
        "configs/coco.py",
        "--no-follow",
        "--dry-run",
        "--",
        "--config.seed=7",
    )
    ok(res)
    describe, start = gcloud(res.stdout)
    assert verb(describe) == ("compute", "tpus", "tpu-vm", "describe")
    assert "--worker=all" in start
    assert (
        "python -m ccmr_jax.main --config=configs/coco.py "
        f"--workdir={GS} --config.multihost=True --config.seed=7 ;" in opt(start, "--command")
    )


@pytest.mark.parametrize(
    "accel", ["v2-32", "v3-32", "v4-16", "v4-32", "v5litepod-16", "v5p-16", "v6e-16", "v6e-256"]
)
def test_tpu_multihost_refuses_local_workdir(sh, accel):
    for sub, workdir in [("run", "runs/x"), ("all", "/tmp/ccmr")]:
        res = sh.run(TPU, sub, *TPU_BASE, "--accelerator-type", accel, "--workdir", workdir, "--dry-run")
        assert res.returncode != 0
        assert res.stdout == ""  # refused before any gcloud command (nothing is created)
        assert "--workdir must be a gs:// path" in res.stderr
        assert accel in res.stderr and "every worker" in res.stderr and "same workdir" in res.stderr


@pytest.mark.parametrize("accel", ["v2-8", "v4-8", "v5litepod-8", "v5litepod-4", "v5p-8", "v6e-8"])
def test_tpu_single_host_accepts_local_workdir(sh, accel):
    res = sh.run(TPU, "run", *TPU_BASE, "--accelerator-type", accel, "--workdir", "runs/x", "--dry-run")
    ok(res)
    remote = opt(gcloud(res.stdout)[1], "--command")
    # a relative local workdir is made relative to the remote home (not the checkout)
    assert 'python -m ccmr_jax.main --config=configs/flickr.py --workdir=\\"\\$HOME\\"/runs/x ;' in remote


def test_tpu_logs_and_stop(sh):
    res = sh.run(TPU, "logs", *TPU_BASE, "--worker", "3", "--dry-run")
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert cmd[:8] == ["gcloud", *TPU_SSH, "my-tpu", "--zone=us-central2-b", "--worker=3"]
    usage_error(sh.run(TPU, "logs", *TPU_BASE, "--worker", "x", "--dry-run"), "--worker")
    res = sh.run(TPU, "stop", *TPU_BASE, "--dry-run")
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert cmd[:8] == ["gcloud", *TPU_SSH, "my-tpu", "--zone=us-central2-b", "--worker=all"]
    assert "kill -TERM" in opt(cmd, "--command")


def test_tpu_fetch(sh):
    res = sh.run(TPU, "fetch", "--workdir", GS, "--dest", "out dir", "--dry-run")
    ok(res)
    assert commands(res.stdout) == [
        ["mkdir", "-p", "out dir"],
        ["gcloud", "storage", "cp", "-r", GS, "out dir"],
    ]
    res = sh.run(TPU, "fetch", *TPU_BASE, "--workdir", "runs/x", "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        [
            "gcloud",
            *TPU_SCP,
            "--recurse",
            "my-tpu:runs/x",
            "results",
            "--zone=us-central2-b",
            "--worker=0",
        ]
    ]
    for workdir, remote in [("/data/runs/x", "my-tpu:/data/runs/x"), ("~/runs/y", "my-tpu:runs/y")]:
        res = sh.run(TPU, "fetch", *TPU_BASE, "--workdir", workdir, "--dry-run")
        ok(res)
        assert gcloud(res.stdout)[0][6] == remote


def test_tpu_delete(sh):
    res = sh.run(TPU, "delete", *TPU_BASE, "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-central2-b", "--quiet"]
    ]


def test_tpu_all(sh):
    res = sh.run(
        TPU,
        "all",
        *TPU_BASE,
        "--accelerator-type",
        "v4-16",
        "--workdir",
        GS,
        "--dry-run",
        "--",
        "--config.seed=1",
    )
    ok(res)
    steps = [
        (verb(c), opt(c, "--worker") if any(t.startswith("--worker=") for t in c) else None)
        for c in gcloud(res.stdout)
    ]
    assert steps == [
        (("compute", "tpus", "tpu-vm", "create"), None),
        (TPU_SCP, "all"),
        (TPU_SSH, "all"),  # setup
        (TPU_SSH, "all"),  # start
        (TPU_SSH, "0"),  # follow
        (("storage", "cp"), None),
        (("compute", "tpus", "tpu-vm", "delete"), None),
    ]
    start = opt(gcloud(res.stdout)[3], "--command")
    assert f"--workdir={GS} --config.multihost=True --config.seed=1 ;" in start
    res = sh.run(TPU, "all", *TPU_BASE, "--workdir", GS, "--keep", "--dry-run")
    ok(res)
    assert verb(gcloud(res.stdout)[-1]) == ("storage", "cp")
    usage_error(sh.run(TPU, "all", *TPU_BASE, "--workdir", GS, "--no-follow", "--dry-run"), "--no-follow")


# ---------------------------------------------------------------------------
# GPU VM


def test_gpu_create(sh):
    res = sh.run(GPU, "create", *GPU_BASE, "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        [
            "gcloud",
            "compute",
            "instances",
            "create",
            "my-gpu",
            "--zone=us-central1-a",
            "--machine-type=g2-standard-8",
            "--accelerator=type=nvidia-l4,count=1",
            "--image-family=common-cu128-ubuntu-2204-nvidia-570",
            "--image-project=deeplearning-platform-release",
            "--boot-disk-size=200GB",
            "--maintenance-policy=TERMINATE",
            "--metadata=install-nvidia-driver=True",
            "--scopes=default,storage-rw",
        ]
    ]


@pytest.mark.parametrize(
    "gpu,count,machine,accelerator",
    [
        ("nvidia-l4", "4", "g2-standard-48", True),
        ("nvidia-tesla-t4", "2", "n1-standard-16", True),
        ("nvidia-tesla-a100", "8", "a2-highgpu-8g", True),
        ("nvidia-a100-80gb", "1", "a2-ultragpu-1g", True),
        ("nvidia-h100-80gb", "8", "a3-highgpu-8g", False),
    ],
)
def test_gpu_create_machine_types(sh, gpu, count, machine, accelerator):
    res = sh.run(GPU, "create", *GPU_BASE, "--gpu-type", gpu, "--gpu-count", count, "--spot", "--dry-run")
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert opt(cmd, "--machine-type") == machine
    accel = [t for t in cmd if t.startswith("--accelerator=")]
    assert accel == ([f"--accelerator=type={gpu},count={count}"] if accelerator else [])
    assert "--provisioning-model=SPOT" in cmd and "--instance-termination-action=DELETE" in cmd


def test_gpu_create_unknown_gpu_needs_machine_type(sh):
    usage_error(sh.run(GPU, "create", *GPU_BASE, "--gpu-type", "nvidia-b200", "--dry-run"), "--machine-type")
    usage_error(sh.run(GPU, "create", *GPU_BASE, "--gpu-count", "0", "--dry-run"), "--gpu-count")
    res = sh.run(
        GPU,
        "create",
        *GPU_BASE,
        "--gpu-type",
        "nvidia-b200",
        "--gpu-count",
        "8",
        "--machine-type",
        "a4-highgpu-8g",
        "--image-family",
        "fam",
        "--boot-disk-size",
        "500GB",
        "--preemptible",
        "--dry-run",
    )
    ok(res)
    (cmd,) = gcloud(res.stdout)
    assert opt(cmd, "--machine-type") == "a4-highgpu-8g"
    assert opt(cmd, "--image-family") == "fam" and opt(cmd, "--boot-disk-size") == "500GB"
    assert "--preemptible" in cmd and not any(t.startswith("--accelerator=") for t in cmd)


def test_gpu_setup(sh):
    res = sh.run(GPU, "setup", *GPU_BASE, "--dry-run")
    ok(res)
    assert commands(res.stdout)[0][:4] == ["git", "-C", str(ROOT), "archive"]
    scp, ssh = gcloud(res.stdout)
    assert scp == [
        "gcloud",
        "compute",
        "scp",
        str(sh.tmp / "ccmr_jax-my-gpu.tar.gz"),
        "my-gpu:ccmr_jax.tar.gz",
        "--zone=us-central1-a",
    ]
    assert ssh[:5] == ["gcloud", "compute", "ssh", "my-gpu", "--zone=us-central1-a"]
    remote = opt(ssh, "--command")
    assert "nvidia-smi" in remote
    assert '~/ccmr_venv/bin/python -m pip install -e ".[cuda,data]"' in remote


def test_gpu_run_fetch_delete(sh):
    res = sh.run(GPU, "run", *GPU_BASE, "--workdir", "runs/l4", "--dry-run", "--", "--config.seed=2")
    ok(res)
    start, follow = gcloud(res.stdout)
    assert start[:5] == follow[:5] == ["gcloud", "compute", "ssh", "my-gpu", "--zone=us-central1-a"]
    assert (
        'python -m ccmr_jax.main --config=configs/flickr.py --workdir=\\"\\$HOME\\"/runs/l4 --config.seed=2 ;'
        in opt(start, "--command")
    )
    assert "--config.multihost" not in opt(start, "--command")
    res = sh.run(GPU, "fetch", *GPU_BASE, "--workdir", "runs/l4", "--dest", "res", "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        ["gcloud", "compute", "scp", "--recurse", "my-gpu:runs/l4", "res", "--zone=us-central1-a"]
    ]
    res = sh.run(GPU, "delete", *GPU_BASE, "--dry-run")
    ok(res)
    assert gcloud(res.stdout) == [
        ["gcloud", "compute", "instances", "delete", "my-gpu", "--zone=us-central1-a", "--quiet"]
    ]


def test_gpu_all(sh):
    res = sh.run(GPU, "all", *GPU_BASE, "--workdir", GS, "--dry-run")
    ok(res)
    assert [verb(c) for c in gcloud(res.stdout)] == [
        ("compute", "instances", "create"),
        ("compute", "scp"),
        ("compute", "ssh"),
        ("compute", "ssh"),
        ("compute", "ssh"),
        ("storage", "cp"),
        ("compute", "instances", "delete"),
    ]


# ---------------------------------------------------------------------------
# The remote commands, executed locally: quoting, detaching, log, exit status.


def _remote_home(tmp: Path, python_body: str) -> Path:
    home = tmp / "remote-home"
    (home / "ccmr_jax").mkdir(parents=True)
    venv_bin = home / "ccmr_venv" / "bin"
    venv_bin.mkdir(parents=True)
    py = venv_bin / "python"
    py.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(python_body))
    py.chmod(0o755)
    return home


# Fake-python prologue: record the working directory and the arguments.
_RECORD_ARGV = (
    f"{shlex.quote(sys.executable)} -c 'import json, os, sys; json.dump([os.getcwd()] + sys.argv[1:], "
    """open(os.path.expanduser("~/argv.json"), "w"))' "$@"\n"""
)


def _remote(home: Path, command: str, timeout: float = 15):
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return subprocess.run(
        [BASH, "-c", command], capture_output=True, text=True, env=env, cwd=home, timeout=timeout
    )


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_remote_run_roundtrip(sh):
    res = sh.run(TPU, "run", *TPU_BASE, "--workdir", GS, "--dry-run", "--", *TRICKY)
    ok(res)
    _, start, follow = gcloud(res.stdout)
    # The program outlives the first follow by far (2 s, not a race on a loaded machine), then exits 3.
    home = _remote_home(sh.tmp, _RECORD_ARGV + 'echo "hello from the program"\nsleep 2\nexit 3\n')
    started = _remote(home, opt(start, "--command"))
    assert started.returncode == 0, started.stderr
    assert "started on" in started.stdout
    for _ in range(2):  # 1st: follows the running program; 2nd: prints the finished log
        followed = _remote(home, opt(follow, "--command"))
        assert followed.returncode == 3, followed.stderr
        assert "hello from the program" in followed.stdout
        assert "exit status 3" in followed.stderr
    argv = json.loads((home / "argv.json").read_text())
    assert argv == [
        str(home / "ccmr_jax"),
        "-m",
        "ccmr_jax.main",
        "--config=configs/flickr.py",
        f"--workdir={GS}",
        *TRICKY,
    ]


def test_remote_stop_and_already_running(sh):
    res = sh.run(GPU, "run", *GPU_BASE, "--workdir", "my runs/x", "--no-follow", "--dry-run")
    ok(res)
    (start,) = gcloud(res.stdout)
    res = sh.run(GPU, "stop", *GPU_BASE, "--dry-run")
    ok(res)
    (stop,) = gcloud(res.stdout)
    res = sh.run(GPU, "logs", *GPU_BASE, "--dry-run")
    ok(res)
    (follow,) = gcloud(res.stdout)
    home = _remote_home(sh.tmp, _RECORD_ARGV + "echo sleeping\nsleep 30\n")

    assert _remote(home, opt(follow, "--command")).returncode == 1  # nothing started yet
    assert _remote(home, opt(start, "--command")).returncode == 0
    again = _remote(home, opt(start, "--command"))
    assert again.returncode == 1 and "already running" in again.stderr
    t0 = time.monotonic()
    log = home / "ccmr_run.log"
    while not (log.exists() and "sleeping" in log.read_text()) and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    stopped = _remote(home, opt(stop, "--command"))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    pid = int((home / "ccmr_run.pid").read_text())
    while _alive(pid) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    followed = _remote(home, opt(follow, "--command"))
    assert followed.returncode != 0 and "sleeping" in followed.stdout
    assert not _alive(pid) and time.monotonic() - t0 < 25  # the sleep 30 was killed with its group
    assert "not running" in _remote(home, opt(stop, "--command")).stdout
    argv = json.loads((home / "argv.json").read_text())
    assert argv == [
        str(home / "ccmr_jax"),
        "-m",
        "ccmr_jax.main",
        "--config=configs/flickr.py",
        f"--workdir={home}/my runs/x",
    ]


def test_remote_run_requires_setup(sh):
    res = sh.run(TPU, "run", *TPU_BASE, "--workdir", GS, "--no-follow", "--dry-run")
    ok(res)
    home = sh.tmp / "empty-home"
    home.mkdir()
    out = _remote(home, opt(gcloud(res.stdout)[1], "--command"))
    assert out.returncode == 1 and "run the setup step first" in out.stderr


# ---------------------------------------------------------------------------
# Without --dry-run (fake gcloud): what is printed is exactly what is run.


def test_real_mode_runs_what_it_prints(sh):
    for script, args in [
        (TPU, ["create", *TPU_BASE, "--accelerator-type", "v4-16", "--project", "p"]),
        (TPU, ["delete", *TPU_BASE]),
        (GPU, ["create", *GPU_BASE, "--spot"]),
        (GPU, ["delete", *GPU_BASE]),
    ]:
        before = len(sh.calls())
        res = sh.run(script, *args)
        ok(res)
        assert sh.calls()[before:] == commands(res.stdout)


def test_real_run_takes_accelerator_type_from_tpu(sh):
    # The TPU is a v4-32 although no --accelerator-type was given: multi-host.
    res = sh.run(TPU, "run", *TPU_BASE, "--workdir", GS, extra_env={"FAKE_ACCEL": "v4-32"})
    ok(res)
    calls = sh.calls()
    assert calls == commands(res.stdout)
    assert [verb(c) for c in calls] == [("compute", "tpus", "tpu-vm", "describe"), TPU_SSH, TPU_SSH]
    assert "--config.multihost=True" in opt(calls[1], "--command")

    sh.calls_file.unlink()
    res = sh.run(TPU, "run", *TPU_BASE, "--workdir", "runs/x", extra_env={"FAKE_ACCEL": "v4-32"})
    assert res.returncode != 0 and "gs://" in res.stderr and "every worker" in res.stderr
    assert [verb(c) for c in sh.calls()] == [("compute", "tpus", "tpu-vm", "describe")]

    sh.calls_file.unlink()
    res = sh.run(
        TPU,
        "run",
        *TPU_BASE,
        "--accelerator-type",
        "v4-8",
        "--workdir",
        GS,
        extra_env={"FAKE_ACCEL": "v4-32"},
    )
    assert res.returncode == 1 and "is a v4-32, not a v4-8" in res.stderr
    assert len(sh.calls()) == 1


def test_real_all_keeps_vm_when_a_step_fails(sh):
    res = sh.run(
        TPU,
        "all",
        *TPU_BASE,
        "--repo",
        "https://example.com/r.git",
        "--workdir",
        GS,
        extra_env={"FAKE_FAIL": "--worker=0"},  # the follow step fails
    )
    assert res.returncode == 1
    assert "NOT deleted" in res.stderr and "delete --name my-tpu --zone us-central2-b" in res.stderr
    verbs = [verb(c) for c in sh.calls()]
    assert verbs == [("compute", "tpus", "tpu-vm", "create"), TPU_SSH, TPU_SSH, TPU_SSH]
