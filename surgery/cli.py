"""The `surgery` command line: a click group of the commands in the registry (``surgery.commands``).

Each command's entry module is imported only when that command is used, and no entry module imports torch at
import time, so `surgery --help` stays fast. Every user-facing failure is a ``SurgeryError`` printed as one
line ``surgery: error: ...`` with exit code 2 (the traceback only with -v).
"""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from surgery import __version__, console
from surgery.commands import COMMANDS
from surgery.errors import SurgeryError
from surgery.process_memory import bound_process_memory


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"surgery.{COMMANDS[name].module}").command

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name].summary) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="surgery")
@click.option("-v", "--verbose", count=True, help="More output; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and results.")
def group(verbose, quiet):
    """Checkpoint surgery for LLMs: turn dense safetensors checkpoints into Mixture-of-Experts ones."""
    console.VERBOSITY["level"] = -1 if quiet else min(verbose, 1)


def main(argv=None):
    bound_process_memory()  # before torch loads: some settings are read once, at its first products

    args = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
    try:
        group.main(args=args, prog_name="surgery", standalone_mode=False)
    except SurgeryError as exc:
        if verbose:
            traceback.print_exc()
        print(f"surgery: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("surgery: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.UsageError as exc:  # one line like every other error, with where to look for help
        command = exc.ctx.command_path if exc.ctx is not None else "surgery"
        print(f"surgery: error: {exc.format_message().rstrip('.')} (see '{command} --help')", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
