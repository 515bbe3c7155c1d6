#!/usr/bin/env python3
"""Build a Spate handler written in Python into a WebAssembly component.

    python3 sdk/python/build.py HANDLER.py OUT.wasm

HANDLER.py defines ``handle(event)`` (see README.md). Modules next to it, and packages
in a ``lib/`` directory beside it, are bundled too. The bindings are generated from the
WIT package (``wit/`` of the repository, or ``$SPATE_WIT_DIR``) by ``componentize-py``
at build time, together with CPython and this SDK (the ``spate`` package beside this
script) into one component of about 18 MB.

componentize-py is looked up as ``$SPATE_COMPONENTIZE_PY``, then in the toolchain cache
``${SPATE_CACHE_DIR:-~/.cache/spate}/guests/python/bin``, then on ``PATH``.
``scripts/guest-toolchains.sh python`` installs the pinned version into that cache.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORLD = "event-handler"
# The generated entry module: componentize-py exports its `Handler` class.
ENTRY = "spate_entry"
ENTRY_SOURCE = """\
import {module} as _user
from spate import _export

Handler = _export(getattr(_user, "handle", None))
"""


def pinned_version() -> str:
    text = (HERE / "requirements-build.txt").read_text()
    m = re.search(r"^componentize-py==(\S+)", text, re.M)
    return m.group(1) if m else "?"


def guests_dir() -> Path:
    if os.environ.get("SPATE_GUESTS_DIR"):
        return Path(os.environ["SPATE_GUESTS_DIR"])
    cache = os.environ.get("SPATE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "spate")
    return Path(cache) / "guests"


def find_componentize_py() -> str:
    explicit = os.environ.get("SPATE_COMPONENTIZE_PY")
    if explicit:
        return explicit
    cached = guests_dir() / "python" / "bin" / "componentize-py"
    if cached.is_file():
        return str(cached)
    found = shutil.which("componentize-py")
    if found:
        return found
    fail(
        f"componentize-py {pinned_version()} is not installed (looked in {cached.parent} and on PATH).\n"
        "Install it with `scripts/guest-toolchains.sh python` from the Spate repository "
        f"(a venv under {guests_dir()}), or `pip install componentize-py=={pinned_version()}`.",
        code=127,
    )


def fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv) -> None:
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    handler = Path(argv[1]).resolve()
    out = Path(argv[2]).resolve()
    if not handler.is_file():
        fail(f"no handler file at {handler}")
    module = handler.stem
    if not module.isidentifier() or module in ("spate", ENTRY):
        fail(f"the handler file name `{handler.name}` must be a Python module name other than spate.py")
    wit = Path(os.environ.get("SPATE_WIT_DIR") or HERE.parent.parent / "wit")
    if not (wit / "spate.wit").is_file():
        fail(f"no WIT package at {wit} (set SPATE_WIT_DIR to the directory holding spate.wit)")
    tool = find_componentize_py()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spate-py-build-") as tmp:
        # Build from copies: the interpreter that pre-initialises the component writes
        # `__pycache__` directories next to the sources it imports.
        work = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.wasm", "target", "node_modules", ".*")
        shutil.copytree(HERE / "spate", work / "sdk" / "spate", ignore=ignore)
        shutil.copytree(handler.parent, work / "app", ignore=ignore)
        (work / "entry").mkdir()
        (work / "entry" / f"{ENTRY}.py").write_text(ENTRY_SOURCE.format(module=module))
        paths = [work / "entry", work / "sdk", work / "app"]
        if (work / "app" / "lib").is_dir():
            paths.append(work / "app" / "lib")
        cmd = [tool, "-q", "-d", str(wit), "-w", WORLD, "componentize"]
        for p in paths:
            cmd += ["-p", str(p)]
        cmd += ["-o", str(out), ENTRY]
        # No virtualenv of the caller leaks its site-packages into the component.
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        try:
            status = subprocess.run(cmd, env=env, cwd=tmp).returncode
        except OSError as e:
            fail(f"cannot run {tool}: {e}", code=127)
    if status != 0:
        fail(f"componentize-py failed (exit {status}); its output above says why")
    print(f"built {out} ({out.stat().st_size} bytes) from {handler}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
