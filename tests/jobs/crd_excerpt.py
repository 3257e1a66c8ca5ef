"""KubeRay's RayJob CRD, cut down to what jobs/kuberay-rayjob.yaml uses, and
checked the way the Kubernetes API server checks a custom resource.

The full CRD (``ray.io_rayjobs.yaml``, 1.4 MB: every pod template field,
several times over) is not vendored. ``tests/jobs/data/`` holds an excerpt
made by :func:`excerpt` from one KubeRay release: along every path the
manifest uses, the schema's validation keywords (types, required fields,
enums, patterns); every other property keeps its name with an empty schema,
so the check of unknown fields still knows it. Regenerate it, after editing
the manifest or to move to another KubeRay release, with::

    python tests/jobs/crd_excerpt.py ray.io_rayjobs.yaml > tests/jobs/data/kuberay-rayjob-crd.yaml

(the CRD is ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of
https://github.com/ray-project/kuberay at a release tag; pass ``--tag``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

#: JSON-schema keywords kept (validation only: descriptions and defaults go).
KEEP = ("type", "required", "enum", "format", "minimum", "maximum", "pattern", "minLength",
        "maxLength", "minItems", "maxItems", "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string")
SOURCE = "https://github.com/ray-project/kuberay/blob/{tag}/ray-operator/config/crd/bases/ray.io_rayjobs.yaml"


def version_schema(crd: dict, version: str = "v1") -> dict:
    """The ``openAPIV3Schema`` of ``version`` of a CRD."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"the CRD has no version {version!r}")


def prune(schema: dict, docs: list) -> dict:
    """The validation keywords of ``schema`` along the paths that ``docs`` (the
    instances at this node) use; unused properties keep their name only."""
    out = {k: schema[k] for k in KEEP if k in schema}
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [prune(s, docs) for s in schema[key]]
    maps = [d for d in docs if isinstance(d, dict)]
    if "properties" in schema:
        out["properties"] = {
            name: prune(sub, [d[name] for d in maps if name in d])
            if any(name in d for d in maps) else {}
            for name, sub in schema["properties"].items()}
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        known = schema.get("properties", {})
        out["additionalProperties"] = prune(extra, [v for d in maps for k, v in d.items()
                                                    if k not in known])
    elif extra is not None:
        out["additionalProperties"] = extra
    if isinstance(schema.get("items"), dict):
        out["items"] = prune(schema["items"], [x for d in docs if isinstance(d, list) for x in d])
    return out


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused where the API server refuses them:
    an object with declared properties, no ``additionalProperties`` and no
    ``x-kubernetes-preserve-unknown-fields`` (``kubectl apply`` validates
    fields strictly by default since Kubernetes 1.27)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf")
           else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def uncovered(schema: dict, doc: Any, path: str = "") -> list[str]:
    """Paths of ``doc`` whose schema in an excerpt is empty: fields the manifest
    uses that the excerpt was not made for (regenerate it)."""
    found: list[str] = []
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        for key, value in doc.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if sub == {}:
                found.append(f"{path}.{key}")
            elif isinstance(sub, dict):
                found += uncovered(sub, value, f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            found += uncovered(schema["items"], item, f"{path}[{i}]")
    return found


def excerpt(crd: dict, manifest: dict, tag: str) -> dict:
    """The excerpt stored in tests/jobs/data/: the group, kind and version of the
    CRD with the schema of that version cut down to ``manifest``."""
    version = manifest["apiVersion"].split("/", 1)[1]
    return {"source": SOURCE.format(tag=tag), "group": crd["spec"]["group"],
            "kind": crd["spec"]["names"]["kind"], "version": version,
            "openAPIV3Schema": prune(version_schema(crd, version), [manifest])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", help="ray.io_rayjobs.yaml of a KubeRay release")
    parser.add_argument("--tag", default="v1.7.0", help="its release tag (for the source URL)")
    parser.add_argument("--manifest", default="jobs/kuberay-rayjob.yaml")
    args = parser.parse_args(argv)
    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    with open(args.manifest) as f:
        manifest = yaml.safe_load(f)
    cut = excerpt(crd, manifest, args.tag)
    sys.stdout.write(f"# An excerpt of KubeRay's RayJob CRD ({args.tag}), made by\n"
                     f"# tests/jobs/crd_excerpt.py for {args.manifest}, from\n"
                     f"# {cut['source']}\n"
                     "# (Apache License 2.0, Copyright The KubeRay Authors).\n")
    yaml.safe_dump(cut, sys.stdout, sort_keys=True, width=100)


if __name__ == "__main__":
    main()
