"""Install packages into this interpreter's environment with uv, set up from pip's configuration.

uv unpacks and byte-compiles wheels on every core: a fresh install of lmmrec (torch with its
CUDA libraries, ~6.6 GB) took 49 s against pip's 138 s on the project's 2-core machine. uv
reads none of pip's settings, so the index, extra indexes, find-links folders, constraints
files and CA bundle pip is configured with (pip.conf or PIP_* variables: a machine's local
wheel mirror, say) are handed to it, and it picks the best version across all indexes, as pip
does. Where uv cannot be installed or fails, pip installs instead.

    python tools/install.py -e '.[dev]'
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

# pip option -> uv option; the values of the multi-valued ones are whitespace-separated lists
SOURCES = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
SCOPES = ("global", "install", ":env:")  # pip's precedence, lowest first
ALIASES = {"default-timeout": "timeout"}  # pip's two names for one setting


def pip_settings(listing: str) -> dict[str, str]:
    """The install settings in ``pip config list`` output (``scope.key='value'`` lines), the
    environment over the ``install`` section over ``global``."""
    found: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        if sep and scope in SCOPES:
            name = ALIASES.get(name, name)
            found.setdefault(name, {})[scope] = str(ast.literal_eval(value))
    return {name: next(v[s] for s in reversed(SCOPES) if s in v) for name, v in found.items()}


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's command-line options and environment variables for pip's ``settings``."""
    options = ["--index-strategy", "unsafe-best-match"]
    for name, flag in SOURCES.items():
        for value in settings.get(name, "").split():
            options += [flag, value]
    env = {"SSL_CERT_FILE": settings.get("cert"), "UV_HTTP_TIMEOUT": settings.get("timeout")}
    return options, {key: value for key, value in env.items() if value}


def main(args: list[str]) -> int:
    """Install ``args`` (pip install arguments) with uv, or with pip where uv cannot."""
    pip = [sys.executable, "-m", "pip"]
    listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True)
    options, env = uv_options(pip_settings(listing.stdout))
    if subprocess.run([*pip, "install", "--quiet", "uv"]).returncode == 0:
        uv = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable]
        done = subprocess.run(
            [*uv, "--compile-bytecode", *options, *args], env={**os.environ, **env}
        )
        if done.returncode == 0:
            return 0
        print(f"uv failed (exit {done.returncode}); installing with pip", file=sys.stderr)
    else:
        print("uv could not be installed; installing with pip", file=sys.stderr)
    return subprocess.run([*pip, "install", *args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
