"""Routing policy (docs/processing.md, "What is processed"): which complete series become a
job, where its output goes, and why the others do not; the ledger records what it decides
(storage.jobs). The routes' match picks a route (route_for); then two rules the routes cannot
override:

1. **Never its own output.** An object whose Contributing Equipment names an enhance-node
   (core.images.producers) is not processed again, whichever node made it, unless the route
   names every model that made it in `chain_from` (a deliberate chain) and its own model
   is not among them. Otherwise the series is skipped: "own output".
2. **Only what the model is for.** Each instance is checked against the model's
   [applies_to] (engines.manifest.AppliesTo); a series none of whose instances fits is
   skipped with the reasons. The worker processes only the instances that fit.

The route's destinations, and with `send_back` the one whose AE title is the sender's, are
where the job's output goes.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from core.errors import ManifestError
from core.images import ImageFacts
from engines.manifest import ModelManifest, load
from node.config import DestinationConfig, RouteConfig
from storage.deliveries import Target
from storage.jobs import Assignment, JobQueue, JobSpec, Routed, SeriesFacts

log = logging.getLogger(__name__)

# ImageType values an enhance-node output carries (node/derive.py): a deliberate chain does not
# refuse its input for them
DERIVED_VALUES = frozenset({"DERIVED", "SECONDARY"})


def route_for(routes: Sequence[RouteConfig], facts: SeriesFacts) -> RouteConfig | None:
    """The first route whose match accepts the series (keys left out match anything):
    modality exact (case-insensitive, * = any), calling AE a glob, series description a
    regular expression searched anywhere in the description; image_type values that every
    image's ImageType holds, sop_classes that hold every instance's SOP class."""
    for route in routes:
        m = route.match
        if m.modality != "*" and m.modality.upper() != facts.modality.upper():
            continue
        if not fnmatch.fnmatchcase(facts.calling_ae, m.calling_ae):
            continue
        if not re.search(m.series_description, facts.description):
            continue
        images = [f for f in facts.images if f.is_image]
        if m.image_type and not (images and all(set(m.image_type) <= set(f.image_type) for f in images)):
            continue
        if m.sop_classes and not all(f.sop_class_uid in m.sop_classes for f in facts.images):
            continue
        return route
    return None


@dataclass(frozen=True)
class Decision:
    """What routing does with a complete series: a job on `route`; or, with no route, nothing
    (`skipped` says why when a rule, not the absence of a matching route, decided it)."""

    route: RouteConfig | None
    skipped: str = ""


Decide = Callable[[Sequence[RouteConfig], SeriesFacts], Decision]


def first_matching_route(routes: Sequence[RouteConfig], facts: SeriesFacts) -> Decision:
    """Routing by the routes' match alone (Router adds the models' and the loop rules)."""
    return Decision(route_for(routes, facts))


def job_spec(route: RouteConfig, destinations: Sequence[DestinationConfig], calling_ae: str) -> JobSpec:
    """The job `route` makes of a series from `calling_ae`: the route's destinations (config
    validation guarantees they exist) and, with `send_back`, the destination whose AE title is
    the sender's (when none is, the job says so, for an event)."""
    by_name = {d.name: d for d in destinations}
    chosen = [by_name[n] for n in route.destinations if n in by_name]
    missing = ""
    if route.send_back:
        back = next((d for d in destinations if d.ae_title == calling_ae), None)
        if back is None:
            missing = f"route {route.name}: send_back, but no destination has AE title {calling_ae}"
        elif back not in chosen:
            chosen.append(back)
    return JobSpec(
        route=route.name,
        model=route.model,
        targets=tuple(Target(d.name, d.max_attempts) for d in chosen),
        forward_original=route.forward_original,
        strength=route.strength,
        on_qa_fail=route.on_qa_fail,
        no_destination=missing,
    )


