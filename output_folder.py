"""An output folder that a killed run resumes: one writer at a time (a lock the kernel drops with
its holder, kill -9 included), one set of settings per folder, and a record written last that
marks it finished. prepare_sthv2.py and record_episodes.py write their outputs through here.

Part of the bottom layer: standard library only.
"""
import fcntl
import json
import os
import socket
import sys

from errors import DataError
from files import atomic_write


class OutputFolder:
    """OUT with its resume state in OUT/<state> (a dot-folder: the frame index skips it) and its
    finished record in OUT/<record>; `program` names the writer in messages."""

    def __init__(self, out, state, record, program):
        self.out, self.program = out, program
        self.state, self.record = os.path.join(out, state), os.path.join(out, record)

    def finished(self):
        """The finished output's record (its settings and counts), or None."""
        try:
            with open(self.record) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DataError(f"{self.record} cannot be read ({e}); it marks {self.out} as "
                            f"finished: remove {self.out} and start again") from None

    def finished_with(self, settings, made="made"):
        """The record of a finished OUT made with these settings (said on stderr: nothing to
        do), or None when OUT is not finished; a finished OUT with other settings is refused."""
        finished = self.finished()
        if finished is not None:
            self.check_settings(finished["settings"], settings)
            print(f"{self.out} is already complete ({made} with these settings); nothing to do",
                  file=sys.stderr)
        return finished

    def check_settings(self, before, settings):
        """One OUT, one set of settings: a rerun with others would mix two outputs."""
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise DataError(f"{self.out} was made with other settings ({what}): rerun with the "
                            f"same ones, or use another --out")

    def keep_settings(self, settings):
        """Settings of the run under way, in the state folder, checked against a resumed
        run's."""
        path = os.path.join(self.state, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                self.check_settings(json.load(f), settings)
        else:
            with atomic_write(path, "w") as f:
                json.dump(settings, f)

    def lock(self):
        """Hold OUT for this run (flock on a file in the state folder): it goes with the process
        that holds it, kill -9 included, and the workers let go of it
        (parallel.process_pool). Returns the open handle; closing it releases OUT."""
        os.makedirs(self.state, exist_ok=True)
        path = os.path.join(self.state, "lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataError(f"another {self.program} is writing {self.out} (it holds {path}: "
                            f"{holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        return handle

    def finish(self, record):
        """Write the record that marks OUT finished (last, atomically)."""
        with atomic_write(self.record, "w") as f:
            json.dump(record, f, indent=1)
