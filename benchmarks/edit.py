"""Editing real RSNA radiographs: counterfactual validity, preservation and realism (issue 14).

Small mode (default, about 3 min on one CPU thread): ingest the 400 RSNA images at 32 px, train
a tiny class-conditional model for ``--steps`` steps, train the real-only classifier (small
CNN), then through the real edit pipeline (``edit_from_protocol``, DICOM written and read back)
make two counterfactual pools of ``--sources`` training images:

- ``inpaint``: RePaint inside the challenge's boxes (positives: opacity removed; normals: a
  box borrowed from a positive, opacity inserted);
- ``vary``: SDEdit at strength ``--strength`` to the other class.

Prints, per pool: counterfactual validity (share the real-only classifier assigns to the target
class at the balanced-accuracy threshold chosen on validation, beside the share of the *unedited*
sources it already assigns there, and how far the edit raised P(target)), SSIM / PSNR to the
source outside the mask (whole image for SDEdit), FD_clf of the edits vs real train images of
the target class (beside the unedited sources' FD_clf to the same set), and writes a grid.

    OMP_NUM_THREADS=1 python benchmarks/edit.py [--size 32] [--steps 300] [--sources 32]
        [--grid docs/edit_grid.png] [--workdir /tmp/medsynth-edit-bench]
    python benchmarks/edit.py --run RUN [--grid PNG]   # the same figures for the edits of a
                                                       # protocols/rsna_edit.yaml run
    python benchmarks/edit.py --appa RUN   # AP vs PA test AUC per arm of an evaluated run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medsynth.data.datasets import load_split  # noqa: E402
from medsynth.data.ingest import ingest_dataset  # noqa: E402
from medsynth.evaluation.classifier import ClassifierConfig  # noqa: E402
from medsynth.evaluation.fidelity import fd  # noqa: E402
from medsynth.evaluation.grouped import fit_seeds  # noqa: E402
from medsynth.generation.api import edit_from_protocol  # noqa: E402
from medsynth.generation.dataset import load_pool  # noqa: E402
from medsynth.protocol import load_protocol  # noqa: E402
from medsynth.training.api import train_from_sections  # noqa: E402


def ssim_map(a: torch.Tensor, b: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Per-pixel SSIM of ``(N, 1, H, W)`` images in [0, 1] (uniform ``win`` window, as
    scikit-image's default; reflect padding so the map keeps the image size)."""
    c1, c2 = 0.01**2, 0.03**2
    pad = win // 2

    def mean(x):
        return F.avg_pool2d(F.pad(x, (pad,) * 4, mode="reflect"), win, stride=1)

    ma, mb = mean(a), mean(b)
    va, vb, cov = mean(a * a) - ma**2, mean(b * b) - mb**2, mean(a * b) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


def preservation(
    edit: torch.Tensor, src: torch.Tensor, keep: torch.Tensor, win: int = 7
) -> tuple[float, float, float]:
    """(mean SSIM over the ``keep`` pixels, mean SSIM over the keep pixels whose whole
    ``win`` x ``win`` window is kept, PSNR in dB over the keep pixels); images in [-1, 1].

    SSIM is a windowed statistic: next to the mask a kept pixel's window reaches into the
    edited region, so the first figure is below 1 even where every kept pixel is unchanged."""
    e, s = (edit + 1) / 2, (src + 1) / 2
    sm = ssim_map(e, s, win)
    edited = (~keep).float()
    far = ~F.max_pool2d(edited, win, stride=1, padding=win // 2).bool()
    mse = float(((e - s) ** 2)[keep].mean())
    return (
        float(sm[keep].mean()),
        float(sm[far].mean()),
        10 * np.log10(1.0 / mse) if mse > 0 else float("inf"),
    )


def small(args) -> None:
    t0 = time.perf_counter()
    run = Path(args.workdir)
    run.mkdir(parents=True, exist_ok=True)
    proto = load_protocol(
        REPO / "protocols/rsna_edit.yaml",
        [
            f"dataset.spatial_size={args.size}",
            "dataset.workers=1",
            "model.channels=[32,64]",
            "model.attention_levels=[false,true]",
            f"training.max_steps={args.steps}",
            f"training.checkpoint_every_steps={args.steps}",
            "training.warmup_steps=20",
            "training.precision=fp32",
            f"edit.max_sources={args.sources}",
            f"edit.steps={args.edit_steps}",
            f"edit.inpaint.jump_length={args.jump_length}",
            f"edit.inpaint.resamplings={args.resamplings}",
            f"edit.vary.strength={args.strength}",
        ],
    )
    if not (run / "ingest" / "index.csv").exists():
        ingest_dataset(proto.dataset, run)
    t_ingest = time.perf_counter() - t0
    if not list((run / "train").glob("snapshot-*")):
        train_from_sections(
            run / "ingest",
            run / "train",
            proto.model,
            proto.schedule,
            proto.training,
            progress=False,
        )
    t_train = time.perf_counter() - t0 - t_ingest
    edit_seconds = {}
    for kind in ("inpaint", "vary"):
        te = time.perf_counter()
        edit_from_protocol(proto, run, kind, progress=False)
        edit_seconds[kind] = round(time.perf_counter() - te, 1)
    out = measure(proto, run, edit_seconds, args.grid)
    out["conditions"] = _conditions(args, proto, out.pop("n_train"), out.pop("auc"))
    out["seconds"] = {
        "ingest": round(t_ingest, 1),
        "train": round(t_train, 1),
        "total": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2, default=float))


