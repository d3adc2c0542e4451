"""What every benchmark run shares: its plan's settings, posts, repositories, rows and notes.

A `Session` exports (or reuses) the repositories a plan names, measures a phase again while other
processes kept the CPU busy, labels rows with their precision and runtime, and describes the run
(machine, model, workload) for the reports. The runs themselves are in crisis_triton.bench.runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crisis_triton.bench import machine, report, repos, workload
from crisis_triton.bench.plan import BenchmarkError, BenchmarkPlan
from crisis_triton.bench.progress import Progress
from crisis_triton.repository.config import Deployment


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def want_cuda(plan: BenchmarkPlan) -> bool:
    """CUDA paths too: `device` is not cpu and torch sees a GPU."""
    if plan.device == "cpu":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class Session:
    """The state of one run of a plan: settings, posts, deployment, rows, notes, gates."""

    def __init__(self, plan: BenchmarkPlan, command: str) -> None:
        if plan.url and (len(plan.precision) > 1 or plan.cma_clip):
            raise BenchmarkError("--url serves one repository: give one --precision, no --cma-clip")
        if (plan.url or plan.repo) and len(plan.variants) > 1:
            raise BenchmarkError("--variants exports its repositories: drop --url / --repo")
        self.plan = plan
        self.command = command
        self.cfg = plan.settings()
        self.paths = set(plan.paths)
        self.out: Path = plan.out
        self.logs = self.out / "logs"
        self.cache: Path = plan.cache or repos.default_cache()
        self.dep = Deployment(
            backend="python",
            max_batch_size=plan.max_batch_size,
            max_queue_delay_us=plan.max_queue_delay_us,
            compute_instances=plan.instances,
            preprocess_instances=plan.preprocess_instances,
        )
        self.precisions: list[str] = list(plan.precision)
        self.variants: list[str] = list(plan.variants)
        self.gates: dict[str, float | None] = {}
        self.heads: dict[Path, str] = {}  # repositories of another head than the paper's
        self.notes: list[str] = []
        self.rows: list[report.Row] = []
        self.posts = workload.make_posts(self.cfg.posts, seed=plan.seed, kind=plan.posts_kind)
        self.server_version: str | None = None

    # -------------------------------------------------------------- measuring
    def measure(
        self,
        what: Callable[[], list[report.Row]],
        units: int,
        progress: Progress,
        pids: tuple[int, ...] = (),
        foreign: bool = True,
    ) -> list[report.Row]:
        """Run a measurement, and again (up to `retries`) while other processes took more than
        `max_other_cpu` cores meanwhile; rows get that share and the attempts it took."""
        limit, retries = self.cfg.max_other_cpu, self.cfg.retries
        attempt = 0
        while True:
            attempt += 1
            with machine.ForeignCpu(pids) as other:
                rows = what()
            cores = other.cores if foreign else None
            if limit is None or cores is None or cores <= limit or attempt > retries:
                break
            log(f"\nother processes kept {cores} cores busy: measuring again")
            progress.extend(units)
        for row in rows:
            row["foreign_cpu_cores"] = cores
            row["attempts"] = attempt
        return rows

    def wait_quiet(self) -> None:
        """Wait up to `wait_quiet` seconds for other processes to leave the CPU idle."""
        deadline = time.monotonic() + self.plan.wait_quiet
        while time.monotonic() < deadline:
            with machine.ForeignCpu() as other:
                time.sleep(min(5.0, max(0.5, deadline - time.monotonic())))
            if other.cores is not None and other.cores <= 0.1:
                return
        if self.plan.wait_quiet:
            self.notes.append(
                f"the machine was not quiet after --wait-quiet {self.plan.wait_quiet}"
            )

    def tag(self, rows: list[report.Row], repo: Path) -> None:
        """Every row says what it computed in and on which runtime; a reduced precision's gate
        agreement (lowest task) is kept for the targets."""
        from crisis_triton.contract.spec import IMAGE_ENCODER

        if self.plan.url:
            precision, runtime = self.precisions[0], f"external Triton ({self.plan.flavour})"
            variant = self.variants[0]
        else:
            variant = repos.variant_of(repo)
            deployed = repos.read_deployment(repo)
            # int8 on OpenVINO is labelled int8:openvino, so both int8 runtimes stand apart
            precision = deployed.dep.precision + (
                f":{deployed.dep.runtime}" if deployed.dep.runtime else ""
            )
            runtime = f"python backend: {deployed.dep.graph_runtime(IMAGE_ENCODER)}"
            report_file = repo / "export_report.json"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                gate = json.loads(report_file.read_text())["precision_gate"]["gate"]
                self.gates[precision] = min(t["agreement"] for t in gate["tasks"].values())
        head = self.heads.get(repo)
        for row in rows:
            row.setdefault("variant", variant)
            if head is not None:  # the cma_clip rows stand apart from the paper's head's
                row["path"] = f"{row['path']}-{head}"
                row["head"] = head
            if row["path"].startswith("research"):
                row.setdefault("precision", "fp32")
                row.setdefault("runtime", "pytorch")
            elif row["path"] == "preprocess":
                row.setdefault("precision", "-")
                row.setdefault("runtime", "numpy/Pillow/tokenizers")
            else:
                row.setdefault("precision", precision)
                row.setdefault("runtime", runtime)

    # -------------------------------------------------------------- repositories
    def repository(
        self, precision: str = "fp32", head: str | None = None, variant: str | None = None
    ) -> tuple[Path, repos.ModelChoice]:
        """The plan's `repo`, else the random-weights export of this precision, head and variant
        (default: the plan's first). A variant whose export fails (a --fast-image gate missed)
        fails the run: nothing falls back to another variant."""
        plan = self.plan
        if plan.repo is not None:
            deployed = repos.read_deployment(plan.repo)
            encoder, specs, dep = deployed.encoder, deployed.specs, deployed.dep
            size = next((k for k, v in repos.SIZES.items() if v == encoder.name), None)
            if size is None:
                raise BenchmarkError(
                    f"{plan.repo}: encoder {encoder.name} is not "
                    f"one of the random-weights sizes {list(repos.SIZES)}"
                )
            self.dep = dep
            self.variants = [repos.variant_of(plan.repo)]
            self.notes.append(
                f"repository given with --repo: {plan.repo}; the research path "
                f"uses the same architecture with random weights (seed {plan.seed})"
            )
            choice = repos.ModelChoice(size, specs.tasks, plan.seed, variant=self.variants[0])
            return plan.repo, choice
        precision, _, runtime = precision.partition(":")
        choice = repos.ModelChoice(
            self.cfg.size, plan.tasks, plan.seed, precision, plan.min_agreement, runtime,
            variant=variant or self.variants[0],
        )  # fmt: skip
        if head is not None:
            choice = dataclasses.replace(choice, head=head)
        log(f"export {choice.describe()} (cached in {self.cache}) ...")
        t0 = time.perf_counter()
        log_file = self.logs / f"export{'' if choice.label == 'fp32' else '_' + choice.label}.log"
        log_file = log_file.with_name(
            log_file.stem + ("" if head is None else f"_{head}")
            + ("" if len(self.variants) == 1 else f"_{choice.variant}") + log_file.suffix
        )  # fmt: skip
        try:
            repo, reused = repos.export(choice, self.cache, self.dep, log_file)
        except RuntimeError as exc:
            raise BenchmarkError(
                f"variant {choice.variant} of {choice.label}: {exc} (a failed gate fails the "
                "variant; nothing falls back to another)"
            ) from exc
        self.notes.append(
            f"repository {'reused from an earlier export' if reused else 'exported'} with "
            f"`export/export.py {' '.join(choice.export_args(Path('REPO'), self.dep))}`"
            f" ({time.perf_counter() - t0:.0f} s)"
        )
        return repo, choice

    def one_task_repository(self, repo: Path, choice: repos.ModelChoice) -> Path:
        """The one-task comparison's repository: derived from `repo`, or exported."""
        task = self.plan.one_task
        if self.cfg.one_task_repo == "derive" or self.plan.repo is not None:
            dst = self.out / "work" / f"one_task_{task}"
            repos.derive_one_task(repo, dst, task)
            self.notes.append(
                f"one-task repository derived from the full one: same encoders, "
                f"the head's ONNX subgraph for {task} (checked equal)"
            )
            return dst
        one = repos.ModelChoice(choice.size, (task,), choice.seed, variant=choice.variant)
        log(f"export {one.describe()} ...")
        path, reused = repos.export(one, self.cache, self.dep, self.logs / "export_one_task.log")
        self.notes.append(
            f"one-task repository {'reused' if reused else 'exported'} with "
            f"`export/export.py {' '.join(one.export_args(Path('REPO'), self.dep))}`"
        )
        return path

    # -------------------------------------------------------------- description
    def meta(self, choice: repos.ModelChoice) -> dict[str, Any]:
        """Machine, model, workload, deployment, command, settings and notes of the run."""
        return {
            "machine": machine.describe(self.server_version),
            "model": choice.describe() + " (speed is the architecture's; predictions meaningless)",
            "workload": workload.describe(self.posts, self.plan.posts_kind),
            "deployment": (
                "external server (--url): see its configs"
                if self.plan.url
                else repos.deployment_summary(self.dep)
            ),
            "command": self.command,
            "settings": dataclasses.asdict(self.cfg),
            "notes": self.notes,
        }
