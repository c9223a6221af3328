"""``clinml keys``: create, list and revoke the API keys applications call the service with.

The keys live in ``CLINML_API_KEYS_FILE`` (default ``CLINML_HOME/secrets/api_keys.json``),
which holds each key's sha256, never its secret; ``create`` prints the secret once. A
running service picks up a change within about a second, without a restart. Keys given in
the ``CLINML_API_KEYS`` environment variable are listed but cannot be edited here.

``clinml.pipelines.cli`` mounts it: ``app.add_typer(keys_app, name="keys")``. The work is done by
:func:`clinml.serving.keys.add_key`, :func:`~clinml.serving.keys.list_keys` and
:func:`~clinml.serving.keys.revoke_key`; errors are ``ClinmlError`` (one line, exit status 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from clinml.serving.keys import CREATE_HINT, ROLES

if TYPE_CHECKING:
    from clinml.settings import Settings

keys_app = typer.Typer(
    help="API keys for the service: create, list, revoke. A running service picks up "
    "changes within about a second.",
    no_args_is_help=True,
)

DEFAULT_ROLES = ["predict"]


def _env_keys(settings: Settings) -> str | None:
    return settings.api_keys.get_secret_value() if settings.api_keys else None


@keys_app.command("create")
def create(
    key_id: Annotated[
        str, typer.Option("--id", help="The key's name, e.g. the application that uses it.")
    ],
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help=f"A role the key holds ({', '.join(ROLES)}); repeat for several. "
            "Default: predict.",
        ),
    ] = None,
) -> None:
    """Create a key; its secret is printed once, on stdout, and never stored."""
    from clinml.pipelines import runtime
    from clinml.serving.keys import add_key

    settings = runtime.load_settings()
    path = settings.api_keys_path
    secret, entry = add_key(path, key_id, role or DEFAULT_ROLES, _env_keys(settings))
    typer.echo(secret)
    typer.echo(
        f"created key '{key_id}' ({', '.join(entry['roles'])}) in {path}; the secret on "
        'stdout is not shown again. Send it as: curl -H "Authorization: Bearer <secret>" ...',
        err=True,
    )


@keys_app.command("list")
def list_() -> None:
    """Show each key's id, roles, creation time and source; never a secret or a hash."""
    from clinml.pipelines import runtime
    from clinml.serving.keys import list_keys

    settings = runtime.load_settings()
    path = settings.api_keys_path
    keys = list_keys(path, _env_keys(settings))
    if not keys:
        typer.echo(
            f"no API keys in {path} (nor in CLINML_API_KEYS): create one with `{CREATE_HINT}`",
            err=True,
        )
        return
    rows = [("ID", "ROLES", "CREATED", "SOURCE")]
    for key in keys:
        source = "file" if key.source == "file" else "CLINML_API_KEYS (read-only)"
        rows.append((key.key_id, ",".join(key.roles), key.created or "-", source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]  # the last is not padded
    for *padded, source in rows:
        typer.echo(
            "  ".join([*(cell.ljust(w) for cell, w in zip(padded, widths, strict=True)), source])
        )


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The id of the key to remove.")],
) -> None:
    """Remove a key from the keys file; a running service refuses it within seconds."""
    from clinml.pipelines import runtime
    from clinml.serving.keys import revoke_key

    settings = runtime.load_settings()
    path = settings.api_keys_path
    revoke_key(path, key_id, _env_keys(settings))
    typer.echo(f"revoked key '{key_id}' in {path}", err=True)
