"""Command-line options generated from a stage's config dataclass.

Every key of the config (nested sections such as `view.*` and `mix.*` included) gets an
option whose help and default come from the field itself (config/stages.py's `setting`), plus `--config`
(a recipe YAML) and `--set KEY=VALUE` for any key. Values are parsed and checked by
config/parser.py exactly like YAML values. Precedence: dataclass defaults < YAML < options/--set.
"""
from __future__ import annotations

import typing
from pathlib import Path

import click

from usi_cache.config.errors import ConfigError
from usi_cache.config.parser import (Setting, load_stage_config, parse_assignment, parse_text, read_yaml,
                                     recipe_section, settings)

RECIPE = "usi_cache.recipe"  # ctx.meta key: (path, YAML) of --config, for --help's defaults
PREFIX = "cfg__"  # parameter names of generated options: cfg__mix__prob for mix.prob


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def _metavar(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args[-1] is Ellipsis:
        return f"{_metavar(args[0])},..."
    if typing.get_origin(tp) is tuple:
        return ",".join(map(_metavar, args))
    if args:  # X | None
        return _metavar(next(a for a in args if a is not type(None)))
    return {int: "INT", float: "FLOAT", str: "TEXT", dict: "JSON"}[tp]


class ConfigOption(click.Option):
    """The option of one config key. Its --help line ends with the key's default, and with the
    recipe's value when --config comes before --help."""

    def __init__(self, *args, setting: Setting, **kwargs):
        self.setting = setting
        super().__init__(*args, **kwargs)

    def get_help_record(self, ctx):
        opts, text = super().get_help_record(ctx)
        s = self.setting
        extra = "required" if s.required else f"default: {_show(s.default)}"
        path, recipe = ctx.meta.get(RECIPE, (None, None))
        if recipe is not None:
            value = _recipe_value(recipe, s.path)
            if value is not None and _show(value) != _show(s.default):
                extra += f"; {Path(path).name} sets {_show(value)}"
        return opts, f"{text}  [{extra}]"


def _recipe_value(recipe: dict, path: str):
    """The recipe's value for dotted `path`, or None where it leaves the key at its default."""
    node = recipe
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _remember_recipe(cls, section):
    def callback(ctx, param, value):
        # eager: runs before --help when --config comes first on the command line
        if value is not None:
            try:
                ctx.meta[RECIPE] = (value, recipe_section(cls, section, read_yaml(value), value))
            except ConfigError:
                pass  # the command itself reports a bad recipe, as one line
        return value
    return callback


def config_options(cls: type, section: str):
    """Decorator: --config, one option per key of `cls`, and --set."""
    def decorate(fn):
        options = [
            click.option("--config", "config_path", is_eager=True, callback=_remember_recipe(cls, section),
                         metavar="YAML", help=f"Recipe YAML (sections view, {section}); a bare name such as "
                                              f"usi.yaml may be a packaged recipe. Put it before --help to see "
                                              f"its values."),
            click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                         help=f"Set any {section} key, dotted for sections (mix.prob=0.5, view.scale=0.35,1); "
                              f"repeatable; checked like the YAML."),
        ]
        for s in settings(cls):
            param = PREFIX + s.path.replace(".", "__")
            if s.type is bool:
                name = s.flag[2:]
                options.append(click.option(f"--{name}/--no-{name}", param, default=None, cls=ConfigOption,
                                            setting=s, help=s.help))
            else:
                options.append(click.option(s.flag, param, default=None, cls=ConfigOption, setting=s,
                                            metavar=_metavar(s.type), help=s.help))
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def stage_config(cls: type, section: str, kwargs: dict):
    """Load the stage config from what config_options gave the command; pops those arguments
    out of `kwargs`. A key given twice (an option and --set, or --set twice) is an error."""
    by_path = {s.path: s for s in settings(cls)}
    given: dict[str, tuple[str, object]] = {}  # dotted key -> (how it was given, value)
    for name in [k for k in kwargs if k.startswith(PREFIX)]:
        value = kwargs.pop(name)
        if value is None:
            continue
        s = by_path[name[len(PREFIX):].replace("__", ".")]
        where = f"{section}.{s.path}"
        given[s.path] = (s.flag, parse_text(value, s.type, where) if isinstance(value, str) else value)
    for item in kwargs.pop("assignments"):
        path, value = parse_assignment(cls, section, item)
        if path in given:
            raise ConfigError(f"{section}.{path}: given twice ({given[path][0]} and --set {item})")
        given[path] = (f"--set {item}", value)
    return load_stage_config(cls, section, kwargs.pop("config_path"), {p: v for p, (_, v) in given.items()},
                             none_means_unset=False)

