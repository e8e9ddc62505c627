"""`python -m jaxmerge COMMAND [flags]`: runs one of the commands of `jaxmerge.commands`.

The first argument picks the command; absl sees the rest, as if the command had been run on
its own. The console script `jaxmerge` (pyproject.toml) is the same entry point.
"""

import importlib
import os
import sys

from jaxmerge.commands import COMMANDS


def usage(program: str) -> str:
    """Every command with what it does, and how to get a command's flags."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {program} COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, about in COMMANDS.items()]
    lines += ["", f"{program} COMMAND --help lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs the command `argv[1]` names with `argv[2:]`; exits 2 with one line naming the
    commands when there is none or it is unknown."""
    argv = list(sys.argv if argv is None else argv)
    # How the user started us, for usage lines: `python -m jaxmerge` or the console script.
    started_as = os.path.basename(argv[0]) if argv else "__main__.py"
    program = "python -m jaxmerge" if started_as == "__main__.py" else started_as
    name = argv[1] if len(argv) > 1 else None
    if name in ("-h", "--help", "help"):
        print(usage(program))
        return
    if name not in COMMANDS:
        got = "no command" if name is None else f"unknown command {name!r}"
        print(
            f"error: {got}; allowed: {', '.join(COMMANDS)} ({program} --help says what each does)",
            file=sys.stderr,
        )
        sys.exit(2)
    command = importlib.import_module(f"jaxmerge.commands.{name}")
    # absl's --help prints the __main__ module's docstring: the command's own usage.
    sys.modules["__main__"].__doc__ = command.__doc__
    sys.argv = [f"{program} {name}", *argv[2:]]
    command.cli()


if __name__ == "__main__":
    main()
