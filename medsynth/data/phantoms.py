"""Embedded demo data: chest-radiograph-like phantoms with a class-defining finding.

Each image has a body outline, two lungs with a domed diaphragm, heart, spine, clavicles, ribs,
low-frequency shading and noise, all with per-patient anatomical variation. Findings:

- ``opacity``: one or two soft Gaussian opacities inside a lung (size/position/contrast vary);
- ``cardiomegaly``: an enlarged heart; ``effusion``: a fluid level at a lung base;
- ``nodule``: a small sharp round density.

``difficulty`` in [0, 1] scales findings down and noise up: at 0 a finding is obvious, at 1 it
is invisible. The default 0.6 leaves a small classifier trained on ~100 images clearly imperfect.
Headers carry fake ``CANARY`` identifiers so leak tests can look for them in every output.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("normal", "opacity", "cardiomegaly", "effusion", "nodule")
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Anatomy:
    """Drawn once per patient (TorchIO rule: draw, then apply deterministically)."""

    body_rx: float
    body_ry: float
    lung_rx: float
    lung_ry: float
    lung_dx: float
    lung_dy: float
    heart_r: float
    rib_gap: float
    tilt: float
    brightness: float


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_rx=rng.uniform(0.78, 0.92),
        body_ry=rng.uniform(0.9, 1.0),
        lung_rx=rng.uniform(0.24, 0.31),
        lung_ry=rng.uniform(0.48, 0.6),
        lung_dx=rng.uniform(0.34, 0.42),
        lung_dy=rng.uniform(-0.12, 0.0),
        heart_r=rng.uniform(0.19, 0.24),
        rib_gap=rng.uniform(0.13, 0.17),
        tilt=rng.uniform(-0.06, 0.06),
        brightness=rng.uniform(0.9, 1.1),
    )


def _smooth_field(rng: np.random.Generator, size: int, scale: int = 4) -> np.ndarray:
    """Low-frequency shading in about [-1, 1]: a coarse grid upsampled bilinearly."""
    coarse = rng.standard_normal((scale + 1, scale + 1))
    idx = np.linspace(0, scale, size)
    i0 = np.minimum(idx.astype(int), scale - 1)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def render(
    anatomy: Anatomy, finding: str, difficulty: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One phantom radiograph ``(size, size) float32 in [0, 1]``, bright = dense."""
    s = 1.0 - difficulty  # finding strength
    ax = np.linspace(-1, 1, size)
    x, y = np.meshgrid(ax, ax)
    # Small rotation of the whole patient.
    c, t = np.cos(anatomy.tilt), np.sin(anatomy.tilt)
    x, y = c * x - t * y, t * x + c * y

    def ellipse(cx, cy, rx, ry, edge=0.04):
        d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        return np.clip((1 - d) / edge, 0, 1)

    img = 0.04 + 0.45 * ellipse(0, 0.05, anatomy.body_rx, anatomy.body_ry, 0.2)
    img += 0.22 * np.exp(-(x**2) / 0.006) * (y > -0.8)  # spine
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        lung = ellipse(side * anatomy.lung_dx, anatomy.lung_dy, anatomy.lung_rx, anatomy.lung_ry)
        lung *= (
            y < anatomy.lung_dy + anatomy.lung_ry * 0.55 + 1.2 * (x - side * anatomy.lung_dx) ** 2
        )
        lungs = np.maximum(lungs, lung)
    img -= 0.3 * lungs
    # Ribs: bright arcs over the lungs.
    for k in range(9):
        y0 = -0.62 + k * anatomy.rib_gap
        arc = y0 + 0.6 * (np.abs(x) - 0.15) ** 2
        img += 0.09 * np.exp(-((y - arc) ** 2) / 0.0009) * (np.abs(x) > 0.08) * (lungs > 0)
    img += (
        0.12
        * np.exp(-((y + 0.72 + 0.3 * (np.abs(x) - 0.4) ** 2) ** 2) / 0.002)
        * (np.abs(x) < 0.75)
    )
    heart_r = anatomy.heart_r
    if finding == "cardiomegaly":
        heart_r *= 1.0 + 0.45 * s * rng.uniform(0.7, 1.0)
    img += 0.2 * ellipse(0.1, 0.22, heart_r * 1.35, heart_r * 1.1, 0.35)
    if finding == "opacity":
        for _ in range(rng.integers(1, 3)):
            side = rng.choice([-1, 1])
            cx = side * anatomy.lung_dx + rng.uniform(-0.12, 0.12)
            cy = anatomy.lung_dy + rng.uniform(-0.3, 0.35)
            sigma = rng.uniform(0.07, 0.16)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
            img += 0.28 * s * rng.uniform(0.6, 1.4) * blob * (0.3 + 0.7 * lungs)
    elif finding == "effusion":
        side = rng.choice([-1, 1])
        level = anatomy.lung_dy + anatomy.lung_ry * (0.75 - 0.55 * s * rng.uniform(0.6, 1.0))
        fluid = (y > level - 0.05 * np.abs(x - side * anatomy.lung_dx)) * (side * x > 0.1)
        img += 0.3 * fluid * lungs
    elif finding == "nodule":
        side = rng.choice([-1, 1])
        cx = side * anatomy.lung_dx + rng.uniform(-0.1, 0.1)
        cy = anatomy.lung_dy + rng.uniform(-0.3, 0.3)
        img += 0.35 * s * ellipse(cx, cy, 0.045, 0.045, 0.3)
    img = img * anatomy.brightness + 0.05 * _smooth_field(rng, size)
    img += (0.015 + 0.05 * difficulty) * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write_phantoms(
    out_dir: str | Path,
    *,
    n_patients: int = 160,
    num_classes: int = 2,
    size_px: int = 128,
    difficulty: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write a labeled phantom DICOM dataset; returns the path of its ``labels.csv``.

    Layout mimics an export: ``<PatientID>/<study>/IMxxxxx`` (some files without extension).
    ``labels.csv`` columns: accession, patient, finding — keyed by AccessionNumber on purpose,
    so the quickstart shows a join on a non-UID attribute. Classes are imbalanced: ~60 % normal.
    Pixels are 12-bit in 16; every fifth patient's images are stored as MONOCHROME1.
    """
    from medsynth.dicom.write import build_instance, deterministic_uid, write_instance

    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be 2..{len(CLASS_NAMES)}, got {num_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = CLASS_NAMES[:num_classes]
    prior = np.array([0.6] + [0.4 / (num_classes - 1)] * (num_classes - 1))
    rows = []
    for p in range(n_patients):
        anatomy = draw_anatomy(rng)
        finding = classes[rng.choice(num_classes, p=prior)]
        pid = f"PH{seed:02d}{p:05d}"
        n_studies = 2 if rng.random() < 0.25 else 1
        monochrome1 = p % 5 == 4
        for s in range(n_studies):
            unit = render(anatomy, finding, difficulty, size_px, rng)
            stored = np.round(unit * 4095).astype(np.uint16)
            if monochrome1:
                stored = 4095 - stored
            study_uid = deterministic_uid("phantom", seed, pid, s, "study")
            accession = f"CAN{seed:02d}{p:05d}{s}"
            attrs = {
                "SpecificCharacterSet": "ISO_IR 100",
                "Modality": "CR",
                "StudyDate": f"2024{1 + (p % 12):02d}{1 + (s * 7 + p) % 28:02d}",
                "StudyTime": "101500",
                "AccessionNumber": accession,
                "InstitutionName": f"CANARY INSTITUTE {p % 7}",
                "ReferringPhysicianName": f"CANARY^REFERRER^{p % 11}",
                "StudyDescription": "CHEST PA",
                "PatientName": f"CANARY^PHANTOM^{pid}",
                "PatientID": pid,
                "PatientBirthDate": f"19{40 + p % 60:02d}0{1 + p % 9}1{p % 9}",
                "PatientSex": "FM"[p % 2],
                "BodyPartExamined": "CHEST",
                "ViewPosition": "PA",
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": deterministic_uid("phantom", seed, pid, s, "series"),
                "StudyID": str(s + 1),
                "SeriesNumber": 1,
                "InstanceNumber": 1,
                "RescaleIntercept": 0,
                "RescaleSlope": 1,
                "WindowCenter": 2048,
                "WindowWidth": 4096,
            }
            sop = deterministic_uid("phantom", seed, pid, s, "image")
            ds = build_instance(
                stored,
                attrs,
                sop_class_uid=CR_STORAGE,
                sop_instance_uid=sop,
                photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                bits_stored=12,
            )
            name = f"IM{s + 1:05d}" + (".dcm" if p % 2 else "")
            write_instance(out / pid / f"ST{s + 1}" / name, ds)
            rows.append({"accession": accession, "patient": pid, "finding": finding})
    labels = out / LABELS_FILE
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["accession", "patient", "finding"])
        w.writeheader()
        w.writerows(rows)
    return labels
