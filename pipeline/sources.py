"""The data seam: a task's input paths come from its parameters or from the one sources file in use.

`[pipeline] sources` in luigi.cfg names a YAML file (docs/cluster.md: every dataset file, image folder,
the detector and the vocabulary, relative paths resolved against the file's folder) or `demo`, the file
of the same form that the built-in demo world writes. A task takes its input paths all from its
parameters or all from the sources file, never a mix, and a path it needs that neither gives is an
error naming the parameter and the sources key, before any work.
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import luigi
import yaml

from pipeline.base import PipelineTask, is_input_path
from pipeline.settings import setting
from tasks.demo import PRESETS, SOURCES, SOURCES_FILE, generate_world


class GenerateDemoWorld(PipelineTask):
    """The built-in synthetic world in the real datasets' formats, with its sources file (docs/demo.md)."""

    seed = luigi.IntParameter(default=0)
    preset = luigi.ChoiceParameter(choices=sorted(PRESETS), default="demo")

    declared: dict[str, Any] = SOURCES
    """What its sources file holds, known before the world exists (the graph is planned from it)."""

    def build(self, out: Path) -> None:
        generate_world(out / "world", seed=self.seed, config=PRESETS[self.preset], overwrite=True)

    def sources_file(self) -> Path:
        return self.output_dir() / "world" / SOURCES_FILE


WRITERS: dict[str, type[GenerateDemoWorld]] = {"demo": GenerateDemoWorld}
"""Sources files that a task writes: `[pipeline] sources = demo` is the one GenerateDemoWorld writes."""


@dataclass(frozen=True)
class Sources:
    """The sources file in use, flattened to dotted keys ("vqa.valid_questions")."""

    where: str  # the file, as messages name it
    entries: dict[str, Any]
    root: Path | None = None  # relative paths resolve against it; None: the writer's output folder
    writer: type[GenerateDemoWorld] | None = None  # the task that writes the file, if one does
    problems: tuple[str, ...] = ()

    def has(self, key: str) -> bool:
        return self.entries.get(key) not in (None, [])

    def has_under(self, prefix: str) -> bool:
        return any(self.has(k) for k in self.entries if k.startswith(prefix + "."))

    def value(self, key: str, many: bool, name_or_path: bool = False) -> str | list[str]:
        """The key's path(s) resolved against the file's folder; a name_or_path value that does not look like
        a path (no "/", no .yaml) is a name (a detector config such as VG-R101-C4) and is kept as it is."""
        raw = self.entries.get(key)
        if raw is None:
            return [] if many else ""
        root = self.root if self.root is not None else self.writer().sources_file().parent
        items = [raw] if isinstance(raw, str) else raw
        resolved = [v if name_or_path and "/" not in v and not v.endswith((".yaml", ".yml"))
                    else os.path.normpath(root / os.path.expanduser(v)) for v in items]
        return resolved if many else resolved[0]


@functools.cache
def known_keys() -> dict[str, bool]:
    """{key: holds a list} for every key some task reads (the sources file's schema), found once."""
    import pipeline.tasks  # noqa: F401  every task class defined, so every key is known

    keys: dict[str, bool] = {}
    stack: list[type] = [SourcedTask]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        params = dict(cls.get_params())
        for name, key in cls.sourced.items():
            keys[key] = keys.get(key, False) or isinstance(params[name], luigi.ListParameter)
    return keys


def flatten(tree: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """{dotted key: str or list of str} of a parsed sources file, and one line per key that is unknown, or whose
    value is neither a path nor (for list keys) a list of paths."""
    known, entries, problems = known_keys(), {}, []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, dict):
                walk(value, key + ".")
            elif key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                problems.append(f"{where}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else
                                                                    f" (known: {', '.join(sorted(known))})"))
            elif value is not None and not _paths(value, known[key]):
                want = "a path or a list of paths" if known[key] else "one path"
                problems.append(f"{where}: key '{key}' must be {want}, got {value!r}")
            else:
                entries[key] = value
    walk(tree, "")
    return entries, problems


def _paths(value: Any, many: bool) -> bool:
    if isinstance(value, str):
        return bool(value)
    return many and isinstance(value, list) and all(isinstance(v, str) and v for v in value)


_READ: dict[tuple[str, int, int], Sources] = {}


def read_sources(path: Path) -> Sources:
    """A user's sources file, parsed once per process and version of the file."""
    try:
        st = path.stat()
    except OSError as e:
        return Sources(str(path), {}, path.parent, problems=(f"luigi.cfg: [pipeline] sources = {path}: "
                                                             f"{e.strerror or e}",))
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    if stamp not in _READ:
        _READ[stamp] = _parse(path)
    return _READ[stamp]


def _parse(path: Path) -> Sources:
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return Sources(str(path), {}, path.parent, problems=(f"{path}: {e}",))
    except yaml.YAMLError as e:
        return Sources(str(path), {}, path.parent, problems=(f"{path}: not valid YAML: {' '.join(str(e).split())}",))
    if not isinstance(tree, dict):
        found = "nothing" if tree is None else f"a {type(tree).__name__}"
        return Sources(str(path), {}, path.parent, problems=(f"{path}: expected a mapping of keys, found {found}",))
    entries, problems = flatten(tree, str(path))
    return Sources(str(path), entries, path.parent, problems=tuple(problems))


@functools.cache
def _declared(name: str) -> dict[str, Any]:
    return flatten(WRITERS[name].declared, name)[0]


