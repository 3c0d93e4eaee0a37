"""Turn ``results.json`` into the targets verdict, a terminal summary, ``report.md`` and plots.

Targets are those of issues 7, 14 and 18 (loopback, this 2-core machine, every process on it).
RSS targets in MB (10^6 bytes) are converted as the issue states them; the tables show MiB. A
service's memory and CPU are its process tree: its command (the launcher), the Envoy process the
service runs in, and the chisel process it supervises (they ship and scale together). With
``--baseline`` every scenario also ran against another tree (before/after table). A smoke run's
numbers are not comparable with the targets and say so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MB_PER_MIB = 1.048576
PROCESS_ORDER = (
    "hub",
    "hub-launcher",
    "chisel-server",
    "agent",
    "agent-launcher",
    "chisel-client",
    "kube-apiserver",
    "etcd",
    "bench-client",
)
LIST_CPU = ("hub", "chisel-server", "agent", "chisel-client", "kube-apiserver", "bench-client")
#: What a Get through the hub costs in our processes (launchers included: they are ours).
OURS = ("hub", "hub-launcher", "chisel-server", "agent", "agent-launcher", "chisel-client")
MAIN_LATENCY = ("direct https-json", "agent connect-proto", "agent connect-json", "agent grpc")


# --------------------------------------------------------------------------------------------------
# Targets


def _row(name: str, value: float | None, limit: str, met: bool | None, note: str = "") -> dict[str, Any]:
    # A smoke run's sizes are too small for a verdict: keep the value, drop the verdict.
    if "smoke" in note:
        met = None
    return {"target": name, "value": value, "limit": limit, "met": met, "note": note}


def _latency(results: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in results.get("latency") or () if r["label"] == label), None)


def _throughput(results: dict[str, Any], path: str, concurrency: int) -> dict[str, Any] | None:
    rows = results.get("throughput") or []
    return next((r for r in rows if r["path"] == path and r["concurrency"] == concurrency), None)


def cpu_per_get(results: dict[str, Any], concurrency: int) -> tuple[float, float] | None:
    """CPU ms per Get: ours through the hub (hub, agent, chisel, launchers) and kube-apiserver's
    own on a direct Get, at ``concurrency``."""
    hub = _throughput(results, "hub", concurrency)
    direct = _throughput(results, "direct", concurrency)
    if not hub or not direct or "cpu_seconds_per_1000" not in hub or "cpu_seconds_per_1000" not in direct:
        return None
    ours = sum(hub["cpu_seconds_per_1000"].get(name, 0.0) for name in OURS)
    apiserver = direct["cpu_seconds_per_1000"].get("kube-apiserver", math.nan)
    return round(ours, 3), round(apiserver, 3)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 14 with the measured value and met / missed (None: not measured)."""
    rows: list[dict[str, Any]] = []
    smoke = "smoke sizes: not comparable" if results.get("smoke") else ""

    for concurrency in (1, 16):
        name = (
            f"CPU per Get: hub + agent + chisel vs kube-apiserver per direct Get, concurrency {concurrency}"
        )
        costs = cpu_per_get(results, concurrency)
        if costs is None or not costs[1]:
            rows.append(_row(name, None, "<= 2 x", None, "not measured"))
            continue
        ratio = round(costs[0] / costs[1], 2)
        note = f"{costs[0]:.2f} vs {costs[1]:.2f} ms per Get {smoke}".strip()
        rows.append(_row(name, ratio, "<= 2 x", ratio <= 2.0, note))

    direct = _latency(results, "direct https-json")
    for protocol in ("connect-proto", "connect-json", "grpc"):
        hub = _latency(results, f"hub {protocol}")
        for q, limit in (("p50", 2.0), ("p99", 8.0)):
            name = f"added latency (hub - direct), {q}, {protocol}"
            if direct is None or hub is None:
                rows.append(_row(name, None, f"<= {limit:g} ms", None, "not measured"))
                continue
            added = round(hub[q] - direct[q], 2)
            rows.append(_row(name, added, f"<= {limit:g} ms", added <= limit, smoke))

    d16 = _throughput(results, "direct", 16)
    h16 = _throughput(results, "hub", 16)
    name = "throughput of hub at concurrency 16, share of direct"
    if d16 and h16 and d16["rps"]:
        share = round(100.0 * h16["rps"] / d16["rps"], 1)
        note = f"{h16['rps']:.0f} vs {d16['rps']:.0f} req/s {smoke}".strip()
        rows.append(_row(name, share, ">= 40 %", share >= 40.0, note))
    else:
        rows.append(_row(name, None, ">= 40 %", None, "not measured"))

    lists = results.get("lists") or []
    size = max((r["items"] for r in lists), default=None)
    name = f"List {size or 5000} ConfigMaps through hub (connect-proto), time vs direct"
    dl = next((r for r in lists if r["items"] == size and r["label"] == "direct https-json"), None)
    hl = next((r for r in lists if r["items"] == size and r["label"] == "hub connect-proto"), None)
    if dl and hl:
        ratio = round(hl["ms_median"] / dl["ms_median"], 2)
        note = f"{hl['ms_median']:.0f} vs {dl['ms_median']:.0f} ms"
        if size != 5000:
            note += "; " + (smoke or f"{size} items, not 5000")
        rows.append(_row(name, ratio, "<= 1.3 x", ratio <= 1.3, note))
    else:
        rows.append(_row(name, None, "<= 1.3 x", None, "not measured"))

    watch = results.get("watch")
    if watch:
        streams = watch.get("streams_open", 0)
        rate = watch.get("writes_per_second", 0.0)
        full = streams >= 1000 and rate >= 190
        note = f"{streams} streams, {rate:.0f} changes/s"
        if not full:
            note += " (below 1,000 streams / 200 per s: " + (smoke or "see the Watch section") + ")"
        p99 = watch["delivery_ms"]["p99"]
        ok = p99 <= 50 and full and not math.isnan(p99)
        rows.append(_row("Watch: p99 delivery latency (write -> client)", p99, "<= 50 ms", ok, note))
        rss_mb = round(watch["hub_tree_peak_rss_mib"] * MB_PER_MIB, 1)
        rows.append(
            _row(
                "Watch: hub RSS (peak, with chisel and launcher)",
                rss_mb,
                "<= 200 MB",
                rss_mb <= 200 and full,
                note,
            )
        )
    else:
        rows.append(_row("Watch: p99 delivery latency", None, "<= 50 ms", None, "not measured"))
        rows.append(_row("Watch: hub RSS", None, "<= 200 MB", None, "not measured"))

    idle = results.get("idle")
    if idle:
        full = idle["clusters_configured"] >= 50 and idle["clusters_connected"] >= 10
        note = f"{idle['clusters_configured']} configured, {idle['clusters_connected']} connected"
        if not full:
            note += "; " + (smoke or "fewer than 50/10")
        for side in ("hub", "agent"):
            rss = idle.get(f"{side}_tree_rss_mib")
            if rss is None:
                continue
            rows.append(
                _row(
                    f"{side} RSS at rest (with its chisel and launcher), MiB",
                    rss,
                    "<= 80 MiB",
                    rss <= 80,
                    note,
                )
            )
        cpu = idle["hub_tree_cpu_percent"]
        rows.append(_row("idle hub CPU, % of one core", cpu, "<= 0.5 %", cpu <= 0.5 and full, note))
    else:
        rows.append(_row("RSS at rest", None, "<= 80 MiB", None, "not measured"))
        rows.append(_row("idle hub CPU", None, "<= 0.5 %", None, "not measured"))

    startup = results.get("startup") or {}
    for side in ("hub", "agent"):
        found = startup.get(side)
        name = f"start-up, spawn -> ready, {side}"
        if not found:
            rows.append(_row(name, None, "<= 0.4 s", None, "not measured"))
            continue
        seconds = found["median_s"]
        note = f"median of {len(found['seconds'])} {smoke}".strip()
        rows.append(_row(name, seconds, "<= 0.4 s", seconds <= 0.4, note))
    if "fanout" in results:
        rows += fanout_targets(results["fanout"], bool(results.get("smoke")))
    return rows


