"""Inter-rater agreement and disagreements among reviewers.

A rating is a reviewer's decision, with an accept under a corrected label counted as its own
category (``accept→opacity``), since accepting a sample as another class is a different call.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations


def rating(d: dict) -> str:
    """The category of one decision row."""
    if d["decision"] == "accept" and d.get("corrected_label"):
        return f"accept→{d['corrected_label']}"
    return d["decision"]


def by_sample(rows: list[dict]) -> dict[str, dict[str, str]]:
    """sample -> {reviewer: rating} from decision rows."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for d in rows:
        out[d["sample"]][d["reviewer"]] = rating(d)
    return dict(out)


def disagreements(rows: list[dict]) -> dict[str, dict[str, str]]:
    """Samples rated by at least two reviewers with at least two different ratings."""
    return {s: r for s, r in by_sample(rows).items() if len(r) > 1 and len(set(r.values())) > 1}


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's κ of two raters over the same items (NaN for no items; 1.0 if chance is 1)."""
    n = len(a)
    if n == 0 or n != len(b):
        return float("nan")
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[k] * cb[k] for k in ca) / n**2
    return 1.0 if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(items: list[list[str]]) -> float:
    """Fleiss' κ over items each rated by ≥2 raters (rater counts may differ per item)."""
    items = [it for it in items if len(it) >= 2]
    if not items:
        return float("nan")
    totals: Counter = Counter()
    p_items = []
    for it in items:
        c = Counter(it)
        totals.update(c)
        n = len(it)
        p_items.append((sum(v * v for v in c.values()) - n) / (n * (n - 1)))
    n_all = sum(totals.values())
    p_e = sum((v / n_all) ** 2 for v in totals.values())
    p_o = sum(p_items) / len(p_items)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def agreement_table(rows: list[dict]) -> dict:
    """Fleiss' κ over all multiply-rated samples and Cohen's κ for each pair of reviewers."""
    per = by_sample(rows)
    reviewers = sorted({d["reviewer"] for d in rows})
    pairs = []
    for r1, r2 in combinations(reviewers, 2):
        both = [s for s, r in per.items() if r1 in r and r2 in r]
        k = cohen_kappa([per[s][r1] for s in both], [per[s][r2] for s in both])
        pairs.append({"reviewers": f"{r1} / {r2}", "samples": len(both), "kappa": k})
    multi = [list(r.values()) for r in per.values() if len(r) > 1]
    return {"fleiss_kappa": fleiss_kappa(multi), "samples": len(multi), "pairs": pairs}
