"""Check a model repository against what the embedded tritonserver (nvidia-pytriton) can load.

That server has the python backend and the ensemble platform only. :func:`check_repository`
refuses, naming the model and the problem, any repository it would fail on: a model folder
without a parsing ``config.pbtxt``, a config naming another model, another backend or platform
(ONNX Runtime, TensorRT: serve those with a stock Triton), no version folder or no model file,
an ensemble step on a model the repository lacks, and a repository whose
``export_report.json`` says the export failed its verification.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from crisis_triton.serving.tritonserver_install import PathLike

SUPPORTED_BACKENDS = frozenset({"python"})
SUPPORTED_PLATFORMS = frozenset({"ensemble"})
EXPORT_REPORT = "export_report.json"


class RepositoryError(ValueError):
    """A model repository the embedded tritonserver cannot load."""


class ConfigParseError(ValueError):
    """A config.pbtxt that is not a ModelConfig in protobuf text format (or not UTF-8)."""


def parse_config(config_path: Path) -> ModelConfig:
    """One ``config.pbtxt`` as Triton's ``ModelConfig`` protobuf: the one reader of the configs
    in deploy/ (the repository check, the /dev/shm rule, the response-cache switch).

    Raises:
        OSError: the file cannot be read.
        ConfigParseError: it does not parse.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(
            config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig()
        )
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConfigParseError(str(exc)) from exc


def _refusal(name: str, what: str) -> RepositoryError:
    return RepositoryError(
        f"model '{name}' needs {what}, which the embedded tritonserver (nvidia-pytriton) lacks: "
        "it has only the python backend and ensembles; export the model with --backend python, "
        "or serve this repository with a stock Triton container (nvcr.io/nvidia/tritonserver)"
    )


def check_repository(repo: PathLike) -> list[str]:
    """Check a model repository against the embedded server; return its model names (sorted).

    Every sub-folder is a model to Triton (hidden ones too). Each needs a ``config.pbtxt``
    that parses as a ``ModelConfig``, names its folder (or nothing), uses the python backend
    or the ensemble platform, and has a numeric version folder (with the python model file
    for python models); ensemble steps must name models of the repository.

    Raises:
        RepositoryError: naming the model and the problem.
    """
    root = Path(repo)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    _check_export_report(root)
    configs: dict[str, ModelConfig] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        config_path = folder / "config.pbtxt"
        if not config_path.is_file():
            raise RepositoryError(f"model '{name}': {config_path} is missing")
        try:
            config = parse_config(config_path)
        except ConfigParseError as exc:
            raise RepositoryError(f"model '{name}': {config_path} does not parse: {exc}") from exc
        _check_model(folder, config)
        configs[name] = config
    if not configs:
        raise RepositoryError(f"model repository {root} holds no model (<model>/config.pbtxt)")
    for name, config in configs.items():
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                raise RepositoryError(
                    f"ensemble '{name}' uses model '{step.model_name}', "
                    f"which is not in the repository {root}"
                )
    return sorted(configs)


def _check_export_report(root: Path) -> None:
    """A repository whose export_report.json says the export failed is not served (exports are
    atomic now, but a repository written by an older exporter or copied by hand may be one)."""
    import json

    report = root / EXPORT_REPORT
    if not report.is_file():
        return
    try:
        passed = json.loads(report.read_text(encoding="utf-8")).get("passed")
    except (OSError, ValueError, AttributeError) as exc:
        raise RepositoryError(f"{report} is unreadable ({exc}); re-export the repository") from None
    if passed is not True:
        raise RepositoryError(
            f"{report} says the export FAILED its verification: refusing to serve {root}; "
            "export again (export.py prints what failed)"
        )


def _check_model(folder: Path, config: ModelConfig) -> None:
    name = folder.name
    config_name, platform, backend = config.name, config.platform, config.backend
    if config_name and config_name != name:
        raise RepositoryError(
            f"model '{name}': config.pbtxt names it '{config_name}'; Triton wants the folder name"
        )
    if platform and platform not in SUPPORTED_PLATFORMS:
        raise _refusal(name, f'platform "{platform}"')
    if not platform and backend not in SUPPORTED_BACKENDS:
        if not backend:
            raise RepositoryError(
                f"model '{name}': config.pbtxt names no backend (backend: \"python\") "
                'nor platform (platform: "ensemble")'
            )
        raise _refusal(name, f'backend "{backend}"')
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise RepositoryError(
            f"model '{name}' has no version folder ({folder}/1/): Triton would load no version"
        )
    if backend == "python" and not platform:
        filename = config.default_model_filename or "model.py"
        if not any((v / filename).is_file() for v in versions):
            raise RepositoryError(f"model '{name}': no version folder holds {filename}")
