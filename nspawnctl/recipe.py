"""What an image is made from. Equal recipes share one image; a different recipe is a
different image. Pure data and validation, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

# distro -> the bootstrap method that builds it
DISTROS = {
    "debian": "debootstrap",
    "ubuntu": "debootstrap",
    "fedora": "dnf",
    "centos": "dnf",
    "rocky": "dnf",
    "almalinux": "dnf",
}
METHODS = ("debootstrap", "dnf", "tar", "directory")
# Imports of an existing tree; their images are named by the user (template:NAME).
IMPORT_METHODS = ("tar", "directory")
TEMPLATE = "template"

_RELEASE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,31}\Z")
_TEMPLATE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*\Z")  # as apt and dnf name them


@dataclass(frozen=True)
class Recipe:
    method: str  # one of METHODS, or "template" for an image that already exists
    distro: str = ""  # empty for imports and templates
    release: str = ""
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    source: str | None = None  # archive or directory, for the import methods
    name: str | None = None  # the template's name, for template:NAME

    @property
    def image(self) -> str:
        """How the YAML names it: distro:release or template:NAME."""
        return f"{TEMPLATE}:{self.name}" if self.name else f"{self.distro}:{self.release}"

    @property
    def key(self) -> str:
        """The image's directory name in the store."""
        if self.name:
            return f"{TEMPLATE}-{self.name}"
        fields = dataclasses.asdict(self)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.distro}-{self.release}-{digest[:12]}"

    def describe(self) -> str:
        parts = [self.method]
        if self.distro:
            parts.append(f"{self.distro}:{self.release}")
        if self.source:
            parts.append(self.source)
        if self.mirror:
            parts.append(self.mirror)
        if self.packages:
            parts.append("+" + ",".join(self.packages))
        return " ".join(parts)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        data["packages"] = tuple(data.get("packages") or ())
        return cls(**data)


def parse_image(value: str) -> Recipe:
    """`distro:release` or `template:NAME`; ValueError says what is wrong."""
    kind, sep, rest = value.partition(":")
    if not sep:
        raise ValueError(f"{value!r} is not <distro>:<release> or template:<name>")
    if kind == TEMPLATE:
        if not _TEMPLATE_RE.match(rest):
            raise ValueError(f"{rest!r} is not a template name (lowercase letters, digits, '-')")
        return Recipe(method=TEMPLATE, name=rest)
    if kind not in DISTROS:
        raise ValueError(
            f"{kind!r} is not a distribution nspawnctl can bootstrap (known: {', '.join(DISTROS)})"
        )
    if not _RELEASE_RE.match(rest):
        raise ValueError(f"{rest!r} is not a release name")
    return Recipe(method=DISTROS[kind], distro=kind, release=rest)


class BootstrapError(ValueError):
    """A key of `bootstrap:` that does not fit the image: which key, and why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def with_bootstrap(
    recipe: Recipe,
    *,
    method: str | None = None,
    mirror: str | None = None,
    packages: tuple[str, ...] = (),
    source: str | None = None,
) -> Recipe:
    """Apply a `bootstrap:` section to the recipe of `image:`; BootstrapError names the key."""
    if method is not None and method not in METHODS:
        raise BootstrapError(
            "method", f"{method!r} is not a bootstrap method (known: {', '.join(METHODS)})"
        )
    if recipe.method == TEMPLATE:
        if method is None:
            if mirror or packages or source:
                raise BootstrapError("method", "required to build a template (tar or directory)")
            return recipe
        if method not in IMPORT_METHODS:
            raise BootstrapError(
                "method",
                f"{method!r} cannot build a template; "
                "use tar or directory (or a distro:release image)",
            )
        if not source:
            raise BootstrapError("source", f"required by method {method}")
        if mirror or packages:
            raise BootstrapError("mirror" if mirror else "packages", f"not used by method {method}")
        return dataclasses.replace(recipe, method=method, source=source)
    if method is not None and method != recipe.method:
        raise BootstrapError(
            "method", f"{recipe.image} is built with {recipe.method}, not {method}"
        )
    if source:
        raise BootstrapError("source", "only for the tar and directory methods of template:NAME")
    return dataclasses.replace(recipe, mirror=mirror, packages=tuple(sorted(set(packages))))


def received_recipe(text: str) -> Recipe:
    """A recipe.json from another host's store (migrate sends one with its image), taken
    only if the YAML could have asked for it: its key, a directory name in the store, is
    then one of ours (never a path). ValueError says what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"not JSON: {err}") from None
    fields = {f.name for f in dataclasses.fields(Recipe)}
    if not isinstance(data, dict) or not set(data) <= fields or "method" not in data:
        raise ValueError(f"not a recipe (an object of {', '.join(sorted(fields))})")
    if not all(isinstance(v, str | None) for k, v in data.items() if k != "packages"):
        raise ValueError("every field but packages is a string or null")
    packages = data.get("packages") or []
    if not isinstance(packages, list) or not all(
        isinstance(p, str) and PACKAGE_RE.match(p) for p in packages
    ):
        raise ValueError("packages is a list of package names")
    recipe = Recipe(**{**data, "packages": tuple(packages)})
    base = parse_image(recipe.image)
    again = with_bootstrap(
        base,
        method=recipe.method,
        mirror=recipe.mirror,
        packages=recipe.packages,
        source=recipe.source,
    )
    if again != recipe:
        raise ValueError(f"not a recipe nspawnctl makes: {recipe.describe()}")
    return recipe
