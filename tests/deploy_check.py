"""Checks the rendered Kubernetes manifests against issue 18's lists.

Run by tests/it/deploy.rs with the venv's Python (PyYAML comes with
kubernetes-validate):  deploy_check.py SPLIT.yaml APPLIANCE.yaml MONITORING.yaml RULES.yml
Prints every failure and exits 1 if there is one.
"""
import sys

import yaml

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def check_pod(name, spec):
    """What every pod has: ConfigMap config, Secrets 0400, probes, resources, securityContext."""
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    check(any("configMap" in v for v in vols.values()), f"{name}: no ConfigMap volume")
    secrets = [v["secret"] for v in vols.values() if "secret" in v]
    check(any(s["secretName"] == "casd-database" for s in secrets), f"{name}: no database password Secret")
    for s in secrets:
        check(s.get("defaultMode") == 0o400, f"{name}: Secret {s['secretName']} not mode 0400")
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{name}: pod not runAsNonRoot")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: pod seccomp not RuntimeDefault")
    for c in spec["containers"]:
        csc = c.get("securityContext", {})
        check(csc.get("runAsNonRoot") is True, f"{name}: container not runAsNonRoot")
        check(csc.get("readOnlyRootFilesystem") is True, f"{name}: root filesystem writable")
        check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities not all dropped")
        check(csc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp not RuntimeDefault")
        check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{name}: readiness not /readyz")
        check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{name}: liveness not /healthz")
        res = c.get("resources", {})
        for k in ("requests", "limits"):
            check({"cpu", "memory"} <= set(res.get(k, {})), f"{name}: no {k} for cpu and memory")
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        check(set(vols) <= mounts, f"{name}: volumes not mounted: {set(vols) - mounts}")
    return {s["secretName"] for s in secrets}


def pod_labels(d):
    return d["spec"]["template"]["metadata"]["labels"]


def check_split(docs):
    deps = by_kind(docs, "Deployment")
    roles = {pod_labels(d).get("app.kubernetes.io/component"): d for d in deps.values()}
    check(set(roles) == {"sms", "emmg", "encryptor", "cycler", "scheduler"}, f"split roles: {sorted(roles)}")
    if failures:
        return
    secrets = {r: check_pod(f"split/{r}", d["spec"]["template"]["spec"]) for r, d in roles.items()}
    for r, d in roles.items():
        check(d["spec"]["template"]["spec"]["containers"][0]["args"] == ["run", "--roles", r], f"{r}: args")
    check("casd-root-key" in secrets["encryptor"], "encryptor: no root key Secret")
    check("casd-token-signing-key" in secrets["sms"], "sms: no token signing key Secret")
    check("casd-peer-emmg" in secrets["emmg"], "emmg: no peer client secret")
    check("casd-peer-scheduler" in secrets["scheduler"], "scheduler: no peer client secret")
    check(all("casd-root-key" not in s for r, s in secrets.items() if r != "encryptor"), "root key outside the encryptor")
    check(roles["sms"]["spec"]["replicas"] >= 2, "sms: fewer than 2 replicas")
    check(roles["emmg"]["spec"]["replicas"] == 2, "emmg: not 2 replicas")
    check(roles["encryptor"]["spec"]["replicas"] == 2, "encryptor: not 2 replicas")
    check(roles["scheduler"]["spec"]["replicas"] == 1, "scheduler: not 1 replica")
    check(roles["cycler"]["spec"]["template"]["spec"].get("hostNetwork") is True, "cycler: not hostNetwork")
    services = by_kind(docs, "Service")
    sms_sel = services["casd-sms"]["spec"]["selector"]
    check(services["casd-sms"]["spec"]["type"] == "LoadBalancer", "casd-sms: not a LoadBalancer")
    check(all(pod_labels(roles["sms"]).get(k) == v for k, v in sms_sel.items()), "casd-sms does not select sms pods")
    enc = services["casd-encryptor"]["spec"]
    check(enc.get("type", "ClusterIP") == "ClusterIP", "casd-encryptor: not internal")
    check(all(pod_labels(roles["encryptor"]).get(k) == v for k, v in enc["selector"].items()), "casd-encryptor selector")
    pdb = by_kind(docs, "PodDisruptionBudget")["casd-sms"]["spec"]
    check(pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "sms", "PDB does not select sms")
    np = by_kind(docs, "NetworkPolicy")["casd-encryptor"]["spec"]
    check(np["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "encryptor", "NetworkPolicy target")
    api_rule = [r for r in np["ingress"] if any(p["port"] == "https" for p in r.get("ports", []))]
    allowed = [e["values"] for r in api_rule for f in r.get("from", []) for e in f["podSelector"]["matchExpressions"]
               if e["key"] == "app.kubernetes.io/component"]
    check(allowed == [["emmg", "scheduler"]], f"encryptor API reachable from {allowed}")
    anti = roles["scheduler"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    check(terms and terms[0]["topologyKey"] == "kubernetes.io/hostname", "scheduler: no node anti-affinity")


def check_appliance(docs):
    deps = list(by_kind(docs, "Deployment").values())
    check(len(deps) == 1, f"appliance: {len(deps)} Deployments")
    spec = deps[0]["spec"]["template"]["spec"]
    secrets = check_pod("appliance", spec)
    check({"casd-root-key", "casd-token-signing-key", "casd-database"} <= secrets, "appliance secrets")
    check(spec["containers"][0]["args"] == ["run"], "appliance: not every role")


def check_monitoring(docs, rules_path):
    with open(rules_path) as f:
        rules = yaml.safe_load(f)
    rule = by_kind(docs, "PrometheusRule")["casd"]
    check(rule["spec"]["groups"] == rules["groups"],
          "PrometheusRule groups differ from deploy/prometheus/casd-rules.yml (regenerate: see its header)")
    check("casd" in by_kind(docs, "ServiceMonitor"), "no ServiceMonitor")


split, appliance, monitoring, rules_path = sys.argv[1:5]
check_split(load(split))
check_appliance(load(appliance))
check_monitoring(load(monitoring), rules_path)
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
