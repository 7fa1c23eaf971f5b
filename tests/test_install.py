"""tools/install.py hands pip's configured package sources to uv, so both install the same."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "install", Path(__file__).parents[1] / "tools" / "install.py"
)
install = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(install)

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/ignored'
install.index-url='https://mirror.example/simple'
global.index-url='https://pypi.org/simple'
"""


def test_pip_settings_take_the_environment_over_install_over_global():
    settings = install.pip_settings(LISTING)
    assert settings["find-links"] == "/opt/wheels"  # PIP_FIND_LINKS over pip.conf
    assert settings["index-url"] == "https://mirror.example/simple"  # [install] over [global]
    assert settings["timeout"] == "180"  # default-timeout is pip's other name for it


def test_uv_gets_every_source_and_picks_across_indexes():
    options, env = install.uv_options(install.pip_settings(LISTING))
    assert options == [
        "--index-strategy", "unsafe-best-match",
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/xdg/pip/constraints.txt",
    ]  # fmt: skip
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}


def test_no_pip_configuration_leaves_uv_on_its_defaults():
    assert install.uv_options(install.pip_settings("")) == (
        ["--index-strategy", "unsafe-best-match"],
        {},
    )


class _Recorder:
    """Stands in for subprocess.run: records each command, fails those that start with uv's."""

    def __init__(self, failing: tuple[str, ...]):
        self.failing, self.calls = failing, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        stdout = "global.find-links='/opt/wheels'\n" if cmd[-2:] == ["config", "list"] else ""
        failed = any(" ".join(cmd[1:]).startswith(prefix) for prefix in self.failing)
        return install.subprocess.CompletedProcess(cmd, 1 if failed else 0, stdout, "")


def test_uv_installs_with_pips_sources(monkeypatch):
    run = _Recorder(failing=())
    monkeypatch.setattr(install.subprocess, "run", run)
    assert install.main(["-e", ".[dev]"]) == 0
    uv = run.calls[-1]
    assert uv[1:5] == ["-m", "uv", "pip", "install"] and uv[-2:] == ["-e", ".[dev]"]
    assert ["--find-links", "/opt/wheels"] == uv[uv.index("--find-links") :][:2]
    assert "--compile-bytecode" in uv  # the stages import torch in every process


def test_pip_installs_when_uv_fails_or_cannot_be_installed(monkeypatch):
    for failing in ("-m uv pip install", "-m pip install --quiet uv"):
        run = _Recorder(failing=(failing,))
        monkeypatch.setattr(install.subprocess, "run", run)
        assert install.main(["-e", ".[dev]"]) == 0
        assert run.calls[-1][1:] == ["-m", "pip", "install", "-e", ".[dev]"], failing
