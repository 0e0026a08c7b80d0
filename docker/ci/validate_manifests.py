"""Validate Kubernetes manifests, custom resources included, against the schemas their projects publish.

    python docker/ci/validate_manifests.py --models .venv/crd-models FILE|- ...

Reads YAML documents and prints `valid: Kind/name` or `invalid: Kind/name: <path>: <why>` for each; exits 1
if any is invalid. Kubernetes' own kinds are checked by kubernetes-validate against the 1.32 API (strict: no
unknown fields). Neither KEDA nor KServe publishes its CRD files to PyPI, npm or Debian, so their kinds are
checked against models generated from their schemas (`make test` installs them into `--models`):

- KEDA ScaledObject: cloudcoil-models-keda, pydantic models generated from the CRDs of KEDA 2.16.1.
- KServe InferenceService: the kserve SDK's models, generated from KServe's OpenAPI definitions (the Go types
  its CRD is made from); the Kubernetes types inside (containers, probes, metadata) go to kubernetes-validate's
  strict schemas.

Neither kind of model refuses a field it does not know, which the API server would drop without a word (a
misspelt field silently does nothing), so both checks below refuse them.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import yaml

KUBERNETES_VERSION = "1.32.0"  # the kubectl on the build machine is a 1.32 client


def _unknown_fields(sent: Any, kept: Any, path: str) -> list[str]:
    """What the model dropped from `sent`: fields its schema does not have."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [
            problem
            for key, value in sent.items()
            for problem in (
                _unknown_fields(value, kept[key], f"{path}.{key}") if key in kept else [f"{path}.{key}: unknown field"]
            )
        ]
    if isinstance(sent, list) and isinstance(kept, list):
        return [
            problem
            for i, (a, b) in enumerate(zip(sent, kept, strict=True))
            for problem in _unknown_fields(a, b, f"{path}[{i}]")
        ]
    return []


def check_scaled_object(document: dict) -> list[str]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    try:
        # Strict: no "1" for 1, as the API server's schema validation would not take it either.
        model = ScaledObject.model_validate(document, strict=True)
    except pydantic.ValidationError as error:
        return [f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()]
    return _unknown_fields(document, model.model_dump(mode="json", by_alias=True, exclude_unset=True), "")


def check_kubernetes_kind(document: dict) -> list[str]:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(str(part) for part in error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:  # also what a removed apiVersion gets
        return [error.message]
    return []


class InferenceServiceSchema:
    """KServe's SDK models, walked strictly; Kubernetes types inside them go to kubernetes-validate's schemas."""

    PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,)}

    def __init__(self, models_dir: Path) -> None:
        # kserve/__init__.py starts by importing its model server (grpc, pandas, ...); the generated API models
        # need only six and urllib3, so the package is entered without running it.
        spec = importlib.machinery.PathFinder.find_spec("kserve", [str(models_dir)])
        package = types.ModuleType("kserve")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kserve"] = package
        from kserve import configuration, models

        self.models = models
        self.configuration = configuration.Configuration()
        schemas = (
            Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
        )
        self.definitions = json.loads((schemas / "_definitions.json").read_text())["$defs"]

    def _kubernetes_definition(self, type_name: str) -> str:
        # The SDK names Kubernetes types as the Python client does; the schemas name them by API group.
        # MetricQuantity is a Quantity the SDK generator left without a model of its own.
        if type_name in ("ResourceQuantity", "V1beta1MetricQuantity"):
            return "io.k8s.apimachinery.pkg.api.resource.Quantity"
        grouped = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
        if grouped:
            group, version, kind = grouped.groups()
            return f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
        core = re.fullmatch(r"V1(\w+)", type_name)
        for candidate in (
            (f"io.k8s.api.core.v1.{core[1]}", f"io.k8s.apimachinery.pkg.apis.meta.v1.{core[1]}") if core else ()
        ):
            if candidate in self.definitions:
                return candidate
        raise LookupError(f"no schema for {type_name}")

    def check(self, value: Any, type_name: str, path: str) -> list[str]:
        if value is None:
            return []
        if type_name.startswith("list["):
            if not isinstance(value, list):
                return [f"{path}: should be a list"]
            return [
                problem for i, item in enumerate(value) for problem in self.check(item, type_name[5:-1], f"{path}[{i}]")
            ]
        if type_name.startswith("dict("):
            if not isinstance(value, dict):
                return [f"{path}: should be a mapping"]
            item_type = type_name[5:-1].split(", ", 1)[1]
            return [problem for key, item in value.items() for problem in self.check(item, item_type, f"{path}.{key}")]
        if type_name in self.PRIMITIVES:
            wrong = isinstance(value, bool) and type_name != "bool"  # YAML's true is no number and no string
            return (
                [f"{path}: should be {type_name}"] if wrong or not isinstance(value, self.PRIMITIVES[type_name]) else []
            )
        model = getattr(self.models, type_name, None)
        if model is None:
            schema = {"$ref": f"#/$defs/{self._kubernetes_definition(type_name)}", "$defs": self.definitions}
            return [
                f"{path}{''.join(f'.{part}' for part in error.absolute_path)}: {error.message}"
                for error in jsonschema.Draft202012Validator(schema).iter_errors(value)
            ]
        if not isinstance(value, dict):
            return [f"{path}: should be a mapping ({type_name})"]
        attributes = {key: attribute for attribute, key in model.attribute_map.items()}
        problems = [f"{path}.{key}: unknown field" for key in value if key not in attributes]
        for key, item in value.items():
            if key in attributes:
                problems += self.check(item, model.openapi_types[attributes[key]], f"{path}.{key}")
        # The generated constructors refuse None for a required field. Every field the manifest leaves out is
        # passed as None, since the generator gives some required strings a default of "".
        try:
            model(
                **{attribute: value.get(key) for attribute, key in model.attribute_map.items()},
                local_vars_configuration=self.configuration,
            )
        except ValueError as error:
            problems.append(f"{path}: {error}")
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="folder the CRD models were installed into")
    parser.add_argument("files", nargs="+", help="YAML files, or - for standard input")
    arguments = parser.parse_args()
    if not arguments.models.is_dir():
        parser.error(f"{arguments.models} does not exist: `make test` installs the models there")
    sys.path.insert(0, str(arguments.models))
    inference_services = InferenceServiceSchema(arguments.models)

    failed = False
    for name in arguments.files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        for document in filter(None, yaml.safe_load_all(text)):
            kind = (document.get("apiVersion"), document.get("kind"))
            label = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
            if kind == ("keda.sh/v1alpha1", "ScaledObject"):
                problems = check_scaled_object(document)
            elif kind == ("serving.kserve.io/v1beta1", "InferenceService"):
                problems = inference_services.check(document, "V1beta1InferenceService", "")
            else:
                problems = check_kubernetes_kind(document)
            failed |= bool(problems)
            report = "; ".join(problem.lstrip(".") for problem in problems)
            sys.stdout.write(f"invalid: {label}: {report}\n" if problems else f"valid: {label}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
