#!/usr/bin/env python3
"""Offline checks of everything under deploy/: no cluster, no Docker, no helm binary.

Run through scripts/validate-deploy, which provides the pinned packages
(deploy/requirements-validate.txt) in a cached virtualenv. It checks:

- the Helm chart: `helm lint`, rendering with every value set in deploy/helm/ci-values/,
  every rendered Kubernetes object against the Kubernetes 1.30 schemas (kubernetes-validate,
  strict: unknown fields fail), the CRD objects (KEDA ScaledObject, ServiceMonitor,
  PrometheusRule) structurally, the properties that matter for Spate (hardened security
  context, grace above the drain timeout, probes, static membership, autoscaling bounds), and
  that unsafe values (more replicas than partitions, grace not above the drain) fail to render;
- every spate.toml the deploy files ship or render, against the runtime's configuration
  types in runtime/server/src/config.rs (keys the runtime would refuse fail here);
- the Prometheus rules and the Grafana dashboard: PromQL parses, and every metric name is one
  the runtime records (grepped from runtime/*/src);
- the compose files, the Dockerfile and .dockerignore.

Prints one line per check and `deploy: N passed, M failed`; exits 1 if anything failed.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

import helm_python
import kubernetes_validate
import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "spate"
CI_VALUES = DEPLOY / "helm" / "ci-values"
RULES_IN_CHART = CHART / "files" / "prometheus-rules.yaml"
RULES_LINK = DEPLOY / "prometheus" / "rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "spate-dashboard.json"
COMPOSE_DIR = DEPLOY / "compose"
CONFIG_RS = ROOT / "runtime" / "server" / "src" / "config.rs"
# config.rs composes the backends' own settings types, each defined in its crate.
CONFIG_SOURCES = [
    CONFIG_RS,
    ROOT / "runtime" / "kafka" / "src" / "options.rs",
    ROOT / "runtime" / "state-cql" / "src" / "lib.rs",
    ROOT / "runtime" / "cache-redis" / "src" / "lib.rs",
    ROOT / "runtime" / "core" / "src" / "state" / "tiered" / "read_through.rs",
    ROOT / "runtime" / "core" / "src" / "events" / "settings.rs",
    ROOT / "runtime" / "core" / "src" / "cache" / "memory.rs",
]

KUBE_VERSION = "1.30.0"
RELEASE = "spate"
NAMESPACE = "spate"
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}

# Keys of the configuration sections that the Kafka work adds to config.rs (issue: cluster
# mode on Kafka). Used only while config.rs has no such type; once it does, config.rs is the
# authority and a name that differs from these fails the check, so deploy/ gets updated.
PENDING_VARIANTS: dict[tuple[str, str], dict[str, str]] = {
    # (section, type tag) -> {key: kind}; kind "map" is a free-form table.
    ("events", "kafka"): {
        "bootstrap-servers": "leaf",
        "group": "leaf",
        "instance-id": "leaf",
        "create-topics": "leaf",
        "partitions": "leaf",
        "replication-factor": "leaf",
        "session-timeout-ms": "leaf",
        "revoke-timeout-ms": "leaf",
        "produce-timeout-ms": "leaf",
        "request-timeout-ms": "leaf",
        "librdkafka": "map",
    },
    ("registry", "shared"): {"control-topic": "leaf"},
    ("registry", "local"): {},
}


# ------------------------------------------------------------------------------------------
# Reporting


class CheckFailed(Exception):
    """A check's expectation did not hold."""


