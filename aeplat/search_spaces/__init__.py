"""Declarative search spaces, one YAML file per dataset (optionally per dataset and modality).

A file has a `parameters` mapping of sampled values and a `constants` mapping of fixed ones.
Parameter types:

- `float`: `low`, `high`, optional `log: true` and `include_zero: true`. With include_zero the
  sampler first chooses whether the value is 0, then samples it from [low, high].
- `int`: `low`, `high`, optional `log: true`.
- `power_of_two`: `low` and `high` are powers of two; the sampler picks the exponent.
- `categorical`: `choices`, a non-empty list.

The loaded `SearchSpace` is a define-by-run function for Optuna: calling it with an Optuna
trial suggests every parameter and returns the constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMETER_TYPES = ("float", "int", "power_of_two", "categorical")
_ENABLED_SUFFIX = "_enabled"
_EXPONENT_SUFFIX = "_log2"


class SearchSpaceError(ValueError):
    """A search space file is missing or invalid."""


@dataclass(frozen=True)
class Parameter:
    """One sampled hyperparameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    include_zero: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def enabled_name(self) -> str:
        """Name of the sampled choice between 0 and a sampled value, for a float with include_zero."""
        return self.name + _ENABLED_SUFFIX

    def size(self) -> int | None:
        """Return how many distinct values the sampler can propose, or None for a float range."""
        if self.type == "categorical":
            return len(self.choices)

        if self.type == "power_of_two":
            return int(math.log2(self.high)) - int(math.log2(self.low)) + 1

        if self.type == "int":
            return int(self.high) - int(self.low) + 1

        if self.low != self.high:
            return None
        return 2 if self.include_zero else 1

    def suggest(self, trial: Any) -> Any:
        """Suggest a value with an Optuna trial and return the value the trial trains with."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))

        if self.type == "power_of_two":
            exponent = trial.suggest_int(
                self.name + _EXPONENT_SUFFIX, int(math.log2(self.low)), int(math.log2(self.high))
            )
            return 2**exponent

        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)

        if self.include_zero and not trial.suggest_categorical(self.enabled_name, [True, False]):
            return 0.0
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space, usable as an Optuna define-by-run function."""

    dataset: str
    parameters: tuple[Parameter, ...]
    constants: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __call__(self, trial: Any) -> dict[str, Any]:
        values = {parameter.name: parameter.suggest(trial) for parameter in self.parameters}
        return {**dict(self.constants), **values}

    def size(self) -> int | None:
        """Return the number of distinct configurations, or None when a float range makes it unbounded."""
        total = 1
        for parameter in self.parameters:
            count = parameter.size()
            if count is None:
                return None
            total *= count
        return total

    def training_values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Return the values a trial trains with from a Tune config.

        The config contains what Optuna recorded (for example `latent_dim_log2`) and the values the
        define-by-run function returned (`latent_dim`); only the latter are training values.
        """
        names = {parameter.name for parameter in self.parameters} | set(self.constants)
        return {name: config[name] for name in names if name in config}

    def describe(self) -> dict[str, Any]:
        """Return the space as plain data, ready to log."""
        return {
            "dataset": self.dataset,
            "source": self.source,
            "parameters": {p.name: _describe_parameter(p) for p in self.parameters},
            "constants": dict(self.constants),
        }


def _describe_parameter(parameter: Parameter) -> dict[str, Any]:
    described: dict[str, Any] = {"type": parameter.type}
    if parameter.type == "categorical":
        described["choices"] = list(parameter.choices)
        return described

    described.update(low=parameter.low, high=parameter.high)
    if parameter.log:
        described["log"] = True
    if parameter.include_zero:
        described["include_zero"] = True
    return described


def available_spaces() -> list[str]:
    """Return the names of the search space files shipped with aeplat."""
    folder = resources.files(__name__)
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_search_space(dataset: str, modality: str | None = None, path: Path | None = None) -> SearchSpace:
    """Load and validate the search space for a dataset.

    An explicit `path` wins. Otherwise `<dataset>-<modality>.yaml` is used when aeplat ships
    one, then `<dataset>.yaml`.
    """
    if path is not None:
        if not path.is_file():
            raise SearchSpaceError(f"Search space file {path} not found; pass an existing YAML file to --search-space.")
        return parse_search_space(path.read_text(encoding="utf-8"), source=str(path))

    candidates = ([f"{dataset}-{modality}"] if modality else []) + [dataset]
    folder = resources.files(__name__)
    for name in candidates:
        entry = folder / f"{name}.yaml"
        if entry.is_file():
            return parse_search_space(entry.read_text(encoding="utf-8"), source=f"aeplat/search_spaces/{name}.yaml")

    raise SearchSpaceError(
        f"No search space for dataset {dataset!r}; shipped spaces: {', '.join(available_spaces())}. "
        "Pass your own YAML file with --search-space."
    )


def parse_search_space(text: str, source: str = "<string>") -> SearchSpace:
    """Parse and validate a search space from YAML text. Errors name `source` and the key."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"{source}: invalid YAML: {error}") from error

    if not isinstance(document, dict):
        raise SearchSpaceError(f"{source}: expected a mapping with 'dataset', 'parameters' and 'constants'.")

    unknown = set(document) - {"dataset", "parameters", "constants"}
    if unknown:
        raise SearchSpaceError(
            f"{source}: unknown top-level keys {sorted(unknown)}; expected 'dataset', 'parameters', 'constants'."
        )

    parameters_section = document.get("parameters") or {}
    constants = document.get("constants") or {}
    if not isinstance(parameters_section, dict) or not parameters_section:
        raise SearchSpaceError(f"{source}: 'parameters' must be a non-empty mapping of name to definition.")
    if not isinstance(constants, dict):
        raise SearchSpaceError(f"{source}: 'constants' must be a mapping of name to value.")

    overlap = set(parameters_section) & set(constants)
    if overlap:
        raise SearchSpaceError(f"{source}: {sorted(overlap)} appear both as parameters and constants; keep one.")

    parameters = tuple(_parse_parameter(name, spec, source) for name, spec in parameters_section.items())
    return SearchSpace(
        dataset=str(document.get("dataset", "")), parameters=parameters, constants=constants, source=source
    )


