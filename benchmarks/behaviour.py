"""Record what the workflow does, and compare two records: a refactoring changes neither.

``record OUT`` writes, under ``OUT``:

- ``dryrun/<scenario>_jobs.tsv``: every job ``snakemake -n`` plans (rule, wildcards,
  inputs, outputs, log, benchmark; sorted), for the demo config, each preset
  ``config/presets/s0..s4.yaml`` on small fixture datasets with the real
  formats' names and layouts, and one config with twins, shortcut controls,
  ensembles, frozen/HOG encoders and a cross-dataset pair;
- ``dryrun/<scenario>_files.txt``: the sorted files those jobs would create;
- ``run/``: the tables of one small real run (``manifest.parquet``,
  ``rois.parquet``, ``folds.csv``, ``metrics.csv``, ``comparison.csv``)
  (skipped with ``--dry-only``).

``compare A B`` exits 1 and lists every difference between two records.

Run it against another checkout with ``--repo`` (and that checkout's ``src``
first on ``PYTHONPATH``), e.g. the commit before a refactoring::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before/src python benchmarks/behaviour.py record \
        --repo /tmp/before /tmp/behaviour-before
    PYTHONPATH=src python benchmarks/behaviour.py record /tmp/behaviour-after
    python benchmarks/behaviour.py compare /tmp/behaviour-before /tmp/behaviour-after
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TABLES = ["manifest.parquet", "rois.parquet", "folds.csv", "metrics.csv", "comparison.csv"]
JOB_KEYS = ["input", "output", "log", "benchmark"]


# ------------------------------------------------------------------ fixtures


def _image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def make_allidb1(root: Path) -> None:
    """ALL-IDB1: ``ImNNN_L.jpg`` fields with ``.xyc`` blast centres."""
    for i, name in enumerate(["Im001_1", "Im002_1", "Im003_0", "Im004_0"]):
        _image(root / f"{name}.jpg", 48, 64, i)
        (root / f"{name}.xyc").write_text("10 20\n" if name.endswith("1") else "\n")


def make_allidb2(root: Path) -> None:
    """ALL-IDB2: ``ImNNN_L.tif`` single-cell crops."""
    for i, name in enumerate(["Im001_1", "Im002_1", "Im003_0", "Im004_0"]):
        _image(root / "img" / f"{name}.tif", 40, 40, i)


def make_cnmc(root: Path) -> None:
    """C-NMC: ``fold_N/{all,hem}/UID_<patient>_<n>_<n>_<all|hem>.bmp``."""
    files = ["fold_0/all/UID_11_1_1_all.bmp", "fold_0/hem/UID_H10_1_1_hem.bmp",
             "fold_1/all/UID_12_2_1_all.bmp", "fold_1/hem/UID_H11_2_1_hem.bmp"]  # fmt: skip
    for i, rel in enumerate(files):
        _image(root / rel, 30, 30, i)


FIXTURES = {"allidb1": make_allidb1, "allidb2": make_allidb2, "cnmc": make_cnmc}
DEMO = {"format": "demo", "root": "demo"}
#: scenario -> (preset or None, user config); every dataset listed is built as a fixture
SCENARIOS: dict[str, tuple[str | None, dict]] = {
    "demo": (None, {}),  # config/config.yaml as it is
    **{
        f"s{i}": (f"s{i}", {"results_dir": "out", "datasets": {"mine": DEMO, **extra}})
        for i, extra in enumerate(
            [
                {"idb1": {"format": "allidb1", "root": "fx/idb1"}},
                {"idb2": {"format": "allidb2", "root": "fx/idb2"}},
                {"idb2": {"format": "allidb2", "root": "fx/idb2"}},
                {"cnmc": {"format": "cnmc", "root": "fx/cnmc"}},
                {"cnmc": {"format": "cnmc", "root": "fx/cnmc"}},
            ]
        )
    },
    "kinds": (
        None,
        {
            "results_dir": "out",
            "datasets": {"mine": DEMO, "cnmc": {"format": "cnmc", "root": "fx/cnmc"}},
            "folds": {"k": 3, "twin": True},
            "encoders": {
                "small": {"arch": "small_cnn"},
                "shared": {"arch": "resnet18", "training": "all_labels"},
                "frozen": {"arch": "resnet18", "training": "frozen"},
                "hog": {"arch": "hog", "training": "frozen"},
            },
            "classifiers": {"knn": {}, "cnn_softmax": {}},
            "evaluation": {
                "shortcut_controls": True,
                "ensembles": {
                    "soft2": {"members": ["small/knn", "small/cnn_softmax"]},
                    "maj3": {
                        "members": ["hog/knn", "shared/cnn_softmax", "frozen/knn"],
                        "vote": "majority",
                    },
                },
                "cross_dataset": [
                    {"train": "mine", "test": "cnmc"},
                    {"train": "cnmc_random", "test": "mine"},
                ],
            },
        },
    ),
}
#: the small real run: twin, per-fold and frozen HOG encoders, head, ensemble, a paper figure
RUN_CONFIG = {
    "results_dir": "out",
    "datasets": {
        "demo": {
            "format": "demo",
            "root": "demo",
            "n_fields": 12,
            "seed": 3,
            "fields_per_patient": 2,
        }
    },
    "segmentation": {"roi_size_px": 32},
    "folds": {"k": 3, "twin": True},
    "encoders": {
        "small": {"arch": "small_cnn", "epochs": 1, "batch_size": 16},
        "hog": {"arch": "hog", "training": "frozen"},
    },
    "classifiers": {"knn": {"n_neighbors": 3}, "cnn_softmax": {}},
    "evaluation": {
        "n_boot": 100,
        "ensembles": {"both": {"members": ["small/knn", "small/cnn_softmax"]}},
        "published": [{"method": "toy", "value": 0.9, "encoder": "small", "classifier": "knn"}],
    },
}


def build_fixtures(work: Path, config: dict) -> None:
    for spec in config.get("datasets", {}).values():
        if spec["format"] in FIXTURES and not Path(work / spec["root"]).exists():
            FIXTURES[spec["format"]](work / spec["root"])


# ------------------------------------------------------------------ dry runs


def snakemake(repo: Path, work: Path, *args: str, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile")]
    cmd += ["--cores", "2", *args]
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} in {work} failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        )
    return run.stdout + run.stderr


def parse_jobs(text: str, work: Path) -> pd.DataFrame:
    """One row per job of ``snakemake -n`` output: rule, wildcards and file lists."""
    jobs, job = [], None
    for line in text.replace(str(work), "<work>").splitlines():
        head = re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\S+):", line.strip())
        if head and not line.startswith(" "):
            job = {"rule": head[1], "wildcards": "", **dict.fromkeys(JOB_KEYS, "")}
            jobs.append(job)
            continue
        item = re.fullmatch(r"\s+(\w+): (.*)", line)
        if job is None or not item or not line.startswith(" "):
            if not line.startswith(" "):
                job = None
            continue
        key, value = item[1], item[2]
        if key == "wildcards":
            job["wildcards"] = ", ".join(sorted(value.split(", ")))
        elif key in JOB_KEYS:
            job[key] = " ".join(sorted(value.split(", ")))
    table = pd.DataFrame(jobs, columns=["rule", "wildcards", *JOB_KEYS])
    return table.sort_values(["rule", "wildcards", "output"]).reset_index(drop=True)


def record_dry_runs(repo: Path, out: Path, tmp: Path) -> None:
    (out / "dryrun").mkdir(parents=True, exist_ok=True)
    for name, (preset, user) in SCENARIOS.items():
        work = tmp / name
        work.mkdir()
        if preset is None and not user:
            shutil.copy(repo / "config" / "config.yaml", work / "my.yaml")
            args = ["--configfile", "my.yaml"]
        else:
            (work / "my.yaml").write_text(yaml.safe_dump(user))
            build_fixtures(work, user)
            presets = [str(repo / "config" / "presets" / f"{preset}.yaml")] if preset else []
            args = ["--configfile", *presets, "my.yaml"]
        jobs = parse_jobs(snakemake(repo, work, "-n", *args), work)
        jobs.to_csv(out / "dryrun" / f"{name}_jobs.tsv", sep="\t", index=False)
        files = sorted({f for cell in jobs["output"] for f in cell.split()} - {""})
        logs = sorted({f for col in ("log", "benchmark") for c in jobs[col] for f in c.split()})
        (out / "dryrun" / f"{name}_files.txt").write_text("\n".join([*files, *logs]) + "\n")
        print(f"{name}: {len(jobs)} jobs, {len(files)} outputs")


def record_run(repo: Path, out: Path, tmp: Path) -> None:
    work = tmp / "run"
    work.mkdir()
    (work / "my.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    snakemake(repo, work, "--configfile", "my.yaml", timeout=1800)
    (out / "run").mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        if (work / "out" / table).exists():
            shutil.copy(work / "out" / table, out / "run" / table)
    print(f"run: {sorted(p.name for p in (out / 'run').iterdir())}")


# ------------------------------------------------------------------ compare


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", keep_default_na=False)


def compare(a: Path, b: Path) -> list[str]:
    """Every difference between two records (empty: the same behaviour)."""
    names_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    names_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    problems = [f"only in {a}: {n}" for n in sorted(names_a - names_b)]
    problems += [f"only in {b}: {n}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        pa, pb = a / name, b / name
        if pa.suffix == ".txt":
            la, lb = set(pa.read_text().splitlines()), set(pb.read_text().splitlines())
            problems += [f"{name}: only in {a}: {x}" for x in sorted(la - lb)]
            problems += [f"{name}: only in {b}: {x}" for x in sorted(lb - la)]
            continue
        ta, tb = _read(pa), _read(pb)
        if name.endswith("_jobs.tsv"):
            ka = set(map(tuple, ta.astype(str).values))
            kb = set(map(tuple, tb.astype(str).values))
            problems += [f"{name}: job only in {a}: {x}" for x in sorted(ka - kb)]
            problems += [f"{name}: job only in {b}: {x}" for x in sorted(kb - ka)]
            continue
        try:
            pd.testing.assert_frame_equal(ta, tb, check_exact=True)
        except AssertionError as err:
            problems.append(f"{name}: {err}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record dry runs and one small run")
    rec.add_argument("out", type=Path)
    rec.add_argument("--repo", type=Path, default=REPO, help="checkout whose Snakefile runs")
    rec.add_argument("--dry-only", action="store_true", help="skip the small real run")
    cmp = sub.add_parser("compare", help="list differences; exit 1 if any")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "compare":
        problems = compare(args.a, args.b)
        for p in problems:
            print(p)
        print(f"{len(problems)} differences")
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="behaviour-") as tmp:
        record_dry_runs(args.repo.resolve(), args.out, Path(tmp))
        if not args.dry_only:
            record_run(args.repo.resolve(), args.out, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