def route_complete_series(
    queue: JobQueue,
    routes: Sequence[RouteConfig],
    max_attempts: int,
    destinations: Sequence[DestinationConfig] = (),
    decide: Decide = first_matching_route,
) -> list[Routed]:
    """Every complete series in the ledger gets a job on the route `decide` gives it, or is
    recorded as unrouted or skipped (storage.jobs.JobQueue.route_complete_series). Safe to run
    from several processes and hosts at once (the `completion` role on each front host): each
    series is decided and recorded by one of them, and the others neither wait nor fail."""

    def assign(facts: SeriesFacts) -> Assignment:
        decision = decide(routes, facts)
        if decision.skipped or decision.route is None:
            return Assignment(None, decision.skipped)
        return Assignment(job_spec(decision.route, destinations, facts.calling_ae))

    return queue.route_complete_series(assign, max_attempts)


class ManifestCache:
    """Model manifests by name, re-read when model.toml or model.onnx changes; None for a
    model that cannot be loaded (the worker then fails its job with the reason)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._cache: dict[str, tuple[tuple[float, float], ModelManifest | None]] = {}

    def __call__(self, model: str) -> ModelManifest | None:
        package = self.models_dir / model
        try:
            stamp = ((package / "model.toml").stat().st_mtime, (package / "model.onnx").stat().st_mtime)
        except OSError:
            return None
        cached = self._cache.get(model)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            manifest: ModelManifest | None = load(package)
        except (ManifestError, OSError, UnicodeDecodeError) as exc:  # a broken package must not stop routing
            log.warning("routing: model %s cannot be loaded: %s", model, exc)
            manifest = None
        self._cache[model] = (stamp, manifest)
        return manifest


def own_output(facts: ImageFacts, device_uid: str) -> str:
    """Why an object is an enhance-node's output ("" when it is not)."""
    if not facts.producers:
        return ""
    last = facts.producers[-1]
    where = "this node" if last.device_uid == device_uid else f"another enhance-node (device {last.device_uid})"
    return f"own output: made by {last.model} on {where}"


def chained(route: RouteConfig, facts: ImageFacts) -> bool:
    """The route deliberately processes this enhance-node output (module docstring, rule 1)."""
    models = {p.model for p in facts.producers}
    return bool(route.chain_from) and models <= set(route.chain_from) and route.model not in models


def applicable(manifest: ModelManifest, facts: ImageFacts, chained: bool) -> str | None:
    """Why `manifest`'s model does not apply to this object, or None. An enhance-node output
    on a deliberate chain (`chained`) is judged without its DERIVED\\SECONDARY."""
    if chained:
        facts = replace(facts, image_type=tuple(v for v in facts.image_type if v not in DERIVED_VALUES))
    return manifest.refusal(facts)


def summary(reasons: Sequence[str]) -> str:
    """ "3 x image type LOCALIZER (...); 1 x not an image", most frequent first."""
    counts = Counter(reasons).most_common()
    return "; ".join(f"{n} x {reason}" if n > 1 else reason for reason, n in counts)


class Router:
    """`decide` for route_complete_series: the routes' match, then the module docstring's rules."""

    def __init__(self, manifests: Callable[[str], ModelManifest | None], device_uid: str) -> None:
        self.manifests = manifests
        self.device_uid = device_uid

    def decide(self, routes: Sequence[RouteConfig], series: SeriesFacts) -> Decision:
        route = route_for(routes, series)
        produced = [f for f in series.images if f.producers]
        if produced and (route is None or not all(chained(route, f) for f in produced)):
            return Decision(None, own_output(produced[0], self.device_uid))
        if route is None:
            return Decision(None)
        manifest = self.manifests(route.model)
        if manifest is None or not series.images:  # the worker says why (or the ledger predates facts)
            return Decision(route)
        reasons = [applicable(manifest, f, bool(f.producers)) for f in series.images]
        if all(reasons):
            return Decision(None, f"{manifest.name} applies to none of it: {summary([r for r in reasons if r])}")
        return Decision(route)
