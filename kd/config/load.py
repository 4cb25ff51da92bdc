"""Loading a config: YAML file + dotted overrides (one grammar: `key=value` or `--key=value`) ->
a validated `Config`; and the way back (YAML, flat dicts for trackers and checkpoints)."""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd.config.schema import Config, _list_keys, all_keys
from kd.errors import ConfigError


def _explain(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        known = all_keys() if "." in key else [f.name for f in fields(Config)]
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        return f"unknown config key '{key}'{where}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    return f"bad value for '{key}'{where}: {msg.splitlines()[0]}"


def _normalise_override(arg: str) -> str:
    a = arg[2:] if arg.startswith("--") else arg
    if "=" not in a:
        raise ConfigError(f"override {arg!r} must look like key=value or --key=value")
    return a


_ABSENT = object()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + dotted overrides -> validated `Config`."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((OmegaConf.load(path), f" in {path}"))
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"cannot parse {path}: {' '.join(str(e).split())[:300]}") from None
    if overrides:
        dotlist = [_normalise_override(o) for o in overrides]
        try:
            layers.append((OmegaConf.from_dotlist(dotlist), " (command line)"))
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    for layer, where in layers:
        for key in _list_keys():  # one path where a list is expected: a list of one; null: none
            value = OmegaConf.select(layer, key, default=_ABSENT, throw_on_missing=False)
            if isinstance(value, str) or value is None:
                OmegaConf.update(layer, key, [] if value is None else [value], merge=False)
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, where)) from None
    if overrides:  # the run length chosen on the command line wins over the file's other one
        given = {k for k in ("train.max_steps", "train.epochs")
                 if OmegaConf.select(layers[-1][0], k, default=None) is not None}
        if len(given) == 1:
            other = ({"train.max_steps", "train.epochs"} - given).pop()
            OmegaConf.update(schema, other, None, merge=False)
    missing = sorted(OmegaConf.missing_keys(schema))
    if missing:
        raise ConfigError(f"missing required config key '{missing[0]}'")
    try:
        return OmegaConf.to_object(schema)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, "")) from None


def from_flat(flat: dict[str, Any]) -> Config:
    """The Config of a flat {dotted key: value} record (trainer_state.json's); keys this version
    no longer has are skipped."""
    known, nested = set(all_keys()), {}
    for key, value in flat.items():
        if key not in known:
            continue
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), nested))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, " (recorded config)")) from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{'loss.alpha': 0.5, ...}: what trackers show as run config columns."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out