# --------------------------------------------------------------------------------------------------
# Fan-out targets (issue 18)


def fanout_targets(fanout: dict[str, Any] | None, smoke: bool) -> list[dict[str, Any]]:
    """Each fan-out target with its measured value and met / missed (None: not measured, or smoke)."""
    rows: list[dict[str, Any]] = []
    note_smoke = "smoke sizes: not comparable" if smoke else ""

    def row(name: str, value: float | None, limit: str, met: bool | None, note: str = "") -> None:
        rows.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "met": None if smoke or value is None else met,
                "note": "; ".join(x for x in (note, note_smoke) if x),
            }
        )

    fanout = fanout or {}
    lists_ = fanout.get("lists") or {}
    if "multilist_ms" in lists_:
        m, b1, b2 = lists_["multilist_ms"], lists_["b1_concurrent_ms"], lists_["b2_sequential_ms"]
        label = f"{lists_['items_per_cluster']} ConfigMaps x {lists_['clusters']} clusters"
        r = round(m["p50"] / b1["p50"], 2)
        row(
            f"MultiList {label}: p50 vs the same Lists issued concurrently (B1)",
            r,
            "<= 1.15 x",
            r <= 1.15,
            f"{m['p50']:.0f} vs {b1['p50']:.0f} ms",
        )
        r = round(m["p99"] / b1["p99"], 2)
        row("MultiList: p99 vs B1 p99", r, "<= 1.25 x", r <= 1.25, f"{m['p99']:.0f} vs {b1['p99']:.0f} ms")
        r = round(m["p50"] / b2["p50"], 2)
        row(
            "MultiList: p50 vs the same Lists issued sequentially (B2)",
            r,
            "<= 0.3 x",
            r <= 0.3,
            f"{m['p50']:.0f} vs {b2['p50']:.0f} ms",
        )
        r = lists_["hub_rss_increase_over_response"]
        row(
            "MultiList: hub RSS increase / response bytes",
            r,
            "<= 2 x",
            r <= 2.0,
            f"{lists_['hub_rss_mib_peak'] - lists_['hub_rss_mib_baseline']:.1f} MiB for "
            f"{lists_['response_bytes'] / 2**20:.1f} MiB; the same Lists through the hub (B1): "
            f"{lists_.get('b1_hub_rss_increase_over_response', '?')} x",
        )
        r = lists_["hub_cpu_us_per_item"]
        row(
            "MultiList: hub CPU per item",
            r,
            "<= 10 us",
            r <= 10.0,
            f"B1 (the same Lists through the hub): {lists_.get('b1_hub_cpu_us_per_item', '?')} us",
        )
        for key, name, limit in (("paged_fair", "FAIR", 2.0), ("paged_cluster_major", "CLUSTER_MAJOR", 2.5)):
            paged = lists_.get(key)
            if paged:
                row(
                    f"MultiList paged limit {paged['limit']}, {name}: total vs unpaged",
                    paged["x_unpaged"],
                    f"<= {limit:g} x",
                    paged["x_unpaged"] <= limit,
                    f"{paged['pages']} pages, {paged['ms']:.0f} ms",
                )
        fair = lists_.get("paged_fair")
        if fair:
            size = fair["cursor_bytes_max"]
            row(
                f"cursor size at {lists_['clusters']} clusters (largest of the traversal)",
                size,
                "<= 2048 bytes",
                size <= 2048 if lists_["clusters"] >= 20 else None,
            )
    else:
        row("MultiList vs B1/B2", None, "<= 1.15 x / <= 0.3 x", None, "not measured")
    hole = fanout.get("black_hole") or {}
    if hole:
        over = hole["over_timeout_ms"]
        row(
            f"one black-holed cluster of {hole['clusters']}: page time over its per-cluster timeout",
            over,
            "<= 100 ms",
            over <= 100,
            f"{hole['page_ms']:.0f} ms with a {hole['per_cluster_timeout_ms']:.0f} ms timeout (the other "
            f"clusters' items moved and decoded after it); a page of 100 items a cluster: "
            f"{hole.get('small_page_over_timeout_ms', '?')} ms over",
        )
    watch_ = fanout.get("watch") or {}
    if "delivery_ms" in watch_ and "single_watch" in watch_:
        d, s = watch_["delivery_ms"], watch_["single_watch"]["delivery_ms"]
        note = (
            f"{watch_['clusters']} clusters, {watch_['events_per_second']:.0f} events/s "
            f"({watch_['writes_per_second']:.0f} writes/s on shared control planes)"
        )
        row("MultiWatch: write -> client p99", d["p99"], "<= 100 ms", d["p99"] <= 100, note)
        r = round(d["p99"] / s["p99"], 2) if s["p99"] else None
        separate = (watch_.get("separate_watches") or {}).get("delivery_ms") or {}
        row(
            "MultiWatch p99 vs single-cluster Watch p99 (same run)",
            r,
            "<= 2 x",
            r is not None and r <= 2,
            f"{d['p99']:.1f} vs {s['p99']:.1f} ms; the same clusters as one Watch each: "
            f"{separate.get('p99', '?')} ms",
        )
        row("MultiWatch: write -> client p50", d["p50"], "<= 10 ms", d["p50"] <= 10, note)
    else:
        row("MultiWatch p99", None, "<= 100 ms", None, "not measured")
    fair_ = fanout.get("fairness") or {}
    if "quiet_delivery_ms" in fair_:
        q = fair_["quiet_delivery_ms"]
        row(
            "fairness: quiet clusters' p99 while one cluster writes fast",
            q["p99"],
            "<= 150 ms",
            q["p99"] <= 150,
            f"hot cluster at {fair_['hot_writes_per_second_achieved']:.0f} writes/s achieved "
            f"(asked {fair_['hot_rate']:.0f})",
        )
    stub = fanout.get("stub") or {}
    label = f"{stub.get('clusters', '?')} clusters, stub agents behind real chisel tunnels"
    if "multilist_ms" in stub:
        v = stub["multilist_ms"]["p50"]
        row(
            "MultiList over 1,000 clusters x 10 items, p50",
            v,
            "<= 2000 ms",
            v <= 2000 if stub["clusters"] >= 1000 else None,
            label,
        )
    paged = stub.get("paged")
    if paged:
        size = paged["cursor_bytes_max"]
        row(
            "cursor size at 1,000 clusters (largest of the traversal)",
            size,
            "<= 16384 bytes",
            size <= 16384 if stub["clusters"] >= 1000 else None,
            label,
        )
        size = paged["resume_bytes"]
        row(
            "resume token size at 1,000 clusters",
            size,
            "<= 16384 bytes",
            size <= 16384 if stub["clusters"] >= 1000 else None,
            label,
        )
    costs = stub.get("token_costs")
    if costs:
        worst = max(costs["cursor"]["open_seal_ms"]["p50"], costs["resume"]["open_seal_ms"]["p50"])
        row(
            "cursor / resume token open + seal at 1,000 clusters, p50",
            worst,
            "<= 1 ms",
            worst <= 1 if stub["clusters"] >= 1000 else None,
            f"cursor {costs['cursor']['bytes']} B: {costs['cursor']['open_seal_ms']['p50']} ms, resume "
            f"{costs['resume']['bytes']} B: {costs['resume']['open_seal_ms']['p50']} ms; hub code in the "
            f"bench process; {label}",
        )
    w = stub.get("watch")
    if w:
        rss_mb = round(w["rss_mib_peak"]["hub"] * 1.048576, 1)
        tree = round((w["rss_mib_peak"]["hub"] + w["rss_mib_peak"]["chisel-server"]) * 1.048576, 1)
        row(
            "hub RSS with a 1,000-leg MultiWatch (peak, hub process)",
            rss_mb,
            "<= 150 MB",
            rss_mb <= 150 if w["legs"] >= 1000 else None,
            f"{label}; hub + chisel server {tree} MB",
        )
        grown = round((w["rss_mib_peak"]["hub"] - w["rss_mib_before"]["hub"]) * 1.048576, 1)
        allowed = round(5 + 0.1 * w["legs"], 1)
        row(
            "MultiWatch memory: hub RSS increase for its legs",
            grown,
            f"<= 5 MB + 0.1 MB a leg ({allowed} MB)",
            grown <= allowed if w["legs"] >= 1000 else None,
            f"{w['legs']} legs: {round(grown * 1000 / max(1, w['legs']), 1)} kB a leg; {label}",
        )
    return rows


