"""How user mistakes are reported: one or two lines, exit 2 for usage, 1 for runtime, no traceback.

    UsageError   the command line, or a file it names, cannot work as given   -> exit 2
    RunError     the run cannot go on (data, checkpoint, disk, device)         -> exit 1
    Parser       argparse whose errors are two lines: the problem, then the nearest option (for a
                 mistyped flag) or where the full usage is; never the 30-line usage dump
    guard(fn, argv, runtime=(...))
                 runs a CLI main: UsageError/RunError and the given runtime exception types become one
                 line on stderr (and in the run's log) with the exit code; `--debug` anywhere on the
                 command line re-raises them with the traceback. Anything else is a bug and keeps its
                 traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys

USAGE_EXIT, RUNTIME_EXIT = 2, 1


class UsageError(Exception):
    """The command as given cannot work; the message names the thing and what would."""


class RunError(RuntimeError):
    """The run started but cannot go on; the message names the thing and what would help."""


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with short errors and a nearest-option suggestion. No abbreviations: a
    mistyped `--max-step 10` is an error naming --max-steps, never silently taken for it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = f"`{self.prog} --help` lists every option"
        unknown = re.findall(r"(--?[A-Za-z][\w-]*)", message) if "unrecognized arguments" in message else []
        options = [s for s in self._option_string_actions if s.startswith("--")]
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]}? ({hint})"
                break
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n  {hint}\n")


def _say(prog: str, message: str) -> None:
    from higgs_min import runlog

    if runlog.live():  # a run's logging: the line goes to the console and to its train.log
        logging.getLogger("higgs_min").error("%s", message)
        runlog.detach()
    else:
        print(f"{prog}: error: {message}", file=sys.stderr)


def guard(fn, argv, prog: str, runtime: tuple = ()) -> int:
    """fn(argv) -> exit code, with user mistakes reported as one line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return fn(argv)
    except UsageError as e:
        if debug:
            raise
        _say(prog, str(e))
        return USAGE_EXIT
    except (RunError, *runtime) as e:
        if debug:
            raise
        _say(prog, str(e))
        return RUNTIME_EXIT
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