def sources_in_use() -> Sources:
    """The sources `[pipeline] sources` names: a file, or the one a task writes (demo)."""
    name = setting("sources")
    if name in WRITERS:
        writer = WRITERS[name]
        return Sources(f"the sources file {writer.__name__} writes ({name})", _declared(name), writer=writer)
    if not name:
        return Sources("", {}, problems=(
            "luigi.cfg: [pipeline] sources is not set: set it to your sources file (docs/cluster.md) or to "
            f"{' / '.join(WRITERS)} (docs/demo.md)",))
    return read_sources(Path(name).expanduser().absolute())


def _filled(value: Any) -> bool:
    return any(str(v) for v in value) if isinstance(value, (list, tuple)) else bool(str(value))


class SourcedTask(PipelineTask):
    """A task whose input paths come from its parameters, or, when it is given none, from the sources file."""

    sourced: dict[str, str] = {}
    """parameter -> the key of the sources file that gives it"""
    needed: tuple[str, ...] = ()
    """parameters that must have a value (from the task or the sources file)"""
    needs_any: tuple[str, ...] = ()
    """parameters of which at least one must have a value (BuildPretrainCorpus's texts)"""
    given_by: tuple[str, ...] = ()
    """further parameters whose value means the task was given its inputs (PretrainLXMERT's corpus)"""
    aliases: dict[str, str] = {}
    """an old parameter name -> the name that replaced it (both work; the old one is not significant)"""

    @classmethod
    def get_param_values(cls, params: Any, args: Any, kwargs: Any) -> list[tuple[str, Any]]:
        """Luigi's parameter values, with a value given under an old name moved to the new one."""
        values = dict(super().get_param_values(params, args, kwargs))
        for old, new in cls.aliases.items():
            if _filled(values[old]) and not _filled(values[new]):
                values[new] = values[old]
        return list(values.items())

    @classmethod
    @functools.cache
    def _sourced_params(cls) -> dict[str, luigi.Parameter]:
        return {name: param for name, param in cls.get_params() if name in cls.sourced}

    def given(self) -> list[str]:
        """The input-path parameters given a value (luigi.cfg, command line or caller)."""
        names = [n for n, p in self._sourced_params().items() if is_input_path(p)] + list(self.given_by)
        return [n for n in names if _filled(getattr(self, n))]

    def from_sources(self) -> bool:
        return bool(self.sourced) and not self.given()

    def source_dependencies(self) -> dict[str, Any]:
        """The task that writes the sources file, when this task reads a file that a task writes."""
        if not self.from_sources():
            return {}
        src = sources_in_use()
        wanted = any(src.has(key) for key in self.sourced.values())
        return {"sources": src.writer()} if src.writer is not None and wanted else {}

    def needs(self) -> tuple[str, ...]:
        """The parameters that must have a value here (`needed`, unless a task decides case by case)."""
        return self.needed

    def input_value(self, name: str) -> Any:
        """Parameter `name` as the task reads it: its own value, else (reading the sources) the file's."""
        own = getattr(self, name)
        if _filled(own) or name not in self.sourced or not self.from_sources():
            return own
        many = isinstance(self._sourced_params()[name], luigi.ListParameter)
        return sources_in_use().value(self.sourced[name], many=many,
                                      name_or_path=name in self.name_or_path)

    def input_entry(self, name: str) -> tuple[Any, str] | None:
        own = getattr(self, name)
        if _filled(own) or name not in self.sourced or not self.from_sources():
            old = [o for o, new in self.aliases.items() if new == name and _filled(getattr(self, o))]
            return own, f"parameter '{name}'" + (f" (given as '{old[0]}')" if old else "")
        if setting("sources") in WRITERS:
            return None  # a file the upstream writer makes: checked and fingerprinted through it
        return self.input_value(name), f"sources key '{self.sourced[name]}' (parameter '{name}')"

    def input_problems(self) -> list[str]:
        """Old and new name given different values; a needed input that neither the task nor the sources give."""
        family = self.get_task_family()
        problems = [f"{family}: parameters '{old}' (the old name) and '{new}' are both given, with different "
                    "values; give one" for old, new in self.aliases.items()
                    if _filled(getattr(self, old)) and getattr(self, old) != getattr(self, new)]
        if not self.from_sources():
            given = ", ".join(self.given())
            missing = [(f"parameter '{n}' is required", f"--{family}-{n.replace('_', '-')}")
                       for n in self.needs() if not _filled(getattr(self, n))]
            if self.needs_any and not any(_filled(getattr(self, n)) for n in self.needs_any):
                missing.append((f"one of the parameters {', '.join(self.needs_any)} is required", "their flags"))
            return problems + [f"{family}: {what} when {given} given (a task takes its input paths all from its "
                               f"parameters, {flag}, or all from the sources file)" for what, flag in missing]
        src = sources_in_use()
        if src.problems and (self.needs() or self.needs_any or setting("sources")):
            return problems + [f"{family}: {line}" for line in src.problems]
        missing = [f"sources key '{self.sourced[n]}' (parameter '{n}') is missing"
                   for n in self.needs() if not src.has(self.sourced[n])]
        if self.needs_any and not any(src.has(self.sourced[n]) for n in self.needs_any):
            missing.append(f"none of the sources keys {', '.join(self.sourced[n] for n in self.needs_any)} is given")
        return problems + [f"{family}: {m} in {src.where}" for m in missing]
