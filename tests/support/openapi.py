"""Validate JSON bodies against OpenAI's published OpenAPI description (read from ../shared).

    from tests.support.openapi import validate
    validate(body, "CreateChatCompletionResponse")   # raises SchemaMismatch (an AssertionError)

Schemas: every `#/components/schemas/...` of `openapi.yaml` plus `BatchRequestInput` and
`BatchRequestOutput` from `batch-request-lines.yaml`. The spec is OpenAPI 3.1 (JSON Schema
2020-12); the few OpenAPI 3.0 `nullable: true` left in it (and in the line schemas) are
rewritten to 2020-12 form. Both files are parsed once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support.procs import REPO_ROOT

SPEC_DIR = REPO_ROOT.parent / "shared" / "openai-openapi"
SPEC_URI = "urn:tierbatch:openai-openapi"


class SchemaMismatch(AssertionError):
    """An instance that does not validate against the named schema."""


def _load_yaml(path: Path) -> Any:
    with open(path, "rb") as fh:
        return yaml.load(fh, Loader=yaml.CSafeLoader)


def _rewrite_nullable(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` → JSON Schema 2020-12 (`null` allowed), recursively."""
    if isinstance(node, list):
        return [_rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rewrite_nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is not True:
        return out
    kind = out.get("type")
    if isinstance(kind, str) and "$ref" not in out and not any(k in out for k in ("anyOf", "oneOf", "allOf")):
        out["type"] = [kind, "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


@functools.lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    """The OpenAPI document with the batch line schemas added under components/schemas."""
    document = _load_yaml(SPEC_DIR / "openapi.yaml")
    lines = _load_yaml(SPEC_DIR / "batch-request-lines.yaml")
    schemas = dict(document["components"]["schemas"])
    schemas.update(lines)
    return {"components": {"schemas": _rewrite_nullable(schemas)}}


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(SPEC_URI, resource)


@functools.lru_cache(maxsize=256)
def validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in spec()["components"]["schemas"]:
        raise KeyError(f"no schema named {schema_name!r} in {SPEC_DIR}")
    return Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"},
                                registry=_registry())


def errors(instance: Any, schema_name: str) -> list[str]:
    """Readable validation errors (empty when the instance is valid)."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}" for err in found]


def validate(instance: Any, schema_name: str) -> None:
    """Raise `SchemaMismatch` listing every reason `instance` is not a valid `schema_name`."""
    problems = errors(instance, schema_name)
    if problems:
        listed = "\n  ".join(problems[:20])
        raise SchemaMismatch(f"not a valid {schema_name}:\n  {listed}")
