"""The ``conan-embed`` command line: one thin command per pipeline stage.

Commands hold no logic of their own; each calls into the stage's module. Heavy imports
(torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="conan-embed",
    help="Train, mine, evaluate and serve text embedding models with the Conan recipe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(
    help="Build training data: prepare, clr, generate, filter.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@app.command()
def version() -> None:
    """Print the package version."""
    from conan_embedding import __version__

    typer.echo(__version__)


# --- stage commands are registered below, one block per stage (keep each block small) ---
