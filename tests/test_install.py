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
