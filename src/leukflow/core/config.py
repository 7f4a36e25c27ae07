"""Configuration: validation against the JSON schema, defaults, clear errors.

Validation happens once, when the workflow is parsed, so that a typo fails the
run before any job starts. Errors name the key, what was expected, what
arrived, and the config file that holds the key.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from leukflow.data.io import IMAGE_SUFFIXES

#: The config schema, shipped inside the package (an installed wheel validates too).
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


def _extend_with_defaults(validator_class: type) -> type:
    """Return a validator class that fills in ``default`` values while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """Read the config schema (YAML)."""
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C: 10x faster


def _key_path(parts: Sequence[Any]) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _file_holding(parts: Sequence[Any], sources: Sequence[str | Path]) -> str:
    """Name the last config file that sets ``parts`` (the one that wins a merge)."""
    for source in reversed(list(sources)):
        try:
            node = yaml.safe_load(Path(source).read_text())
            for p in parts:
                node = node[p]
        except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
            continue
        return str(source)
    return ", ".join(str(s) for s in sources) if sources else "the command line (--config)"


def _describe(error: jsonschema.ValidationError) -> tuple[list[Any], str]:
    """Turn a jsonschema error into (key path, 'expected ..., got ...')."""
    parts = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        parts.append(extra[0] if extra else "?")
        return parts, f"unknown key; expected one of {allowed}"
    if error.validator == "required":
        return parts, error.message
    expected = {
        "type": lambda: f"a value of type {schema.get('type')}",
        "enum": lambda: f"one of {schema.get('enum')}",
        "minimum": lambda: f"a value >= {schema.get('minimum')}",
        "maximum": lambda: f"a value <= {schema.get('maximum')}",
        "exclusiveMinimum": lambda: f"a value > {schema.get('exclusiveMinimum')}",
        "pattern": lambda: f"a string matching {schema.get('pattern')}",
        "minProperties": lambda: f"at least {schema.get('minProperties')} entry",
        "minLength": lambda: "a non-empty string",
        "not": lambda: schema.get("description", error.message).strip(),
    }.get(error.validator, lambda: error.message)()
    return parts, f"expected {expected}; got {error.instance!r}"


def validate_config(
    config: dict,
    sources: Sequence[str | Path] = (),
    *,
    schema_path: str | Path = SCHEMA_PATH,
    check_paths: bool = True,
) -> dict:
    """Validate ``config`` in place, filling in every default from the schema.

    Parameters
    ----------
    config : dict
        The merged configuration (modified in place: defaults are added).
    sources : sequence of path
        The config files it was read from, in merge order; named in errors.
    schema_path : str or Path
        The JSON schema (YAML) to validate against.
    check_paths : bool
        Also check that each non-generated dataset's ``root`` exists.

    Returns
    -------
    dict
        ``config``, validated and completed.

    Raises
    ------
    ConfigError
        Naming the key, what was expected, what arrived, and the file.
    """
    validator = _Validator(load_schema(schema_path))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            parts, what = _describe(err)
            lines.append(f"  {_key_path(parts)}: {what}  (in {_file_holding(parts, sources)})")
        raise ConfigError("invalid leukflow configuration:\n" + "\n".join(lines))

    if check_paths:
        for name, ds in config["datasets"].items():
            # format manifest: root is the user's CSV file; every other format a folder
            is_csv = ds["format"] == "manifest"
            exists = Path(ds["root"]).is_file() if is_csv else Path(ds["root"]).is_dir()
            if ds["format"] != "demo" and not exists:
                where = _file_holding(["datasets", name, "root"], sources)
                kind = "an existing CSV file" if is_csv else "an existing folder"
                found = "is not a file" if Path(ds["root"]).exists() else "does not exist"
                if not is_csv and Path(ds["root"]).exists():
                    found = "is not a folder"
                raise ConfigError(
                    f"invalid leukflow configuration:\n  datasets.{name}.root: expected "
                    f"{kind}; got {ds['root']!r}, which {found}  (in {where})"
                )
            if ds["format"] not in ("demo", "manifest") and not _holds_an_image(ds["root"]):
                where = _file_holding(["datasets", name, "root"], sources)
                raise ConfigError(
                    f"invalid leukflow configuration:\n  datasets.{name}.root: expected a "
                    f"folder of images ({', '.join(sorted(IMAGE_SUFFIXES))}); got "
                    f"{ds['root']!r}, which holds none  (in {where})"
                )
    return config


def _holds_an_image(folder: str | Path) -> bool:
    """Whether any image file lies anywhere under ``folder`` (stops at the first)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in Path(folder).rglob("*"))
