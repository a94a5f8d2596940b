"""Peer profiles: TOML files that fill a command's options (flags given on the command line win).

A profile names its role (`role = "join"`) and sets options by their names with
underscores (`initial_peers = ["/ip4/..."]`, `steps = 1000`). An unknown key, a
role that is not the command's, or a value the option refuses is an error that
names the file and the key.
"""

from __future__ import annotations

import sys

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_profile(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """click callback of `--profile` (eager): validates the file and makes its values the defaults."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", ctx, param) from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}", ctx, param) from None
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML: not UTF-8 text (byte {e.start})", ctx, param) from None
    command = ctx.command.name
    role = data.pop("role", None)
    if role is not None and role != command:
        raise click.BadParameter(f"{path}: role = {role!r}, but this is `{command}`", ctx, param)
    options = {_key(p): p for p in ctx.command.params if isinstance(p, click.Option) and p.name != param.name}
    defaults = {}
    for key, value in data.items():
        option = options.get(key)
        if option is None or getattr(option, "hidden", False):
            known = ", ".join(sorted(n for n, p in options.items() if not getattr(p, "hidden", False)))
            raise click.BadParameter(f"{path}: unknown key {key!r} for `{command}`; known keys: {known}", ctx, param)
        if option.multiple and not isinstance(value, list):
            raise click.BadParameter(f"{path}: key {key!r} takes a list", ctx, param)
        try:
            if option.multiple:
                defaults[option.name] = [option.type.convert(v, option, ctx) for v in value]
            elif isinstance(value, (list, dict)):
                raise click.BadParameter(f"expected one value, got {type(value).__name__}")
            else:
                defaults[option.name] = option.type.convert(value, option, ctx)
        except click.BadParameter as e:
            raise click.BadParameter(f"{path}: key {key!r}: {e.message}", ctx, param) from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _key(option: click.Option) -> str:
    """The profile key of an option: its long flag without dashes (`--initial-peers` -> `initial_peers`)."""
    longs = [o for o in option.opts if o.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else option.name


def profile_option(f):
    return click.option("--profile", type=click.Path(dir_okay=False), default=None, is_eager=True,
                        expose_value=False, callback=load_profile,
                        help="TOML peer profile (see peers/); flags on the command line override it.")(f)
