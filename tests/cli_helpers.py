"""Running ``vkd.cli.main`` in the test process, shared by the tests (``tests/`` is on ``sys.path``: its conftest)."""

from __future__ import annotations

import logging

from vkd.cli import main


def run_cli_output(capsys, *args) -> tuple[int, str, str]:
    """``vkd.cli.main`` in this process; the stderr handler its ``logging.basicConfig`` adds is removed after the
    call, so that it never writes to a later test's (closed) captured stream. Returns
    ``(exit code, stdout, stderr)``."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        code = main([str(a) for a in args])
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(capsys, *args) -> tuple[int, str]:
    """:func:`run_cli_output` without stdout: ``(exit code, stderr)``."""
    code, _, err = run_cli_output(capsys, *args)
    return code, err


def set_args(*items: str) -> list[str]:
    """``--set`` flags for each ``key=value``."""
    return [x for item in items for x in ("--set", item)]
