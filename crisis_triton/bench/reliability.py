"""Reliability under load: the library behind `crisis-load` (docs/reliability.md).

`run_load(LoadPlan)` sends every kind of request of crisis_triton.bench.cases alone, then a mix of
them from many closed-loop workers over HTTP and gRPC, checks each answer against the one it got
alone, the request ids, the ensemble's success count, readiness and the server's memory growth,
and returns a `LoadReport` (what load.json holds).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crisis_triton.bench import loadgen, machine, repos
from crisis_triton.bench.cases import Case, all_cases, schedule
from crisis_triton.bench.progress import Progress
from crisis_triton.contract.spec import DEFAULT_TASKS, ENSEMBLE
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.config import Deployment
from crisis_triton.repository.writer import read_preprocess_spec

ATOL = 1e-6
TIMEOUT_S = loadgen.TIMEOUT_S


API_COMMAND = "crisis_triton.bench.reliability"  # the report's "command" without a CLI


class LoadError(ValueError):
    """A plan the load run cannot carry out (the command prints it after `load.py: `)."""


@dataclass(frozen=True)
class LoadPlan:
    """Every option of `crisis-load`, typed, with its defaults (`--quick`: requests=400)."""

    requests: int = 10_000
    concurrency: int = 32
    protocols: tuple[str, ...] = ("http", "grpc")  # workers alternate between these
    invalid_share: float = 0.25
    skip_cases: tuple[str, ...] = ()  # case names to leave out
    size: str = "tiny"  # the random-weights architecture exported without `repo` or `url`
    repo: Path | None = None  # an exported repository to serve
    url: str | None = None  # HTTP host:port of a running server (no embedded server)
    grpc_url: str | None = None
    preprocess_json: Path | None = None  # with `url`: the served limits
    cache: Path | None = None  # where exports are kept (None: repos.default_cache())
    seed: int = 0
    max_memory_growth_mib: float = 64.0
    out: Path = Path("results/load")
    progress: bool = True


@dataclass(frozen=True)
class LoadReport:
    """Whether the run passed, load.json's content (`summary`), the files written and load.md's
    text."""

    passed: bool
    summary: dict[str, Any]
    files: dict[str, Path]
    markdown: str

    @property
    def problems(self) -> list[str]:
        return list(self.summary["problems"])


@dataclass
class Outcome:
    """What one request got: probabilities per output, or the server's error message."""

    probs: dict[str, np.ndarray] | None = None
    error: str | None = None
    response_id: str | None = None

    def same_as(self, alone: Outcome) -> bool:
        if alone.probs is not None:
            return self.probs is not None and all(
                float(np.max(np.abs(self.probs[k] - v))) <= ATOL for k, v in alone.probs.items()
            )
        return self.error is not None and self.error == alone.error

    def summary(self) -> str:
        return f"error: {self.error}" if self.error is not None else "probabilities"


class Sender:
    """One thread's client of one protocol."""

    def __init__(self, protocol: str, url: str, outputs: list[str]) -> None:
        self.protocol = protocol
        self.module = loadgen._module(protocol)
        self.client = loadgen.new_client(protocol, url)
        self.outputs = outputs

    def send(self, case: Case, request_id: str) -> Outcome:
        from tritonclient.utils import InferenceServerException

        requested = [self.module.InferRequestedOutput(n) for n in self.outputs]
        # HTTP: the client's network timeout is set where it is made (loadgen.new_client).
        kwargs: dict[str, Any] = {} if self.protocol == "http" else {"client_timeout": TIMEOUT_S}
        try:
            result = self.client.infer(
                ENSEMBLE, case.inputs(self.module), outputs=requested, request_id=request_id,
                **kwargs,
            )  # fmt: skip
        except InferenceServerException as exc:
            # Triton prefixes its own validation errors with the request id: kept apart.
            message = str(exc.message())
            found = re.match(r"^\[request id: ([^\]]*)\] ", message)
            rid = found.group(1) if found else None
            message = message[found.end() :] if found else message
            return Outcome(error=" ".join(message.split()), response_id=rid)
        response = result.get_response()
        rid = response.get("id") if isinstance(response, dict) else response.id
        return Outcome({n: result.as_numpy(n)[0] for n in self.outputs}, response_id=rid)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # best effort
            pass


def _spec_of(repo: Path | None) -> PreprocessSpec:
    if repo is None:
        return PreprocessSpec()
    return read_preprocess_spec(repo)


def _alone(
    cases: list[Case], protocols: list[str], urls: dict[str, str], outputs: list[str]
) -> dict[tuple[int, str], Outcome]:
    answers = {}
    for protocol in protocols:
        sender = Sender(protocol, urls[protocol], outputs)
        try:
            for i, case in enumerate(cases):
                answers[i, protocol] = sender.send(case, f"alone-{i}")
        finally:
            sender.close()
    return answers


