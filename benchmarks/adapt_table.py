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
import json
import sys
from pathlib import Path


def _snapshot_kb(train: Path) -> float:
    snaps = sorted(train.glob("snapshot-*"))
    return sum(f.stat().st_size for f in snaps[-1].iterdir()) / 1024 if snaps else float("nan")


def rows_of(arm: str, run: Path) -> list[dict]:
    out = []
    with (run / "sweep" / "configs.csv").open() as fh:
        for r in csv.DictReader(fh):
            fdir = run / "sweep" / f"f{float(r['fraction']):g}"
            unit = fdir / "evaluate" / r["class_mix"] / r["pool"]
            memo = json.loads((unit / "memorization.json").read_text())[r["pool"]]
            stage = json.loads((fdir / "train" / ".stage.json").read_text())
            out.append(
                dict(
                    r,
                    arm=arm,
                    train_s=stage["seconds"],
                    snapshot_kb=_snapshot_kb(fdir / "train"),
                    memorized=memo["share_flagged"],
                    holdout_flag_rate=memo["holdout_flag_rate"],
                )
            )
    return out


def main() -> None:
    rows = [r for a in sys.argv[1:] for r in rows_of(*a.split("=", 1))]
    print(
        "| fraction | arm | train s | snapshot KB | FD_clf | precision | recall | MS-SSIM ratio "
        "| memorized (held-out rate) | AUC vs dup control [95 % CI] | Holm p | MDE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (float(r["fraction"]), r["arm"])):
        f = {k: float(v) for k, v in r.items() if _num(v)}
        print(
            f"| {f['fraction']:.0%} | {r['arm']} | {f['train_s']:.0f} | {f['snapshot_kb']:,.0f} "
            f"| {f['FD_clf']:.2f} | {f['precision_clf']:.3f} | {f['recall_clf']:.3f} "
            f"| {f['msssim_ratio']:.3f} | {f['memorized']:.1%} ({f['holdout_flag_rate']:.1%}) "
            f"| {f['auc_vs_dup']:+.3f} [{f['auc_vs_dup_ci_low']:+.3f}, "
            f"{f['auc_vs_dup_ci_high']:+.3f}] | {f['auc_vs_dup_p_holm']:.3f} "
            f"| {f['auc_vs_dup_mde']:.3f} |"
        )


def _num(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    main()
