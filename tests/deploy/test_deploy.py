"""deploy/: the KubeRay manifests validate against KubeRay's own CRD schemas (strictly: unknown fields
are errors, as a strict API server would have it), the container image copies only files that
exist, and the entrypoint the manifests run is one the annotate CLI accepts, with a config that loads."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
IMAGE_ROOT = "/home/ray/vesl"  # WORKDIR of deploy/Dockerfile: the repository's root inside the image
MANIFESTS = {"RayCluster": DEPLOY / "kuberay" / "raycluster.yaml", "RayJob": DEPLOY / "kuberay" / "rayjob.yaml",
             "RayJob-served": DEPLOY / "kuberay" / "rayjob-served.yaml",
             "RayService": DEPLOY / "kuberay" / "served.yaml",
             "RayService-vesl-serve": DEPLOY / "kuberay" / "serve.yaml"}
SCHEMAS = {"RayCluster": DEPLOY / "crds" / "raycluster.v1.openapi.json",
           "RayJob": DEPLOY / "crds" / "rayjob.v1.openapi.json",
           "RayJob-served": DEPLOY / "crds" / "rayjob.v1.openapi.json",
           "RayService": DEPLOY / "crds" / "rayservice.v1.openapi.json",
           "RayService-vesl-serve": DEPLOY / "crds" / "rayservice.v1.openapi.json"}


def load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Keys of DOC that SCHEMA does not declare (Kubernetes prunes or, with strict field validation,
    rejects them): what JSON Schema alone lets through, e.g. a misspelt `minReplica`."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                out += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                out.append(f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_the_kuberay_crd(kind):
    doc = load(kind)
    schema = json.loads(SCHEMAS[kind].read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind.split("-")[0]
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == []


def test_the_validation_catches_mistakes():
    """The two checks above fail on a wrong type and on a misspelt field."""
    schema = json.loads(SCHEMAS["RayCluster"].read_text())
    doc = load("RayCluster")
    doc["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "six"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(doc)
    doc = load("RayCluster")
    doc["spec"]["workerGroupSpecs"][1]["minReplica"] = 0
    assert unknown_fields(doc, schema) == [".spec.workerGroupSpecs[1].minReplica"]


def test_rayjob_runs_the_same_cluster_as_raycluster():
    assert load("RayJob")["spec"]["rayClusterSpec"] == load("RayCluster")["spec"]


def test_cluster_shape_cpu_head_and_autoscaling_gpu_workers():
    spec = load("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["nodeSelector"]
    # the GPU group can hold every GPU actor deploy/cluster.yaml asks for
    from vesl.annotate.config import load_config

    config = load_config(str(DEPLOY / "cluster.yaml"))
    gpu_stages = [s.name for s in config.active_stages() if s.resources.gpu]
    assert gpu_stages == ["caption", "fuse", "detect"]  # the paper's recipe
    pools = [getattr(config.ray.pools, name) for name in gpu_stages]
    assert all(p.size and p.num_gpus for p in pools)  # sized for this cluster, not guessed
    assert sum(p.size * p.num_gpus for p in pools) <= gpu["maxReplicas"] * int(limits["nvidia.com/gpu"])
    cpus = float(limits["cpu"])
    assert all(p.num_cpus <= cpus for p in pools)


def test_credentials_only_from_a_secret():
    for kind in ("RayCluster", "RayJob", "RayJob-served"):
        text = MANIFESTS[kind].read_text()
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text)
        doc = load(kind)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "vesl-s3"
    for path in (DEPLOY / "cluster.yaml", DEPLOY / "runtime_env.yaml"):
        data = yaml.safe_load(path.read_text())
        text = json.dumps(data).lower()
        assert "secret" not in text and "aws_access_key_id" not in text


def test_entrypoint_is_one_the_cli_accepts():
    from vesl.annotate.config import load_config
    from vesl.annotate.job import parser

    argv = shlex.split(load("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{IMAGE_ROOT}/pipelines/annotate.py"
    assert (REPO / "pipelines" / "annotate.py").is_file()
    args = parser().parse_args(argv[2:])  # argparse exits (SystemExit) on anything it does not accept
    assert args.input.startswith("s3://") and args.output.startswith("s3://")
    config_path = REPO / Path(args.config).relative_to(IMAGE_ROOT)
    config = load_config(str(config_path), args.preset, args.overrides)
    assert config.caption.model == "HuggingFaceTB/SmolVLM-Instruct" and config.caption.prompt_style == "chat"
    assert config.fuse.enabled and config.fuse.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert config.detect.model == "google/owlv2-base-patch16-ensemble"
    assert config.ray.pools.caption.num_gpus == config.ray.pools.fuse.num_gpus == config.ray.pools.detect.num_gpus == 1


def dockerfile_copies(text: str) -> list[str]:
    """Source paths of every COPY/ADD instruction (flags and the destination left out)."""
    sources = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].upper() in ("COPY", "ADD"):
            args = [p for p in parts[1:] if not p.startswith("--")]
            sources += args[:-1]
    return sources


def test_image_definition_references_only_files_that_exist():
    text = (DEPLOY / "Dockerfile").read_text()
    sources = dockerfile_copies(text)
    assert "requirements/lock.txt" in sources and "pipelines/" in sources and "deploy/cluster.yaml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    for source in sources:  # nothing it copies is excluded from the build context
        assert not any(source.rstrip("/") == i.rstrip("/") for i in ignored), source
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert "cuda" in base and base.startswith("pytorch/pytorch:")
    assert not re.search(r"(?i)aws_secret|aws_access_key|HF_TOKEN", text)  # no credentials baked in
    # the spaCy model and the pins are the ones the tests run with
    assert "spacy-model.txt" in text and "torchvision" in text


def test_dockerfile_copies_parser():
    assert dockerfile_copies("COPY --chown=ray a b dest/\nADD c d\nRUN x") == ["a", "b", "c"]


def test_runtime_env_example_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)
    assert ".venv/" in env["excludes"] and env["env_vars"]["HF_HOME"]


def test_the_served_job_points_its_generation_at_the_rayservice():
    """rayjob-served.yaml runs --preset paper-served against served.yaml's Service; the RayService serves both
    generative models of the paper recipe through Ray Serve LLM (vLLM), the captioner's image splitting bounded
    as the local preset bounds it; the job's GPUs are only the detector's."""
    from vesl.annotate.config import load_config
    from vesl.annotate.job import parser

    service = load("RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    llms = {c["model_loading_config"]["model_id"]: c for c in app["args"]["llm_configs"]}
    argv = shlex.split(load("RayJob-served")["spec"]["entrypoint"])
    args = parser().parse_args(argv[2:])
    config = load_config(str(REPO / Path(args.config).relative_to(IMAGE_ROOT)), args.preset, args.overrides)
    endpoint = f"http://{service['metadata']['name']}-serve-svc:8000"  # the Service KubeRay makes for Serve
    for stage in (config.caption, config.fuse):
        assert stage.backend == "openai" and stage.endpoint == endpoint and stage.model in llms
    assert llms[config.caption.model]["engine_kwargs"]["mm_processor_kwargs"] == {"size": {"longest_edge": 768}}
    assert load_config(None, "paper", []).caption.processor_kwargs == {"size": {"longest_edge": 768}}
    pools = config.ray.pools
    assert not pools.caption.num_gpus and not pools.fuse.num_gpus and pools.detect.num_gpus == 1
    gpu = {g["groupName"]: g for g in load("RayJob-served")["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    assert gpu["maxReplicas"] == pools.detect.size


def test_the_serve_rayservice_builds_vesl_serve_with_the_paper_recipe_on_gpus():
    """serve.yaml's application is vesl.serve.app:app_builder with args that load: the paper preset (the batch
    job's label hash), a GPU per replica of the model stages, autoscaling within the GPU group's size."""
    import importlib

    from vesl.annotate.config import load_config

    doc = load("RayService-vesl-serve")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    args = dict(app["args"], config=str(REPO / Path(app["args"]["config"]).relative_to(IMAGE_ROOT)))
    config = load_config(args["config"], args["preset"], [])
    assert config.label_hash() == load_config(None, "paper", []).label_hash()
    assert serve["http_options"]["port"] == config.serve.port == 8000
    pools, scaling = config.ray.pools, config.serve.autoscaling
    assert all(getattr(pools, s).num_gpus == 1 for s in ("caption", "fuse", "detect")) and not pools.phrases.num_gpus
    gpu = {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}["gpu"]
    assert gpu["maxReplicas"] == sum(scaling[s]["max_replicas"] for s in ("caption", "fuse", "detect"))
    assert gpu["minReplicas"] == sum(scaling[s]["min_replicas"] for s in ("caption", "fuse", "detect"))
    copied = dockerfile_copies((DEPLOY / "Dockerfile").read_text())
    assert app["args"]["config"].removeprefix(IMAGE_ROOT + "/") in copied  # the image has the config it names
    application = builder(args)  # what Serve builds (no cluster needed to build it)
    assert type(application).__name__ == "Application"
