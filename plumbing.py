"""
The machinery a reader of the method can skip: settings from dataclasses to the command
line and back, files written atomically, checkpoints read with a clear error, process
groups under torchrun, pictures, and the exit codes every entry script shares.

Nothing here knows about GAST; model.py, lora.py, data.py and gast.py are the method.
"""

import argparse
import csv
import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import statistics
import sys
from contextlib import nullcontext
from dataclasses import field, fields
from pickle import UnpicklingError

import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------
# Settings: one dataclass field per setting, its help text beside its default


def option(default, help):
    """A dataclass field whose help text travels with it (to --help and to the README)."""
    return field(default=default, metadata={"help": help})


def like(config_type, name, convert=None):
    """A field with the default and help of config_type's field `name` (declared once there);
    convert: how the default is spelled on the command line (a tuple as "a,b", say)."""
    source = {f.name: f for f in fields(config_type)}[name]
    return option(convert(source.default) if convert else source.default, source.metadata["help"])


class ConfigError(ValueError):
    """Every problem with the settings, listed at once; main() prints it and exits 2."""


def refuse(problems):
    """Raise one ConfigError listing every problem, if there are any."""
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def flag(name):
    return "--" + name.replace("_", "-")


def positive(config, *names):
    """A problem line for every listed setting that is not > 0 (nan and inf included)."""
    return [
        f"{flag(n)} must be positive, got {getattr(config, n)}"
        for n in names
        if not (getattr(config, n) > 0 and math.isfinite(getattr(config, n)))
    ]


def not_negative(config, *names):
    return [
        f"{flag(n)} must not be negative, got {getattr(config, n)}"
        for n in names
        if not (getattr(config, n) >= 0 and math.isfinite(getattr(config, n)))
    ]