def comparison(results: dict[str, Any]) -> Table | None:
    """Before (the ``--baseline`` tree) and after (this tree), same machine, run and client."""
    before = results.get("baseline")
    if not before:
        return None

    def latency(r: dict[str, Any], label: str, q: str) -> float | None:
        found = _latency(r, label)
        return found[q] if found else None

    def rps(r: dict[str, Any], path: str, c: int) -> float | None:
        found = _throughput(r, path, c)
        return found["rps"] if found else None

    def cpu(r: dict[str, Any], c: int) -> float | None:
        costs = cpu_per_get(r, c)
        return costs[0] if costs else None

    def listed(r: dict[str, Any], label: str) -> float | None:
        rows = r.get("lists") or []
        size = max((x["items"] for x in rows), default=None)
        found = next((x for x in rows if x["items"] == size and x["label"] == label), None)
        return found["ms_median"] if found else None

    def idle(r: dict[str, Any], key: str) -> float | None:
        return (r.get("idle") or {}).get(key)

    def watch(r: dict[str, Any], key: str) -> float | None:
        found = r.get("watch") or {}
        return found.get("delivery_ms", {}).get("p99") if key == "p99" else found.get(key)

    def started(r: dict[str, Any], side: str) -> float | None:
        return ((r.get("startup") or {}).get(side) or {}).get("median_s")

    figures: list[tuple[str, Any, Any]] = [
        (
            "Get via hub, connect-proto, p50 / p99 (ms)",
            lambda r: latency(r, "hub connect-proto", "p50"),
            lambda r: latency(r, "hub connect-proto", "p99"),
        ),
        (
            "Get direct, p50 / p99 (ms)",
            lambda r: latency(r, "direct https-json", "p50"),
            lambda r: latency(r, "direct https-json", "p99"),
        ),
        (
            "CPU per Get through the hub, ours (ms): concurrency 1 / 16",
            lambda r: cpu(r, 1),
            lambda r: cpu(r, 16),
        ),
        (
            "Get req/s through the hub: concurrency 1 / 16",
            lambda r: rps(r, "hub", 1),
            lambda r: rps(r, "hub", 16),
        ),
        (
            "List (largest) via hub / direct (ms)",
            lambda r: listed(r, "hub connect-proto"),
            lambda r: listed(r, "direct https-json"),
        ),
        (
            "Watch delivery p99 (ms) / hub peak RSS (MiB)",
            lambda r: watch(r, "p99"),
            lambda r: watch(r, "hub_tree_peak_rss_mib"),
        ),
        (
            "RSS at rest, hub / agent trees (MiB)",
            lambda r: idle(r, "hub_tree_rss_mib"),
            lambda r: idle(r, "agent_tree_rss_mib"),
        ),
        ("idle CPU, hub tree (% of a core)", lambda r: idle(r, "hub_tree_cpu_percent"), lambda r: None),
        (
            "start-up, spawn -> ready, hub / agent (s)",
            lambda r: started(r, "hub"),
            lambda r: started(r, "agent"),
        ),
    ]
    rows = []
    for name, first, second in figures:
        cells = []
        for r in (before, results):
            a, b = first(r), second(r)
            cells.append(_f(a) if b is None else _slash(_f(a), _f(b)))
        rows.append([name, *cells])
    label = before.get("label") or "baseline"
    return (f"Before ({label}) and after (this tree), one run", ["figure", "before", "after"], rows)


