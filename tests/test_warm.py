"""Warm starts (stages/warm.py): a command run in the server's fork behaves as a cold one."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from test_stages import invoke, tiny_params

from stages import warm

ROOT = Path(__file__).parents[1]
LMMREC = str(Path(sys.executable).parent / "lmmrec")  # the installed console script
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _children(pid: int) -> list[int]:
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [child for child in pids if warm.parent_pid(child) == pid]


def _servers(folder: Path) -> list[int]:
    return warm.servers(str(folder))


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def warm_env(monkeypatch):
    """Warm starts on, with a private socket folder (a short path: sockets' names are limited
    to 107 bytes); every server of the test is stopped."""
    parent = Path(tempfile.mkdtemp(prefix="lmw", dir="/tmp"))
    folder = parent / "s"
    monkeypatch.setenv("LMMREC_WARM", "1")
    monkeypatch.setenv("LMMREC_WARM_DIR", str(folder))
    monkeypatch.setenv("LMMREC_WARM_IDLE", "30")
    yield folder
    for pid in warm.servers(str(folder)):
        os.killpg(pid, signal.SIGKILL)  # its session: its supervisors and commands too
    shutil.rmtree(parent)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(params, interactions) of a tiny demo world, made cold in this process."""
    tmp = tmp_path_factory.mktemp("warm")
    params = tiny_params(tmp)
    invoke("download", "--out", tmp / "raw", "--params", params)
    invoke("preprocess", "--raw", tmp / "raw", "--out", tmp / "processed", "--params", params)
    return params, tmp / "processed" / "interactions.parquet"


def _train(params: Path, interactions: Path, out: Path) -> list[str]:
    return ["train", "--model", "bpr", "--feature-set", "id", "--interactions",
            str(interactions), "--params", str(params), "--out", str(out)]  # fmt: skip


def test_a_command_run_warm_writes_the_bytes_a_cold_start_writes(warm_env, tiny_data, tmp_path):
    params, interactions = tiny_data
    assert warm.run_warm(_train(params, interactions, tmp_path / "first")) == 0  # starts it
    assert len(_servers(warm_env)) == 1
    umask = os.umask(0o077)  # the caller's umask, not the server's, applies
    try:
        assert warm.run_warm(_train(params, interactions, tmp_path / "warm")) == 0  # its fork
        cold_env = {**os.environ, "LMMREC_WARM": "0"}
        cold = [LMMREC, *_train(params, interactions, tmp_path / "cold")]
        assert subprocess.run(cold, env=cold_env, capture_output=True).returncode == 0
    finally:
        os.umask(umask)
    assert len(_servers(warm_env)) == 1  # the same server served both warm commands
    for name in ("model.pt", "metrics.json", "per_user.parquet"):
        cold_file, warm_file = tmp_path / "cold" / name, tmp_path / "warm" / name
        assert warm_file.read_bytes() == cold_file.read_bytes(), name
        assert warm_file.stat().st_mode == cold_file.stat().st_mode, name
    assert (tmp_path / "warm" / "model.pt").stat().st_mode & 0o077 == 0


def test_exit_status_and_error_output_come_through(warm_env, tmp_path, capfd):
    assert warm.run_warm(["stats", "demo", "--processed", str(tmp_path / "none")]) == 1
    assert "error:" in capfd.readouterr().err
    assert warm.run_warm(["--bogus"]) == 2
    assert "No such option" in capfd.readouterr().err
    done = subprocess.run([LMMREC, "--version-of-nothing"], capture_output=True, text=True)
    assert done.returncode == 2 and "No such option" in done.stderr


@contextmanager
def _slow_train(folder: Path, tiny_data, out: Path, tmp_path: Path):
    """(client, command pid) of a warm `lmmrec train` that would run for hours, once its
    command runs in the server of ``folder``; the client is killed at the end."""
    params, interactions = tiny_data
    slow = yaml.safe_load(params.read_text())
    slow["train"].update(max_epochs=100000, patience=100000, min_epochs=0)
    slow_params = tmp_path / "slow.yaml"
    slow_params.write_text(yaml.safe_dump(slow))
    client = subprocess.Popen(
        [LMMREC, *_train(slow_params, interactions, out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal, even where the tests run with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert _wait_for(lambda: _runner(folder) is not None), "no command ran in the server"
        yield client, _runner(folder)
    finally:
        client.kill()  # on a failure too: its command stops with it
        client.wait()


def _runner(folder: Path) -> int | None:
    """The pid of the one command process the server in ``folder`` is running, if any."""
    servers = _servers(folder)
    if len(servers) != 1:
        return None
    commands = [pid for supervisor in _children(servers[0]) for pid in _children(supervisor)]
    return commands[0] if len(commands) == 1 else None


def test_ctrl_c_reaches_the_command_and_leaves_no_output(warm_env, tiny_data, tmp_path):
    out = tmp_path / "interrupted"
    with _slow_train(warm_env, tiny_data, out, tmp_path) as (client, runner):
        time.sleep(2.0)  # well into training
        client.send_signal(signal.SIGINT)
        client.communicate(timeout=60)
    assert client.returncode == 130  # as typer ends a cold command on Ctrl-C: 128 + SIGINT
    assert _wait_for(lambda: not Path(f"/proc/{runner}").exists(), 10)
    assert not out.exists()


def test_a_command_whose_caller_dies_is_stopped(warm_env, tiny_data, tmp_path):
    out = tmp_path / "orphan"
    with _slow_train(warm_env, tiny_data, out, tmp_path) as (_, runner):
        pass  # the client is killed on leaving
    assert _wait_for(lambda: not Path(f"/proc/{runner}").exists(), 15)
    assert not out.exists()


def test_another_environment_gets_another_server_and_an_idle_one_exits(
    warm_env, tmp_path, monkeypatch
):
    stats = ["stats", "demo", "--processed", str(tmp_path / "none")]
    monkeypatch.setenv("LMMREC_WARM_IDLE", "1")
    assert warm.run_warm(stats) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read when torch loads: not shareable
    assert warm.run_warm(stats) == 1
    assert len(list(warm_env.glob("*.sock"))) == 2
    monkeypatch.setenv("DVC_STAGE", "train@bpr")  # differs per stage: shared
    assert warm.run_warm(stats) == 1
    assert len(_servers(warm_env)) == 2
    assert _wait_for(lambda: not _servers(warm_env), 60), "idle servers did not exit"
    assert not list(warm_env.glob("*.sock"))


def test_it_runs_cold_where_it_cannot_be_private_or_is_turned_off(warm_env, monkeypatch):
    warm_env.mkdir(mode=0o755)
    warm_env.chmod(0o755)  # others could open it
    assert warm.socket_folder() is None
    assert warm.run_warm(["stats", "demo"]) is None
    assert warm.enabled()
    monkeypatch.setenv("LMMREC_WARM", "0")
    assert not warm.enabled()
    monkeypatch.setenv("LMMREC_WARM", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun
    assert not warm.enabled()
