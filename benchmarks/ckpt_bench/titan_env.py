"""Where the torchtitan peer comes from: its own virtual environment, ``.venv-titan``.

torchtitan 0.3.0 cannot live in the project's venv: it needs ``datasets<4.8``, which pins
``fsspec<=2026.2.0`` (the project's ``s3fs`` pins a newer one) and an older ``huggingface_hub``.
``make titan-env`` builds ``.venv-titan`` with ``pip install torch==2.13.0 torchtitan==0.3.0``
(its own complete environment; nothing of torchtitan is copied into this repository).

The benchmark's workers run in the project's venv and import torchtitan from that environment:
its ``site-packages`` is appended at the *end* of ``sys.path``, so torch and every package the
project has come from the project's venv (one torch for every case, so the torchtitan cases run
in the same process, interleaved with the others), and what only torchtitan needs (``tyro``,
``torchdata``, ``spmd_types``, ...) from ``.venv-titan``. Only ``torchtitan.components`` is
imported: its checkpoint and optimizer modules, which import neither ``datasets`` nor ``fsspec``
for local paths.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ckpt_bench.common import ROOT

DEFAULT_ENV = ROOT / ".venv-titan"
TITAN_VERSION = "0.3.0"  # what `make titan-env` installs
_DIST_INFO = re.compile(r"^torchtitan-(?P<version>[0-9][^-]*)\.dist-info$")


def site_packages(env: Path, version: tuple[int, int] | None = None) -> Path:
    """The ``site-packages`` of virtual environment ``env`` for Python ``version`` (default: this
    interpreter's major.minor; an environment of another Python holds incompatible extensions)."""
    major, minor = version or sys.version_info[:2]
    return Path(env) / "lib" / f"python{major}.{minor}" / "site-packages"


def dist_version(names: list[str]) -> str | None:
    """torchtitan's installed version from the entry names of a ``site-packages`` directory
    (``torchtitan-0.3.0.dist-info`` -> ``"0.3.0"``); None when no entry is torchtitan's."""
    versions = [m["version"] for n in names if (m := _DIST_INFO.match(n))]
    return versions[0] if len(versions) == 1 else None


def availability(env: Path) -> tuple[bool, str]:
    """Whether ``env`` holds torchtitan for this Python: ``(True, version)`` or ``(False, why)``
    (one line, naming the command that builds it). Looks at files only; imports nothing."""
    site = site_packages(env)
    if not site.is_dir():
        return False, f"no environment for Python {sys.version_info[0]}.{sys.version_info[1]} at {env} (make titan-env)"
    names = [p.name for p in site.iterdir()]
    version = dist_version(names)
    if version is None or "torchtitan" not in names:
        return False, f"torchtitan is not installed in {env} (make titan-env)"
    return True, version


def activate(env: Path) -> str:
    """Make torchtitan importable from ``env`` (appended to ``sys.path``, behind this venv's
    packages); returns its version. Raises RuntimeError (one line) when ``env`` has none."""
    ok, what = availability(env)
    if not ok:
        raise RuntimeError(what)
    site = str(site_packages(env))
    if site not in sys.path:
        sys.path.append(site)
    return what