def check_alone(cases: list[Case], alone: dict[tuple[int, str], Outcome]) -> list[str]:
    """The catalogue's promises, checked on the answers alone: valid cases succeed, invalid ones
    fail with their words."""
    problems = []
    for (i, protocol), got in alone.items():
        case = cases[i]
        if case.valid and got.error is not None:
            problems.append(f"{case.name} ({protocol}) failed alone: {got.error}")
        elif not case.valid and (got.error is None or case.error not in got.error):
            problems.append(
                f"{case.name} ({protocol}) should fail with '{case.error}', got {got.summary()}"
            )
    return problems


def run_load(plan: LoadPlan, command: str = API_COMMAND) -> LoadReport:
    """Serve (or reach) the ensemble, send the plan's mixed requests and check every answer;
    write load.json and load.md into `plan.out`. `command` is recorded in the report.

    Raises:
        LoadError: a plan that cannot run (an unknown case in `skip_cases`, `url` without
            `grpc_url` for the grpc protocol).
    """
    if plan.url and not plan.grpc_url and "grpc" in plan.protocols:
        raise LoadError("--grpc-url is needed with --url for the grpc protocol")
    protocols = list(plan.protocols)
    started = time.perf_counter()
    server = None
    repo = plan.repo
    notes: list[str] = []
    if plan.url is None and repo is None:
        choice = repos.ModelChoice(plan.size, DEFAULT_TASKS, plan.seed)
        print(f"export {choice.describe()} ...", file=sys.stderr)
        repo, _ = repos.export(
            choice, plan.cache or repos.default_cache(), Deployment(backend="python"),
            plan.out / "export.log",
        )  # fmt: skip
        notes.append(f"model: {choice.describe()}")
    spec = (
        PreprocessSpec.from_json(plan.preprocess_json.read_text())
        if plan.preprocess_json
        else _spec_of(repo)
    )
    if plan.url and not plan.preprocess_json:
        notes.append("limits assumed to be the defaults (no --preprocess-json)")
    skip = set(filter(None, plan.skip_cases))
    cases = [c for c in all_cases(spec, plan.seed) if c.name not in skip]
    unknown = skip - {c.name for c in all_cases(spec, plan.seed)}
    if unknown:
        raise LoadError(f"--skip-cases: unknown {sorted(unknown)}")
    if plan.url is None:
        assert repo is not None
        server = loadgen.start(repo, plan.out / "tritonserver.log")
        urls = {"http": server.url_http, "grpc": server.url_grpc}
    else:
        urls = {"http": plan.url, "grpc": plan.grpc_url or ""}
        notes.append(f"external server {plan.url}: its memory is not measured")
    try:
        return _load(plan, command, protocols, urls, server, cases, repo, notes, started)
    finally:
        if server is not None:
            server.stop()


