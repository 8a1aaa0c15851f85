"""Copy the OpenAI API schemas the simulator's replies are checked against into tests/data.

Reads the public API description (openai/openai-openapi, MIT licence), keeps the given roots and
every schema they reach through `$ref`, drops annotations (descriptions, examples), and writes
tests/data/openai_chat_schemas.json in the same `components` layout, so the same `$ref`s resolve
in both. Tests use the full description when it is present and this extract otherwise.

    python scripts/extract_openapi_schemas.py [--spec PATH] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"
DEFAULT_OUT = ROOT / "tests" / "data" / "openai_chat_schemas.json"
ROOTS = (
    "#/components/schemas/CreateChatCompletionResponse",
    "#/components/schemas/ErrorResponse",
    "#/components/schemas/ListModelsResponse",
    "#/components/responses/TooManyRequests",
    # The Files and Batch APIs the batch engine drives.
    "#/components/schemas/OpenAIFile",
    "#/components/schemas/DeleteFileResponse",
    "#/components/schemas/Batch",
    "#/components/schemas/ListBatchesResponse",
    "#/components/schemas/CreateBatchRequest",
)
# Keywords that only document; validation never looks at them.
ANNOTATIONS = frozenset({"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "x-oaiExpandable"})
# Keywords whose value maps names to schemas: its keys are names, never annotations.
NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "headers"})
# Keywords whose value is data, kept as it is.
LITERALS = frozenset({"enum", "const", "default"})


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _strip(node: Any, *, names: bool = False) -> Any:
    if isinstance(node, dict):
        if names:
            return {key: _strip(value) for key, value in node.items()}
        return {
            key: value if key in LITERALS else _strip(value, names=key in NAME_MAPS)
            for key, value in node.items()
            if key not in ANNOTATIONS
        }
    if isinstance(node, list):
        return [_strip(value) for value in node]
    return node


def extract(spec: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """The `roots` of `spec` and everything they reference, in the spec's own layout."""
    todo, seen = list(roots), set[str]()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        if not ref.startswith("#/components/"):
            raise ValueError(f"only local component references are supported, got {ref!r}")
        seen.add(ref)
        todo.extend(_refs(_pointer(spec, ref)))
    components: dict[str, dict[str, Any]] = {}
    for ref in sorted(seen):
        _, _, section, name = ref.split("/", 3)
        components.setdefault(section, {})[name] = _strip(_pointer(spec, ref))
    return {
        "x-source": (
            "Extracted by scripts/extract_openapi_schemas.py from the OpenAI OpenAPI description "
            "(https://github.com/openai/openai-openapi, MIT licence); annotations removed."
        ),
        "openapi": spec.get("openapi"),
        "info": {"title": spec["info"].get("title"), "version": spec["info"].get("version")},
        "components": components,
    }


def render(spec_path: Path) -> str:
    """The extract of the description at `spec_path`, as the JSON text that is committed."""
    with spec_path.open(encoding="utf-8") as handle:
        spec = yaml.load(handle, Loader=yaml.CSafeLoader)
    return json.dumps(extract(spec), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="openapi.yaml to read")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh extract")
    args = parser.parse_args(argv)
    text = render(args.spec)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(
                f"{args.out} is out of date with {args.spec}; run scripts/extract_openapi_schemas.py", file=sys.stderr
            )
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text)} bytes, {text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
