"""The stage configs (stages.py) loaded from YAML and the command line with strict checking.

A YAML recipe has one section per concern (`view`, `cache`, `train`); each maps onto one
frozen dataclass of stages.py. Every field carries its help text in its metadata (`setting`): the
command line's options and their `--help` are generated from it (cli/options.py), so a key,
its help and its default live in one place. Unknown keys and wrong types are errors that name
the key; values from the command line go through the same checks as YAML values.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from usi_cache.config.errors import ConfigError

# Keys that moved: old key -> its key now (relative to the stage's section).
MOVED = {"mixup": "mix.mixup", "cutmix": "mix.cutmix", "mix_prob": "mix.prob", "mix_switch": "mix.switch"}
def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # a list of any length >= 1
        item = typing.get_args(tp)[0]
        values = list(value) if isinstance(value, (list, tuple)) else [value]  # one value: a list of one
        if not values:
            raise ConfigError(f"{where}: expected one or more values, got an empty list")
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(values))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                raise ConfigError(f"{where}: expected a finite number, got {value!r}") from None
            if not math.isfinite(value):  # nan/inf would silently poison a cache or a run
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return value
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, where: str, base=None):
    """Build dataclass `cls` from `data` over `base` (default: the class defaults), nested sections
    included; unknown keys and wrong types raise ConfigError naming the key."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names, key=str):  # YAML keys need not be strings
        if key in MOVED and "mix" in names:
            raise ConfigError(f"{where}.{key}: moved to {where}.{MOVED[key]}")
        raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp, where_key = hints[key], f"{where}.{key}"
        if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
            if not isinstance(value, dict):
                raise ConfigError(_not_a_section(where_key, value))
            kwargs[key] = from_dict(tp, value, where_key, getattr(base, key))
        else:
            kwargs[key] = _check_type(value, tp, where_key)
    return dataclasses.replace(base, **kwargs)


def _not_a_section(where: str, value) -> str:
    if where.endswith(".mix") and isinstance(value, str):  # the old `mix: paired`
        return f"{where}: is a section now: write `mix: {{mode: {value}}}` (on the command line: --mix {value})"
    return f"{where}: expected a mapping of keys, got {value!r:.80}"


RECIPES = "configs"  # packaged recipes: usi_cache/configs links to the repository's configs/


def recipe_path(name: str) -> Path:
    """A recipe shipped inside the package, e.g. recipe_path("usi.yaml")."""
    folder = importlib.resources.files("usi_cache") / RECIPES
    path = folder / name
    if not path.is_file():
        known = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []
        raise ConfigError(f"{name}: no such packaged recipe (packaged: {', '.join(known) or 'none'})")
    return Path(str(path))  # wheels install unzipped: a real file


