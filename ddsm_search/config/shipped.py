"""The experiment configs that ship with the package, found by name (`digits`, `digits-dit`) or by path.

A wheel carries them as ddsm_search/search_spaces/*.yaml (setup.py maps the top-level search_spaces/
folder there); a checkout, editable install included, keeps them in search_spaces/ beside the package.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DDSMError

SUFFIXES = (".yaml", ".yml")


def shipped_dir() -> Path | None:
    """Return the folder of the shipped configs: inside the package (a wheel), else the checkout's."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "search_spaces", package.parent / "search_spaces"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def shipped_configs() -> dict[str, Path]:
    """Return {name: file} of every shipped experiment config, sorted by name."""
    folder = shipped_dir()
    return {} if folder is None else {p.stem: p for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}


def describe(path: Path, width: int = 100) -> str:
    """Return the first sentence of a config's opening comment (what it is), cut to `width` characters."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    sentence = " ".join(lines).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def config_path(name_or_path: str | Path) -> Path:
    """Return the file a config argument names: an existing file, else a shipped config by name (with or
    without .yaml), else raise DDSMError listing the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[: -len(path.suffix)] if path.suffix in SUFFIXES else path.name
    if (path.parent == Path(".") or path.parent.name == "search_spaces") and name in shipped:
        return shipped[name]
    if path.exists():
        return path  # a folder: reading it says so
    known = ", ".join(shipped) or "none found"
    raise DDSMError(f"config file not found: {name_or_path} (neither a file nor a shipped config; shipped: {known})")
