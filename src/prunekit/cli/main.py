"""The `prunekit` command: train, prune, fine-tune, evaluate and benchmark from YAML recipes.

Every error prunekit raises on purpose (a bad recipe key, an unknown model, missing data, an
impossible pruning target) is printed as one line on stderr and exits with status 2; `--debug`
shows the traceback instead. Nothing is written before the recipe, the data, the model and (for
one-shot methods) a dry run of the pruning have all been checked.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from typing import Any

import click

from ..core.errors import PrunekitError

EXIT_USER_ERROR = 2


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _silence_stdout() -> None:
    # Python would report the broken pipe again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class PrunekitGroup(click.Group):
    """A click group that turns prunekit's own errors into one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PrunekitError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_one_line(err)}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except BrokenPipeError:  # the reader went away (`prunekit info | head`): stop quietly
            _silence_stdout()
            ctx.exit(1)
        except OSError as err:
            if ctx.params.get("debug"):
                raise
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            click.echo(f"error: {err.strerror or _one_line(err)}{where}", err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=PrunekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="prunekit", prog_name="prunekit")
def cli(debug: bool) -> None:
    """Structural pruning for PyTorch.

    \b
    prunekit run                        train, prune, fine-tune and report (embedded digits recipe)
    prunekit run RECIPE.yaml k=v ...    the same from a recipe, with dotted overrides
    prunekit compare RECIPE.yaml        several methods on one dense model: table, plot, report
    prunekit info                       models, datasets, methods and criteria
    prunekit search RECIPE.yaml k=v ... PR-DARTS: search a sparse cell and evaluate it
    prunekit evolve RECIPE.yaml         evolve pruning functions (genetic programming)
    prunekit export RUN_DIR --to m.onnx the pruned model for deployment (ONNX, torch.export, TorchScript)
    """


def _register() -> None:
    from . import commands, compare_cmd, evolve_cmd, export_cmd, inspect_cmds, search_cmd

    for command in (commands.run, commands.resume_cmd, commands.train_cmd, commands.prune_cmd, commands.finetune_cmd,
                    inspect_cmds.eval_cmd, inspect_cmds.bench, export_cmd.export_cmd, inspect_cmds.report, inspect_cmds.info,
                    compare_cmd.compare_cmd, evolve_cmd.evolve_cmd, search_cmd.search_cmd):
        cli.add_command(command)


_register()


def _one_line_warnings(shown: Any) -> Any:
    """A showwarning that prints prunekit's own warnings (PrunekitWarning) as one 'warning: ...'
    line (the source line behind them means nothing to a user of the command) and hands every
    other warning to `shown`, the one in place before."""
    from ..core.errors import PrunekitWarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, PrunekitWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)
    return show


class Terminated(KeyboardInterrupt):
    """SIGTERM (a timeout, a stopped batch job), raised where Ctrl-C would be: a command that
    checkpoints says how to continue, as on Ctrl-C, and the process exits 143 (128 + SIGTERM)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`prunekit`). SIGTERM is handled like Ctrl-C (see `Terminated`) where
    no other handler is set; the default action would end the process without a word."""
    signals: list[int] = []

    def on_terminate(signum: int, frame: Any) -> None:
        signals.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process outright
        raise Terminated()

    own = (hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if own:
        signal.signal(signal.SIGTERM, on_terminate)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(shown)
    try:
        cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="prunekit")
    except SystemExit:
        if signals:
            raise SystemExit(128 + signals[0]) from None
        raise
    finally:
        warnings.showwarning = shown
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    main()
