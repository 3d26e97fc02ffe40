"""Run folders: ``<output_root>/<name>-<hash8>/`` holding the resolved protocol and environment.

The folder name comes from the hash of the protocol's *dataset* section: rerunning the protocol
finds the same folder (and resumes), a changed model/training/generation/evaluation setting
reuses it and recomputes only the stages whose inputs changed (see ``stage_inputs``), and a
different dataset gets a folder of its own.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

from medsynth import __version__
from medsynth.protocol import (
    DistillSection,
    Protocol,
    canonical_json,
    drop_later_defaults,
    guide_called,
    sampler_revision,
)

STAGES = ("ingest", "train", "generate", "evaluate", "report")


def _sha(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def run_dir_for(protocol: Protocol, output_root: str | Path | None = None) -> Path:
    root = Path(output_root or protocol.output_root)
    return root / f"{protocol.name}-{_sha(protocol.dataset.model_dump(mode='json'))[:8]}"


def stage_inputs(protocol: Protocol, base_sha256: str | None = None) -> dict[str, str]:
    """SHA-256 of everything each stage depends on, chained through the stages before it.

    ``base_sha256``: the snapshot hash ``training.init_from`` resolves to, so a retrained base
    reruns the adaptation (None leaves every hash as it was without adaptation).
    """
    # Knobs added later, at their old-behaviour value, leave every hash as it was.
    p = drop_later_defaults(protocol.dump())
    ds, up, T = p["dataset"], p.get("upscaler"), p["schedule"]["num_train_timesteps"]
    out: dict[str, str] = {}
    skip = ("train_fraction", "fraction_seed", "workers")
    if not ds.get("split_stratify"):
        skip += ("split_stratify",)  # added later; the default must not invalidate older ingests
    out["ingest"] = _sha({k: v for k, v in ds.items() if k not in skip})
    # The model does not depend on its autoguidance guide (trained after it, in RUN/train/guide
    # with an identity of its own): adding or changing a guide must not retrain the model.
    guide = p["training"].pop("guide_fraction", 0.0)
    out["train"] = _sha(
        [
            out["ingest"],
            ds["train_fraction"],
            ds["fraction_seed"],
            p["model"],
            p["schedule"],
            p["training"],
        ]
        + ([base_sha256] if base_sha256 else [])
        # An upsampler is trained (and compared with bicubic, with its sampler) in the train
        # stage too; absent, hashes stay as they were.
        + ([up | sampler_revision(up["sampler"], up["steps"], T)] if up else [])
    )
    # The write batch does not change a sample (its seed names it): not an input.
    gen = {k: v for k, v in p["generation"].items() if k != "batch_size"}
    if not gen.get("ddim_eta"):
        gen.pop("ddim_eta", None)  # added later; the default must not invalidate older pools
    gen |= sampler_revision(gen["sampler"], gen["steps"], T)
    if guide_called(
        gen.get("autoguidance", False), gen["guidance_scale"], gen.get("class_guidance", {})
    ):
        gen["guide_fraction"] = guide  # the guide drew the pool too
    # A distilled pool also depends on how the student was distilled (defaults if unset).
    default = drop_later_defaults(DistillSection().model_dump(mode="json"), "distill")
    distill = [p.get("distill") or default]
    out["generate"] = _sha([out["train"], gen] + (distill if gen["sampler"] == "distilled" else []))
    out["evaluate"] = _sha([out["generate"], p["evaluation"]])
    # The model card describes the guide: a report of another guide is another report.
    out["report"] = _sha(
        [out["evaluate"], p["name"], p["description"]] + ([guide] if guide else [])
    )
    return out


def environment() -> dict:
    """Versions and device facts worth keeping beside results."""
    import importlib.metadata as md

    env = {
        "medsynth": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    for pkg in ("torch", "monai", "diffusers", "pydicom", "numpy", "scikit-learn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def prepare_run_dir(protocol: Protocol, run_dir: str | Path) -> Path:
    """Create ``run_dir`` and write ``protocol.yaml`` (resolved), its SHA-256 and environment."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "protocol.yaml").write_text(
        f"# resolved protocol; sha256 {protocol.sha256()}\n" + protocol.to_yaml()
    )
    (run_dir / "protocol.sha256").write_text(protocol.sha256() + "\n")
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    return run_dir
