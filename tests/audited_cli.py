"""``foundation`` under a Python audit hook (tests/test_artefact_attacks.py runs it as a subprocess).

    AUDIT_CONFIG='{"roots": [...], "marker": "...", "report": FILE, "spawn": [[...]]}' \\
        python tests/audited_cli.py foundation-arguments...

``roots`` are the directories this run may open files in (the artefact, ``--data``, ``--out``). The hook
blocks each of these and appends one line per attempt to ``report``:

- process creation (``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.spawn*``,
  ``os.fork``), except a command starting with one of the ``spawn`` prefixes (the pipeline's own
  ``python -m foundation.cli train`` launcher: its children run under the same hook, through the
  ``sitecustomize.py`` the test puts on their ``PYTHONPATH``);
- network: ``socket.connect``, ``socket.getaddrinfo``, ``urllib.Request``;
- unpickling: ``pickle.find_class`` (torch's ``weights_only`` loader does not unpickle through it);
- ``exec`` / ``compile`` of code from a file under the roots, or of source naming ``marker`` (the payloads do);
- ``open`` of a path outside the roots and what the interpreter and its libraries need to run: this Python's
  prefixes and site-packages, the repository's ``foundation/``, ``evaluation/``, ``tests/`` and ``launch/``
  sources and the package's metadata (``foundation.egg-info``: entry points), ``/proc``, ``/sys``, ``/dev`` (torch
  reads CPU and device facts there), ``/etc/ld.so.cache``,
  ``/etc/localtime``, ``/usr/share/zoneinfo`` (time zones), ``/usr/lib`` and ``/usr/share`` (read-only data of
  system libraries). Nothing under ``/tmp``, ``$HOME`` or the repository's other folders is allowed unless
  it is a root.

In process (the fast tests): ``with audited(roots, marker) as violations: main([...])`` installs one hook for
the test process on first use; it enforces the policy inside the block only and idles otherwise (a Python
audit hook cannot be removed).

Auditing starts after ``torch`` and ``foundation.cli`` are imported (torch's import runs ``ldconfig -p`` to find
CUDA libraries, before any argument is read) and stops when the command returns (W&B removes at exit a
temporary folder it made at import).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _allowed_prefixes(roots: list[str]) -> tuple[str, ...]:
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"],
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(),
             str(REPO / "foundation"), str(REPO / "evaluation"), str(REPO / "tests"), str(REPO / "launch"),
             str(REPO / "foundation.egg-info"),
             "/proc", "/sys", "/dev", "/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo", "/usr/lib",
             "/usr/share", *roots}
    return tuple(sorted({os.path.realpath(p) for p in paths}))


def _policy(config: dict) -> dict:
    return {"prefixes": _allowed_prefixes(config["roots"]),
            "code_roots": tuple(os.path.realpath(r) for r in config["roots"]),
            "marker": config.get("marker", ""), "spawn": [list(map(str, p)) for p in config.get("spawn", [])],
            "report": config.get("report"), "violations": []}


BLOCKED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "socket.connect", "socket.getaddrinfo", "urllib.Request", "pickle.find_class")


def _hook(state: dict):
    """The audit hook; it enforces ``state["policy"]`` while that is set (and not ``state["busy"]``)."""

    def under(path: str, bases: tuple[str, ...]) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bases)

    def violation(policy: dict, what: str) -> None:
        state["busy"] = True
        try:
            line = f"AUDIT-VIOLATION pid {os.getpid()}: {what}"
            policy["violations"].append(line)
            if policy["report"]:
                with open(policy["report"], "a") as f:
                    f.write(line + "\n")
            if os.environ.get("AUDIT_STACK"):
                import traceback

                traceback.print_stack(limit=25)
        finally:
            state["busy"] = False
        raise PermissionError(f"blocked by the audit hook: {what}")

    def allowed_spawn(policy: dict, event: str, args: tuple) -> bool:
        if event != "subprocess.Popen":
            return False
        argv = [os.fsdecode(a) for a in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]])]
        return any(argv[: len(p)] == p for p in policy["spawn"])

    def hook(event: str, args: tuple) -> None:
        policy = state["policy"]
        if policy is None or state["busy"]:
            return
        if event in BLOCKED or event.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
            if not allowed_spawn(policy, event, args):
                violation(policy, f"{event} {args!r:.300}")
        elif event == "open":
            path = args[0]
            if isinstance(path, int):
                return
            path = os.fsdecode(path)
            real = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
            if not under(real, policy["prefixes"]):
                violation(policy, f"open {real} {args[1]!r}")
        elif event == "compile":
            source, filename = args[0], os.fsdecode(args[1]) if args[1] is not None else ""
            if filename and filename[0] != "<" and under(os.path.realpath(filename), policy["code_roots"]):
                violation(policy, f"compile of {filename}")
            marker = policy["marker"]
            if isinstance(source, (str, bytes)) and marker and marker in (
                    source if isinstance(source, str) else source.decode("utf-8", "replace")):
                violation(policy, f"compile of source naming {marker}")
        elif event == "exec":
            filename = getattr(args[0], "co_filename", "")
            if filename and filename[0] != "<" and under(os.path.realpath(filename), policy["code_roots"]):
                violation(policy, f"exec of code from {filename}")

    return hook


def install(config: dict) -> dict:
    """Install the hook for this process under ``config``; returns its state: set ``state["policy"] = None``
    to stop auditing."""
    state = {"policy": _policy(config), "busy": False}
    sys.addaudithook(_hook(state))
    return state


_IN_PROCESS: dict | None = None  # the one hook of an in-process audit (a hook cannot be removed: it idles)


@contextmanager
def audited(roots: list, marker: str = "", report: str | None = None):
    """Audit this process (the fast tests call ``foundation.cli.main`` in it) while the block runs; yields the
    list of violations recorded, which the block's blocked operations also raise as ``PermissionError``."""
    global _IN_PROCESS
    if _IN_PROCESS is None:
        _IN_PROCESS = {"policy": None, "busy": False}
        sys.addaudithook(_hook(_IN_PROCESS))
    policy = _policy({"roots": [str(r) for r in roots], "marker": marker, "report": report})
    _IN_PROCESS["policy"] = policy
    try:
        yield policy["violations"]
    finally:
        _IN_PROCESS["policy"] = None


def from_env() -> None:
    """For a child process (``sitecustomize``): audit it under ``AUDIT_CONFIG`` until it exits."""
    config = os.environ.get("AUDIT_CONFIG")
    if not config or not os.environ.get("AUDIT_CHILDREN"):
        return
    import torch  # noqa: F401  (see the module docstring)
    import wandb  # noqa: F401  (its import registers exit handlers that must run unaudited, after ours)

    state = install(json.loads(config))
    atexit.register(lambda: state.__setitem__("policy", None))  # runs before the handlers registered at import


if __name__ == "__main__":
    import torch  # noqa: F401  (see the module docstring)

    from foundation.cli import main

    state = install(json.loads(os.environ["AUDIT_CONFIG"]))
    os.environ["AUDIT_CHILDREN"] = "1"  # the processes this one starts install the hook (sitecustomize)
    code = main(sys.argv[1:])
    state["policy"] = None
    sys.exit(code)