# --------------------------------------------------------------------------------------------------
# Tables (rendered as text for the terminal and as Markdown for the report)


Table = tuple[str, list[str], list[list[str]]]


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def _slash(*values: Any) -> str:
    return " / ".join(str(v) for v in values)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def tables(results: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    latency = results.get("latency") or []
    if latency:
        direct = _latency(results, "direct https-json")
        rows = []
        for r in latency:
            added50 = r["p50"] - direct["p50"] if direct else math.nan
            added99 = r["p99"] - direct["p99"] if direct else math.nan
            rows.append(
                [
                    r["label"],
                    _f(r["p50"]),
                    _f(r["p90"]),
                    _f(r["p99"]),
                    _f(added50),
                    _f(added99),
                    _f(r.get("other_cores")),
                ]
            )
        out.append(
            (
                "Unary Get latency, sequential (ms)",
                [
                    "path / protocol",
                    "p50",
                    "p90",
                    "p99",
                    "+p50 vs direct",
                    "+p99 vs direct",
                    "other cores busy",
                ],
                rows,
            )
        )

    tp = results.get("throughput") or []
    if tp:
        rows = []
        for r in tp:
            per = r.get("cpu_seconds_per_1000", {})
            rows.append(
                [
                    r["label"],
                    str(r["concurrency"]),
                    _f(r["rps"], 0),
                    _f(r["latency_ms"]["p50"]),
                    _f(r["latency_ms"]["p99"]),
                ]
                + [_f(per.get(p), 3) for p in PROCESS_ORDER]
                + [_f(r.get("other_cores"))]
            )
        out.append(
            (
                "Throughput of Get, and CPU seconds per 1,000 requests per process",
                ["path", "conc.", "req/s", "p50 ms", "p99 ms", *PROCESS_ORDER, "other cores busy"],
                rows,
            )
        )

    lists = results.get("lists") or []
    if lists:
        rows = []
        for r in lists:
            base = next(
                (x for x in lists if x["items"] == r["items"] and x["label"] == "direct https-json"), None
            )
            ratio = r["ms_median"] / base["ms_median"] if base else math.nan
            peak = r["peak_rss_mib"]
            per = r.get("cpu_seconds_per_list", {})
            rows.append(
                [
                    str(r["items"]),
                    r["label"],
                    _f(r["ms_median"], 1),
                    _f(r["ms_min"], 1),
                    _f(ratio),
                    f"{r['bytes']:,}",
                    _f(peak.get("hub"), 1),
                    _f(peak.get("agent"), 1),
                    _slash(*(_f(per.get(p), 3) for p in LIST_CPU)),
                    _f(r.get("other_cores")),
                ]
            )
        out.append(
            (
                "List of N ConfigMaps (~1 KiB each): time (median), response body bytes, peak RSS (MiB)",
                [
                    "items",
                    "path / protocol",
                    "ms",
                    "min ms",
                    "x direct",
                    "bytes",
                    "hub peak",
                    "agent peak",
                    "CPU s per list: " + " / ".join(LIST_CPU),
                    "other cores busy",
                ],
                rows,
            )
        )

    watch = results.get("watch")
    if watch:
        d = watch["delivery_ms"]
        cpu = watch["cpu_percent_of_core"]
        peak = watch["peak_rss_mib"]
        before, opened = watch["rss_mib_before"], watch["rss_mib_open"]
        ack = watch["write_ack_ms"]
        busy = ("hub", "chisel-server", "agent", "chisel-client", "kube-apiserver", "etcd", "bench-client")
        quiet = watch.get("open_idle_cpu_percent_of_core", {})
        after = watch.get("delivery_after_ack_ms", {})
        rows = [
            [
                "streams open (requested), client HTTP/2 connections",
                f"{watch['streams_open']} ({watch['streams_requested']}), {watch.get('client_connections')}",
            ],
            ["ramp-up (all streams established)", f"{watch['ramp_seconds']} s"],
            ["changes written / per s", _slash(watch["writes"], _f(watch["writes_per_second"], 1))],
            ["write ack p50 / p99 (ms)", _slash(_f(ack["p50"]), _f(ack["p99"]))],
            ["delivered / missing", _slash(watch["delivered"], watch["missing"])],
            [
                "delivery p50 / p90 / p99 / max (ms)",
                _slash(*(_f(d[q]) for q in ("p50", "p90", "p99", "max"))),
            ],
            [
                "same, counted from the write's ack (ms)",
                _slash(*(_f(after.get(q)) for q in ("p50", "p90", "p99", "max"))),
            ],
            ["hub RSS MiB: before / open / peak", _slash(*(_f(x["hub"], 1) for x in (before, opened, peak)))],
            ["chisel server RSS MiB peak", _f(peak["chisel-server"], 1)],
            [
                "agent RSS MiB: before / open / peak",
                _slash(*(_f(x["agent"], 1) for x in (before, opened, peak))),
            ],
            [f"CPU % of a core: {' / '.join(busy)}", _slash(*(_f(cpu.get(p), 1) for p in busy))],
            ["same, streams open but no changes", _slash(*(_f(quiet.get(p), 1) for p in busy))],
            ["other cores busy", _f(watch.get("other_cores"))],
        ]
        out.append(("Watch through the hub (one object per stream, steady change rate)", ["", "value"], rows))

    kubeclient = results.get("kubeclient")
    if kubeclient and "watch" in kubeclient:
        out.append(kubeclient_table(kubeclient))

    idle = results.get("idle")
    if idle:
        rss, cpu = idle["rss_mib"], idle["cpu_percent_of_core"]
        rows = [
            [p, _f(rss.get(p), 1), _f(cpu.get(p), 3)]
            for p in ("hub", "hub-launcher", "chisel-server", "agent", "agent-launcher", "chisel-client")
        ]
        out.append(
            (
                f"Idle: {idle['clusters_configured']} clusters configured, "
                f"{idle['clusters_connected']} connected (agent rows: one of them), {idle['seconds']:.0f} s",
                ["process", "RSS MiB", "CPU % of a core"],
                rows,
            )
        )

    compared = comparison(results)
    if compared is not None:
        out.append(compared)

    startup = results.get("startup") or {}
    if startup:
        rows = []
        for side, found in startup.items():
            rows.append(
                [
                    side,
                    _f(found["median_s"], 3),
                    " ".join(_f(t, 3) for t in found["seconds"]),
                    ", ".join(f"{k} {v}" for k, v in (found.get("breakdown_ms") or {}).items()),
                ]
            )
        out.append(
            ("Start-up, spawn -> ready (s)", ["service", "median", "runs", "where it went (ms)"], rows)
        )

    rows = [
        [t["target"], _f(t["value"]), t["limit"], _verdict(t["met"]), t["note"]]
        for t in results.get("targets", [])
    ]
    out.append(("Targets (issues 7, 14 and 18)", ["target", "measured", "limit", "verdict", "note"], rows))
    return out


def kubeclient_table(k: dict[str, Any]) -> Table:
    """The ``kubeclient`` scenario: the agent's client to kube-apiserver, aiohttp vs pyqwest."""
    get, conc, listed, watch = k["get"], k["get_concurrent"], k["list"], k["watch"]
    names = list(get)
    first = names[0]
    items, streams = listed[first]["items"], watch[first]["streams"]

    def row(label: str, cell: Any, ratio: Any = None) -> list[str]:
        """``cell(name)`` per client, and pyqwest / aiohttp of ``ratio(name)`` (a number)."""
        share = ""
        if ratio is not None and "pyqwest" in names and "aiohttp" in names:
            a, b = ratio("aiohttp"), ratio("pyqwest")
            share = _f(b / a) if a else ""
        return [label, *(cell(n) for n in names), share]

    def pair(values: dict[str, Any], *keys: str, digits: int = 2) -> Any:
        return lambda n: _slash(*(_f(values[n][key], digits) for key in keys))

    def quantiles(values: dict[str, Any], key: str) -> Any:
        return lambda n: _slash(_f(values[n][key]["p50"]), _f(values[n][key]["p99"]))

    rows = [
        row("HTTP version", lambda n: watch[n]["http_version"]),
        row(
            f"Get p50 / p99 (ms), {get[first]['requests']:,} sequential",
            pair(get, "p50", "p99"),
            lambda n: get[n]["p50"],
        ),
        row(
            "client CPU s per 1,000 Gets",
            pair(get, "cpu_seconds_per_1000", digits=3),
            lambda n: get[n]["cpu_seconds_per_1000"],
        ),
        row(
            "kube-apiserver CPU s per 1,000 Gets",
            pair(get, "apiserver_cpu_seconds_per_1000", digits=3),
            lambda n: get[n]["apiserver_cpu_seconds_per_1000"],
        ),
        row(
            f"Get at concurrency {conc[first]['concurrency']}: req/s, p50 / p99 (ms)",
            lambda n: f"{_f(conc[n]['rps'], 0)}, {_slash(_f(conc[n]['p50']), _f(conc[n]['p99']))}",
            lambda n: conc[n]["rps"],
        ),
        row(
            f"  client / kube-apiserver CPU s per 1,000 Gets at concurrency {conc[first]['concurrency']}",
            pair(conc, "cpu_seconds_per_1000", "apiserver_cpu_seconds_per_1000", digits=3),
            lambda n: conc[n]["cpu_seconds_per_1000"],
        ),
        row(
            f"List {items:,}: median / min (ms), {listed[first]['repeats']} runs",
            pair(listed, "ms_median", "ms_min", digits=1),
            lambda n: listed[n]["ms_median"],
        ),
        row(
            f"List {items:,}: client / kube-apiserver CPU s per List",
            pair(listed, "cpu_seconds_median", "apiserver_cpu_seconds_median", digits=3),
            lambda n: listed[n]["cpu_seconds_median"],
        ),
        row(f"List {items:,}: client peak RSS (MiB)", pair(listed, "peak_rss_mib", digits=1)),
        row(
            f"{streams:,} Watches: open all (s) / client CPU (s)",
            pair(watch, "open_seconds", "open_cpu_seconds"),
            lambda n: watch[n]["open_seconds"],
        ),
        row("  first event of a Watch p50 / p99 (ms)", quantiles(watch, "first_event_ms")),
        row("  TCP connections to kube-apiserver", lambda n: str(watch[n]["connections"])),
        row(
            "  open and quiet: client / kube-apiserver CPU (% of a core)",
            pair(watch, "quiet_cpu_percent", "quiet_apiserver_cpu_percent"),
        ),
        row(
            "  changes written / per s, missing",
            lambda n: f"{watch[n]['writes']:,} / {_f(watch[n]['writes_per_second'], 1)}, "
            f"{watch[n]['missing']}",
        ),
        row(
            "  delivery p50 / p99 (ms)",
            quantiles(watch, "delivery_ms"),
            lambda n: watch[n]["delivery_ms"]["p99"],
        ),
        row(
            "  changes: client / kube-apiserver CPU (% of a core)",
            pair(watch, "cpu_percent", "apiserver_cpu_percent"),
            lambda n: watch[n]["cpu_percent"],
        ),
        row(
            "  client RSS MiB: fresh process / Watches open / peak",
            pair(watch, "rss_mib_rest", "rss_mib_open", "peak_rss_mib", digits=1),
            lambda n: watch[n]["rss_mib_open"] - watch[n]["rss_mib_rest"],
        ),
        row(
            "other cores busy: Get / List / Watch",
            lambda n: _slash(*(_f(x[n]["other_cores"]) for x in (get, listed, watch))),
        ),
    ]
    load = _slash(*(_f((k.get(key) or [math.nan])[0]) for key in ("loadavg_start", "loadavg_end")))
    return (
        "The agent's client to kube-apiserver over TLS: one process per client, turns alternating "
        f"(load average at start / end {load}); the RSS ratio is of the growth with the Watches open",
        ["figure", *(f"{n} (ships)" if n == "aiohttp" else n for n in names), "pyqwest / aiohttp"],
        rows,
    )


def _text(table: Table) -> str:
    title, header, rows = table
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [title, "-" * len(title)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)))
    return "\n".join(lines)


