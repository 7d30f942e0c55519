"""The two run-wide choices of `[pipeline]` in luigi.cfg: the profile (a set of task settings layered under
every luigi.cfg, so a user's own values win) and the sources (the file naming every input the tasks read)."""
from __future__ import annotations

from pathlib import Path

import luigi.configuration
from luigi.configuration import LuigiConfigParser

PROFILES = Path(__file__).resolve().parent / "profiles"


def setting(name: str) -> str:
    """One value of luigi.cfg's [pipeline] section, "" when unset."""
    return str(luigi.configuration.get_config().get("pipeline", name, "")).strip()


def profile_file(name: str) -> Path | None:
    """The file of a profile: a name of pipeline/profiles/*.cfg or a path; None for none or one not found."""
    if not name or name == "none":
        return None
    path = PROFILES / f"{name}.cfg" if "/" not in name and not name.endswith(".cfg") else Path(name)
    return path.absolute() if path.is_file() else None


_LAYERED: list[str] = []


def use_profile() -> None:
    """Layer the chosen profile under Luigi's config files: it is read first, so every value that
    /etc/luigi/luigi.cfg, ./luigi.cfg or LUIGI_CONFIG_PATH sets wins, option by option."""
    config = luigi.configuration.get_config()
    if not isinstance(config, LuigiConfigParser):
        return  # the TOML parser: profiles are luigi.cfg files (docs/cluster.md)
    path = profile_file(setting("profile"))
    wanted = [str(path)] if path else []
    if wanted == _LAYERED:
        return
    paths = LuigiConfigParser._config_paths  # Luigi's reading order, later files winning
    if _LAYERED:  # another profile was layered: read everything again without it
        paths.remove(_LAYERED[0])
        config.clear()
    paths[:0] = wanted
    _LAYERED[:] = wanted
    LuigiConfigParser.reload()


def problems() -> list[str]:
    """The [pipeline] profile names no profile: one line naming the value and the known profiles."""
    name = setting("profile")
    if not name or name == "none" or profile_file(name) is not None:
        return []
    known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.cfg")))
    return [f"luigi.cfg: [pipeline] profile = {name!r} is neither a profile ({known}, or empty for none) "
            "nor a .cfg file"]


def describe() -> str:
    """The one line a run prints first: where its data come from and which profile sized it."""
    sources, profile = setting("sources") or "(not set)", setting("profile")
    path = profile_file(profile)
    sized = f"profile {profile} ({path}) under luigi.cfg" if path else "no profile: luigi.cfg and the task defaults"
    return f"[lxmert] data from [pipeline] sources = {sources}; settings from {sized}"