def expect(cond: Any, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except CheckFailed as e:
            self.failed.append((name, str(e)))
            print(f"FAIL {name}: {e}", flush=True)
            return None
        except Exception as e:  # an unexpected error is a failure with its trace
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            self.failed.append((name, detail))
            print(f"FAIL {name}: {detail}", flush=True)
            return None
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return result

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


R = Report()


# ------------------------------------------------------------------------------------------
# What the runtime accepts: metric names and configuration keys, read from its sources


def runtime_metrics() -> tuple[set[str], set[str]]:
    """(all metric names, histogram names) the runtime records: the names declared in
    runtime/core/src/metric_names.rs whose constant a `metrics::…!(…NAME` call in
    runtime/*/src uses."""
    table = (ROOT / "runtime" / "core" / "src" / "metric_names.rs").read_text(encoding="utf-8")
    declared = re.findall(r'^\s*([A-Z][A-Z0-9_]*) = "([A-Za-z_:][A-Za-z0-9_:]*)", (Counter|Gauge|Histogram),', table, re.M)
    sources = "\n".join(
        p.read_text(encoding="utf-8")
        for p in sorted((ROOT / "runtime").glob("*/src/**/*.rs"))
        if p.name != "metric_names.rs"
    )
    used = set(re.findall(r"metrics::(?:counter|gauge|histogram)!\(\s*(?:[\w:]+::)?([A-Z][A-Z0-9_]*)\b", sources))
    names: set[str] = set()
    histograms: set[str] = set()
    for ident, name, kind in declared:
        if ident in used:
            names.add(name)
            if kind == "Histogram":
                histograms.add(name)
    return names, histograms


def exposed_series(names: set[str], histograms: set[str]) -> set[str]:
    """Series names Prometheus sees: histograms as _bucket, _sum and _count."""
    out = set(names)
    for h in histograms:
        out |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return out


def kebab(ident: str) -> str:
    return ident.replace("_", "-")


def variant_tag(name: str) -> str:
    """serde's rename_all = "kebab-case" for a CamelCase variant name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _block(text: str, start: int) -> str:
    """The text between the `{` at or after `start` and its matching `}`."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    raise ValueError("unbalanced braces")


def _fields(body: str) -> dict[str, str]:
    """Serde field name -> Rust type of a struct body or a struct variant body."""
    body = re.sub(r"//[^\n]*", "", body)
    fields: dict[str, str] = {}
    rename = None
    depth = 0
    for line in body.splitlines():
        stripped = line.strip()
        if depth == 0:
            m = re.match(r'#\[serde\(.*\brename\s*=\s*"([^"]+)"', stripped)
            if m:
                rename = m.group(1)
            m = re.match(r"(?:pub(?:\([^)]*\))?\s+)?([a-z_][a-z0-9_]*)\s*:\s*(.+?),?$", stripped)
            if m and not stripped.startswith("#"):
                fields[rename or kebab(m.group(1))] = m.group(2).rstrip(",").strip()
                rename = None
        depth += line.count("{") + line.count("(") + line.count("[")
        depth -= line.count("}") + line.count(")") + line.count("]")
    return fields


class ConfigSchema:
    """The runtime's configuration types as parsed from config.rs."""

    def __init__(self, source: str) -> None:
        self.structs: dict[str, dict[str, str]] = {}
        self.enums: dict[str, dict[str, Any]] = {}
        # Each source's test module (at its end) is not configuration.
        text = "\n".join(re.sub(r"#\[cfg\(test\)\][\s\S]*", "", part) for part in source.split("\f"))
        for m in re.finditer(r"pub struct (\w+)\s*\{", text):
            self.structs[m.group(1)] = _fields(_block(text, m.start()))
        for m in re.finditer(r"pub enum (\w+)\s*\{", text):
            body = _block(text, m.start())
            variants: dict[str, Any] = {}
            pos = 0
            clean = re.sub(r"//[^\n]*", "", body)
            while pos < len(clean):
                vm = re.compile(r"^\s*([A-Z]\w*)\s*([{(,]|$)", re.M).search(clean, pos)
                if not vm:
                    break
                name, opener = vm.group(1), vm.group(2)
                if opener == "{":
                    inner = _block(clean, vm.start(2))
                    variants[variant_tag(name)] = _fields(inner)
                    pos = clean.index(inner, vm.start(2)) + len(inner) + 1
                elif opener == "(":
                    end = clean.index(")", vm.end())
                    variants[variant_tag(name)] = clean[vm.end() : end].strip()
                    pos = end + 1
                else:
                    variants[variant_tag(name)] = {}
                    pos = vm.end()
            self.enums[m.group(1)] = variants

    @staticmethod
    def _strip(ty: str) -> str:
        ty = ty.strip()
        m = re.fullmatch(r"Option<(.+)>", ty)
        ty = m.group(1).strip() if m else ty
        # A type named by path (`spate_kafka::KafkaOptions`) is parsed under its last name.
        return ty if "<" in ty else ty.rsplit("::", 1)[-1]

    def check(self, doc: dict[str, Any], where: str) -> list[str]:
        """Every problem of `doc` (a parsed spate.toml) the runtime would refuse."""
        problems: list[str] = []
        self._check_struct("Config", doc, "", problems, where)
        return problems

    def _check_value(self, ty: str, value: Any, path: str, problems: list[str], where: str) -> None:
        ty = self._strip(ty)
        if re.match(r"(BTreeMap|HashMap|IndexMap)<", ty):
            expect_table = isinstance(value, dict)
            if not expect_table:
                problems.append(f"{where}: `{path}` must be a table")
            return
        if ty in self.structs:
            if not isinstance(value, dict):
                problems.append(f"{where}: `{path}` must be a table")
                return
            self._check_struct(ty, value, path, problems, where)
        elif ty in self.enums and isinstance(value, dict):
            self._check_tagged(ty, value, path, problems, where)

    def _check_struct(self, ty: str, table: dict[str, Any], path: str, problems: list[str], where: str) -> None:
        fields = self.structs[ty]
        for key, value in table.items():
            full = f"{path}.{key}" if path else key
            if key in fields:
                self._check_value(fields[key], value, full, problems, where)
            elif ty == "Config" and key == "registry":
                self._check_pending("registry", value, full, problems, where)
            else:
                problems.append(f"{where}: unknown key `{full}` (config.rs {ty} has: {', '.join(sorted(fields))})")

    def _check_tagged(self, ty: str, table: dict[str, Any], path: str, problems: list[str], where: str) -> None:
        tag = table.get("type")
        variants = self.enums[ty]
        if tag in variants:
            spec = variants[tag]
            if isinstance(spec, str):  # a newtype variant: the struct it wraps
                self._check_value(spec, {k: v for k, v in table.items() if k != "type"}, path, problems, where)
                return
            for key, value in table.items():
                if key == "type":
                    continue
                if key in spec:
                    self._check_value(spec[key], value, f"{path}.{key}", problems, where)
                else:
                    problems.append(
                        f"{where}: unknown key `{path}.{key}` for type \"{tag}\" "
                        f"(config.rs {ty}::{tag} has: {', '.join(sorted(spec))})"
                    )
        elif (path, tag) in PENDING_VARIANTS:
            self._check_pending(path, table, path, problems, where)
        else:
            problems.append(f"{where}: `{path}.type = {tag!r}` is not one of {sorted(variants)} (config.rs {ty})")

    def _check_pending(self, section: str, table: Any, path: str, problems: list[str], where: str) -> None:
        if not isinstance(table, dict):
            problems.append(f"{where}: `{path}` must be a table")
            return
        tag = table.get("type")
        spec = PENDING_VARIANTS.get((section, tag))
        if spec is None:
            problems.append(f"{where}: `{path}.type = {tag!r}` is unknown")
            return
        R.note(
            f"[{section}] type = \"{tag}\" is not in config.rs yet: checked against the keys "
            f"deploy/validate.py expects ({', '.join(sorted(spec)) or 'none'})"
        )
        for key, value in table.items():
            if key == "type":
                continue
            if key not in spec:
                problems.append(f"{where}: unknown key `{path}.{key}` (expected: {', '.join(sorted(spec))})")
            elif spec[key] == "map" and not isinstance(value, dict):
                problems.append(f"{where}: `{path}.{key}` must be a table")

    def env_path_ok(self, var: str) -> bool:
        """Whether SPATE_* variable `var` names a configuration key, by the runtime's mapping
        (`__` between levels, `_` for `-`, case-insensitive)."""
        path = var[len("SPATE_") :].lower().replace("__", ".").replace("_", "-").split(".")
        top = self.structs["Config"]
        pending = {k for (sec, _), spec in PENDING_VARIANTS.items() if sec == path[0] for k in spec} | (
            {"type"} if any(sec == path[0] for sec, _ in PENDING_VARIANTS) else set()
        )
        if path[0] not in top:
            return len(path) == 2 and path[1] in pending
        ty = self._strip(top[path[0]])
        for part in path[1:]:
            if re.match(r"(BTreeMap|HashMap|IndexMap)<", ty):
                return True
            if ty in self.structs:
                if part not in self.structs[ty]:
                    return False
                ty = self._strip(self.structs[ty][part])
            elif ty in self.enums:
                # A struct variant's fields, or those of the struct a newtype variant wraps.
                specs = [
                    spec if isinstance(spec, dict) else self.structs.get(self._strip(spec), {})
                    for spec in self.enums[ty].values()
                ]
                found = [spec[part] for spec in specs if part in spec]
                if found:
                    ty = self._strip(found[0])
                elif part == "type" or part in pending:
                    ty = "String"
                else:
                    return False
            else:
                return False
        return True


# ------------------------------------------------------------------------------------------
# PromQL


def promql_names(expr: str) -> list[str]:
    """Metric names selected by a PromQL expression (raises ValueError if it does not parse)."""
    ast = promql_parser.parse(expr)
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.append(node.name)

    promql_parser.walk(ast, visit)
    return names


GRAFANA_VARS = [
    (re.compile(r"\$__rate_interval|\$\{__rate_interval\}"), "5m"),
    (re.compile(r"\$__interval|\$\{__interval\}"), "1m"),
    (re.compile(r"\$__range|\$\{__range\}"), "1h"),
    (re.compile(r"\$\{?\w+\}?"), ".*"),
]


def grafana_to_promql(expr: str) -> str:
    for pattern, replacement in GRAFANA_VARS:
        expr = pattern.sub(replacement, expr)
    return expr


# ------------------------------------------------------------------------------------------
# Helm


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


class Rendered:
    """One rendering of the chart: its objects, by kind and name."""

    def __init__(self, values: dict[str, Any], manifests: dict[str, str], merged: dict[str, Any]) -> None:
        self.values = merged
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
            elif path.endswith((".yaml", ".yml")):
                self.objects.extend(load_yaml_docs(text))

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        expect(len(found) == 1, f"expected one {kind}, found {len(found)}")
        return found[0]


def render(chart: helm_python.Chart, values: dict[str, Any]) -> Rendered:
    manifests = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    return Rendered(values, manifests, chart.merge_values(copy.deepcopy(values)))


def container(sts: dict[str, Any]) -> dict[str, Any]:
    cs = sts["spec"]["template"]["spec"]["containers"]
    expect(len(cs) == 1 and cs[0]["name"] == "spate", "the StatefulSet must run one container named spate")
    return cs[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# -- checks on one rendering ---------------------------------------------------------------


def check_kubernetes_schemas(r: Rendered) -> None:
    problems = []
    for o in r.objects:
        kind = o.get("kind")
        if kind in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{kind}/{o['metadata']['name']}: {e.caught.message} at {'.'.join(map(str, e.caught.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{kind} ({o.get('apiVersion')}) has no Kubernetes {KUBE_VERSION} schema and no structural check here")
    unknown = {o.get("kind") for o in r.objects} - CRD_KINDS - {
        "StatefulSet", "Service", "ConfigMap", "Secret", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler",
    }
    expect(not unknown, f"unexpected kinds rendered: {sorted(unknown)}")
    expect(not problems, "; ".join(problems))


def check_security(r: Rendered) -> None:
    sts = r.one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    expect(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot must be true")
    expect(psc.get("runAsUser") == 10001, "pod securityContext.runAsUser must be 10001 (the image's user)")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile must be RuntimeDefault")
    sc = container(sts).get("securityContext", {})
    expect(sc.get("runAsNonRoot") is True, "container runAsNonRoot must be true")
    expect(sc.get("runAsUser") == 10001, "container runAsUser must be 10001")
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    expect(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "container seccompProfile must be RuntimeDefault")
    expect(pod.get("automountServiceAccountToken") is False, "the pod must not mount a service account token")
    for sa in r.all("ServiceAccount"):
        expect(sa.get("automountServiceAccountToken") is False, "the ServiceAccount must set automountServiceAccountToken: false")
    writable = {m["mountPath"] for m in container(sts).get("volumeMounts", []) if not m.get("readOnly")}
    expect({"/var/lib/spate", "/tmp"} <= writable, f"with a read-only root, /var/lib/spate and /tmp must be mounted writable (have {sorted(writable)})")


def check_shutdown(r: Rendered) -> None:
    sts = r.one("StatefulSet")
    drain_ms = int(r.values["config"]["dispatch"]["drainTimeoutMs"])
    grace = sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")
    expect(isinstance(grace, int), "terminationGracePeriodSeconds must be set")
    expect(grace * 1000 > drain_ms, f"terminationGracePeriodSeconds {grace} is not above the drain timeout {drain_ms} ms")
    expect(grace * 1000 >= drain_ms + 5000, f"terminationGracePeriodSeconds {grace} leaves under 5 s after the {drain_ms} ms drain")
    if r.values.get("terminationGracePeriodSeconds") is None:
        want = -(-drain_ms // 1000) + int(r.values["terminationGracePeriodMarginSeconds"])
        expect(grace == want, f"derived grace {grace}, expected ceil(drain) + margin = {want}")


def check_probes(r: Rendered) -> None:
    c = container(r.one("StatefulSet"))
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    expect(ports.get("http") == int(r.values["config"]["api"]["port"]), f"container port http must be config.api.port (have {ports})")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        p = c.get(probe)
        expect(p, f"{probe} missing")
        expect(p.get("httpGet", {}).get("path") == path, f"{probe} must GET {path} (has {p.get('httpGet')})")
        expect(p["httpGet"].get("port") in ("http", ports.get("http")), f"{probe} must use the API port")
    startup = c["startupProbe"]
    expect(startup["periodSeconds"] * startup["failureThreshold"] >= 60, "the startup probe must allow at least 60 s (plugins compile at start)")


def check_statefulset(r: Rendered) -> None:
    sts = r.one("StatefulSet")
    headless = [s for s in r.all("Service") if s["spec"].get("clusterIP") == "None"]
    expect(len(headless) == 1, "expected one headless Service (clusterIP: None)")
    expect(sts["spec"].get("serviceName") == headless[0]["metadata"]["name"], "StatefulSet serviceName must be the headless Service")
    sel = sts["spec"]["selector"]["matchLabels"]
    for svc in r.all("Service"):
        expect(svc["spec"]["selector"] == sel, f"Service {svc['metadata']['name']} must select the StatefulSet's pods")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    expect(all(labels.get(k) == v for k, v in sel.items()), "pod labels must match the selector")
    c = container(sts)
    expect(c.get("args") == ["up", "--config", "/etc/spate/spate.toml"], f"container args must run `up --config /etc/spate/spate.toml` (have {c.get('args')})")
    env = env_of(c)
    iid = env.get("SPATE_EVENTS__INSTANCE_ID", {})
    expect(iid.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
           "SPATE_EVENTS__INSTANCE_ID must come from the pod name (fieldRef metadata.name) for static membership")
    token = env.get("SPATE_API__TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    auth = r.values["auth"]
    want_secret = auth["existingSecret"] or f"{RELEASE}-token"
    expect(token.get("name") == want_secret and token.get("key") == auth["existingSecretKey"],
           f"SPATE_API__TOKEN must come from Secret {want_secret} key {auth['existingSecretKey']} (has {token})")
    secrets = {s["metadata"]["name"]: s for s in r.all("Secret")}
    if auth["existingSecret"]:
        expect(want_secret not in secrets, "with auth.existingSecret the chart must not create the token Secret")
    else:
        expect(want_secret in secrets and auth["existingSecretKey"] in secrets[want_secret].get("data", {}),
               f"the chart must create Secret {want_secret} with key {auth['existingSecretKey']}")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    expect(mounts.get("/etc/spate") == "config", "spate.toml must be mounted at /etc/spate")
    expect(mounts.get("/var/lib/spate") == "data", "the data volume must be mounted at /var/lib/spate")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
    if r.values["persistence"]["enabled"]:
        expect(claims == ["data"] and "data" not in volumes, "persistence.enabled must give a volumeClaimTemplate `data` and no data volume")
        req = sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        expect(req == r.values["persistence"]["size"], f"PVC size {req} != persistence.size")
    else:
        expect(not claims and "emptyDir" in volumes.get("data", {}), "persistence off must give an emptyDir data volume")
    cfg = volumes.get("config", {})
    store = "secret" if r.values["config"]["storeInSecret"] else "configMap"
    expect(store in cfg, f"the config volume must come from a {store}")
    annotations = sts["spec"]["template"]["metadata"].get("annotations", {})
    expect(re.fullmatch(r"[0-9a-f]{64}", annotations.get("checksum/config", "")), "pods must carry checksum/config to roll on config changes")
    pdb = r.one("PodDisruptionBudget")
    expect(pdb["spec"].get("maxUnavailable") == 1, "the PodDisruptionBudget must allow maxUnavailable 1")
    expect(pdb["spec"]["selector"]["matchLabels"] == sel, "the PodDisruptionBudget must select the pods")
    api = [s for s in r.all("Service") if s["spec"].get("clusterIP") != "None"]
    expect(len(api) == 1, "expected one API Service")
    port = api[0]["spec"]["ports"][0]
    expect(port["port"] == 8780 and port["targetPort"] == "http", f"the API Service must expose 8780 -> http (has {port})")
    res = c.get("resources", {})
    expect(res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), "memory requests and limits must be set")


def rendered_config(r: Rendered) -> tuple[str, dict[str, Any]]:
    for o in r.all("ConfigMap") + r.all("Secret"):
        data = o.get("data") or o.get("stringData") or {}
        if "spate.toml" in data:
            text = data["spate.toml"]
            return text, tomllib.loads(text)
    raise CheckFailed("no ConfigMap or Secret with spate.toml rendered")


def check_runtime_config(r: Rendered, schema: ConfigSchema, label: str) -> None:
    text, doc = rendered_config(r)
    problems = schema.check(doc, f"rendered spate.toml ({label})")
    expect(not problems, "; ".join(problems))
    v = r.values["config"]
    expect(doc["data-dir"] == "/var/lib/spate", "data-dir must be /var/lib/spate (the mounted volume)")
    expect(doc["api"]["listen"] == f"0.0.0.0:{int(v['api']['port'])}", "api.listen must be 0.0.0.0:<config.api.port>")
    expect(doc["events"]["type"] == "kafka" and doc["events"]["group"] == v["events"]["group"], "events must be kafka with the configured group")
    expect("instance-id" not in doc["events"], "events.instance-id comes from the pod name (env), not the shared file")
    expect(doc["registry"] == {"type": "shared", "control-topic": v["registry"]["controlTopic"]}, "registry must be shared on the control topic")
    expect(doc["dispatch"]["drain-timeout-ms"] == int(v["dispatch"]["drainTimeoutMs"]), "dispatch.drain-timeout-ms must be config.dispatch.drainTimeoutMs")
    for k, val in doc["events"].get("librdkafka", {}).items():
        expect(isinstance(val, str), f"events.librdkafka.{k} must render as a string (librdkafka takes strings), got {val!r}")
        expect("e+" not in val, f"events.librdkafka.{k} rendered as a float: {val}")
    for m in re.finditer(r"=\s*([0-9.]+e\+[0-9]+)", text):
        raise CheckFailed(f"a number rendered in exponent form: {m.group(0)}")
    c = container(r.one("StatefulSet"))
    for e in c.get("env", []):
        if e["name"].startswith("SPATE_"):
            expect(schema.env_path_ok(e["name"]), f"env {e['name']} names no configuration key")


def check_autoscaling(r: Rendered, expected_mode: str) -> None:
    a = r.values["autoscaling"]
    sts = r.one("StatefulSet")
    scaled = r.all("ScaledObject")
    hpas = r.all("HorizontalPodAutoscaler")
    mode = "keda" if scaled else "hpa" if hpas else "none"
    expect(mode == expected_mode, f"autoscaling rendered {mode}, expected {expected_mode}")
    expect(len(scaled) + len(hpas) <= 1, "at most one of ScaledObject and HorizontalPodAutoscaler")
    if mode == "none":
        expect(sts["spec"].get("replicas") == int(r.values["replicaCount"]), "without autoscaling the StatefulSet sets replicas")
        expect(sts["spec"]["replicas"] <= int(a["partitions"]), "replicas must not exceed the partitions")
        return
    expect("replicas" not in sts["spec"], "with an autoscaler the StatefulSet must leave replicas to it")
    partitions = int(a["partitions"])
    window = int(a["scaleDown"]["stabilizationWindowSeconds"])
    if mode == "hpa":
        h = hpas[0]["spec"]
        expect(h["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]}, "the HPA must target the StatefulSet")
        expect(h["minReplicas"] == int(a["minReplicaCount"]) and h["maxReplicas"] == int(a["maxReplicaCount"]), "HPA bounds must be the autoscaling bounds")
        expect(h["maxReplicas"] <= partitions, "HPA maxReplicas must not exceed the partitions")
        expect(h.get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds") == window, "HPA scale-down stabilisation missing")
        metrics = h.get("metrics", [])
        expect(metrics and metrics[0]["resource"]["name"] == "cpu", "the HPA fallback scales on CPU")
        return
    s = scaled[0]
    expect(s.get("apiVersion") == "keda.sh/v1alpha1", "ScaledObject apiVersion must be keda.sh/v1alpha1")
    spec = s.get("spec", {})
    expect(spec.get("scaleTargetRef") == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]},
           f"the ScaledObject must target the StatefulSet (has {spec.get('scaleTargetRef')})")
    lo, hi = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
    expect(isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi, f"bad replica bounds {lo}..{hi}")
    expect(hi <= partitions, f"maxReplicaCount {hi} exceeds the {partitions} partitions")
    expect(isinstance(spec.get("pollingInterval"), int) and isinstance(spec.get("cooldownPeriod"), int), "pollingInterval and cooldownPeriod must be integers")
    got = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds")
    expect(got == window, f"advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilizationWindowSeconds must be {window} (has {got})")
    # The HPA behavior KEDA passes on must itself be a valid autoscaling/v2 behavior.
    probe = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "probe"},
        "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": hi,
                 "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]},
    }
    kubernetes_validate.validate(probe, KUBE_VERSION, strict=True)
    triggers = spec.get("triggers", [])
    want = [(t["plugin"], t["topic"]) for t in a["triggers"]]
    expect(len(triggers) == len(want), f"one trigger per autoscaling.triggers entry ({len(want)}), got {len(triggers)}")
    group = r.values["config"]["events"]["group"]
    required = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold", "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers"}
    for t, (plugin, topic) in zip(triggers, want):
        expect(t.get("type") == "kafka", "triggers must be of type kafka")
        md = t.get("metadata", {})
        expect(required <= set(md), f"kafka trigger metadata lacks {sorted(required - set(md))}")
        expect(all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata values must all be strings")
        expect(md["consumerGroup"] == f"{group}.{plugin}", f"consumerGroup must be {group}.{plugin} (has {md['consumerGroup']})")
        expect(md["topic"] == topic, f"trigger topic must be {topic}")
        expect(md["lagThreshold"].isdigit() and int(md["lagThreshold"]) > 0, "lagThreshold must be a positive integer")
        expect(md["activationLagThreshold"].isdigit(), "activationLagThreshold must be an integer")
        expect(md["offsetResetPolicy"] in ("earliest", "latest"), "offsetResetPolicy must be earliest or latest")
        expect(md["allowIdleConsumers"] == "false", "allowIdleConsumers must be false (replicas capped by partitions)")
        expect(md["bootstrapServers"], "bootstrapServers must be set")
        if "authenticationRef" in t:
            expect(isinstance(t["authenticationRef"].get("name"), str), "authenticationRef needs a name")


def check_monitoring(r: Rendered, rules_doc: dict[str, Any]) -> None:
    sms = r.all("ServiceMonitor")
    prs = r.all("PrometheusRule")
    expect(bool(sms) == bool(r.values["serviceMonitor"]["enabled"]), "ServiceMonitor rendered iff serviceMonitor.enabled")
    expect(bool(prs) == bool(r.values["prometheusRule"]["enabled"]), "PrometheusRule rendered iff prometheusRule.enabled")
    for sm in sms:
        expect(sm.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion must be monitoring.coreos.com/v1")
        spec = sm["spec"]
        sel = spec["selector"]["matchLabels"]
        matched = [s for s in r.all("Service") if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        expect(len(matched) == 1, f"the ServiceMonitor must select exactly one Service, selects {len(matched)}")
        svc = matched[0]
        job = svc["metadata"]["labels"].get(spec.get("jobLabel", ""))
        expect(job == "spate", f"the scrape job must be named spate (the rules' up{{job=\"spate\"}}); jobLabel gives {job!r}")
        ports = {p["name"] for p in svc["spec"]["ports"]}
        for ep in spec.get("endpoints", []):
            expect(ep.get("port") in ports and ep.get("path") == "/metrics", f"endpoint must scrape /metrics on a Service port: {ep}")
        expect(spec.get("endpoints"), "ServiceMonitor needs endpoints")
        for k, v in r.values["serviceMonitor"]["labels"].items():
            expect(sm["metadata"]["labels"].get(k) == v, f"ServiceMonitor must carry label {k}={v}")
    for pr in prs:
        expect(pr.get("apiVersion") == "monitoring.coreos.com/v1", "PrometheusRule apiVersion must be monitoring.coreos.com/v1")
        expect(pr["spec"] == rules_doc, "the PrometheusRule's spec must be deploy/prometheus/rules.yaml verbatim")
        for k, v in r.values["prometheusRule"]["labels"].items():
            expect(pr["metadata"]["labels"].get(k) == v, f"PrometheusRule must carry label {k}={v}")


def check_notes(r: Rendered) -> None:
    expect("kubectl" in r.notes and "SPATE_API_TOKEN" in r.notes, "NOTES.txt must say how to reach the API with the token")


# ------------------------------------------------------------------------------------------
# The checks


def value_sets() -> dict[str, dict[str, Any]]:
    sets = {}
    for path in sorted(CI_VALUES.glob("*.yaml")):
        sets[path.stem] = yaml.safe_load(path.read_text()) or {}
    expect(
        {"defaults", "keda", "hpa", "pvc", "existing-secret"} <= set(sets),
        f"deploy/helm/ci-values must hold defaults, keda, hpa, pvc and existing-secret (has {sorted(sets)})",
    )
    return sets


EXPECTED_MODE = {"defaults": "hpa", "keda": "keda", "hpa": "hpa", "pvc": "hpa", "existing-secret": "none"}

# Values that must make rendering fail, with a phrase the failure message must contain.
MUST_FAIL: list[tuple[str, dict[str, Any], str]] = [
    ("KEDA maxReplicaCount above the partitions",
     {"autoscaling": {"keda": {"enabled": True}, "triggers": [{"plugin": "order-totals", "topic": "orders"}],
                      "partitions": 12, "maxReplicaCount": 13}}, "maxReplicaCount"),
    ("HPA maxReplicaCount above the partitions",
     {"autoscaling": {"keda": {"enabled": False}, "partitions": 4, "maxReplicaCount": 5}}, "maxReplicaCount"),
    ("fixed replicaCount above the partitions",
     {"autoscaling": {"enabled": False, "partitions": 3}, "replicaCount": 4}, "replicaCount"),
    ("grace equal to the drain timeout",
     {"terminationGracePeriodSeconds": 30, "config": {"dispatch": {"drainTimeoutMs": 30000}}}, "terminationGracePeriodSeconds"),
    ("grace below the drain timeout",
     {"terminationGracePeriodSeconds": 20, "config": {"dispatch": {"drainTimeoutMs": 30000}}}, "terminationGracePeriodSeconds"),
    ("grace without 5 s after the drain",
     {"terminationGracePeriodSeconds": 34, "config": {"dispatch": {"drainTimeoutMs": 30000}}}, "terminationGracePeriodSeconds"),
    ("derived grace with a zero margin",
     {"terminationGracePeriodMarginSeconds": 0}, "terminationGracePeriodSeconds"),
    ("KEDA on without triggers", {"autoscaling": {"keda": {"enabled": True}, "triggers": []}}, "triggers"),
    ("trigger without a topic",
     {"autoscaling": {"keda": {"enabled": True}, "triggers": [{"plugin": "order-totals"}]}}, "topic"),
    ("unknown KEDA mode", {"autoscaling": {"keda": {"enabled": "sometimes"}}}, "true, false or auto"),
    ("minReplicaCount 0", {"autoscaling": {"minReplicaCount": 0}}, "minReplicaCount"),
    ("HPA without a CPU request", {"autoscaling": {"keda": {"enabled": False}}, "resources": {"requests": {"cpu": None}}}, "resources.requests.cpu"),
    ("a token shorter than 8 characters", {"auth": {"token": "short"}}, "8 characters"),
    ("both a token and an existing Secret", {"auth": {"token": "long-enough-token", "existingSecret": "x"}}, "existingSecret"),
]

# Values right at a bound that must render.
MUST_RENDER: list[tuple[str, dict[str, Any]]] = [
    ("grace exactly drain + 5 s", {"terminationGracePeriodSeconds": 35, "config": {"dispatch": {"drainTimeoutMs": 30000}}}),
    ("maxReplicaCount equal to the partitions",
     {"autoscaling": {"keda": {"enabled": True}, "triggers": [{"plugin": "order-totals", "topic": "orders"}], "partitions": 6, "maxReplicaCount": 6}}),
    ("a sub-second drain rounds up", {"config": {"dispatch": {"drainTimeoutMs": 1500}}}),
    ("a given token", {"auth": {"token": "a-token-of-some-length"}}),
]


def chart_checks(schema: ConfigSchema, rules_doc: dict[str, Any] | None) -> None:
    chart = R.run("helm: chart loads", lambda: helm_python.Chart.load(CHART))
    if chart is None:
        return

    def chart_yaml() -> None:
        meta = chart.metadata
        expect(meta.get("apiVersion") == "v2", "Chart.yaml apiVersion must be v2")
        expect(meta.get("appVersion"), "Chart.yaml needs appVersion (the default image tag)")
        names = {t["name"] for t in chart.templates}
        for t in ("templates/_helpers.tpl", "templates/NOTES.txt"):
            expect(t in names, f"chart lacks {t}")

    R.run("helm: Chart.yaml, _helpers.tpl, NOTES.txt", chart_yaml)

    sets = R.run("helm: ci value sets present", value_sets) or {}
    for label, values in sets.items():

        def lint(values: dict[str, Any] = values) -> None:
            report = helm_python.lint(str(CHART), copy.deepcopy(values), strict=True, kube_version=f"v{KUBE_VERSION}")
            bad = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
            bad += list(report.get("errors") or [])
            expect(not bad, "; ".join(bad))

        R.run(f"helm lint [{label}]", lint)
        r = R.run(f"helm render [{label}]", lambda values=values: render(chart, values))
        if r is None:
            continue
        R.run(f"kubernetes {KUBE_VERSION} schemas [{label}]", lambda r=r: check_kubernetes_schemas(r))
        R.run(f"security context hardened [{label}]", lambda r=r: check_security(r))
        R.run(f"grace above drain timeout [{label}]", lambda r=r: check_shutdown(r))
        R.run(f"probes /readyz /livez [{label}]", lambda r=r: check_probes(r))
        R.run(f"statefulset, services, token, volumes, PDB [{label}]", lambda r=r: check_statefulset(r))
        R.run(f"spate.toml accepted by the runtime [{label}]", lambda r=r, label=label: check_runtime_config(r, schema, label))
        R.run(f"autoscaling {EXPECTED_MODE.get(label, '?')} [{label}]",
              lambda r=r, label=label: check_autoscaling(r, EXPECTED_MODE.get(label, "?")))
        if rules_doc is not None:
            R.run(f"monitoring objects [{label}]", lambda r=r: check_monitoring(r, rules_doc))
        R.run(f"NOTES.txt [{label}]", lambda r=r: check_notes(r))

    for label, values, phrase in MUST_FAIL:

        def must_fail(values: dict[str, Any] = values, phrase: str = phrase) -> None:
            try:
                chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
            except helm_python.HelmRenderError as e:
                expect(phrase in str(e), f"failed, but the message does not mention {phrase!r}: {e}")
                return
            raise CheckFailed("rendered, but must fail")

        R.run(f"refuses: {label}", must_fail)

    for label, values in MUST_RENDER:

        def must_render(values: dict[str, Any] = values) -> None:
            r = render(chart, values)
            check_shutdown(r)
            mode = "keda" if r.all("ScaledObject") else "hpa" if r.all("HorizontalPodAutoscaler") else "none"
            check_autoscaling(r, mode)

        R.run(f"accepts: {label}", must_render)


def rules_checks(series: set[str]) -> dict[str, Any] | None:
    def link() -> None:
        expect(RULES_LINK.exists(), f"{RULES_LINK.relative_to(ROOT)} missing")
        expect(RULES_LINK.resolve() == RULES_IN_CHART.resolve(),
               f"{RULES_LINK.relative_to(ROOT)} must be the chart's files/prometheus-rules.yaml (one source of rule text)")

    R.run("prometheus: rules.yaml is the chart's rule file", link)
    doc = R.run("prometheus: rules parse as YAML", lambda: yaml.safe_load(RULES_IN_CHART.read_text()))
    if not isinstance(doc, dict):
        return None

    def structure() -> None:
        expect(set(doc) == {"groups"} and doc["groups"], "a rule file is {groups: [...]}")
        seen = set()
        for g in doc["groups"]:
            expect(g.get("name") and g["name"] not in seen, f"group names must be unique and set: {g.get('name')}")
            seen.add(g["name"])
            for rule in g.get("rules", []):
                expect(("record" in rule) != ("alert" in rule), f"a rule is a record or an alert: {rule}")
                expect(isinstance(rule.get("expr"), str), f"rule {rule.get('record') or rule.get('alert')} needs an expr")
                if "alert" in rule:
                    expect(rule.get("labels", {}).get("severity") in ("warning", "critical"), f"alert {rule['alert']} needs severity warning|critical")
                    expect({"summary", "description"} <= set(rule.get("annotations", {})), f"alert {rule['alert']} needs summary and description")
                    expect(re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"alert {rule['alert']} needs a `for` duration")

    R.run("prometheus: rule structure", structure)

    def metrics() -> None:
        records = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
        problems = []
        for g in doc["groups"]:
            for rule in g["rules"]:
                name = rule.get("record") or rule.get("alert")
                try:
                    names = promql_names(rule["expr"])
                except ValueError as e:
                    problems.append(f"{name}: PromQL does not parse: {e}")
                    continue
                for n in names:
                    if n in series or n in records or n == "up":
                        continue
                    problems.append(f"{name}: metric {n} is not recorded by the runtime (runtime/*/src) nor a recording rule here")
        expect(not problems, "; ".join(problems))

    R.run("prometheus: every expr parses and names runtime metrics", metrics)

    def coverage() -> None:
        records = {r["record"]: promql_names(r["expr"]) for g in doc["groups"] for r in g["rules"] if "record" in r}

        def base(names: list[str]) -> set[str]:
            out: set[str] = set()
            for n in names:
                out |= base(records[n]) if n in records else {n}
            return out

        alerts = {r["alert"]: base(promql_names(r["expr"])) for g in doc["groups"] for r in g["rules"] if "alert" in r}
        needs = {
            "consumer lag": {"spate_consumer_lag"},
            "dead-letter rate": {"spate_dead_letters_total"},
            "trap rate relative to events": {"spate_traps_total", "spate_events_total"},
            "runtime down": {"up"},
            "cache degraded": {"spate_cache_degraded"},
        }
        missing = [what for what, ms in needs.items() if not any(ms <= used for used in alerts.values())]
        expect(not missing, f"no alert covers: {', '.join(missing)}")
        lag_rules = [r for g in doc["groups"] for r in g["rules"] if "alert" in r and "spate_consumer_lag" in alerts[r["alert"]]]
        growing = [r for r in lag_rules if re.search(r"\b(deriv|delta|increase)\(", r["expr"])]
        expect(len(lag_rules) >= 2 and growing, "consumer lag needs a `high` and a `growing` (deriv/delta) alert")

    R.run("prometheus: alerts cover lag, dead letters, traps, down, cache", coverage)
    return doc


def dashboard_checks(series: set[str]) -> None:
    dash = R.run("grafana: dashboard is JSON", lambda: json.loads(DASHBOARD.read_text()))
    if not isinstance(dash, dict):
        return

    def structure() -> None:
        expect(dash.get("title") and dash.get("uid"), "the dashboard needs a title and uid")
        ids = [p["id"] for p in dash["panels"]]
        expect(len(ids) == len(set(ids)), "panel ids must be unique")
        for p in dash["panels"]:
            expect({"x", "y", "w", "h"} <= set(p.get("gridPos", {})), f"panel {p.get('title')} needs a gridPos")
            if p["type"] != "row":
                expect(p.get("targets"), f"panel {p.get('title')} has no queries")
        names = {v["name"] for v in dash.get("templating", {}).get("list", [])}
        expect("datasource" in names, "the dashboard needs a datasource variable")

    R.run("grafana: dashboard structure", structure)

    def queries() -> None:
        used: set[str] = set()
        problems = []
        exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
        for v in dash.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else None
            if q:
                m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
                exprs.append((f"variable {v['name']}", m.group(1) if m else q))
        for title, expr in exprs:
            try:
                names = promql_names(grafana_to_promql(expr))
            except ValueError as e:
                problems.append(f"{title}: PromQL does not parse: {e}")
                continue
            for n in names:
                used.add(n)
                if n not in series and n != "up":
                    problems.append(f"{title}: metric {n} is not recorded by the runtime")
        expect(not problems, "; ".join(problems))
        needed = {
            "spate_events_total", "spate_handler_duration_seconds_bucket", "spate_consumer_lag", "spate_dead_letters_total",
            "spate_traps_total", "spate_cache_degraded", "spate_retries_total", "spate_infrastructure_errors_total",
        }
        expect(needed <= used, f"the dashboard lacks panels on {sorted(needed - used)}")
        text = json.dumps(dash)
        expect("histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text, "handler duration p50 and p99 panels needed")
        expect("sum by (outcome)" in text, "an events/s by outcome panel is needed")

    R.run("grafana: queries parse and name runtime metrics", queries)


def compose_checks(schema: ConfigSchema) -> None:
    def load(name: str) -> dict[str, Any]:
        return yaml.safe_load((COMPOSE_DIR / name).read_text())

    def backends() -> None:
        base = load("compose.yaml")
        expect({"scylla", "redis"} <= set(base["services"]), "compose.yaml must start scylla and redis")
        for name, svc in base["services"].items():
            expect("healthcheck" in svc, f"{name} needs a healthcheck")

    R.run("compose: compose.yaml (ScyllaDB + Redis)", backends)

    def cluster() -> None:
        doc = load("cluster.yaml")
        services: dict[str, Any] = {}
        for inc in doc.get("include", []):
            path = inc if isinstance(inc, str) else (inc["path"] if isinstance(inc["path"], str) else inc["path"][0])
            expect((COMPOSE_DIR / path).exists(), f"included {path} missing")
            services.update(load(path)["services"])
        services.update(doc["services"])
        for name in ("kafka", "kafka-init", "scylla", "redis", "spate-1", "spate-2"):
            expect(name in services, f"cluster.yaml lacks service {name}")
        kafka = services["kafka"]
        expect(kafka["image"] == "apache/kafka:4.1.1", "kafka must be apache/kafka:4.1.1")
        env = kafka.get("environment", {})
        expect("controller" in str(env.get("KAFKA_PROCESS_ROLES", "")) and "broker" in str(env.get("KAFKA_PROCESS_ROLES", "")),
               "kafka must run KRaft combined broker,controller")
        expect(env.get("KAFKA_CONTROLLER_QUORUM_VOTERS"), "KRaft needs controller quorum voters")
        cid = str(env.get("CLUSTER_ID", ""))
        expect(re.fullmatch(r"[A-Za-z0-9_-]{22}", cid) and len(base64.urlsafe_b64decode(cid + "==")) == 16,
               f"CLUSTER_ID must be a base64url UUID (22 characters), not {cid!r}")
        init = services["kafka-init"]
        script = " ".join(init.get("command", [])) if isinstance(init.get("command"), list) else str(init.get("command"))
        for topic in ("orders", "workflows", "order-totals.dlq", "customer-totals", "spate.registry"):
            expect(re.search(rf"(^|[\s\"']){re.escape(topic)}([\s\"']|$)", script), f"kafka-init must create topic {topic}")
        expect(re.search(r"spate\.registry[^\n]*cleanup\.policy=compact", script), "spate.registry must be created with cleanup.policy=compact")
        expect("--if-not-exists" in script, "topic creation must be idempotent (--if-not-exists)")
        expect("$$" in script or "$" not in script, "shell variables in a compose command must be written $$ (compose interpolates $)")
        ids, ports, tokens = set(), set(), set()
        for name in ("spate-1", "spate-2"):
            s = services[name]
            build = s.get("build", {})
            expect(build.get("dockerfile") == "deploy/Dockerfile" and (COMPOSE_DIR / build.get("context", "")).resolve() == ROOT,
                   f"{name} must build deploy/Dockerfile from the repository root")
            e = s.get("environment", {})
            ids.add(e.get("SPATE_EVENTS__INSTANCE_ID"))
            tokens.add(e.get("SPATE_API__TOKEN"))
            for var in e:
                if var.startswith("SPATE_"):
                    expect(schema.env_path_ok(var), f"{name}: env {var} names no configuration key")
            for p in s.get("ports", []):
                ports.add(str(p).split(":")[-2])
            expect("healthcheck" in s, f"{name} needs a healthcheck")
            deps = s.get("depends_on", {})
            expect(deps.get("kafka-init", {}).get("condition") == "service_completed_successfully", f"{name} must wait for the topics")
            for dep in ("scylla", "redis"):
                expect(deps.get(dep, {}).get("condition") == "service_healthy", f"{name} must wait for {dep} to be healthy")
            mounts = [v for v in s.get("volumes", []) if str(v).endswith(":/etc/spate/spate.toml:ro")]
            expect(mounts, f"{name} must mount its spate.toml read-only at /etc/spate/spate.toml")
            cfg = COMPOSE_DIR / str(mounts[0]).split(":")[0]
            expect(cfg.exists(), f"{cfg} missing")
            doc_cfg = tomllib.loads(cfg.read_text())
            drain = doc_cfg.get("dispatch", {}).get("drain-timeout-ms", 10000)
            grace = str(s.get("stop_grace_period", "10s"))
            expect(grace.endswith("s") and int(grace[:-1]) * 1000 >= drain + 5000, f"{name}: stop_grace_period {grace} must exceed the drain timeout + 5 s")
        expect(len(ids) == 2 and None not in ids, "the replicas need distinct SPATE_EVENTS__INSTANCE_ID")
        expect(ports == {"8781", "8782"}, f"the replicas must publish 8781 and 8782 (have {sorted(ports)})")
        expect(len(tokens) == 1 and None not in tokens, "the replicas must share one API token")
        for name, s in services.items():
            for dep, cond in (s.get("depends_on") or {}).items():
                expect(dep in services, f"{name} depends on unknown service {dep}")
                if cond.get("condition") == "service_healthy":
                    expect("healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
                if cond.get("condition") == "service_completed_successfully":
                    expect(services[dep].get("restart", "no") == "no", f"{dep} is a one-shot and must not restart")

    R.run("compose: cluster.yaml (Kafka, topics, two replicas)", cluster)

    for path in (COMPOSE_DIR / "spate-cluster.toml", COMPOSE_DIR / "spate-kafka.toml", DEPLOY / "image" / "spate.toml"):
        def config_file(path: Path = path) -> None:
            doc = tomllib.loads(path.read_text())
            problems = schema.check(doc, str(path.relative_to(ROOT)))
            expect(not problems, "; ".join(problems))

        R.run(f"config: {path.relative_to(ROOT)} accepted by the runtime", config_file)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics, enough for our patterns: last match wins."""
    excluded = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not neg
    return excluded


def docker_checks() -> None:
    def dockerfile() -> None:
        text = (DEPLOY / "Dockerfile").read_text()
        channel = re.search(r'channel\s*=\s*"([^"]+)"', (ROOT / "rust-toolchain.toml").read_text()).group(1)
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
        expect(len(froms) == 2, f"expected a builder and a runtime stage, found {froms}")
        builder, runtime = froms
        expect(builder[0] == "rust:1.95-bookworm" and channel.startswith("1.95"), f"builder must be rust:1.95-bookworm (toolchain {channel})")
        expect(runtime[0] == "debian:bookworm-slim", "runtime must be debian:bookworm-slim")
        expect("cargo build --release --locked -p spate --bin spate" in text, "the builder must build only the spate binary, --locked")
        for target in ("/usr/local/cargo/registry", "/src/target"):
            expect(re.search(rf"--mount=type=cache,[^\s]*target={re.escape(target)}", text), f"a BuildKit cache mount for {target} is needed")
        expect("wasm32-wasip2" in text, "the pinned toolchain's wasm32-wasip2 target must be installed")
        expect(re.search(r"^USER\s+10001(:10001)?\s*$", text, re.M), "the runtime must run as uid 10001")
        expect(re.search(r"--uid 10001", text) and re.search(r"--gid 10001", text), "user and group 10001 must be created")
        expect(re.search(r"install -d -o 10001 -g 10001 [^\n]*/var/lib/spate", text), "/var/lib/spate must be owned by 10001")
        expect('ENTRYPOINT ["spate"]' in text, 'ENTRYPOINT ["spate"] needed')
        expect('CMD ["up", "--config", "/etc/spate/spate.toml"]' in text, "CMD must run up with /etc/spate/spate.toml")
        expect(re.search(r"^EXPOSE\s+8780\s*$", text, re.M), "EXPOSE 8780 needed")
        for flags, src in re.findall(r"^COPY\s+((?:--\S+\s+)*)(\S+)\s+\S+\s*$", text, re.M):
            if src != "." and "--from=" not in flags:
                expect((ROOT / src).exists(), f"COPY source {src} missing")

    R.run("docker: Dockerfile", dockerfile)

    def dockerignore() -> None:
        patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
        for needed in ("Cargo.toml", "Cargo.lock", "rust-toolchain.toml", "wit/spate.wit", "runtime/server/src/main.rs",
                       "runtime/engine/src/lib.rs", "sdk/python/build.py", "sdk/js/template/handler.js", "sdk/rust/template/src/lib.rs",
                       "tests/Cargo.toml", "plugins/order-totals/spate.toml", "deploy/image/spate.toml"):
            expect((ROOT / needed).exists(), f"{needed} missing from the repository")
            expect(not dockerignore_excludes(patterns, needed), f".dockerignore excludes {needed}, which the build needs")
        for junk in ("target/release/spate", ".git/HEAD", "deploy/helm/spate/Chart.yaml"):
            expect(dockerignore_excludes(patterns, junk), f".dockerignore should exclude {junk}")
        # Every include_str!/bindgen path of the spate crates must be in the context.
        for rs in (ROOT / "runtime").glob("*/src/**/*.rs"):
            for rel in re.findall(r'include_str!\("([^"]+)"\)', rs.read_text()):
                target = os.path.normpath(rs.parent / rel)
                expect(not dockerignore_excludes(patterns, os.path.relpath(target, ROOT)), f".dockerignore excludes {rel} (included by {rs.relative_to(ROOT)})")

    R.run("docker: .dockerignore keeps the sources, drops the rest", dockerignore)


def main() -> int:
    os.chdir(ROOT)
    names, histograms = runtime_metrics()
    series = exposed_series(names, histograms)

    def metrics_found() -> None:
        expect({"spate_events_total", "spate_consumer_lag", "spate_handler_duration_seconds"} <= names,
               f"expected the runtime's metrics in runtime/*/src, found {sorted(names)}")
        expect("spate_handler_duration_seconds" in histograms, "spate_handler_duration_seconds must be a histogram")

    R.run(f"runtime: {len(names)} metric names from runtime/*/src", metrics_found)
    schema = R.run("runtime: configuration types from config.rs and the backends' crates",
                   lambda: ConfigSchema("\f".join(p.read_text() for p in CONFIG_SOURCES)))
    if schema is not None:
        R.run("runtime: config.rs has the sections deploy/ renders",
              lambda: expect({"Config", "ApiConfig", "DispatchConfig", "SandboxSettings", "ReadThroughConfig", "KafkaOptions", "CqlOptions", "RedisOptions", "LogSettings", "RetentionSettings"} <= set(schema.structs)
                             and {"cql"} <= set(schema.enums.get("StateConfig", {})) and {"redis"} <= set(schema.enums.get("CacheConfig", {})),
                             f"parsed structs {sorted(schema.structs)}, enums {sorted(schema.enums)}"))
    def probe_routes() -> None:
        # The chart's probes must hit routes the runtime serves. A path the runtime does not
        # serve yet is reported as a note (the route lands with the same issue), not a failure.
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        api = (ROOT / "runtime" / "server" / "src" / "api" / "mod.rs").read_text()
        routes = set(re.findall(r'\.route\(\s*"([^"]+)"', api))
        expect("/readyz" in routes, "runtime/server/src/api/mod.rs serves no /readyz")
        for probe, spec in values["probes"].items():
            if spec["path"] not in routes:
                R.note(f"the chart's {probe} probe GETs {spec['path']}, which runtime/server/src/api/mod.rs does not route yet "
                       f"(it routes {', '.join(sorted(r for r in routes if not r.startswith('/v1')))}): pods fail that probe until it does")

    R.run("runtime: probe paths vs the API's routes", probe_routes)
    rules_doc = rules_checks(series)
    dashboard_checks(series)
    docker_checks()
    if schema is not None:
        compose_checks(schema)
        chart_checks(schema, rules_doc)
    for n in R.notes:
        print(f"note: {n}")
    failed = len(R.failed)
    print(f"deploy: {R.passed} passed, {failed} failed")
    if failed:
        print("\nvalidate-deploy FAILED:", file=sys.stderr)
        for name, msg in R.failed:
            print(f"  - {name}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
