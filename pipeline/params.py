"""Luigi parameters derived from the library's config dataclasses, so that a setting has one definition:
the dataclass field gives the parameter's name and type, and the config instance a task is derived from
(the stage's recipe) gives its default. `config_values` reads the parameters back as the fields take them.

Field types: int, float and str (a ChoiceParameter when choices are given); an optional number
(`float | None`) is a FloatParameter whose negative values stand for None (default -1).
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import luigi

from tasks.training.runconfig import unwrap_optional

TaskClass = TypeVar("TaskClass", bound=type)
UNSET = -1.0  # an optional number's "not given"


def parameter(tp: Any, default: Any, *, significant: bool = True, choices: Sequence[str] | None = None,
              description: str | None = None) -> luigi.Parameter:
    """The Luigi parameter of one dataclass field of type `tp`, defaulting to `default`."""
    kwargs: dict[str, Any] = {"significant": significant}
    if description:
        kwargs["description"] = description
    base, optional = unwrap_optional(tp)
    if optional and base is not float:
        raise TypeError(f"no Luigi parameter for an optional {base}")
    if base is int:
        return luigi.IntParameter(default=default, **kwargs)
    if base is float:
        return luigi.FloatParameter(default=UNSET if default is None else default, **kwargs)
    if base is str:
        if choices:
            return luigi.ChoiceParameter(choices=list(choices), default=default, **kwargs)
        return luigi.Parameter(default=default, **kwargs)
    raise TypeError(f"no Luigi parameter for a field of type {tp}")


def derived(config: Any, names: Sequence[str], *, insignificant: Collection[str] = (),
            choices: Mapping[str, Sequence[str]] | None = None,
            descriptions: Mapping[str, str] | None = None) -> Callable[[TaskClass], TaskClass]:
    """Class decorator: the task takes one parameter per named field of the dataclass instance `config`,
    with that field's type and, as default, its value in `config`; `insignificant` ones do not enter the
    task's identity."""
    hints = typing.get_type_hints(type(config))

    def add(cls: TaskClass) -> TaskClass:
        for name in names:
            param = parameter(hints[name], getattr(config, name), significant=name not in insignificant,
                              choices=(choices or {}).get(name), description=(descriptions or {}).get(name))
            setattr(cls, name, param)
            param.__set_name__(cls, name)  # what a class body does for its own attributes
        return cls

    return add


def config_values(task: luigi.Task, config_type: type, names: Sequence[str]) -> dict[str, Any]:
    """The task's values of the named parameters, as the fields of `config_type` take them."""
    hints = typing.get_type_hints(config_type)
    values = {}
    for name in names:
        value = getattr(task, name)
        values[name] = None if unwrap_optional(hints[name])[1] and value < 0 else value
    return values