def read_yaml(path: str | Path | None) -> dict:
    """Read a recipe YAML (safe loader); None gives an empty recipe. A bare name that is not a
    file here, such as `usi.yaml`, is looked up among the packaged recipes."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file() and path.parent == Path("."):
        try:
            path = recipe_path(path.name)
        except ConfigError:
            pass
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}  # safe: a !!python/... tag is an error
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not valid UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(data) - {"view", "cache", "train"}, key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (known: cache, train, view)")
    return data


def recipe_section(cls: type, section: str, recipe: dict, path=None) -> dict:
    """The YAML keys of stage `section`: its section, plus the shared `view` section."""
    for name in (section, "view"):
        if not isinstance(recipe.get(name) or {}, dict):
            raise ConfigError(f"{path}: section {name!r}: expected a mapping of keys, got {recipe[name]!r:.80}")
    data = dict(recipe.get(section) or {})
    if "view" in recipe and "view" in {f.name for f in dataclasses.fields(cls)}:
        if "view" in data:  # one of the two would be ignored
            raise ConfigError(f"{path}: {section}.view: also given as the top-level view section: give one")
        data["view"] = dict(recipe["view"] or {})
    return data


def load_stage_config(cls: type, section: str, path: str | Path | None, overrides: dict, *,
                      none_means_unset: bool = True):
    """Dataclass defaults < YAML section `section` (+ the shared `view` section) < overrides.

    Override keys are field names or dotted paths into sections (`mix.prob`); a mapping given
    for a section is merged key by key. Overrides whose value is None were not given, unless
    `none_means_unset` is off (the command line passes only what it was given: null is a value).
    """
    data = recipe_section(cls, section, read_yaml(path), path)
    given = {k: v for k, v in overrides.items() if v is not None or not none_means_unset}
    if given.get("mix.mode") == "none" and isinstance(data.get("mix"), dict):
        # mixing switched off on the command line: the recipe's other mix keys go with it (only
        # mix keys given on the command line as well are an error: they would be ignored)
        data["mix"] = {}
    for key, value in given.items():
        _assign(cls, data, key.split("."), value, section)
    cfg = from_dict(cls, data, section)
    cfg.validate()
    return cfg


def _assign(cls: type, data: dict, parts: list[str], value, where: str) -> None:
    """data[parts...] = value, merging mappings given for a nested section."""
    key, where = parts[0], f"{where}.{parts[0]}"
    tp = typing.get_type_hints(cls).get(key)
    if tp is None or not dataclasses.is_dataclass(tp) or (len(parts) == 1 and not isinstance(value, dict)):
        if len(parts) > 1:
            field_type(cls, ".".join(parts), where.rsplit(".", 1)[0])  # raises: not a section
        data[key] = value
        return
    sub = data.get(key)
    if sub is None:
        sub = {}
    elif isinstance(sub, tp):
        sub = to_dict(sub)
    elif not isinstance(sub, dict):
        raise ConfigError(_not_a_section(where, sub))
    data[key] = sub = dict(sub)
    if len(parts) > 1:
        _assign(tp, sub, parts[1:], value, where)
    else:
        for k, v in value.items():
            _assign(tp, sub, [k], v, where)


def field_type(cls: type, path: str, where: str):
    """The type of the field at dotted `path` of `cls`; ConfigError for an unknown key."""
    for i, key in enumerate(path.split(".")):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: not a section, has no key {key!r}")
        where = f"{where}.{key}"
        hints = typing.get_type_hints(cls)
        if key not in hints:
            from_dict(cls, {key: None}, where.rsplit(".", 1)[0])  # raises: moved or unknown key
        cls = hints[key]
    return cls


def parse_text(text: str, tp: Any, where: str) -> Any:
    """A command-line value (text) for a field of type `tp`, checked like a YAML value.

    Numbers as Python writes them (1e-3 included, which YAML 1.1 reads as a string), pairs and
    triples comma-separated (0.35,1), lists comma-separated (a,b,c), booleans true/false, mappings as JSON, null for None.
    """
    return _check_type(_from_text(text, tp, where), tp, where)


def _from_text(text: str, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() == "null":
            return None
        return _from_text(text, args[0], where)  # the configs' unions are `X | None`
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # comma-separated, any length
        item = typing.get_args(tp)[0]
        parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
        return [_from_text(p, item, f"{where}[{i}]") for i, p in enumerate(parts)]
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
        if len(parts) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {text!r}")
        return [_from_text(p, a, f"{where}[{i}]") for i, (p, a) in enumerate(zip(parts, args))]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: is a section: set its keys, e.g. {where}.<key>=VALUE")
    if tp is bool:
        word = text.strip().lower()
        if word in ("true", "false"):
            return word == "true"
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    if tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: expected a JSON object, e.g. '{{\"drop_path_rate\": 0.1}}', "
                              f"got {text!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {text!r}")
        return value
    converters = {int: (int, "an integer"), float: (float, "a number"), str: (str, "a string")}
    convert, what = converters[tp]
    try:
        return convert(text.strip() if tp is not str else text)
    except ValueError:
        raise ConfigError(f"{where}: expected {what}, got {text!r}") from None


def parse_assignment(cls: type, section: str, item: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` -> (dotted key, checked value). KEY may start with the section name."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. {section}.seed=1")
    if key.startswith(section + "."):
        key = key[len(section) + 1:]
    return key, parse_text(text, field_type(cls, key, section), f"{section}.{key}")


@dataclass(frozen=True)
class Setting:
    """One leaf key of a stage config, as the command line shows it."""

    path: str  # dotted key in the section, e.g. "mix.prob"
    type: Any
    default: Any  # the stage's default (a nested section's default comes from its parent)
    help: str
    flag: str  # the option, e.g. --mix-prob
    required: bool


def settings(cls: type, base=None, prefix: str = "") -> list[Setting]:
    """Every leaf key of config class `cls`, nested sections included, in declaration order."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, value, path = hints[f.name], getattr(base, f.name), prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += settings(tp, value, path + ".")
            continue
        flag = f.metadata.get("flag") or "--" + path.replace(".", "-").replace("_", "-")
        out.append(Setting(path, tp, value, f.metadata.get("help", ""), flag, f.metadata.get("required", False)))
    return out


def upgrade_saved(cls: type, saved: dict, where: str = "saved config") -> dict:
    """A config dict saved by an older version (a run's config.json or checkpoint) in today's
    shape: the flat mix keys move into the `mix` section (an old train config mixed batches),
    keys added since take their defaults."""
    data = dict(saved)
    if "mix" in {f.name for f in dataclasses.fields(cls)}:
        mix = {new.split(".", 1)[1]: data.pop(old) for old, new in MOVED.items() if old in data}
        if isinstance(data.get("mix"), str):
            mix["mode"] = data.pop("mix")
        if mix:
            data["mix"] = {**data.get("mix", {}), **mix}
    return to_dict(from_dict(cls, data, where))


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
