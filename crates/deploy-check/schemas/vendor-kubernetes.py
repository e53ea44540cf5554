#!/usr/bin/env python3
"""Re-creates schemas/kubernetes-v1.33 from the kubernetes-validate package on PyPI.

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python3 schemas/vendor-kubernetes.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

Keeps the kinds deploy/k8s uses and only the definitions they reach, without descriptions, so
the vendored copy stays small. Standard library only.
"""
import json
import sys
import zipfile
from pathlib import Path

VERSION = "v1.33.0-local-strict"
KINDS = [
    "namespace-v1",
    "configmap-v1",
    "secret-v1",
    "service-v1",
    "deployment-apps-v1",
    "statefulset-apps-v1",
    "poddisruptionbudget-policy-v1",
]
PREFIX = f"kubernetes_validate/kubernetes-json-schema/{VERSION}/"
OUT = Path(__file__).resolve().parent / "kubernetes-v1.33"


def strip_descriptions(node):
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def main(wheel):
    with zipfile.ZipFile(wheel) as z:
        definitions = json.loads(z.read(PREFIX + "_definitions.json"))
        kinds = {name: json.loads(z.read(PREFIX + name + ".json")) for name in KINDS}
    wanted, queue = set(), [r for schema in kinds.values() for r in refs(schema)]
    while queue:
        name = queue.pop().split("#/$defs/")[-1]
        if name in wanted:
            continue
        wanted.add(name)
        queue.extend(refs(definitions["$defs"][name]))
    pruned = dict(definitions)
    pruned["$defs"] = {k: v for k, v in sorted(definitions["$defs"].items()) if k in wanted}
    OUT.mkdir(exist_ok=True)
    for name, schema in [("_definitions", pruned), *kinds.items()]:
        text = json.dumps(strip_descriptions(schema), indent=1, sort_keys=True)
        (OUT / f"{name}.json").write_text(text + "\n")
    print(f"{len(kinds)} kinds, {len(wanted)} definitions -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