def _markdown(table: Table) -> str:
    title, header, rows = table
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    head = (
        f"OtterScale benchmark{' (SMOKE)' if results.get('smoke') else ''}: {m.get('cores')} cores "
        f"({m.get('cpu_model')}), load average at start {_f((m.get('loadavg_start') or [math.nan])[0])}"
    )
    return "\n\n".join([head, *(_text(t) for t in tables(results))])


# --------------------------------------------------------------------------------------------------
# Plots


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots beside the report; returns their file names (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    latency = results.get("latency") or []
    if latency:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        labels = [r["label"] for r in latency]
        y = range(len(labels))
        for offset, q in ((-0.27, "p50"), (0.0, "p90"), (0.27, "p99")):
            ax1.barh([i + offset for i in y], [r[q] for r in latency], height=0.26, label=q)
        ax1.set_yticks(list(y), labels)
        ax1.invert_yaxis()
        ax1.set_xlabel("ms")
        ax1.set_title("Get latency (sequential)")
        ax1.legend()
        for r in latency:
            if r["label"] in (*MAIN_LATENCY, "hub connect-proto", "hub connect-json", "hub grpc"):
                ax2.plot(r["cdf"], range(1, 101), label=r["label"])
        ax2.set_xscale("log")
        ax2.set_xlabel("ms (log)")
        ax2.set_ylabel("percentile")
        ax2.set_title("Get latency CDF")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
        save(fig, "latency.png")

    tp = results.get("throughput") or []
    if tp:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        for label in dict.fromkeys(r["label"] for r in tp):
            rows = [r for r in tp if r["label"] == label]
            ax1.plot([r["concurrency"] for r in rows], [r["rps"] for r in rows], marker="o", label=label)
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("concurrency")
        ax1.set_ylabel("requests/s")
        ax1.set_title("Get throughput")
        ax1.grid(True, alpha=0.3)
        ax1.legend()
        c16 = [r for r in tp if r["concurrency"] == 16 and r.get("cpu_seconds_per_1000")]
        bottom = [0.0] * len(c16)
        for proc in PROCESS_ORDER:
            values = [r["cpu_seconds_per_1000"].get(proc, 0.0) for r in c16]
            ax2.bar([r["label"] for r in c16], values, bottom=bottom, label=proc)
            bottom = [a + b for a, b in zip(bottom, values, strict=True)]
        ax2.tick_params(axis="x", labelrotation=20)
        ax2.set_ylabel("CPU seconds per 1,000 requests")
        ax2.set_title("Where the CPU goes (concurrency 16)")
        ax2.legend(fontsize=8)
        save(fig, "throughput.png")

    lists = results.get("lists") or []
    if lists:
        sizes = sorted({r["items"] for r in lists})
        fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            rows = [r for r in lists if r["items"] == size]
            ax.barh([r["label"] for r in rows], [r["ms_median"] for r in rows])
            ax.invert_yaxis()
            ax.set_xlabel("ms (median)")
            ax.set_title(f"List {size} ConfigMaps")
        save(fig, "lists.png")

    watch = results.get("watch")
    if watch and watch.get("timeline"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        if watch.get("delivery_cdf"):
            ax1.plot(watch["delivery_cdf"], range(1, 101))
            ax1.set_xscale("log")
        ax1.set_xlabel("ms, write -> client (log)")
        ax1.set_ylabel("percentile")
        ax1.set_title(
            f"Watch delivery latency ({watch['streams_open']} streams, {watch['writes_per_second']}/s)"
        )
        ax1.grid(True, which="both", alpha=0.3)
        times = [t for t, _ in watch["timeline"]]
        for proc in ("hub", "chisel-server", "agent", "kube-apiserver"):
            ax2.plot(times, [values.get(proc, 0.0) for _, values in watch["timeline"]], label=proc)
        for mark, t in watch.get("marks", {}).items():
            ax2.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax2.text(t, ax2.get_ylim()[1] * 0.95, mark, rotation=90, fontsize=7, va="top")
        ax2.set_xlabel("s")
        ax2.set_ylabel("RSS MiB")
        ax2.set_title("RSS during the Watch scenario")
        ax2.legend(fontsize=8)
        save(fig, "watch.png")
    return names


# --------------------------------------------------------------------------------------------------
# report.md


def _profile_section(profiles: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## Profiles",
        "",
        "py-spy `--gil` samples at 100 Hz (Python code holding the GIL; native code called from "
        "Python counts for the calling line), taken in a separate run after each measurement. "
        "`perf` (when available) gives the true on-CPU split by library. Shares are % of samples.",
        "",
    ]
    if not profiles:
        return [*lines, "Not taken in this run (`--no-profile` or smoke).", ""]
    for p in profiles:
        title = f"### {p.get('scenario')}: {p.get('name')}"
        if "error" in p:
            lines += [title, "", f"py-spy failed: {p['error']}", ""]
            continue
        perf = p.get("perf") or {}
        lines += [
            title,
            "",
            f"{p['samples']} samples ({p['samples'] / 100:.1f} s sampled); the process used "
            f"{p.get('cpu_seconds', '-')} s of CPU in {p.get('load_seconds', '-')} s of load. "
            f"Raw stacks: `profiles/{p['file']}`.",
            "",
        ]
        if perf.get("dso"):
            lines += ["perf, on-CPU by library: " + ", ".join(f"{d} {v:g}%" for d, v in perf["dso"][:6]), ""]
        lines += [
            "| package (self) | % | function (self) | % | function (inclusive) | % |",
            "|---|---|---|---|---|---|",
        ]
        n = max(len(p["packages"]), len(p["self"]), len(p["inclusive"]))
        for i in range(min(n, 12)):
            cells = []
            for key in ("packages", "self", "inclusive"):
                entries = p[key]
                cells += (
                    [entries[i][0].replace("|", "\\|"), str(entries[i][1])] if i < len(entries) else ["", ""]
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write(results: dict[str, Any], out: Path) -> None:
    """``report.md`` and the PNG plots into ``out``."""
    images = plots(results, out)
    m = results.get("machine", {})
    lines = [
        f"# OtterScale benchmark{' (smoke run: tiny sizes, not comparable)' if results.get('smoke') else ''}",
        "",
        f"Started {results.get('started')}, took {results.get('timings', {}).get('total')} s. "
        f"Commit {m.get('git')}.",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}; shared with other work: load average "
        f"{_f((m.get('loadavg_start') or [math.nan])[0])} at the start, "
        f"{_f((m.get('loadavg_end') or [math.nan])[0])} at the end (the 'other cores busy' columns "
        "show how many cores were busy outside the benchmark during each measurement).",
        "",
        "Every process runs on this machine on loopback: etcd, kube-apiserver and "
        "kube-controller-manager; the hub (`otterscale server`) with its chisel server; the agent "
        "(`otterscale agent`) with its chisel client; a local OIDC issuer; and the load generator "
        "(one Python process, asyncio, pyqwest), which competes for the same 2 cores.",
        "",
        "Paths: **direct** = kube-apiserver over HTTPS (HTTP/2, admin client certificate, JSON); "
        "**agent** = the agent's API directly (signed identity headers); **hub** = hub -> chisel "
        "-> agent -> kube-apiserver with an OIDC bearer token. Connect and gRPC run over h2c "
        "unless marked `/h1`; compression is off unless marked `+gzip` (connectrpc's client "
        "defaults). Clients decode and check every response.",
        "",
    ]
    if results.get("failures"):
        lines += ["## Functional failures", "", *(f"- {f}" for f in results["failures"]), ""]
    lines += ["## Results", ""]
    for table in tables(results):
        lines += [_markdown(table), ""]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    lines += _profile_section(results.get("profiles") or [])
    sizes = results.get("sizes", {})
    lines += ["## Sizes", "", "```", *(f"{k} = {v}" for k, v in sizes.items()), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
