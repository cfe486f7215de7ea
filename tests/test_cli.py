"""Every command: a bad flag, a missing or broken --config and a bad override are one line and exit 2."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("main", "reevaluate", "sweep", "compare", "study", "choose", "pretrain", "verify", "search",
            "data.prepare")


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"ccmr_jax.{module}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_an_unknown_flag_is_one_line(module):
  assert "Unknown command line flag 'no_such_flag'" in _one_line_error(_command(module, "--no_such_flag=1"))


@pytest.mark.parametrize("args, message", [
    (("--config=configs/no_such_config.py",), "--config: cannot load it (OSError: [Errno 2] No such file"),
    (("--config.train.batch_size=abc",), "flag --config.train.batch_size=abc: invalid literal for int()"),
    (("--config.train.no_such_field=1",), "--config: an override names a field the config does not have"),
    (("--config=configs/tiny.py", "--config.train.no_such_field=1"), "the config does not have ('no_such_field')"),
])
def test_a_bad_config_flag_of_the_main_command_is_one_line(args, message, tmp_path):
  assert message in _one_line_error(_command("main", *args, f"--workdir={tmp_path}"))
  assert not os.listdir(tmp_path)  # refused before the workdir is touched


def test_a_config_file_that_does_not_parse_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  line = _one_line_error(_command("main", f"--config={broken}", f"--workdir={tmp_path / 'w'}"))
  assert "--config: cannot load it (SyntaxError" in line


@pytest.mark.parametrize("module, args", [
    ("sweep", ("--strategies=finetune", "--workdir=/tmp/unused", "--config=configs/no_such_config.py")),
    ("pretrain", ("--out=/tmp/unused", "--config=configs/no_such_config.py")),
])
def test_the_other_config_commands_refuse_a_missing_config_in_one_line(module, args):
  assert "--config: cannot load it" in _one_line_error(_command(module, *args))