def balanced_threshold(y: np.ndarray, p1: np.ndarray) -> float:
    """The P(class 1) threshold with the highest balanced accuracy on ``(y, p1)`` (validation):
    a small CNN stopped early is often far from calibrated, so 0.5 can put every image in one
    class while its AUC is fine."""
    cands = np.unique(p1)
    bal = [((p1[y == 1] >= t).mean() + (p1[y == 0] < t).mean()) / 2 for t in cands]
    return float(cands[int(np.argmax(bal))])


def measure(proto, run: Path, edit_seconds: dict | None = None, grid_path=None) -> dict:
    """Validity, preservation and realism of the ``inpaint`` and ``vary`` pools of ``run``
    (a run folder of ``proto`` whose edits exist), judged by a real-only small CNN trained on
    the run's train split; then the canary scan and, with ``grid_path``, the grid."""
    t0 = time.perf_counter()
    real = load_split(run / "ingest", "train")
    val, test = load_split(run / "ingest", "val"), load_split(run / "ingest", "test")
    cfg = ClassifierConfig(kind="small_cnn", epochs=15, batch_size=32, precision="fp32")
    clf = fit_seeds(2, 1, cfg, [0], real.images, real.labels, val.images, val.labels)[0]
    from medsynth.evaluation.stats import metrics

    auc = metrics(test.labels.numpy(), clf.predict_proba(test.images), real.classes)["auc"]
    thr = balanced_threshold(val.labels.numpy(), clf.predict_proba(val.images)[:, 1])
    out = {
        "n_train": len(real.labels),
        "auc": auc,
        "threshold_from_validation": thr,
        "classifier_seconds": round(time.perf_counter() - t0, 1),
    }
    cache = torch.from_numpy(np.load(run / "ingest" / "images.npy")).float()  # stored as fp16
    real_feats = clf.features(real.images)
    grid = {}
    for kind in ("inpaint", "vary"):
        sub = getattr(proto.edit, kind)
        pool = load_pool(run / "generate" / sub.pool, real.classes, channels=1)
        rows = pool.rows
        src = cache[[int(r["source_row"]) for r in rows]]
        target = pool.labels
        if kind == "inpaint":
            from PIL import Image

            masks = torch.stack(
                [
                    torch.from_numpy(
                        np.asarray(Image.open(run / "generate" / sub.pool / r["mask_path"])) > 0
                    )
                    for r in rows
                ]
            )[:, None]
        else:
            masks = torch.zeros_like(src, dtype=torch.bool)
        pe1, ps1 = clf.predict_proba(pool.images)[:, 1], clf.predict_proba(src)[:, 1]
        tgt = target.numpy()
        # Assigned to the target class on the validation-calibrated side of the threshold.
        hit_edit, hit_src = (pe1 >= thr) == (tgt == 1), (ps1 >= thr) == (tgt == 1)
        shift = np.where(tgt == 1, pe1 - ps1, ps1 - pe1)  # rise of P(target) by the edit
        ssim, ssim_far, psnr = preservation(pool.images, src, ~masks)
        res = {
            "n_edits": len(rows),
            "edit_seconds": (edit_seconds or {}).get(kind),
            "validity": float(hit_edit.mean()),
            "validity_unedited_sources": float(hit_src.mean()),
            "p_target_rise_mean": float(shift.mean()),
            "share_p_target_rose": float((shift > 0).mean()),
            "ssim_outside_mask": ssim,
            "ssim_outside_mask_window_clear": ssim_far,
            "psnr_outside_mask_db": psnr,
            "mask_share_of_image": float(masks.float().mean()),
        }
        fe, fs = clf.features(pool.images), clf.features(src)
        for c, name in enumerate(real.classes):
            sel = (target == c).numpy()
            ref = real_feats[(real.labels == c).numpy()]
            if sel.sum() >= 2:
                res[f"validity_to_{name}"] = float(hit_edit[sel].mean())
                res[f"validity_unedited_to_{name}"] = float(hit_src[sel].mean())
                res[f"FD_clf_edits_vs_real_class_{name}"] = fd(ref, fe[sel])
                res[f"FD_clf_sources_vs_real_class_{name}"] = fd(ref, fs[sel])
                res[f"n_target_{name}"] = int(sel.sum())
        if kind == "inpaint":
            inside = masks.expand_as(src)
            res["mean_abs_change_inside_mask"] = float((pool.images - src).abs()[inside].mean())
        out[kind] = res
        grid[kind] = (src, pool.images, masks, rows)
    out["canary_hits"] = canary_scan(run, Path(proto.dataset.root))
    if grid_path:
        _grid(grid, Path(grid_path), real.classes)
        print(f"grid: {grid_path}")
    return out