def _parse_parameter(name: str, spec: Any, source: str) -> Parameter:
    where = f"{source}: parameter {name!r}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise SearchSpaceError(f"{where} needs a mapping with a 'type' ({', '.join(PARAMETER_TYPES)}).")

    kind = spec["type"]
    if kind not in PARAMETER_TYPES:
        raise SearchSpaceError(f"{where} has type {kind!r}; supported types: {', '.join(PARAMETER_TYPES)}.")

    allowed = {
        "categorical": {"type", "choices"},
        "power_of_two": {"type", "low", "high"},
        "int": {"type", "low", "high", "log"},
        "float": {"type", "low", "high", "log", "include_zero"},
    }[kind]
    unknown = set(spec) - allowed
    if unknown:
        raise SearchSpaceError(f"{where}: keys {sorted(unknown)} are not valid for type {kind!r}; allowed: {sorted(allowed)}.")

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: 'choices' must be a non-empty list.")
        return Parameter(name=name, type=kind, choices=tuple(choices))

    low, high = _parse_bounds(spec, where)
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: low={low} must be > 0 with log: true (use include_zero: true to reach 0).")
    if kind == "power_of_two":
        _check_power_of_two(low, where, "low")
        _check_power_of_two(high, where, "high")
    if kind in ("int", "power_of_two") and (low != int(low) or high != int(high)):
        raise SearchSpaceError(f"{where}: low and high must be integers, got {low} and {high}.")

    return Parameter(
        name=name, type=kind, low=low, high=high, log=log, include_zero=bool(spec.get("include_zero", False))
    )


def _parse_bounds(spec: Mapping[str, Any], where: str) -> tuple[float, float]:
    try:
        low = float(spec["low"])
        high = float(spec["high"])
    except KeyError as error:
        raise SearchSpaceError(f"{where}: missing {error.args[0]!r}.") from error
    except (TypeError, ValueError) as error:
        raise SearchSpaceError(f"{where}: low and high must be numbers, got {spec.get('low')!r} and {spec.get('high')!r}.") from error

    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise SearchSpaceError(f"{where}: needs finite low <= high, got low={low}, high={high}.")
    return low, high


def _check_power_of_two(value: float, where: str, key: str) -> None:
    if value < 1 or value != int(value) or int(value) & (int(value) - 1):
        raise SearchSpaceError(f"{where}: {key}={value} is not a power of two (1, 2, 4, ...).")