def in_range(config, name, low, high, low_open=False, high_open=False):
    value = getattr(config, name)
    ok = (
        math.isfinite(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return [] if ok else [f"{flag(name)} must be in {bounds}, got {value}"]


def one_of(config, name, choices):
    value = getattr(config, name)
    return (
        []
        if value in choices
        else [f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}"]
    )


def parse_args(config_type, argv=None, description=None, known_only=False, epilog=None):
    """config_type from the command line: one flag per field (--layer-ratio for layer_ratio),
    its help the field's. known_only: (config, the flags that are not config_type's), for a
    script that passes the rest on; flags are never abbreviated, so --seed is never taken for
    --seeds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(
        description=description, epilog=epilog, allow_abbrev=False, formatter_class=HelpFormatter
    )
    for f in fields(config_type):
        if f.type is bool or f.type == "bool":
            parser.add_argument(
                flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag(f.name), type=kind, default=f.default, help=f.metadata["help"])
    if known_only:
        values, rest = parser.parse_known_args(argv)
        return config_type(**vars(values)), rest
    return config_type(**vars(parser.parse_args(argv)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the script's docstring as it is written."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a value that is not a number) are a
    ConfigError like any other bad setting: one `error:` line, printed by the first
    process only under torchrun, exit 2 on every process."""

    def error(self, message):
        raise ConfigError(f"{message} (--help lists the flags)")


def config_from_dict(config_type, values):
    """config_type from a dict; unknown keys are an error, not silently ignored."""
    unknown = sorted(set(values) - {f.name for f in fields(config_type)})
    refuse([f"unknown field(s): {', '.join(unknown)}"] if unknown else [])
    return config_type(**values)


def subset(config_type, config):
    """config_type built from the fields of a larger config (or dict) that it declares."""
    values = config if isinstance(config, dict) else vars(config)
    return config_type(**{f.name: values[f.name] for f in fields(config_type) if f.name in values})


# ---------------------------------------------------------------------------------------
# Devices and processes


def check_device(name):
    """None if the device can be used here, else the problem, naming --device."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {name!r}: only cpu and cuda are supported"
    if not torch.cuda.is_available():
        return (
            f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); "
            "use --device cpu or auto"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)"
    return None


def world():
    """(rank, number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """Only the first process prints and writes files; the others compute alongside it.
    Before the process group exists (a bad flag under torchrun), RANK says which is first."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def pick_device(name):
    """auto: cuda when available. Under torchrun a plain cuda means this process's GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device == "cuda" and world()[1] > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return device


def init_distributed(device_name):
    """Under torchrun (its environment names WORLD_SIZE, RANK, MASTER_ADDR ...), join the
    process group: nccl on CUDA, gloo on the CPU. True if this call created it."""
    if (
        "WORLD_SIZE" not in os.environ
        or not dist.is_available()
        or dist.is_initialized()
        or check_device(device_name)
    ):
        return False
    cuda = pick_device(device_name).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def autocast_for(device):
    """bf16 autocast on GPUs that support it; full precision elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def say(config, *args):
    """A progress line, unless --quiet; only the first process prints."""
    if not getattr(config, "quiet", False) and is_main():
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------
# Files: written atomically, read with a clear error, the output directory checked first


def atomic_write(path, write):
    """write(tmp) writes the file at tmp; then it is renamed to path. A crash or an error
    leaves the old file intact and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # same extension: writers that go by it still do
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash leaves the old file intact."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    atomic_write(path, lambda tmp: _dump_json(tmp, obj))


def _dump_json(tmp, obj):
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


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
            reason = (
                f"it holds a Python object ({named.group(1)}) that is never loaded; only "
                "tensors and plain data are read"
            )
        elif "central directory" in text or isinstance(e, (OSError, EOFError, UnpicklingError)):
            reason = "the file is truncated or not a torch checkpoint"
        else:
            reason = f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"
        raise ConfigError(
            f"invalid settings:\n  {flag_name} {path}: not a checkpoint we read ({reason})"
        ) from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(
            f"invalid settings:\n  {flag_name} {path}: not a checkpoint of train.py (no "
            f"{', '.join(missing)})"
        )
    return ckpt


def fingerprint(path):
    """A short hash of a file (or of the files in a directory): a base model, a data file."""
    digest = hashlib.sha256()
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(
            os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))
        )
    )
    for name in files:
        with open(name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def cannot_write(folder):
    """Why files cannot be written in folder (made if missing), or None if they can: a probe
    file is written and removed."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return e.strerror
    return None


def check_out_dir(out_dir, outputs, resume=False, overwrite=False):
    """Before any work: out_dir can be written, no output is a directory, and an earlier
    run there is neither overwritten by accident nor resumed from nothing."""
    if cannot_write(out_dir):
        refuse([f"--out-dir {out_dir}: cannot write there ({cannot_write(out_dir)})"])
    for name in outputs:
        if os.path.isdir(os.path.join(out_dir, name)):
            raise ConfigError(
                f"invalid settings:\n  --out-dir {out_dir}: {name} is a directory; move it away"
            )
    earlier = [name for name in outputs if os.path.exists(os.path.join(out_dir, name))]
    if earlier and not resume and not overwrite:
        raise ConfigError(
            f"invalid settings:\n  --out-dir {out_dir} already holds {', '.join(earlier)} of an "
            "earlier run: "
            "continue it with --resume, replace it with --overwrite, or pick another --out-dir"
        )


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
        kind = (
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        )
        return [f"{flag_name} {path}: is {kind}, not a regular file; give a file"]
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


def memory_available(device):
    """Bytes this process can still take on device: the GPU's free memory, or the machine's
    MemAvailable (Linux); None where it cannot be told."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB"


def memory_problems(what, estimate, device, flags):
    """A problem line when a step clearly cannot fit: half the rough estimate (model.py's
    training_memory) is still more than the device has available."""
    available = memory_available(device)
    if available is None or estimate / 2 <= available:
        return []
    return [
        f"{flags}: {what} needs at least about {gib(estimate / 2)} and {device} has "
        f"{gib(available)} available; "
        "choose a smaller shape or batch"
    ]


# ---------------------------------------------------------------------------------------
# Pictures (matplotlib is optional) and small statistics


def pyplot(config=None):
    """pyplot, or None with a one-line note: the code runs without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        say(config, "no picture: matplotlib is not installed (pip install matplotlib)")
        return None


def save_figure(plt, fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def plot_run(history, path, config):
    """train.py's picture of a run (its History): the learning curve (held-out loss and exact
    match at each evaluation); which blocks were updated at each step, unless every block
    always was; each block's noisy and clean selection rates over training (smoothed), where
    the data carries noisy flags."""
    plt = pyplot(config)
    if plt is None or not history.active:
        return
    active = torch.tensor(history.active, dtype=torch.float32).T.tolist()  # (L, steps)
    L, every_block = len(active), all(all(row) for row in history.active)
    rows = 2 if every_block else 3
    fig, axes = plt.subplots(
        rows,
        1,
        figsize=(9, 2.6 * rows),
        gridspec_kw={"height_ratios": [1.2] + [1] * (rows - 2) + [2]},
    )
    curve, bottom = axes[0], axes[-1]
    steps = [e["step"] for e in history.evals]
    curve.plot(
        steps, [e["loss"] for e in history.evals], "o-", color="tab:red", label="held-out loss"
    )
    curve.set_ylabel("held-out loss")
    if history.evals and history.evals[0]["exact_match"] is not None:
        twin = curve.twinx()
        twin.plot(steps, [e["exact_match"] for e in history.evals], "s--", color="tab:blue")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("exact match", color="tab:blue")
    curve.set_title(
        f"{config.method}: the learning curve"
        + (", every block updated at every step" if every_block else "")
    )
    if not every_block:
        axes[1].imshow(
            active,
            aspect="auto",
            interpolation="nearest",
            cmap="Greys",
            vmin=0,
            vmax=1,
            extent=(-0.5, len(active[0]) - 0.5, L - 0.5, -0.5),
        )
        axes[1].set_yticks(range(L))
        axes[1].set_ylabel("block")
        axes[1].set_title("blocks updated at each step (black)")
    if history.noisy_rate:
        colors = plt.get_cmap("tab10")
        for l in range(L):
            for kind, style in (("noisy", ":"), ("clean", "-")):
                rates = smooth([row[l] for row in getattr(history, f"{kind}_rate")], 50)
                bottom.plot(rates, style, color=colors(l), label=f"block {l}, {kind}")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("share of the batch's samples taken\n(when updated; 50-step mean)")
        bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        bottom.text(
            0.5,
            0.5,
            "no noisy flags in this data: no rates",
            ha="center",
            va="center",
            transform=bottom.transAxes,
        )
    for ax in axes:
        ax.set_xlim(-0.5, max(len(history.active), max(steps, default=0)) + 0.5)
    bottom.set_xlabel("step")
    fig.tight_layout()
    save_figure(plt, fig, path)
    say(config, f"wrote {path}")


def nanmean(values):
    """Mean of the values that are not nan (a step with no noisy sample has no noisy rate)."""
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def smooth(values, window):
    """Moving average over the last `window` entries, skipping nan (steps a block was off)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(statistics.fmean(recent) if recent else float("nan"))
    return out


