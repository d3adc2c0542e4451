"""`export.py --model-version N --out EXISTING_REPO`: version N of every composing model beside the
versions already there, the ensemble pinned to N, published in one atomic exchange.

Why this order is safe for a running server that polls the repository (`serve.py
--poll-seconds`): the composing models keep their two newest versions loaded
(`triton_config.LOADED_VERSIONS`), so when version N appears Triton loads it while N-1, which the
ensemble still names, keeps serving; the ensemble's config, pinned to N, changes in the same
exchange, and Triton loads an ensemble only after the models it names are loaded. One request runs
in one ensemble, whose steps all name the same version: it never mixes versions.

A new version must not change the deployment (the composing models' configs): a config change
reloads every version of that model, which a live switch cannot promise to do without failed
requests. Such an export fails with the reason; roll it out as a new repository (docs/versions.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crisis_triton.contract.spec import ENSEMBLE
from crisis_triton.repository.writer import served_version

REPORT = "export_report.json"


class VersionError(ValueError):
    pass


def composing_models(repo: Path) -> list[str]:
    """Every model folder of `repo` but the ensemble's."""
    return sorted(
        p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file() and p.name != ENSEMBLE
    )


def versions_on_disk(repo: Path, model: str) -> list[int]:
    return sorted(int(p.name) for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit())


def check_new_version(out: Path, version: int, keep: int | None) -> None:
    """Refuse, before any model is loaded, a version that cannot be added to `out`."""
    if keep is not None and keep < 2:
        raise VersionError(
            "--keep-versions must be >= 2: the version a running server still serves is removed "
            "only after it has moved to the new one"
        )
    if not (out / ENSEMBLE / "config.pbtxt").is_file():
        raise VersionError(f"--model-version {version}: {out} is not a crisis repository")
    on_disk = [max(versions_on_disk(out, m), default=0) for m in composing_models(out)]
    existing = max(on_disk, default=0)
    if version <= existing:
        raise VersionError(
            f"--model-version {version}: {out} already has version {existing}; versions are "
            f"immutable, give a higher one (e.g. --model-version {existing + 1})"
        )


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links (model files are hundreds of MB), copies where links are impossible."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def merge_previous(out: Path, stage: Path, version: int, keep: int | None) -> list[int]:
    """Bring `out`'s earlier versions into the staged repository of `version` (pruned to the
    `keep` newest, the new one included). -> the versions the published repository holds.

    Raises VersionError when version `version` would change a composing model's config."""
    previous = served_version(out)
    differ = [
        m
        for m in composing_models(stage)
        if (stage / m / "config.pbtxt").read_bytes() != (out / m / "config.pbtxt").read_bytes()
    ]
    if set(composing_models(stage)) != set(composing_models(out)):
        differ.append("(the set of models)")
    if differ:
        raise VersionError(
            f"version {version} changes the deployment of {differ} (configs differ from "
            f"{out}'s): a live switch would reload every version of those models. Export it to a "
            "new repository and roll it out with a rolling update (docs/versions.md)"
        )
    kept: set[int] = {version}
    for model in composing_models(out):
        olds = versions_on_disk(out, model)
        if keep is not None:
            olds = olds[-(keep - 1) :]
        for old in olds:
            _link_tree(out / model / str(old), stage / model / str(old))
            kept.add(old)
    # The reports of the versions kept: the served one's under its number.
    if (out / REPORT).is_file():
        shutil.copy2(out / REPORT, stage / f"export_report.v{previous}.json")
    for old_report in out.glob("export_report.v*.json"):
        number = old_report.name.removeprefix("export_report.v").removesuffix(".json")
        if number.isdigit() and int(number) in kept and int(number) != previous:
            shutil.copy2(old_report, stage / old_report.name)
    return sorted(kept)
