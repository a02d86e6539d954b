"""``python -m zeda_lightning <subcommand> ...``: fit, validate, test, predict, generate, budget, eval, estimate,
consolidate, demo, slice, corpus, tokenizer (``--help`` lists them with one line each).

Bad input (a ``ValueError`` or a missing / existing file) ends the command with one line naming the problem and
the fix, exit status 2, instead of a traceback; a diverged run (NaN / inf loss, gradient, weight or metric) ends
the same way with exit status 3; ``ZEDA_TRACEBACK=1`` shows the traceback. Python callers of
:func:`zeda_lightning.cli.main` get the exception itself.
"""

import os
import sys
import traceback

from lightning.fabric.utilities.exceptions import MisconfigurationException

from zeda_lightning.cli import main

#: Lightning's own setting checks (``max_steps: -5``) are bad input too
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                MisconfigurationException)


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _origin(err: BaseException) -> BaseException:
    """The innermost input error raised by this package: jsonargparse wraps a check that fails while it instantiates
    the YAML's classes in a union-type error that buries the message."""
    found, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = traceback.extract_tb(err.__traceback__)
        if isinstance(err, INPUT_ERRORS) and frames and frames[-1].filename.startswith(PACKAGE_DIR):
            found = err
        err = err.__cause__ or err.__context__
    return found


def _report(err: BaseException, status: int) -> None:
    where = traceback.extract_tb(err.__traceback__)[-1]
    sys.stderr.write(f"zeda_lightning: error: {err}\n"
                     f"  (raised at {where.filename}:{where.lineno}; ZEDA_TRACEBACK=1 shows the traceback)\n")
    sys.exit(status)


def run() -> None:
    try:
        main()
    except FloatingPointError as err:  # a diverged run (DivergenceError): exit 3, the step and the term named
        if os.environ.get("ZEDA_TRACEBACK"):
            raise
        _report(err, 3)
    except INPUT_ERRORS as top:
        if os.environ.get("ZEDA_TRACEBACK"):
            raise
        _report(_origin(top), 2)


if __name__ == "__main__":
    run()
