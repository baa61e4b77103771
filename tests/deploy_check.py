#!/usr/bin/env python3
"""Checks deploy/ against the daemon itself (run by .ci/run after the binary is built):
every ConfigMap's offloadd.toml passes `offloadd config check`; every OFFLOADD_* variable the
manifests set is accepted by the daemon's own config loader (unknown keys are rejected); every
VLLM_* variable is one the daemon reads, with a value vLLM would parse; the GH200 overlay renders
(its JSON6902 patch applied) to a valid Deployment that disables pinning in both containers."""
import copy
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("OFFLOADD_BIN", os.path.join(ROOT, "target", "debug", "offloadd"))
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail and not ok else ''}")


def run(args, env=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=env or {"PATH": os.environ["PATH"]})


def resources():
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "**", "*.yaml"), recursive=True)):
        for doc in yaml.safe_load_all(open(path)):
            if isinstance(doc, dict) and "kind" in doc and doc.get("kind") != "Kustomization":
                yield path, doc


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


VLLM_VARS = set(re.findall(r'pub const \w+: &str = "(VLLM_\w+)";', open(os.path.join(ROOT, "src", "vllm_env.rs")).read()))
NOT_CONFIG = {"OFFLOADD_CONFIG", "OFFLOADD_LOG"}


def check_env(where, name, value):
    if name.startswith("VLLM_"):
        check(f"{where}: {name} is read by offloadd", name in VLLM_VARS, f"known: {sorted(VLLM_VARS)}")
        check(f"{where}: {name}={value!r} parses as vLLM's int()", re.fullmatch(r"\s*[+-]?\d+\s*", str(value)) is not None)
    elif name.startswith("OFFLOADD_") and name not in NOT_CONFIG:
        r = run(["config", "print"], {"PATH": os.environ["PATH"], name: str(value)})
        check(f"{where}: {name}={value!r} accepted by offloadd config", r.returncode == 0, r.stderr.strip())


def main():
    # The rendered files outlive their `with` blocks (a subprocess reads them); they go with it.
    with tempfile.TemporaryDirectory() as scratch:
        checks(scratch)
    failed = results.count(False)
    print(f"deploy checks: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def checks(scratch):
    for path, doc in resources():
        rel = os.path.relpath(path, ROOT)
        if doc["kind"] == "ConfigMap" and "offloadd.toml" in doc.get("data", {}):
            toml_path = os.path.join(scratch, "offloadd.toml")
            with open(toml_path, "w") as f:
                f.write(doc["data"]["offloadd.toml"])
            r = run(["config", "check", toml_path])
            check(f"{rel}: offloadd.toml passes offloadd config check", r.returncode == 0, r.stderr.strip())
        for c in containers(doc):
            for e in c.get("env", []):
                check_env(f"{rel} [{c['name']}]", e["name"], e.get("value", ""))

    # Network exposure: TCP needs a token from a Secret, probes use health only, and a
    # NetworkPolicy admits nothing but the metrics port.
    cm = next(d for p, d in resources() if d["kind"] == "ConfigMap")
    toml_text = cm["data"]["offloadd.toml"]
    check("ConfigMap: TCP on 0.0.0.0 comes with server.auth_token_file", "auth_token_file" in toml_text)
    for path, doc in resources():
        rel = os.path.relpath(path, ROOT)
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        secrets = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == "offloadd-token"]
        check(f"{rel}: the token comes from the offloadd-token Secret", len(secrets) == 1)
        off = next(c for c in containers(doc) if c["name"] == "offloadd")
        mounts = {m["name"]: m["mountPath"] for m in off.get("volumeMounts", [])}
        check(f"{rel}: the token is mounted where auth_token_file points",
              secrets and mounts.get(secrets[0]["name"]) == "/etc/offloadd-token")
        for probe in ("readinessProbe", "livenessProbe"):
            check(f"{rel}: {probe} is a gRPC health probe", "grpc" in off.get(probe, {}), json.dumps(off.get(probe)))
    policies = [d for p, d in resources() if d["kind"] == "NetworkPolicy"]
    check("a NetworkPolicy admits only the metrics port",
          len(policies) == 1 and [p["port"] for r in policies[0]["spec"]["ingress"] for p in r["ports"]] == [9400])
    egress = sorted({p["port"] for r in policies[0]["spec"].get("egress", []) for p in r["ports"]})
    check("the NetworkPolicy lets out DNS and HTTPS to object storage, nothing else",
          "Egress" in policies[0]["spec"]["policyTypes"] and egress == [53, 443], json.dumps(egress))
    for path, doc in resources():
        if doc["kind"] in ("Deployment", "DaemonSet"):
            spec = doc["spec"]["template"]["spec"]
            off = next(c for c in containers(doc) if c["name"] == "offloadd")
            refs = [e["secretRef"] for e in off.get("envFrom", []) if "secretRef" in e]
            check(f"{os.path.relpath(path, ROOT)}: object-store credentials from a Secret or the ServiceAccount",
                  spec.get("serviceAccountName") == "offloadd"
                  and refs == [{"name": "offloadd-object-store", "optional": True}], json.dumps(refs))

    # Render the GH200 overlay: base Deployment + JSON6902 replace ops.
    base = next(d for p, d in resources() if d["kind"] == "Deployment" and "/base/" in p)
    rendered = copy.deepcopy(base)
    ops = yaml.safe_load(open(os.path.join(ROOT, "deploy", "overlays", "gh200", "pin-off.yaml")))
    for op in ops:
        check(f"gh200 patch op {op['path']} is a replace", op["op"] == "replace")
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = rendered
        for p in parents:
            node = node[p]
        node[last] = op["value"]
    for c in containers(rendered):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        check(f"gh200 [{c['name']}]: pinning disabled", env.get("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY") == "1", json.dumps(env))
        for n, v in env.items():
            check_env(f"gh200 [{c['name']}]", n, v)
    off = next(c for c in containers(rendered) if c["name"] == "offloadd")
    check("gh200: offloadd no longer asks for IPC_LOCK", "add" not in off["securityContext"]["capabilities"])
    rendered_path = os.path.join(scratch, "gh200-deployment.yaml")
    with open(rendered_path, "w") as f:
        yaml.safe_dump(rendered, f)
    r = subprocess.run(["kubernetes-validate", "--strict", "--quiet", rendered_path], capture_output=True, text=True)
    check("gh200: rendered Deployment validates", r.returncode == 0, r.stdout + r.stderr)


if __name__ == "__main__":
    main()
