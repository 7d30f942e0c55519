"""Machinery shared by the Luigi tasks: the work directory, content-addressed outputs, atomic
completion, one-runner locks and a check of every input path before any work starts."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import luigi
import luigi.configuration
from luigi.task import flatten

from extractor.fileio import exclusive, writing
from extractor.jsonstream import iter_jsonl, load_json, write_text_atomic
from pipeline import settings
from pipeline.fingerprint import Members, fingerprint

WORKDIR_ENV = "LXMERT_WORKDIR"


def workdir() -> Path:
    """Where every output lives: $LXMERT_WORKDIR, else `[pipeline] workdir` of luigi.cfg, else ./work."""
    env = os.environ.get(WORKDIR_ENV)
    if env:
        return Path(env).absolute()
    configured = luigi.configuration.get_config().get("pipeline", "workdir", "work")
    return Path(configured).absolute()


class _InputPath:
    """Marks a parameter whose value names paths that must exist before anything runs, and whose contents
    enter the task's signature (pipeline.fingerprint); `members` gives the files a list file names (a folder
    stands for all its files, any other file for itself)."""

    def __init__(self, *args: Any, kind: str = "any", optional: bool = False, members: Members | None = None,
                 **kwargs: Any) -> None:
        if kind not in ("any", "file", "dir"):
            raise ValueError(f"input path kind must be any, file or dir, not {kind!r}")
        self.kind = kind
        self.optional = optional
        self.members = members
        super().__init__(*args, **kwargs)


class InputPathParameter(_InputPath, luigi.Parameter):
    """One path the user gives; empty means "not given" when optional."""


class InputPathListParameter(_InputPath, luigi.ListParameter):
    """Several paths the user gives (a JSON list on the command line); empty when optional."""


def is_input_path(param: luigi.Parameter) -> bool:
    """The parameter names input paths (checked before work, fingerprinted into the signature)."""
    return isinstance(param, _InputPath)


class InputPathError(FileNotFoundError):
    """An input named by a parameter is missing or unreadable; the message names the task, the parameter
    and the path (and the line of a list file)."""


def _entry(task: luigi.Task, name: str) -> tuple[Any, str] | None:
    return task.input_entry(name) if isinstance(task, PipelineTask) else (getattr(task, name), f"parameter '{name}'")


def _problems(task: luigi.Task) -> list[str]:
    found = []
    for name, param in task.get_params():
        entry = _entry(task, name) if isinstance(param, _InputPath) else None
        if entry is None:
            continue
        value, label = entry
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not any(str(v) for v in values):
            if not param.optional:
                found.append(f"{task.get_task_family()}: parameter '{name}' "
                             f"(--{task.get_task_family()}-{name.replace('_', '-')}) is required but empty")
            continue
        for v in values:
            p = Path(str(v))
            ok = p.is_file() if param.kind == "file" else p.is_dir() if param.kind == "dir" else p.exists()
            if not ok:
                what = {"file": "file", "dir": "directory", "any": "path"}[param.kind]
                found.append(f"{task.get_task_family()}: {label} names {what} '{p}', which does not exist")
    if hasattr(task, "input_problems"):
        found.extend(task.input_problems())
    return found


_CHECKED: set[tuple[str, str]] = set()  # (task id, sources in use): a task's inputs follow the sources


def check_inputs(root: luigi.Task) -> None:
    """Walk the whole graph under `root` and fail before any work if an input is missing or unreadable."""
    sources = settings.setting("sources")
    if (root.task_id, sources) in _CHECKED:
        return
    seen: set[str] = set()
    problems: list[str] = settings.problems()
    stack = [root]
    while stack:
        task = stack.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        problems.extend(_problems(task))
        if isinstance(task, PipelineTask):
            stack.extend(flatten(task.dependencies()))
        else:
            stack.extend(flatten(task.requires()))
    if problems:
        raise InputPathError("inputs missing or unreadable, nothing was run:\n  " + "\n  ".join(_merged(problems)))
    _CHECKED.update((task_id, sources) for task_id in seen)


def _merged(problems: list[str]) -> list[str]:
    """One line per problem: tasks that share a parameter (a task and its shards) report it together."""
    families: dict[str, list[str]] = {}
    for line in problems:
        family, _, what = line.partition(": ")
        families.setdefault(what, [])
        if family not in families[what]:
            families[what].append(family)
    return [f"{' / '.join(names)}: {what}" for what, names in families.items()]


# ---------------------------------------------------------------- cheap checks of input contents

JSON_PARSE_LIMIT = 16 * 2**20
"""JSON inputs up to this many bytes are parsed in full before any work; larger ones (raw dataset files of
hundreds of MB) only have their first non-space character checked, so the check stays cheap."""


def _reason(path: Path, exc: Exception) -> str:
    text = str(exc)
    return text if str(path) in text else f"{path}: {text}"


def json_check(top: str) -> Callable[[Path], str | None]:
    """A check of a JSON input: top is "[" (a list), "{" (an object) or "jsonl" (JSON lines of objects).

    A folder (GQA's chunked question files) is checked file by file.
    """
    want = "{" if top == "jsonl" else top
    kind = "JSON lines" if top == "jsonl" else "a JSON list" if top == "[" else "a JSON object"

    def check_file(path: Path) -> str | None:
        size = path.stat().st_size
        if size == 0:
            return f"{path}: empty file, expected {kind}"
        if size > JSON_PARSE_LIMIT:
            with open(path, "rb") as f:
                first = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()[:1]
            if first != want:
                return (f"{path}: starts with {first!r}, not {want!r} as {kind} does (over "
                        f"{JSON_PARSE_LIMIT:,} bytes: only the first character is checked)")
            return None
        if top == "jsonl":
            for _ in iter_jsonl(path):
                pass
            return None
        value = load_json(path)
        if not isinstance(value, list if top == "[" else dict):
            return f"{path}: expected {kind}, found a JSON {type(value).__name__}"
        return None

    def check(path: Path) -> str | None:
        if not path.is_dir():
            return check_file(path)
        files = sorted(path.glob("*.json"))
        if not files:
            return f"{path}: folder holds no .json files"
        return next((r for r in map(check_file, files) if r), None)

    return check


def reads(reader: Callable[[Path], Any]) -> Callable[[Path], None]:
    """A check that `reader` accepts the path; what it raises is the message."""
    def check(path: Path) -> None:
        reader(path)
    return check


def param_problems(task: luigi.Task, name: str, check: Callable[[Path], str | None]) -> list[str]:
    """Run `check` on every existing path the parameter `name` gives; one message per bad path.

    Missing paths are skipped: the existence check of InputPathParameter reports them, and so are paths an
    upstream task makes. `check` returns None when the path is fine, else a message naming the path;
    OSError / ValueError count as messages.
    """
    entry = _entry(task, name)
    if entry is None:
        return []
    value, label = entry
    found = []
    for v in (list(value) if isinstance(value, (list, tuple)) else [value]):
        path = Path(str(v))
        if not str(v) or not path.exists():
            continue
        try:
            reason = check(path)
        except (OSError, ValueError) as e:
            reason = _reason(path, e)
        if reason:
            found.append(f"{task.get_task_family()}: {label}: {reason}")
    return found


def _values(value: Any) -> list[str]:
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if str(v)]


def input_fingerprints(task: luigi.Task) -> dict[str, list[dict[str, Any]]]:
    """{parameter: [{"path", "digest", "files", "bytes"}, ...]} for every input path the task was given."""
    if not isinstance(task, PipelineTask):
        return {}
    return {name: [{"path": p, **fingerprint(p, members)} for p in paths]
            for name, (paths, members) in task.input_paths().items() if paths}


def _signature(task: luigi.Task) -> str:
    params = task.to_str_params(only_significant=True, only_public=True)
    upstream = task.dependencies() if isinstance(task, PipelineTask) else task.requires()
    deps = sorted(_signature(d) if isinstance(d, PipelineTask) else d.task_id for d in flatten(upstream))
    spec: dict[str, Any] = {"task": task.get_task_family(), "params": params, "deps": deps}
    contents = {name: [f["digest"] for f in found] for name, found in input_fingerprints(task).items()}
    if contents:  # absent for tasks given no input path, whose folders so stay those of earlier versions
        spec["inputs"] = contents
    blob = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class PipelineTask(luigi.Task):
    """Base task: output folder workdir/<Family>/<signature>, built in `<folder>.partial`, renamed when done.

    The signature hashes the task's significant parameters, the fingerprints of what its input paths hold
    and its upstream signatures, so new settings or changed inputs anywhere upstream give a new folder and
    never overwrite or reuse an old result. The `.partial` folder survives a crash: tasks that checkpoint
    (training, extraction) resume from it.
    """

    name_or_path: tuple[str, ...] = ()
    """Parameters whose value is a name (a preset, a choice) or a path, such as a detector config name or YAML
    file: when the value names an existing path, its contents count as an input."""

    def dependencies(self) -> Any:
        """The upstream tasks (what `requires` would return); override in subclasses."""
        return []

    def requires(self) -> Any:
        check_inputs(self)
        return self.dependencies()

    def signature(self) -> str:
        return _signature(self)

    def input_entry(self, name: str) -> tuple[Any, str] | None:
        """(value, how errors name it) of the input parameter `name` as the task reads it, or None when an
        upstream task makes it (then neither checked before work nor fingerprinted: its signature covers it)."""
        return getattr(self, name), f"parameter '{name}'"

    def input_paths(self) -> dict[str, tuple[list[str], Members | None]]:
        """{parameter: (paths, members)}: the paths whose contents this task reads, for its signature."""
        found: dict[str, tuple[list[str], Members | None]] = {}
        for name, param in self.get_params():
            entry = self.input_entry(name) if isinstance(param, _InputPath) or name in self.name_or_path else None
            if entry is None:
                continue
            if name not in self.name_or_path:
                found[name] = (_values(entry[0]), param.members)
            elif str(entry[0]) and os.path.exists(str(entry[0])):
                found[name] = ([str(entry[0])], None)
        return found

    def output_dir(self) -> Path:
        return workdir() / self.get_task_family() / self.signature()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.output_dir()))

    def partial_dir(self) -> Path:
        final = self.output_dir()
        return final.with_name(final.name + ".partial")

    def build(self, out: Path) -> None:
        """Write this task's results into `out` (the partial folder); override in subclasses."""
        raise NotImplementedError(f"{self.get_task_family()} does not define build()")

    def run(self) -> None:
        if not _ANNOUNCED:
            print(settings.describe(), flush=True)
            _ANNOUNCED.append(True)
        final = self.output_dir()
        with exclusive(workdir() / ".locks" / f"{self.get_task_family()}-{final.name}.lock",
                       f"{self.get_task_family()} {final.name}"):
            if final.exists():
                print(f"[lxmert] {self.get_task_family()} {final.name}: already done -> {final}", flush=True)
                return
            partial = self.partial_dir()
            resumed = partial.exists()
            partial.mkdir(parents=True, exist_ok=True)
            print(f"[lxmert] {self.get_task_family()} {final.name}: {'resuming' if resumed else 'started'}",
                  flush=True)
            upstream = [d for d in flatten(self.dependencies()) if isinstance(d, PipelineTask)]
            if upstream:
                print(f"[lxmert] {self.get_task_family()} {final.name}: upstream "
                      + "; ".join(map(settings_line, upstream)), flush=True)
            start = time.perf_counter()
            self.build(partial)
            seconds = round(time.perf_counter() - start, 2)
            record = {"task": self.get_task_family(), "params": self.to_str_params(only_significant=True),
                      "signature": self.signature(), "seconds": seconds,
                      "inputs": [d.output().path for d in flatten(self.dependencies())],
                      "fingerprints": input_fingerprints(self)}
            write_text_atomic(partial / "task.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
            with writing(final):
                os.replace(partial, final)
            print(f"[lxmert] {self.get_task_family()} {final.name}: done in {seconds} s -> {final}", flush=True)

    def input_dirs(self) -> Any:
        """The upstream output folders as Paths, shaped like dependencies()."""
        return paths_of(self.dependencies())


_ANNOUNCED: list[bool] = []  # the run's sources and profile are printed once per process


def settings_line(task: PipelineTask) -> str:
    """`Family signature (name=value, ...)`: the significant settings of a task that are not its defaults, so a
    log shows what a task read upstream (a setting given on the command line applies to that task only)."""
    own = task.to_str_params(only_significant=True, only_public=True)
    changed = [f"{name}={own[name]}" for name, param in task.get_params()
               if name in own and getattr(param, "_default", None) not in (None, luigi.parameter._no_value)
               and own[name] != param.serialize(param._default)]
    return f"{task.get_task_family()} {task.signature()}" + (f" ({', '.join(changed)})" if changed else "")


def paths_of(tasks: Any) -> Any:
    """The output folders of a structure of tasks (dict / list / task) as Paths, in the same shape."""
    def convert(struct: Any) -> Any:
        if isinstance(struct, dict):
            return {k: convert(v) for k, v in struct.items()}
        if isinstance(struct, (list, tuple)):
            return [convert(v) for v in struct]
        return Path(struct.path)
    return convert(luigi.task.getpaths(tasks))
