"""CustomResourceDefinitions of podnet's own kinds (podnet.io/v1), made from its models, so
that the API server refuses what podnet refuses wherever an OpenAPI schema can say it: unknown
fields, types, enumerations, required fields, ranges. What only podnet's code can check (a CIDR
that parses, a block size that fits its pool) is written as a CEL rule
(x-kubernetes-validations) for API servers that evaluate them, and kube-sync checks it again in
any case: an object it refuses never reaches the store (kube/sync.py).

    python -m podnet.kube.crds > deploy/crds.yaml     (tests/kube/test_deploy.py checks it is current)
    python -m podnet.kube.crds --network-attachment-definition    (Multus's CRD, for a cluster without it)
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from podnet.model.objects import KINDS, KubeObject

GROUP = "podnet.io"

# Checks the models make in code, as schema keywords and CEL rules (by kind, then dotted path
# under spec).
EXTRA: dict[str, dict[str, dict[str, Any]]] = {
    "IPPool": {
        "cidr": {"x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "cidr must be a CIDR"}]},
        "blockSize": {"minimum": 20, "maximum": 128},
    },
}


def podnet_kinds() -> list[type[KubeObject]]:
    return [cls for cls in KINDS.values() if cls.API_VERSIONS[0].startswith(GROUP + "/")]


def _structural(schema: dict, defs: dict) -> dict:
    if "$ref" in schema:
        return _structural(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _structural(schema["allOf"][0], defs)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        types = {s.get("type") for s in options}
        if len(options) == 1:
            return _structural(options[0], defs)
        if types == {"integer", "string"}:
            return {"x-kubernetes-int-or-string": True}
        return {"x-kubernetes-preserve-unknown-fields": True}
    out: dict[str, Any] = {}
    if "const" in schema:
        schema = {**schema, "enum": [schema["const"]]}
    t = schema.get("type")
    if t is None and "enum" in schema:
        t = "string" if all(isinstance(v, str) for v in schema["enum"]) else None
    if t:
        out["type"] = t
    for k in ("enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems"):
        if k in schema:
            out[k] = schema[k]
    for k, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(k), int | float) and not isinstance(schema.get(k), bool):
            out[base] = schema[k]
            out[k] = True
    if t == "object" or "properties" in schema:
        out["type"] = "object"
        props = schema.get("properties") or {}
        if props:
            out["properties"] = {name: _structural(s, defs) for name, s in props.items()}
        if schema.get("required"):
            out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        elif not props and extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if t == "array" and isinstance(schema.get("items"), dict):
        out["items"] = _structural(schema["items"], defs)
    return out


def _apply_extra(spec_schema: dict, extra: dict[str, dict]) -> None:
    for path, more in extra.items():
        node = spec_schema
        for part in path.split("."):
            node = node.setdefault("properties", {}).setdefault(part, {})
        node.update(more)


def spec_schema(cls: type[KubeObject]) -> dict:
    full = cls.model_json_schema(by_alias=True, mode="validation")
    defs = full.get("$defs") or {}
    spec = (full.get("properties") or {}).get("spec")
    out = _structural(spec, defs) if spec else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    _apply_extra(out, EXTRA.get(cls.KIND, {}))
    return out


def crd(cls: type[KubeObject]) -> dict:
    group, _, version = cls.API_VERSIONS[0].rpartition("/")
    spec = spec_schema(cls)
    required = ["spec"] if "spec" in (cls.model_json_schema(by_alias=True).get("required") or ()) else []
    root: dict[str, Any] = {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": spec,
        "status": {"type": "object", "properties": {"conditions": {"type": "array", "items": {
            "type": "object", "required": ["type", "status"], "properties": {
                "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"}, "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64"}}},
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}}}}}
    if required:
        root["required"] = required
    names: dict[str, Any] = {"plural": cls.PLURAL, "singular": cls.KIND.lower(), "kind": cls.KIND,
                             "listKind": f"{cls.KIND}List"}
    if cls.SHORT_NAMES:
        names["shortNames"] = list(cls.SHORT_NAMES)
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{cls.PLURAL}.{group}", "labels": {"app.kubernetes.io/part-of": "podnet"}},
        "spec": {"group": group, "scope": "Namespaced" if cls.NAMESPACED else "Cluster", "names": names,
                 "versions": [{"name": version, "served": True, "storage": True,
                               "subresources": {"status": {}},
                               "additionalPrinterColumns": [
                                   {"name": "Accepted", "type": "string",
                                    "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
                                   {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                               "schema": {"openAPIV3Schema": root}}]},
    }


def network_attachment_definition_crd() -> dict:
    """Multus's CustomResourceDefinition of NetworkAttachmentDefinition (k8s.cni.cncf.io/v1),
    which podnet reads but does not own: a cluster with Multus has it already; the lab
    installs it on its API server."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "network-attachment-definitions.k8s.cni.cncf.io"},
        "spec": {"group": "k8s.cni.cncf.io", "scope": "Namespaced",
                 "names": {"plural": "network-attachment-definitions", "singular": "network-attachment-definition",
                           "kind": "NetworkAttachmentDefinition", "shortNames": ["net-attach-def"]},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {
                         "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                         "metadata": {"type": "object"},
                         "spec": {"type": "object", "properties": {"config": {"type": "string"}}}}}}}]},
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # every schema written out in full, no &anchors
        return True


def render() -> str:
    header = ("# podnet's own kinds (podnet.io/v1) as CustomResourceDefinitions.\n"
              "# Made from podnet's models: python -m podnet.kube.crds > deploy/crds.yaml\n")
    return header + yaml.dump_all([crd(cls) for cls in podnet_kinds()], Dumper=_Dumper, sort_keys=False, width=110)


if __name__ == "__main__":
    if sys.argv[1:] == ["--network-attachment-definition"]:  # for a cluster without Multus
        sys.stdout.write(yaml.dump(network_attachment_definition_crd(), Dumper=_Dumper, sort_keys=False, width=110))
    else:
        sys.stdout.write(render())
