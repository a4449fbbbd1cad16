"""
What every entry script's main() returns: one `error:` line and an exit code, never a
raw traceback (GAST_TRACEBACK=1 shows it).
"""

import errno
import os
import sys

from plumbing.devices import Stopped, is_main
from plumbing.settings import ConfigError


def disk_full(e):
    """Whether an exception is a write that found the disk full (torch.save's, safetensors')."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
        s in str(e) for s in ("file write failed", "No space left", "unexpected pos"))


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where it stopped and what was saved."""


def run_main(work, errors=()):
    """work() with the shared endings: a clear `error:` line and exit 2 for bad settings or
    data, exit 130 for Ctrl-C (the shell's code for it), 0 when it finished. The last guard
    turns anything the checks missed into one line too (GAST_TRACEBACK=1 shows it whole)."""
    try:
        work()
    except Stopped:  # under torchrun, by another process's error, which that one printed
        return 2
    except (ConfigError, FloatingPointError, *errors) as e:
        if is_main() or getattr(e, "first", False):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; what was written before stays on disk", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("GAST_TRACEBACK"):
            raise
        if disk_full(e):  # every write is atomic: what was written before is intact
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"error: the disk is full{where}: nothing already written was lost; free some "
                  "space and run again (--resume continues a run from its last checkpoint)",
                  file=sys.stderr)
            return 2
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {type(e).__name__}: {reason}{where}. The checks missed this: please "
              "report it with the command; GAST_TRACEBACK=1 shows the traceback", file=sys.stderr)
        return 2
    return 0
