"""Which metrics the shipped Grafana dashboard queries, and which of them an exposition lacks.

A dashboard that queries a renamed or never-exported metric shows "No data" and nobody notices; the tests
compare these names with what the running app exports. The PromQL reading is a small lexer, not a full
parser: enough to tell metric names from functions, label names, durations and Grafana variables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Series a histogram / summary / counter family exposes besides its own name.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
_FAMILY_SERIES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}

# Words that look like identifiers but aren't series (binary/set operators, modifiers, literals).
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
     "group_right", "inf", "nan", "atan2"}
)  # fmt: skip
# After these, a parenthesised list holds label names, not expressions.
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<var>\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\])   # Grafana variables: ${x}, $x, $__rate_interval, [[x]]
    | (?P<number>[0-9.][0-9a-zA-Z_.]*)             # numbers, and durations like 5m or 1h30m
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def promql_metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (raw: `x_bucket` stays `x_bucket`)."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup not in ("ws", "comment")]
    names: set[str] = set()
    stack: list[str] = []  # open brackets: "{" labels, "[" range, "(" expression, "L" label list
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        prev = tokens[i - 1] if i else ("", "")
        if kind == "punct":
            if text == "(":
                stack.append("L" if prev[0] == "ident" and prev[1].lower() in _LABEL_LIST_KEYWORDS else "(")
            elif text in "{[":
                stack.append(text)
            elif text in ")}]" and stack:
                stack.pop()
            continue
        if kind != "ident" or (stack and stack[-1] in "{[L"):
            continue
        # A keyword, a function / aggregation call, or an aggregation with a leading `by (...)` clause.
        if text.lower() in _KEYWORDS or nxt == "(" or nxt.lower() in ("by", "without"):
            continue
        names.add(text)
    return names


def base_metric_name(series: str) -> str:
    """`x_bucket` / `x_sum` / `x_count` -> `x` (the histogram's name); other names unchanged."""
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def dashboard_queries(path: str | Path) -> list[str]:
    """Every PromQL query in a dashboard: panel targets (rows and library-free nested panels included) and
    query-type template variables (the expression inside `label_values(...)` / `query_result(...)`)."""
    doc = json.loads(Path(path).read_text())
    queries = [t["expr"] for t in _targets(doc) if isinstance(t.get("expr"), str) and t["expr"].strip()]
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if expr := _template_expr(query):
            queries.append(expr)
    return queries


def dashboard_metric_names(path: str | Path) -> set[str]:
    """Raw series names the dashboard's queries select, e.g. `tierserve_request_duration_seconds_bucket`."""
    return set().union(*(promql_metric_names(q) for q in dashboard_queries(path)))


def dashboard_base_metric_names(path: str | Path) -> set[str]:
    """The same names with histogram series suffixes stripped (`..._seconds_bucket` -> `..._seconds`)."""
    return {base_metric_name(n) for n in dashboard_metric_names(path)}


def exported_series_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition provides, including those of declared families that have
    no samples yet (a labelled counter or histogram shows only HELP/TYPE until its first observation)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in _FAMILY_SERIES.get(family.type, ("",)))
    return names


def missing_metrics(dashboard: str | Path, exposition: str) -> set[str]:
    """Dashboard series that the exposition neither has samples for nor declares."""
    return dashboard_metric_names(dashboard) - exported_series_names(exposition)


def _targets(node: Any) -> Iterator[dict[str, Any]]:
    # Panels nest inside collapsed rows ("panels" of a row); walk every dict and list to find "targets".
    if isinstance(node, dict):
        for target in node.get("targets", []) or []:
            if isinstance(target, dict):
                yield target
        for key, value in node.items():
            if key != "targets":
                yield from _targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _targets(item)


def _template_expr(query: str) -> str:
    """PromQL inside a Prometheus-datasource template query; '' when it names no series."""
    query = query.strip()
    match = re.fullmatch(r"(label_values|query_result)\s*\((.*)\)", query, re.DOTALL)
    if not match:
        return "" if re.fullmatch(r"(label_names|metrics)\s*\(.*\)", query, re.DOTALL) else query
    func, args = match.groups()
    if func == "query_result":
        return args
    # label_values(expr, label) or label_values(label): the label is the last top-level argument.
    depth, split = 0, -1
    for i, ch in enumerate(args):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            split = i
    return args[:split] if split >= 0 else ""
