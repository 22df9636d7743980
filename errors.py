"""The errors a user sees, their exit codes, and the `main` wrapper every script runs under.

The bottom layer: imports nothing of this project and nothing heavy, so every module can raise
these and a light script stays light. An error carries its exit code; `run_main` prints it as
one line on stderr and exits with it, so no script keeps its own list of what to catch.

Exit codes, every script: 0 done, 1 the work failed, 2 bad input (arguments, config, data,
checkpoint: nothing was done, as argparse's own exit), 75 stopped on a signal after saving
(EX_TEMPFAIL: requeue and resume), 130 aborted (a second Ctrl-C).
"""
import sys

FAILED_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 75
ABORTED_EXIT_CODE = 130


class ReportedError(Exception):
    """An error the user acts on: its message is one line that names the problem, and
    `exit_code` says how the script ends."""
    exit_code = BAD_INPUT_EXIT_CODE


class ConfigError(ReportedError, ValueError):
    """A config problem, phrased as one line that names the key (and file)."""


class DataError(ReportedError, RuntimeError):
    """The data on disk cannot serve what was asked (one line, names the path)."""


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint cannot be used (one line, names the file)."""


class WeightsMissing(ReportedError, RuntimeError):
    """Pretrained weights are not on disk, and downloading them would hang offline."""


class LaqError(ReportedError, RuntimeError):
    """LAQ's code or checkpoint cannot be used (one line that says why and what to do)."""


class PythaeError(ReportedError, RuntimeError):
    """A pythae model cannot be evaluated (one line that says why)."""


class TrainingError(ReportedError, RuntimeError):
    """Training cannot continue (one line that says what happened and where)."""
    exit_code = FAILED_EXIT_CODE


class RunFailed(ReportedError, RuntimeError):
    """The work ran and most of it failed (a decoder that cannot decode, say): one line naming
    the commonest cause; what was done is kept for a rerun to continue."""
    exit_code = FAILED_EXIT_CODE


class WriteFailed(ReportedError, OSError):
    """The output could not be written (a full disk, a quota): one line naming the file."""
    exit_code = FAILED_EXIT_CODE


class Preempted(ReportedError):
    """A stop signal arrived; a checkpoint was written and the job can be resumed."""
    exit_code = PREEMPTED_EXIT_CODE


def exit_bad_input(message):
    """One line on stderr, and the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)


def run_main(main, interrupted="interrupted"):
    """Run a script's `main()`: a ReportedError becomes its one line (none for a stop, which
    has logged its own) and its exit code; Ctrl-C exits 130 with `interrupted` as the line."""
    try:
        return main()
    except ReportedError as err:
        if str(err):
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(ABORTED_EXIT_CODE)
