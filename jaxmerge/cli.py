"""Every command-line entry point in one style: absl flags, one-line errors, a console script.

Each command (`jaxmerge.commands`, and the study's and scripts' own) has a `main(argv)` over
library functions that tests call directly, a `define_flags()` that declares its flags, and
`cli()`, which runs it:

    def cli():
        cli_lib.run(main, define_flags, required=["config", "workdir"])

Flags are defined when the command runs, never on import, so importing a command module
defines no flag and several can be imported in one process (as tests do). A command that
computes on a pod passes `distributed=True` and gets `--distributed` (and the three flags of a
launch by hand), which joins the multi-host job before `main` runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser as config_file_parser

CPU_DEVICES = 8


def split_cpu_into_devices(count: int = CPU_DEVICES) -> None:
    """On CPU, run data parallel over `count` host devices instead of one.

    XLA:CPU parallelises one device's program poorly; on a 2-core machine the ViT-Ti-like
    benchmark trained with 14% less CPU time per image on 8 devices than on 2 and 30% less
    than on 1 (benchmarks/RESULTS.md; the offline study's small model is cheapest on 2).
    Only sets XLA_FLAGS, so it must run before JAX starts its backends; a device count the user
    set is kept. GPU and TPU runs are unaffected.
    """
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}"


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Lets XLA:CPU reuse the memory of its temporaries from one step to the next (glibc only).

    Each run of a compiled step allocates its temporaries as one block per device (185 MB for
    the ViT-Ti benchmark at 16 images a device). glibc serves a block that large with a fresh
    mmap and unmaps it when freed, so every step page-faults its temporaries in again: 362,000
    faults and 0.6 of the 2.1 CPU seconds of a training step on 8 devices. Serving every block
    from one heap that is never trimmed keeps the pages: 38,000 faults, 0.1 s. The cost is
    that the process keeps its peak heap until it exits. Must run before JAX starts its
    threads. Returns whether the settings took (False on a C library without mallopt).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
        return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    except (OSError, AttributeError):
        return False


def define_config(help_text: str) -> flags.FlagHolder:
    """`--config`, a Python config file with `get_config(arg)`, and `--config.field=value`."""
    return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


@contextlib.contextmanager
def one_line_errors():
    """Turns a bad config or input into one line on stderr and exit status 2, not a traceback."""
    from jaxmerge.checkpoint import CheckpointError, CheckpointWriteError

    try:
        yield
    except CheckpointWriteError as error:
        # Orbax's writer threads are still failing; a normal exit would let them, its atexit
        # hooks and the interpreter's shutdown print their tracebacks after this line.
        print(f"error: {error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except (ValueError, FloatingPointError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def define_distributed_flags() -> None:
    """`--distributed`, and where process 0 listens and which process this is, for a multi-host
    job launched by hand (TPU pods and SLURM jobs need none of the three)."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Multi-host: join the job with jax.distributed.initialize() before anything computes "
        "(TPU pods and SLURM find their processes; by hand give the three flags below).",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "--distributed by hand: HOST:PORT of process 0, on every one."
    )
    flags.DEFINE_integer("num_processes", None, "--distributed by hand: how many processes.")
    flags.DEFINE_integer("process_id", None, "--distributed by hand: this one, 0 to N-1.")


