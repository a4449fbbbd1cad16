"""
What every entry script's main() returns: one `error:` line and an exit code, never a
raw traceback (GAST_TRACEBACK=1 shows it).
"""

import os
import sys
from plumbing.devices import is_main
from plumbing.settings import ConfigError




class Interrupted(Exception):
    """Ctrl-C during a run; the message says where it stopped and what was saved."""


def run_main(work, errors=()):
    """work() with the shared endings: a clear `error:` line and exit 2 for bad settings or
    data, exit 130 for Ctrl-C (the shell's code for it), 0 when it finished. The last guard
    turns anything the checks missed into one line too (GAST_TRACEBACK=1 shows it whole)."""
    try:
        work()
    except (ConfigError, FloatingPointError, *errors) as e:
        if is_main():
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
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {type(e).__name__}: {reason}{where}. The checks missed this: please "
              "report it with the command; GAST_TRACEBACK=1 shows the traceback", file=sys.stderr)
        return 2
    return 0
