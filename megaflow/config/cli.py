"""Command line and YAML: Megatron-LM flag names -> Config (then finalize and validate)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from megaflow.config.fields import ConfigError
from megaflow.config.root import SECTIONS, Config
from megaflow.config.validation import finalize


# ---------------------------------------------------------------------------------------------
# Flag table: flag name -> (section, field)

def _flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _field_table():
    table = {}
    for section, klass in SECTIONS.items():
        for f in fields(klass):
            table[_flag_name(f)] = (section, f)
    return table


FIELDS = _field_table()
_BY_NAME = {f.name: (section, f) for section, f in FIELDS.values()}


def _scalar_type(section: str, f) -> type:
    hint = get_type_hints(SECTIONS[section])[f.name]
    if get_origin(hint) is Union:
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting: one message, the entry
    point's, for every command-line mistake."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_gpt.py", description="megaflow GPT pretraining (Megatron-LM flag names)",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", help="YAML file of settings (command-line flags override it)")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also MEGAFLOW_DEBUG=1)")
    for flag, (section, f) in FIELDS.items():
        help_text = (f.metadata.get("help") or "").replace("%", "%%")  # argparse formats help with %
        action, kw = f.metadata.get("action"), {"help": help_text, "dest": f"{section}.{f.name}"}
        if action in ("store_true", "store_false"):
            p.add_argument(flag, action=action, **kw)
        elif action == "nargs+":
            p.add_argument(flag, nargs="+", **kw)
        else:
            typ = _scalar_type(section, f)
            p.add_argument(flag, type=typ, choices=f.metadata.get("choices"), **kw)
    return p


def _coerce(section: str, f, value, origin: str):
    """Type-check a YAML value against the field's type; errors name the key."""
    if value is None:
        return None
    typ = list if f.metadata.get("action") == "nargs+" else _scalar_type(section, f)
    try:
        if typ is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ is list:
            return [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        value = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {_flag_name(f)} expects {typ.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{origin}: {_flag_name(f)} must be one of {choices}, got {value!r}")
    return value


def _load_yaml(path: str) -> dict:
    """YAML keys may be field names or flag names, flat or under a section name."""
    import yaml
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        name = str(key).lstrip("-").replace("-", "_")
        hit = _BY_NAME.get(name) or FIELDS.get("--" + str(key).lstrip("-"))
        if hit is None:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.75)
            raise ConfigError(f"--config {path}: unknown setting {key!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        section, f = hit
        v = _coerce(section, f, value, f"--config {path}")
        if f.metadata.get("action") == "store_false" and key.lstrip("-").startswith("disable"):
            v = not v  # `disable-bias-linear: true` means add_bias_linear = False
        out[(section, f.name)] = v
    return out


def parse_args(argv=None, world_size: Optional[int] = None, check: bool = True) -> Config:
    """Command line (+ YAML) -> validated Config. Raises ConfigError naming the flag.
    check=False fills the derived fields but leaves validation to the caller (the run planner, which
    validates each layout it tries)."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(unknown_flags_message(unknown, parser))
    given = {tuple(k.split(".", 1)): v for k, v in vars(ns).items() if k not in ("config", "debug")}
    settings = _load_yaml(ns.config) if getattr(ns, "config", None) else {}
    settings.update(given)
    cfg = Config()
    for (section, name), value in settings.items():
        setattr(getattr(cfg, section), name, value)
    return finalize(cfg, world_size=world_size, check=check)


def unknown_flags_message(unknown: list, parser: argparse.ArgumentParser) -> str:
    """`unknown flag --num-layer (did you mean --num-layers?)`, for every unknown flag given."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(unknown)}: every setting is a --flag VALUE pair (see --help)"
    parts = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return (f"unknown flag{'s' if len(parts) > 1 else ''} {', '.join(parts)}; `pretrain_gpt.py --help` lists "
            "every flag, docs/migrating.md the Megatron-LM flags megaflow does not have")


def _default_config(cfg: Config) -> Config:
    """What the same model style resolves to with no other setting: the reference of the argument dump."""
    ref = Config()
    ref.model.model_style = cfg.model.model_style
    return finalize(ref, world_size=1, check=False)


def changed_settings(cfg: Config) -> list:
    """[(section, name, value)] of every field whose value differs from the default."""
    ref = _default_config(cfg)
    out = []
    for section in SECTIONS:
        mine, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(ref, section))
        out += [(section, name, value) for name, value in sorted(mine.items()) if value != theirs[name]]
    return out


def format_config(cfg: Config, full: bool = False) -> str:
    """The configuration as Megatron prints it, one `name ....... value` line per field. By default only
    the fields that differ from their defaults (the full set is in every checkpoint's config.json and in
    TensorBoard's `arguments` text); full=True lists all of them."""
    lines = ["------------------------ megaflow arguments ------------------------"]
    if full:
        shown = [(s, n, v) for s in SECTIONS for n, v in sorted(dataclasses.asdict(getattr(cfg, s)).items())]
    else:
        shown = changed_settings(cfg)
    for _section, name, value in shown:
        lines.append(f"  {name} {'.' * max(1, 48 - len(name))} {value}")
    lines.append(f"  world_size / data_parallel_size {'.' * 17} {cfg.world_size} / {cfg.data_parallel_size}")
    if cfg.padded_vocab_size is not None:
        lines.append(f"  vocab_size / padded_vocab_size {'.' * 18} {cfg.vocab_size} / {cfg.padded_vocab_size}")
    if not full:
        total = sum(len(dataclasses.fields(k)) for k in SECTIONS.values())
        where = [f"{cfg.checkpoint.save}/iter_*/config.json"] if cfg.checkpoint.save else []
        if cfg.logging.tensorboard_dir:
            where.append(f"TensorBoard text 'arguments' in {cfg.logging.tensorboard_dir}")
        lines.append(f"  ({total - len(shown)} more at their defaults, which --help lists"
                     + (f"; all settings: {', '.join(where)})" if where else ")"))
    lines.append("-------------------- end of megaflow arguments ---------------------")
    return "\n".join(lines)


def config_from_kwargs(world_size: int = 1, **overrides: Any) -> Config:
    """Build a Config in code (tests, benchmarks): keyword = field name, in any section."""
    cfg = Config()
    for name, value in overrides.items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        setattr(getattr(cfg, _BY_NAME[name][0]), name, value)
    return finalize(cfg, world_size=world_size)