def start_distributed(
    distributed: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the multi-host job (`jax.distributed.initialize`) when `distributed`; a no-op
    otherwise. Must run before JAX computes anything. The three by-hand values left None are
    found by JAX (a TPU pod's metadata, SLURM's variables). Returns whether it joined.
    """
    by_hand = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [name for name, value in by_hand.items() if value is not None]
    if given and not distributed:
        raise ValueError(
            f"--{given[0]}: given without --distributed; allowed: only with --distributed"
        )
    if not distributed:
        return False
    import jax

    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def run(
    main: Callable[[list[str]], None],
    define_flags: Callable[[], None],
    *,
    required: Sequence[str] = (),
    distributed: bool = False,
) -> None:
    """Defines the command's flags (with `distributed`, `define_distributed_flags`' too), sets
    up the CPU (devices, memory reuse) and runs `main` under absl, after joining the
    multi-host job when `--distributed` is given."""
    split_cpu_into_devices()
    keep_freed_memory()
    defined_before = set(flags.FLAGS)
    define_flags()
    if distributed:
        define_distributed_flags()
    flags.mark_flags_as_required(list(required))
    # absl's --help lists the flags of the module named sys.argv[0] alone: under `python -m
    # jaxmerge COMMAND` the command's flags were defined by another module (and `--config` by
    # this one), so they are named the program's own.
    for name in sorted(set(flags.FLAGS) - defined_before):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def quiet_main(argv):
        sys.unraisablehook = drop_closed_loop_reports
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO
        logging.get_absl_logger().addFilter(_drop_advice)
        with one_line_errors():
            if distributed:
                args = flags.FLAGS
                start_distributed(
                    args.distributed, args.coordinator_address, args.num_processes, args.process_id
                )
            main(argv)

    app.run(quiet_main, flags_parser=_parse_in_one_line)


def parse_param(text: str) -> tuple[str, Any]:
    """`name=value` of a `--merge_param` flag: an int, a float, none/true/false, or a string."""
    name, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, {"none": None, "true": True, "false": False}.get(value.lower(), value)


def drop_closed_loop_reports(unraisable, report=sys.unraisablehook) -> None:
    """sys.unraisablehook without the "RuntimeError: Event loop is closed" reports that
    TensorStore's callbacks raise, long after an Orbax read failed and was reported, when they
    find Orbax's asyncio loop gone. A hook, not a stderr filter: several threads report at once,
    and only the hook sees each report whole. Every other report goes to `report`."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    report(unraisable)


# Library lines that are not about the run: TFDS recommends OpenCV on every image dataset it
# opens, and warns that a dataset being prepared on first use has no dataset_info.json yet.
NOT_ABOUT_THE_RUN = ("OpenCV is not installed", "has no dataset_info.json")


def _drop_advice(record) -> bool:
    message = record.getMessage()
    return not any(text in message for text in NOT_ABOUT_THE_RUN)


def _without_traceback(message: str) -> str:
    """A flag error in one line: ml_collections reports an error raised by a config file's
    `get_config` (a typo in `--config file.py:tsak=digits`) with the whole traceback; keep
    the flag and the error's own message."""
    if "Traceback (most recent call last)" not in message:
        return message
    flag = message.splitlines()[0].split(": Error whilst parsing")[0]
    last = [line for line in message.splitlines() if line.strip()][-1].strip()
    raised = re.fullmatch(r"[\w.]+(?:Error|Exception): (.*)", last)
    return f"{flag}: {raised.group(1) if raised else last}"


def _config_of(argv: list[str]):
    """The ConfigDict that `--config FILE[:ARG]` (or `--config=...`) in argv names, or None."""
    for flag, value in zip(argv, [*argv[1:], ""]):
        path = value if flag == "--config" else flag.partition("=")[2]
        if flag == "--config" or flag.startswith("--config="):
            try:
                return config_file_parser("config").parse(path)
            except Exception:  # the file's own error is reported where it is parsed
                return None
    return None


def _unknown_config_field(argv: list[str], error: Exception) -> str:
    """The `--config.a.b` flag that names no field of the parsed config, and the closest field.

    ml_collections' own message is a KeyError holding its quoted text and a suggestion of the
    last name alone ('rnak' for `--config.lora.rnak`): the flag is found by walking each
    `--config.` flag's path through the config instead."""
    config = _config_of(argv)
    for arg in argv[1:]:
        if config is None or not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=")[0].split(".")
        node = config
        for depth, part in enumerate(path):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part in fields:
                node = node[part]
                continue
            parents = path[:depth]
            close = difflib.get_close_matches(part, fields, n=1)
            hint = (
                f"did you mean --config.{'.'.join([*parents, *close])}? (fields are listed in "
                f"the config file)"
                if close
                else "see the config file for its fields"
            )
            return (
                f"--config.{'.'.join(path)}: unknown config field "
                f"{'.'.join(path[: depth + 1])!r}; {hint}"
            )
    name = re.findall(r"\w+", str(error))
    return (
        f"--config: unknown config field {name[0] if name else str(error)!r}; see the config file"
    )


def _parse_in_one_line(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every bad flag (an unknown `--config.field`, a value of the
    wrong type) reported in one line and exit status 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = _without_traceback(str(error))
    except (AttributeError, KeyError) as error:  # ml_collections on an unknown field
        message = _unknown_config_field(argv, error)
    except (TypeError, ValueError) as error:
        message = str(error).splitlines()[0]
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
