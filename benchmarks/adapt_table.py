"""Issue 13's table: scratch vs full fine-tune vs LoRA per train fraction, from finished sweeps.

Reads one run folder of ``protocols/adapt_sweep.yaml`` per arm and prints, per fraction and arm:
training wall seconds (the train stage's ``.stage.json``), snapshot size on disk, the pool's
FD_clf / precision / recall / MS-SSIM ratio (the sweep's ``configs.csv``), the memorization
share (the unit's ``memorization.json``; the held-out flag rate beside it is what chance gives),
and the uplift over the count-matched duplicate control with its 95 % CI, Holm-adjusted p and
MDE.

    python benchmarks/adapt_table.py scratch=runs/adapt_scratch full=runs/adapt_full \\
        lora=runs/adapt_lora
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # quality.py, the fixed extractors


def _snapshot_kb(train: Path) -> float:
    snaps = sorted(train.glob("snapshot-*"))
    return sum(f.stat().st_size for f in snaps[-1].iterdir()) / 1024 if snaps else float("nan")


@functools.cache
def _reference(ingest: Path, cache: Path):
    """(test split, extractors, their test features): loaded once per ingest, not per pool."""
    from quality import load_extractors

    from medsynth.data.datasets import load_split

    test = load_split(ingest, "test")
    ex = load_extractors(cache)
    return test, ex, {n: e.features(test.images) for n, e in ex.items()}


def fixed_space(run: Path, pool: Path, cache: Path) -> dict:
    """Fixed-extractor figures of one pool against the real test split of ``run``'s ingest."""
    from quality import score_set

    from medsynth.generation.dataset import load_pool

    test, ex, test_feats = _reference((run / "ingest").resolve(), cache)
    syn = load_pool(pool, test.classes, channels=test.images.shape[1])
    res = score_set(syn.images, syn.labels, test, ex, test_feats)
    return {
        "n_pool": len(syn.labels),
        "FD_cnn0": res["all"]["FD_cnn0"],
        "FD_cnn1": res["all"].get("FD_cnn1", float("nan")),
        "precision": res["all"]["precision"],
        "recall": res["all"]["recall"],
        "coverage": res["all"]["coverage"],
        "FD_cnn0_pneumonia": res[test.classes[-1]].get("FD_cnn0", float("nan")),
    }


def rows_of(arm: str, run: Path, cache: Path | None = None) -> list[dict]:
    out = []
    with (run / "sweep" / "configs.csv").open() as fh:
        for r in csv.DictReader(fh):
            fdir = run / "sweep" / f"f{float(r['fraction']):g}"
            unit = fdir / "evaluate" / r["class_mix"] / r["pool"]
            memo = json.loads((unit / "memorization.json").read_text())[r["pool"]]
            stage = json.loads((fdir / "train" / ".stage.json").read_text())
            extra = fixed_space(run, fdir / "generate" / r["pool"], cache) if cache else {}
            out.append(
                dict(
                    r,
                    arm=arm,
                    train_s=stage["seconds"],
                    snapshot_kb=_snapshot_kb(fdir / "train"),
                    memorized=memo["share_flagged"],
                    holdout_flag_rate=memo["holdout_flag_rate"],
                    **extra,
                )
            )
    return out


def main() -> None:
    args = sys.argv[1:]
    cache = None
    if "--extractors" in args:
        i = args.index("--extractors")
        cache = Path(args[i + 1])
        del args[i : i + 2]
    rows = [r for a in args for r in rows_of(a.split("=", 1)[0], Path(a.split("=", 1)[1]), cache)]
    print(
        "| fraction | arm | train s | snapshot KB | FD_clf | precision | recall | MS-SSIM ratio "
        "| memorized (held-out rate) | AUC vs dup control [95 % CI] | Holm p | MDE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows.sort(key=lambda r: (float(r["fraction"]), r["arm"]))
    for r in rows:
        f = {k: float(v) for k, v in r.items() if _num(v)}
        print(
            f"| {f['fraction']:.0%} | {r['arm']} | {f['train_s']:.0f} | {f['snapshot_kb']:,.0f} "
            f"| {f['FD_clf']:.2f} | {f['precision_clf']:.3f} | {f['recall_clf']:.3f} "
            f"| {f['msssim_ratio']:.3f} | {f['memorized']:.1%} ({f['holdout_flag_rate']:.1%}) "
            f"| {f['auc_vs_dup']:+.3f} [{f['auc_vs_dup_ci_low']:+.3f}, "
            f"{f['auc_vs_dup_ci_high']:+.3f}] | {f['auc_vs_dup_p_holm']:.3f} "
            f"| {f['auc_vs_dup_mde']:.3f} |"
        )
    if cache:
        head = "| fraction | arm | n | FD_cnn0 | FD_cnn1 | precision | recall | coverage "
        print("\n" + head + "| pneumonia FD_cnn0 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {float(r['fraction']):.0%} | {r['arm']} | {r['n_pool']} "
                f"| {r['FD_cnn0']:.2f} | {r['FD_cnn1']:.2f} | {r['precision']:.3f} "
                f"| {r['recall']:.3f} | {r['coverage']:.3f} | {r['FD_cnn0_pneumonia']:.2f} |"
            )


def _num(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    main()
