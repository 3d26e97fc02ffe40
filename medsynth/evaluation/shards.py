"""The uplift study's classifier fits as independent work items: ``--shard i/n`` + ``--merge``.

A shard fits the arms at positions ``p % n == i`` of the study's fixed arm list
(:func:`~medsynth.evaluation.units.plan_units`) and writes ``shard-i-of-n.npz`` (rows, test
probabilities, and a hash of its extractor features). Every shard first fits the real-only arm
itself, because seed 0 of it is the feature extractor that selects the synthetic subsets: shards
then need nothing from each other, so torchrun ranks, SLURM array tasks or any job runner can
run them in any order, on any number of machines sharing the run folder. The cost is one extra
arm per shard beyond the first. The merge checks that all ``n`` shards agree on the extractor,
then runs the same analysis as a single-process study, so the files it writes are identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsynth.evaluation.study import analyse
from medsynth.evaluation.units import (
    extract_features,
    fit_unit,
    load_study,
    plan_units,
    real_only_unit,
)
from medsynth.protocol import EvaluationSection


def shard_path(shard_dir: str | Path, i: int, n: int) -> Path:
    return Path(shard_dir) / f"shard-{i}-of-{n}.npz"


def _features_sha256(feats: dict, conf: dict) -> str:
    h = hashlib.sha256()
    for name, arr in sorted(feats.items()) + sorted((f"conf:{k}", v) for k, v in conf.items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _atomic_savez(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; anything else raises a ValueError."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text} is not valid; use i/n with 0 <= i < n")
    return i, n


def run_shard(
    ingest_dir: str | Path,
    generate_dir: str | Path,
    shard_dir: str | Path,
    ev: EvaluationSection,
    shard: tuple[int, int],
    *,
    key: str = "",
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    progress: bool = True,
) -> Path:
    """Fit this shard's arms; write ``shard_dir/shard-i-of-n.npz`` and return its path.

    ``key`` names the study's inputs (the CLI passes the evaluate stage's input hash); the merge
    only accepts shards with the same key. A finished shard file is not fitted again.
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is not valid; use i/n with 0 <= i < n")
    path = shard_path(shard_dir, i, n)
    if path.exists() and _meta(path)["key"] == key:
        return path
    d = load_study(
        ingest_dir, generate_dir, ev, train_fraction=train_fraction, fraction_seed=fraction_seed
    )
    first = fit_unit(d, real_only_unit(d))
    feats, conf = extract_features(d, first[2][0])
    units, _ = plan_units(d, feats, conf)
    mine = [u for pos, u in enumerate(units) if pos % n == i]
    arrays, done = {}, []
    for j, unit in enumerate(tqdm(mine, desc=f"arms {i}/{n}", disable=not progress)):
        rows, probas, _, val_probas = first if unit.arm == "real_only" else fit_unit(d, unit)
        done.append({"arm": unit.arm, "rows": rows})
        arrays[f"probas_{j}"] = np.stack(probas)
        arrays[f"val_probas_{j}"] = np.stack(val_probas)
    meta = {"key": key, "shard": [i, n], "arms": done, "features": _features_sha256(feats, conf)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if i == 0:
        arrays.update({f"feat_{k}": v for k, v in feats.items()})
        arrays.update({f"conf_{k}": v for k, v in conf.items()})
    _atomic_savez(path, arrays)
    return path


def _meta(path: Path) -> dict:
    with np.load(path) as z:
        return json.loads(z["meta"].tobytes().decode())


def merge_shards(
    ingest_dir: str | Path,
    generate_dir: str | Path,
    shard_dir: str | Path,
    out_dir: str | Path,
    ev: EvaluationSection,
    n: int,
    *,
    key: str = "",
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
) -> dict:
    """Combine ``n`` shard files into the study's outputs in ``out_dir`` (as :func:`run_study`).

    Fails with the missing shard numbers, or when shards disagree on inputs or extractor.
    """
    t0 = time.perf_counter()
    paths = [shard_path(shard_dir, i, n) for i in range(n)]
    missing = [str(i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"cannot merge {n} evaluation shards: shard(s) {', '.join(missing)} not found in "
            f"{shard_dir}; run `medsynth evaluate --shard i/{n}` for each first"
        )
    metas = [_meta(p) for p in paths]
    stale = [str(i) for i, m in enumerate(metas) if m["key"] != key]
    if stale:
        raise ValueError(
            f"evaluation shard(s) {', '.join(stale)} in {shard_dir} were made from other inputs "
            "(protocol or pools changed since); rerun them"
        )
    if len({m["features"] for m in metas}) != 1:
        raise ValueError(
            f"the evaluation shards in {shard_dir} disagree on the feature extractor (different "
            "hardware, threads or library versions give other weights); run every shard alike"
        )
    d = load_study(
        ingest_dir, generate_dir, ev, train_fraction=train_fraction, fraction_seed=fraction_seed
    )
    with np.load(paths[0]) as z:
        feats = {k[5:]: z[k] for k in z.files if k.startswith("feat_")}
        conf = {k[5:]: z[k] for k in z.files if k.startswith("conf_")}
    units, variants = plan_units(d, feats, conf)
    results = {}
    for path, meta in zip(paths, metas, strict=True):
        with np.load(path) as z:
            for j, rec in enumerate(meta["arms"]):
                results[rec["arm"]] = (
                    rec["rows"],
                    list(z[f"probas_{j}"]),
                    list(z[f"val_probas_{j}"]),
                )
    lacking = [u.arm for u in units if u.arm not in results]
    if lacking:
        raise ValueError(f"the shards in {shard_dir} lack arm(s) {lacking}; rerun them")
    return analyse(d, out_dir, feats, units, results, variants, t0)