# ---------------------------------------------------------------------------------------
# Exit codes: what every entry script's main() returns


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
        print(
            f"error: {type(e).__name__}: {reason}{where}. The checks missed this: please "
            "report it with the command; GAST_TRACEBACK=1 shows the traceback",
            file=sys.stderr,
        )
        return 2
    return 0


class OutDirLock:
    """One run at a time in an out-dir: run.lock holds the pid and host of the run that
    writes there. A second run is refused at once; a lock whose process is gone (kill -9)
    is named and taken over. Leftover temporary files of such a run are removed."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):  # a stale lock is removed once, then the lock is taken
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, host = self.holder()
                if host == socket.gethostname() and pid is not None and not running(pid):
                    print(f"note: {self.path} was left by pid {pid}, no longer running: taken over")
                    os.remove(self.path)
                    continue
                raise ConfigError(
                    f"invalid settings:\n  --out-dir {os.path.dirname(self.path)}: another run "
                    f"(pid {pid} on {host}) is writing there; wait for it, or give another "
                    f"--out-dir (a stale lock: remove {self.path})"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            remove_leftovers(os.path.dirname(self.path))
            return self
        raise ConfigError(f"invalid settings:\n  {self.path}: cannot take the lock")

    def holder(self):
        try:
            pid, host = open(self.path).read().split()
            return int(pid), host
        except (OSError, ValueError):
            return None, "?"

    def __exit__(self, *exc):
        if self.holder()[0] == os.getpid():
            os.remove(self.path)


def running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder):
    """Temporary files of an interrupted atomic_write (name.tmp<pid>.ext) whose process is gone."""
    for name in os.listdir(folder):
        found = re.search(r"\.tmp(\d+)(\.|$)", name)
        if found and not running(int(found.group(1))):
            os.remove(os.path.join(folder, name))