def _conditions(args, proto, n_train: int, auc: float) -> dict:
    return {
        "data": f"RSNA 400 images, {args.size} px, train split {n_train} images",
        "model": f"UNet {proto.model.channels}, {args.steps} steps batch {proto.training.batch_size}",
        "edit": f"steps {args.edit_steps}, guidance {proto.edit.guidance_scale:g}, RePaint "
        f"j={args.jump_length} r={args.resamplings}, SDEdit s={args.strength}",
        "classifier": f"small_cnn 15 epochs, real-only test AUC {auc:.3f}",
        "machine": f"{platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}",
    }


def _grid(grid: dict, path: Path, classes: list[str], n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src_i, ed_i, m_i, rows_i = grid["inpaint"]
    _, ed_v, _, rows_v = grid["vary"]
    by_row_v = {r["source_row"]: k for k, r in enumerate(rows_v)}
    both = [k for k, r in enumerate(rows_i) if r["source_row"] in by_row_v]
    # Half from each source class: a finding removed, and one inserted in a borrowed box.
    picks = [
        k for c in classes for k in [k for k in both if rows_i[k]["source_class"] == c][: n // 2]
    ]
    cols = ["source", "mask", "inpainted", "|diff|", "SDEdit"]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(1.6 * len(cols), 1.7 * len(picks)))
    for i, k in enumerate(picks):
        r = rows_i[k]
        v = by_row_v[r["source_row"]]
        s = src_i[k, 0].numpy()
        panels = [
            (s, f"source: {r['source_class']}"),
            (m_i[k, 0].float().numpy() * 2 - 1, r["mask"].split(":")[1]),
            (ed_i[k, 0].numpy(), f"to {r['class_name']}"),
            (np.abs(ed_i[k, 0].numpy() - s) * 2 - 1, "inpaint change"),
            (ed_v[v, 0].numpy(), f"to {rows_v[v]['class_name']}"),
        ]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("RSNA edits (classes: 0 = no opacity, 1 = opacity)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def canary_scan(run: Path, source_root: Path) -> int:
    """Identifying header values (>= 6 characters) of every source file found in any file of
    ``run/generate``; prints and returns the number of hits (0 = nothing leaked)."""
    from medsynth.dicom.read import read_header

    values = set()
    for f in sorted(source_root.rglob("*.dcm")):
        h = read_header(f, IDENTIFYING)
        values |= {h[k].encode() for k in IDENTIFYING if len(h.get(k, "")) >= 6}
    hits = []
    for f in (run / "generate").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {v!r}" for v in values if v in data]
    print(f"canary scan: {len(values)} identifying values of {source_root}, {len(hits)} hits")
    for h in hits[:10]:
        print("  ", h)
    return len(hits)


def appa(run: Path) -> None:
    """Within-view AUC per arm of an evaluated run (``evaluate/views.json``): AUC on AP and on
    PA test images, the AP - PA gap, and the gap's change vs the arm's count-matched duplicate
    control with its paired bootstrap 95 % CI (negative = narrower)."""
    rep = json.loads((run / "evaluate" / "views.json").read_text())
    a, b = rep["views"][:2]
    print(f"{'arm':<58}{'AUC ' + a:>8}{'AUC ' + b:>8}{'gap':>8}   gap change vs control [95 % CI]")
    for arm, rec in rep["arms"].items():
        g = rec["gap"].get("vs_dup")
        change = f"{g['diff']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" if g else "-"
        print(
            f"{arm:<58}{rec['views'][a]['auc_mean']:>8.3f}{rec['views'][b]['auc_mean']:>8.3f}"
            f"{rec['gap']['mean']:>+8.3f}   {change}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300, help="diffusion training steps")
    ap.add_argument("--sources", type=int, default=32, help="training images edited per pool")
    ap.add_argument("--edit-steps", type=int, default=25)
    ap.add_argument("--jump-length", type=int, default=5)
    ap.add_argument("--resamplings", type=int, default=3)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--workdir", default="/tmp/medsynth-edit-bench")
    ap.add_argument("--grid", default=None, help="write a PNG grid of edits here")
    ap.add_argument("--appa", type=Path, default=None, help="evaluated run folder: AP/PA AUCs")
    ap.add_argument(
        "--run", type=Path, default=None, help="measure the edits of a protocols/rsna_edit.yaml run"
    )
    ap.add_argument("--scan", action="store_true", help="only the canary scan of --workdir")
    args = ap.parse_args()
    if args.appa:
        appa(args.appa)
    elif args.run:
        proto = load_protocol(REPO / "protocols/rsna_edit.yaml")
        print(json.dumps(measure(proto, args.run, grid_path=args.grid), indent=2, default=float))
    elif args.scan:
        proto = load_protocol(REPO / "protocols/rsna_edit.yaml")
        canary_scan(Path(args.workdir), Path(proto.dataset.root))
    else:
        small(args)


if __name__ == "__main__":
    main()