def _load(
    plan: LoadPlan,
    command: str,
    protocols: list[str],
    urls: dict[str, str],
    server: Any,
    cases: list[Case],
    repo: Path | None,
    notes: list[str],
    started: float,
) -> LoadReport:
    outputs = loadgen.ensemble_outputs(urls["http"])
    alone = _alone(cases, protocols, urls, outputs)
    problems = check_alone(cases, alone)
    tickets = schedule(cases, plan.requests, plan.invalid_share, plan.seed)
    results: list[list[Outcome]] = [[] for _ in tickets]
    transport: list[str] = []
    pid = server.pid if server is not None else None

    def memory() -> dict[str, dict[str, float]] | None:
        return machine.tree_memory(pid) if pid is not None else None

    samples: list[tuple[int, dict[str, dict[str, float]] | None]] = [(0, memory())]
    before = loadgen.read_stats(urls["http"], (ENSEMBLE,))[ENSEMBLE]
    progress = Progress(len(tickets), plan.progress)
    progress.phase(f"{len(tickets)} requests at concurrency {plan.concurrency}")
    lock, next_ticket = threading.Lock(), [0]
    protocol_of: dict[int, str] = {}

    def worker(w: int) -> None:
        protocol = protocols[w % len(protocols)]
        sender = Sender(protocol, urls[protocol], outputs)
        try:
            while True:
                with lock:
                    i = next_ticket[0]
                    if i >= len(tickets):
                        return
                    next_ticket[0] += 1
                try:
                    got = sender.send(cases[tickets[i]], f"load-{i}")
                except Exception as exc:  # a transport failure: the request is lost
                    transport.append(f"{protocol} request {i}: {type(exc).__name__}: {exc}"[:300])
                    continue
                with lock:
                    results[i].append(got)
                    protocol_of[i] = protocol
                progress.tick()
        finally:
            sender.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(plan.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    step = max(1, len(tickets) // 10)
    mark = step
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        done = sum(1 for r in results if r)
        if done >= mark:
            samples.append((done, memory()))
            mark += step
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    progress.close()
    samples.append((len(tickets), memory()))
    after = loadgen.read_stats(urls["http"], (ENSEMBLE,))[ENSEMBLE]

    lost = [i for i, r in enumerate(results) if not r]
    # Successes carry their request's id; errors when Triton quotes it (its own checks).
    wrong_id = [i for i, r in enumerate(results) if r and (r[0].error is None or r[0].response_id)
                and r[0].response_id != f"load-{i}"]  # fmt: skip
    per_case: dict[str, Counter] = {c.name: Counter() for c in cases}
    wrong: list[str] = []
    for i, r in enumerate(results):
        if not r:
            continue
        case = cases[tickets[i]]
        ok = r[0].same_as(alone[tickets[i], protocol_of[i]])
        per_case[case.name]["ok" if ok else "wrong"] += 1
        if not ok and len(wrong) < 10:
            wrong.append(
                f"request {i} ({case.name}, {protocol_of[i]}): got {r[0].summary()}; alone: "
                f"{alone[tickets[i], protocol_of[i]].summary()}"
            )
    valid_sent = sum(1 for i in tickets if cases[i].valid)
    success_delta = (
        after["inference_stats"]["success"]["count"]
        - (before["inference_stats"]["success"]["count"])
    )
    client = loadgen.new_client("http", urls["http"])
    try:
        ready = bool(client.is_server_ready() and client.is_model_ready(ENSEMBLE))
    finally:
        client.close()
    growth = _growth(samples)

    problems += [f"{len(lost)} requests lost (no answer): e.g. {transport[:3]}"] * bool(lost)
    problems += [f"{len(wrong_id)} responses carry another request's id"] * bool(wrong_id)
    problems += [f"{sum(c['wrong'] for c in per_case.values())} wrong answers: {wrong}"] * bool(
        wrong
    )
    if success_delta != valid_sent:
        problems.append(
            f"the ensemble counted {success_delta} successes for {valid_sent} valid requests"
        )
    if not ready:
        problems.append("the ensemble is not ready after the load")
    if growth is not None and growth > plan.max_memory_growth_mib:
        problems.append(
            f"server memory (PSS) grew by {growth:.1f} MiB over the second half of the load "
            f"(limit {plan.max_memory_growth_mib} MiB)"
        )
    report = {
        "passed": not problems,
        "problems": problems,
        "machine": machine.describe(loadgen.server_version(urls["http"])),
        "command": command,
        "repository": str(repo) if repo is not None else None,
        "notes": notes,
        "requests": len(tickets),
        "valid_requests": valid_sent,
        "invalid_requests": len(tickets) - valid_sent,
        "concurrency": plan.concurrency,
        "protocols": dict(Counter(protocol_of.values())),
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(tickets) / seconds, 1),
        "lost": len(lost),
        "wrong_response_id": len(wrong_id),
        "ensemble_success_delta": success_delta,
        "ready_after": ready,
        "memory_mib": [{"done": d, "processes": m} for d, m in samples],
        "pss_growth_second_half_mib": round(growth, 1) if growth is not None else None,
        "cases": {c.name: {"valid": c.valid, "expect": c.error, **per_case[c.name]} for c in cases},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    plan.out.mkdir(parents=True, exist_ok=True)
    files = {"json": plan.out / "load.json", "markdown": plan.out / "load.md"}
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    files["markdown"].write_text(text)
    return LoadReport(report["passed"], report, files, text)


def _growth(samples: list[tuple[int, dict[str, dict[str, float]] | None]]) -> float | None:
    """Total PSS (MiB) at the end minus at half the load (None unmeasured). Allocators, ONNX
    Runtime's arenas (one size per batch shape met) and the frontends' buffers grow in the first
    requests and then stay; a leak grows with every request, in the second half too."""
    known = [(d, m["total"]["pss"]) for d, m in samples if m is not None]
    if len(known) < 2:
        return None
    total = known[-1][0]
    half = next((b for d, b in known if d >= total / 2), known[0][1])
    return known[-1][1] - half


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Load: mixed valid and invalid requests",
        "",
        f"- machine: **{machine.label(r['machine'])}**",
        f"- command: `{r['command']}`",
        *[f"- {n}" for n in r["notes"]],
        f"- {r['requests']} requests ({r['valid_requests']} valid, {r['invalid_requests']} "
        f"invalid) at concurrency {r['concurrency']}, by protocol {r['protocols']}: "
        f"{r['seconds']} s, {r['throughput_rps']} req/s",
        f"- lost {r['lost']}, wrong response id "
        f"{r['wrong_response_id']}; ensemble successes +{r['ensemble_success_delta']}; "
        f"ready after: {r['ready_after']}",
        "- server memory, PSS MiB (tritonserver + its python-backend stubs; shared memory counted "
        "once) after N requests: "
        + ", ".join(
            f"{s['processes']['total']['pss']} @ {s['done']}"
            for s in r["memory_mib"]
            if s["processes"]
        )
        + f"; growth over the second half: {r['pss_growth_second_half_mib']} MiB",
        f"- **{'PASSED' if r['passed'] else 'FAILED'}**"
        + "".join(f"\n  - {p}" for p in r["problems"]),
        "",
        "| case | valid | must fail with | sent | same as alone | wrong |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, c in r["cases"].items():
        sent = c.get("ok", 0) + c.get("wrong", 0)
        lines.append(
            f"| {name} | {'yes' if c['valid'] else 'no'} | {c['expect'] or ''} | {sent} "
            f"| {c.get('ok', 0)} | {c.get('wrong', 0)} |"
        )
    return "\n".join(lines) + "\n"
