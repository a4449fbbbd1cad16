"""
Files: written atomically, read with a clear error, the output directory checked first
and held by a lock, so that nothing already written is lost or half-written.
"""

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from pickle import UnpicklingError

import torch
from filelock import FileLock, Timeout

from plumbing.devices import world
from plumbing.entry import disk_full
from plumbing.settings import ConfigError, refuse


def atomic_write(path, write):
    """write(tmp) writes the file at tmp; then it is renamed to path. A crash or an error
    leaves the old file intact and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # same extension: writers that go by it still do
    remove_leftovers(os.path.dirname(os.path.abspath(path)), os.path.basename(root))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if disk_full(e) and not getattr(e, "filename", None):
            e.filename = path  # run_main's line names the file the disk could not hold
        raise


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash leaves the old file intact."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_checkpoint(path, flag_name, keys):
    """torch.load(weights_only=True) of a dict holding keys; any failure is a ConfigError
    naming the flag and the file (a crafted pickle is refused by weights_only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if named:  # a pickle that would run code: never loaded, whatever it is
            reason = (f"it holds a Python object ({named.group(1)}) that is never loaded; only "
                      "tensors and plain data are read")
        elif "central directory" in text or isinstance(e, (OSError, EOFError, UnpicklingError)):
            reason = "the file is truncated or not a torch checkpoint"
        else:
            reason = f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"
        raise ConfigError(f"invalid settings:\n  {flag_name} {path}: not a checkpoint we read "
                          f"({reason})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        refuse([f"{flag_name} {path}: not a checkpoint of train.py (no {', '.join(missing)})"])
    return ckpt


def fingerprint(path):
    """A short hash of a file (or of the files in a directory): a base model, a data file."""
    digest = hashlib.sha256()
    files = ([path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))))
    for name in files:
        with open(name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def cannot_write(folder):
    """Why folder cannot take files, or None: a probe file is written there and removed, as
    are the folders made for it (a refused run leaves none behind)."""
    made, path = [], os.path.abspath(folder)
    while not os.path.exists(path) and path != os.path.dirname(path):
        made, path = made + [path], os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return e.strerror
    except RecursionError:  # os.makedirs recurses once a level
        return "a path too many folders deep"
    for path in made if world()[1] == 1 else []:  # the deepest first (torchrun's processes
        try:  # share the out-dir: kept)
            os.rmdir(path)
        except OSError:
            break
    return None


def out_dir_problems(out_dir, outputs, resume=False, overwrite=False):
    """Before any work: out_dir can be written, no output is a directory (a name ending in /
    is a folder, and no file), and an earlier run there is neither overwritten by accident
    nor resumed from nothing. The problems, as lines."""
    if reason := cannot_write(out_dir):
        return [f"--out-dir {out_dir}: cannot write there ({reason})"]
    out = []
    for name in outputs:
        path, folder = os.path.join(out_dir, name), name.endswith("/")
        if folder and os.path.isdir(path) and (reason := cannot_write(path)):  # now, not at the end
            out.append(f"--out-dir {out_dir}: cannot write in its {name} ({reason})")
        if os.path.isdir(path) != folder and os.path.exists(path):
            kind = "a file" if folder else "a directory"
            out.append(f"--out-dir {out_dir}: {name.rstrip('/')} is {kind}; move it away")
    if (earlier := [n for n in outputs if os.path.exists(os.path.join(out_dir, n))]) and not (
            resume or overwrite):
        out.append(f"--out-dir {out_dir} already holds {', '.join(earlier)} of an earlier run: "
                   "continue it with --resume, replace it with --overwrite, or pick another one")
    return out


def file_problems(flag_name, path):
    """The problem with an input file given by a flag, or []: missing, a symlink loop, a
    directory, not a regular file (a FIFO, a device, a socket would hang or never end), or
    unreadable."""
    if not path:
        return []
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        gone = os.path.islink(path)
        return [f"{flag_name} {path}: " + ("a symlink to nothing" if gone else "no such file")]
    except OSError as e:
        if e.errno == errno.ELOOP:
            return [f"{flag_name} {path}: a symlink loop, not a file"]
        return [f"{flag_name} {path}: cannot be read ({e.strerror})"]
    if stat.S_ISDIR(mode):
        return [f"{flag_name} {path}: is a directory, not a file"]
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        return [f"{flag_name} {path}: is a {kind}, not a regular file; give a file"]
    if not os.access(path, os.R_OK):
        return [f"{flag_name} {path}: cannot be read (permissions)"]
    return []


def output_problems(flag_name, path):
    """The problem with an output file named by a flag, found before any work: its directory
    cannot be made or written, or the name is a directory."""
    if os.path.isdir(path):
        return [f"{flag_name} {path}: is a directory; give a file name"]
    reason = cannot_write(os.path.dirname(os.path.abspath(path)))
    return [f"{flag_name} {path}: cannot write there ({reason})"] if reason else []


class OutDirLock:
    """One run at a time in an out-dir: the filelock package's lock on run.lock, which the
    kernel lets go when its process ends, so a run killed with kill -9 blocks nothing. A
    second run is refused at once; the first removes a killed run's temporary files."""

    def __init__(self, out_dir):
        self.out_dir, self.lock = out_dir, FileLock(os.path.join(out_dir, "run.lock"), timeout=0)

    def __enter__(self):
        os.makedirs(self.out_dir or ".", exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise ConfigError(f"invalid settings:\n  --out-dir {self.out_dir}: another run is "
                              "writing there; wait for it, or give another --out-dir") from None
        remove_leftovers(self.out_dir)
        return self

    def __exit__(self, *exc):
        self.lock.release()


def running(pid):
    try:
        return os.kill(pid, 0) is None  # signal 0: only asks whether the process is there
    except (ProcessLookupError, PermissionError) as e:
        return isinstance(e, PermissionError)  # there, another user's


def leftovers(folder, stem=""):
    """Temporary files of an interrupted atomic_write (name.tmp<pid>.ext, of `stem` if given)
    whose process is gone: a kill -9 leaves them, and the next write or run finds them."""
    out = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        found = re.search(r"\.tmp(\d+)(\.|$)", name)
        if found and name.startswith(stem) and not running(int(found.group(1))):
            out.append(os.path.join(folder, name))
    return out


def remove_leftovers(folder, stem=""):
    for path in leftovers(folder, stem):  # a folder: write_safetensors' (hf/export.py)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
