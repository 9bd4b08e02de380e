"""Benchmark suites: fit, sample, evaluate each (method, epsilon); one JSON line per run.

``dpimages bench --suite fmnist --methods dpdm,real --epsilons 1,10 --preset cpu --out benchmarks/results/``
appends to ``benchmarks/results/fmnist.jsonl``. Every number in a line comes
from the run it describes: ``epsilon_spent`` is the run's ledger (PLD), the
accuracies and fidelity come from `dpimages.eval.evaluate`, timings and
peak memory are measured around each stage. The run directory
(``benchmarks/runs/METHOD-epsE-PRESET/``) is named in the line as
``run_dir`` so each number can be traced to its ledger.

Privacy noise comes from the OS CSPRNG, so two fits with the same seed
differ: ``--repeats R`` fits each (method, epsilon) cell R times, in run
directories ``METHOD-epsE-PRESET-r1`` ... ``-rR`` (R = 1 keeps the plain
name), and writes ONE line per cell (`combine_fits`): the mean of every
numeric metric, a sample standard deviation (ddof 1; null for one fit)
beside each accuracy and FID (``acc_cnn_sd``, ``fid_sd``, ...), ``fits``,
``run_dirs`` and ``seeds``. Repeat k (0-based) runs exactly as
``--seed SEED+k --repeats 1`` would: the spread then covers everything that
differs between two real fits (noise, initialisation, data order, sampling,
classifier training), and with ``--insecure-seeded-noise`` (tests only) the
repeats are not R copies of one fit, each is reproducible from its own seed.
Each line records ``noise_source``: ``os-csprng``, ``seeded-insecure``, or
``none`` for the reference row ``real``; lines written before the noise
became secret have no such field and are shown as seeded in the table.

Two reference methods need no generator:
- ``real``: the classifiers and metrics on the real private training images
  themselves (no privacy; fidelity is then that of the reference set with
  itself and memorization is flagged by construction). Its epsilon column
  only places the row beside the private ones.
- ``dpsgd-classifier``: a CNN trained with DP-SGD directly on the private
  images at the same (epsilon, delta) (`dpimages.bench.dpsgd_classifier`):
  the task-specific ceiling. Only its CNN accuracy exists.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dpimages import __version__
from dpimages.errors import DPImagesError, InputError

REFERENCE_METHODS = ("real", "dpsgd-classifier", "dpsgd-classifier+scatter")
RESULT_KEYS = (
    "method", "preset", "epsilon", "delta", "epsilon_spent", "noise_source", "fits", "acc_cnn", "acc_cnn_sd",
    "acc_mlp", "acc_mlp_sd", "acc_logreg", "acc_logreg_sd", "fid", "fid_sd", "kid", "precision", "recall",
    "feature_net", "memorization", "fit_s", "sample_s", "eval_s", "peak_mem_mb", "device", "date", "commit",
    "run_dir", "run_dirs",
)
FIRST_FIT_KEYS = ("seed", "epsilon", "delta")  # numbers that name a fit, never averaged over fits
SEEDED = ("seeded-insecure", None)  # a line's noise_source that marks it seeded (None: written before the field)
MEMORIZATION_KEYS = ("frac_closer_than_heldout_p1", "flagged", "synthetic_nn_median", "heldout_nn_median",
                     "heldout_nn_p1", "n_exact_copies", "n_synthetic")


@dataclass(frozen=True)
class Suite:
    """A benchmark suite: private data, real data for evaluation, delta, sample count, results file."""

    name: str
    data: str
    real: str
    delta: float
    n_samples: int
    results_file: str


SUITES = {"fmnist": Suite("fmnist", "fashion-mnist", "fashion-mnist", 1e-5, 60000, "fmnist.jsonl")}


def parse_list(text: str, what: str, cast: type = str) -> list:
    """Comma-separated list; `InputError` naming `what` on bad items."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise InputError(f"--{what} needs at least one value, e.g. --{what} 1,10")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise InputError(f"--{what} must be a comma-separated list of {cast.__name__}, got {text!r}") from None


def run_dir_name(method: str, epsilon: float, preset: str, variant: str | None = None,
                 repeat: int | None = None) -> str:
    """``METHOD[+VARIANT]-epsE-PRESET``, with ``-rK`` (K from 1) for repeat K of a ``--repeats R > 1`` cell."""
    name = f"{row_label({'method': method, 'variant': variant})}-eps{epsilon:g}-{preset}"
    return name if repeat is None else f"{name}-r{repeat}"


def row_label(row: dict) -> str:
    """`method` or `method+variant`: how a results line is named in tables, plots and run directories."""
    return row["method"] + (f"+{row['variant']}" if row.get("variant") else "")


# -- measurement helpers -------------------------------------------------------------


def reset_peak_memory() -> None:
    """Reset the process' peak resident set (Linux: VmHWM via /proc/self/clear_refs) and CUDA's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak host memory (MB) since `reset_peak_memory` (process lifetime where it cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)


def git_commit() -> str | None:
    """Commit of the dpimages checkout that ran (with ``+dirty`` if its source had uncommitted changes)."""
    src = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def _display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (portable in committed results)."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd())
    return str(path.resolve()) if rel.startswith("..") else rel


def _append_line(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _eval_section(line: dict, ev: dict | None, repeat: tuple[int, int] | None = None) -> str:
    """Markdown appended to a run's report.md: the evaluation that produced its results line."""
    rows = [("CNN accuracy", line["acc_cnn"]), ("MLP accuracy", line["acc_mlp"]),
            ("logistic regression accuracy", line["acc_logreg"]), ("FID", line["fid"]), ("KID", line["kid"]),
            ("precision", line["precision"]), ("recall", line["recall"])]
    where = f"measured on {line['device']} at commit `{line['commit']}` ({line['date']})"
    if ev is None:
        head = f"Suite `{line['suite']}`: no images to evaluate (classifier reference row); {where}."
    else:
        head = (f"Suite `{line['suite']}`, {line.get('n_samples')} images evaluated (mode `{line.get('eval_mode')}`), "
                f"feature network `{line['feature_net']}`; {where}.")
    out = ["", "## Benchmark evaluation", "", head, "", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {'-' if v is None else f'{v:.4f}'} |" for k, v in rows]
    mem = line.get("memorization")
    if mem:
        out += ["", f"Memorization: {mem['frac_closer_than_heldout_p1']:.4f} of synthetic images are closer to a "
                f"private training image than 99% of real held-out images are (flagged: {mem['flagged']}); "
                f"median nearest-private distance {mem['synthetic_nn_median']:.3f} vs "
                f"{mem['heldout_nn_median']:.3f} for held-out images."]
    timings = ", ".join(f"{k} {line[k + '_s']} s" for k in ("fit", "sample", "eval") if line.get(k + "_s") is not None)
    out += ["", f"Timings: {timings or 'none'}; peak memory {line['peak_mem_mb']} MB; privacy noise "
            f"`{line.get('noise_source')}`."]
    if ev and ev.get("grid_png"):
        grid = Path(ev["grid_png"])
        out += ["", f"Per-class samples (owner only, not committed): `{grid.parent.name}/{grid.name}`."]
    if repeat is not None:
        out += ["", f"This run is fit {repeat[0]} of {repeat[1]} (seed {line['seed']}) of its benchmark cell; the "
                "results line holds the mean and standard deviation over the fits."]
    return "\n".join(out) + "\n"


# -- one run -------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """Settings shared by all runs of one `bench` call."""

    preset: str = "cpu"
    seed: int = 0
    device: str | None = None
    n_samples: int | None = None
    classifiers: str | None = None
    fid_weights: str | None = None
    threads: int | None = None
    progress: bool = True
    public: str | None = None
    overrides: tuple[str, ...] = ()
    variant: str | None = None
    insecure_seeded_noise: bool = False  # tests only: reproducible noise from the seed (not private)
    repeats: int = 1  # fits per (method, epsilon) cell; repeat k uses seed + k
    commit: str | None = field(default_factory=git_commit)  # the code that runs: taken when bench starts
    grids_dir: Path | None = None  # where each row's 10x10 class grid of synthetic images goes (OUT/grids)

    @property
    def noise_source(self) -> str:
        """What privacy.json and the results line record: ``os-csprng`` or ``seeded-insecure``."""
        # as NoiseSource.kind, spelled out: importing dpimages.privacy would load dp-accounting for `bench --table`
        return "seeded-insecure" if self.insecure_seeded_noise else "os-csprng"


def _eval_options(opts: BenchOptions):  # noqa: ANN202 - EvalOptions, imported lazily
    from dpimages.eval import EvalOptions

    classifiers = opts.classifiers or ("wrn" if opts.preset.startswith("gpu") else "default")
    return EvalOptions(classifiers=classifiers, fid_weights=opts.fid_weights, smoke=opts.preset == "smoke",
                       seed=opts.seed, device=opts.device, threads=opts.threads, progress=False)


def _line(suite: Suite, method: str, epsilon: float, opts: BenchOptions, run_dir: Path, ev: dict | None,
          **values: object) -> dict:
    from dpimages.eval.evaluate import machine_description

    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    line = {k: None for k in RESULT_KEYS}
    line.update(method=method, preset=opts.preset, epsilon=float(epsilon), delta=suite.delta,
                noise_source=opts.noise_source, fits=1)
    if opts.variant:
        line["variant"] = opts.variant
    if ev is not None:
        line.update({k: ev.get(k) for k in ("acc_cnn", "acc_mlp", "acc_logreg", "fid", "kid", "precision", "recall",
                                            "feature_net")})
        line["memorization"] = {k: ev["memorization"].get(k) for k in MEMORIZATION_KEYS}
        for k in ("acc_wrn", "acc_resnet", "acc_dpimagebench", "dpimagebench_arch"):
            if k in ev:
                line[k] = ev[k]
        line["eval_mode"] = ev.get("mode")
        line["classifier_protocol"] = ev.get("classifier_protocol")
    line.update(values)
    line.update(device=machine_description(dev), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                commit=opts.commit, run_dir=_display_path(run_dir), suite=suite.name, seed=opts.seed,
                dpimages_version=__version__)
    line["run_dirs"] = [line["run_dir"]]
    return line


def _run_generator(suite: Suite, method: str, epsilon: float, opts: BenchOptions, run_dir: Path,
                   real, public) -> tuple[dict, dict]:  # noqa: ANN001
    from dpimages.eval import evaluate
    from dpimages.fit_runner import fit_run

    n = opts.n_samples or (2000 if opts.preset == "smoke" else suite.n_samples)
    t = time.time()
    res = fit_run(method, real.train, epsilon=epsilon, delta=suite.delta, run_dir=run_dir, preset=opts.preset,
                  public=public, overrides=list(opts.overrides), seed=opts.seed, device=opts.device, progress=False,
                  insecure_seeded_noise=opts.insecure_seeded_noise)
    fit_s = time.time() - t
    t = time.time()
    synth = res.synthesizer
    samples = synth.sample(n, synth.balanced_labels(n), seed=opts.seed)
    sample_s = time.time() - t
    grid = None
    if opts.grids_dir is not None:  # synthetic images only: shareable, small enough to commit
        from dpimages.eval.grid import save_grid

        grid = _display_path(save_grid(opts.grids_dir / f"{run_dir.name}.png", samples.images, samples.labels,
                                       samples.num_classes, per_class=10, scale=1))
    t = time.time()
    ev = evaluate(samples, real, artifacts=res.run.private_eval_prefix(), options=_eval_options(opts))
    classifier = getattr(synth, "labeller", None)  # a DP classifier the run trained (labeller, dpdfd's DP teacher)
    if classifier is not None:  # its held-out accuracy: evaluation, owner only
        from dpimages.scatter_classifier import write_heldout_accuracy

        write_heldout_accuracy(classifier, real.test, res.run.private_eval_prefix("labeller").with_suffix(".json"))
    eval_s = time.time() - t
    return _line(suite, method, epsilon, opts, run_dir, ev, epsilon_spent=res.ledger.epsilon(),
                 noise_source=res.ledger.noise_source,
                 epsilon_rdp=res.ledger.epsilon_rdp(), fit_s=round(fit_s, 1), sample_s=round(sample_s, 1),
                 eval_s=round(eval_s, 1), n_samples=n, public=None if public is None else public.name,
                 overrides=list(opts.overrides), grid=grid, **synth.bench_extras()), ev


def _reference_config(suite: Suite, method: str, epsilon: float, opts: BenchOptions, real) -> dict:  # noqa: ANN001
    return {"method": method, "preset": opts.preset, "data": real.train.name, "dataset_size": len(real.train),
            "public": None, "epsilon": float(epsilon), "delta": suite.delta, "seed": opts.seed,
            "noise_source": opts.noise_source, "reference_row": True,
            "versions": {"dpimages": __version__, "torch": str(torch.__version__)}}


def _run_real(suite: Suite, epsilon: float, opts: BenchOptions, run_dir: Path, real) -> tuple[dict, dict]:  # noqa: ANN001
    from dpimages.eval import evaluate
    from dpimages.report import render_report
    from dpimages.runs import Run

    run = Run(run_dir)
    run.start({**_reference_config(suite, "real", epsilon, opts, real), "privacy": "none (non-private reference)"},
              resume=False)
    t = time.time()
    ev = evaluate(real.train, real, artifacts=run.private_eval_prefix(), options=_eval_options(opts))
    eval_s = time.time() - t
    section = ("Reference row `real`: the downstream classifiers are trained on the real private training images "
               "(no privacy, epsilon infinite). Fidelity compares the training set with itself and the memorization "
               "check flags it by construction.")
    run.write_report(render_report(run, section))
    return _line(suite, "real", epsilon, opts, run_dir, ev, epsilon_spent=None, fit_s=None, sample_s=None,
                 eval_s=round(eval_s, 1), n_samples=len(real.train), privacy="none", noise_source="none"), ev


def _run_dpsgd(suite: Suite, epsilon: float, opts: BenchOptions, run_dir: Path, real,  # noqa: ANN001
               scatter: bool = False) -> tuple[dict, None]:
    from dpimages.bench.dpsgd_classifier import train_dpsgd_classifier
    from dpimages.privacy import NoiseSource, PrivacyLedger
    from dpimages.report import render_report
    from dpimages.runs import Run

    method = "dpsgd-classifier+scatter" if scatter else "dpsgd-classifier"
    run = Run(run_dir)
    run.start(_reference_config(suite, method, epsilon, opts, real), resume=False)
    noise = NoiseSource(opts.seed if opts.insecure_seeded_noise else None)
    ledger = PrivacyLedger(epsilon, suite.delta, path=run.privacy_path, dataset_size=len(real.train),
                           noise_source=noise.kind)
    ledger.write()
    t = time.time()
    out = train_dpsgd_classifier(real.train, real.test, epsilon=epsilon, delta=suite.delta, preset=opts.preset,
                                 ledger=ledger, noise=noise, progress=opts.progress, device=opts.device,
                                 seed=opts.seed, features="scatter" if scatter else "pixels")
    fit_s = time.time() - t
    ledger.write(exact=True)
    section = (f"Reference row `{method}`: {out.get('model')} trained with DP-SGD directly on the private "
               f"images ({out.get('steps')} steps, sample rate {out.get('sample_rate', 0):.4g}, noise multiplier "
               f"{out.get('sigma', 0):.4g}, clip {out.get('clip_norm')}); test accuracy "
               f"{out['accuracy']:.4f} on {out.get('test')}. No images are generated: only CNN accuracy exists.")
    run.write_report(render_report(run, section))
    detail = {k: out.get(k) for k in ("model", "steps", "sample_rate", "sigma", "clip_norm", "batch_size", "epochs")}
    return _line(suite, method, epsilon, opts, run_dir, None, acc_cnn=out["accuracy"],
                 epsilon_spent=ledger.epsilon(), epsilon_rdp=ledger.epsilon_rdp(), fit_s=round(fit_s, 1),
                 sample_s=None, eval_s=None, dpsgd=detail), None


# -- repeats: one line per cell ---------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _has_sd(key: str) -> bool:
    """Keys that get a ``KEY_sd`` beside them: every accuracy and the FID."""
    return not key.endswith("_sd") and (key == "fid" or key.startswith("acc_") or key.endswith("_accuracy"))


def _mean_of(key: str, values: list) -> object:
    """One value for `key` from the fits' values: unchanged when all agree, else the mean (max for peak memory)."""
    if key in FIRST_FIT_KEYS or all(v == values[0] for v in values):
        return values[0]
    nums = [v for v in values if _is_number(v)]
    if not nums or any(v is not None and not _is_number(v) for v in values):
        return values[0]  # text or structures that differ (date, commit, run_dir...): the first fit's
    if key == "peak_mem_mb":
        return max(nums)
    mean = math.fsum(nums) / len(nums)
    return round(mean, 1) if key.endswith("_s") else _six(mean)


def _six(x: float) -> float:
    """`x` to 6 significant digits: means and sds of 4-digit metrics, without float noise in the JSON."""
    return float(f"{x:.6g}")


def _combine_memorization(mems: list[dict | None]) -> dict | None:
    """Memorization over fits: means, except `flagged` (any fit) and `n_exact_copies` (the most of any fit)."""
    if any(m is None for m in mems):
        return mems[0]
    out = {}
    for k in mems[0]:
        vals = [m.get(k) for m in mems]
        if k == "flagged":
            out[k] = any(bool(v) for v in vals)
        elif k == "n_exact_copies" and all(_is_number(v) for v in vals):
            out[k] = max(vals)
        else:
            out[k] = _mean_of(k, vals)
    return out


def combine_fits(lines: list[dict]) -> dict:
    """ONE results line from the lines of R fits of one (method, epsilon) cell.

    Numeric metrics are means over the fits (peak memory: the largest);
    ``KEY_sd`` beside each accuracy and the FID is the sample standard
    deviation (ddof 1), null for one fit or where the metric does not exist.
    Text fields and ``run_dir`` are the first fit's; ``fits``, ``run_dirs``
    and ``seeds`` list all of them. ``seed`` stays the first fit's (the
    ``--seed`` given; repeat k used seed + k).
    """
    if not lines:
        raise ValueError("combine_fits needs at least one line")
    first = lines[0]
    out: dict = {}
    for key in first:
        if key.endswith("_sd") and _has_sd(key[:-3]):
            continue  # written beside its metric below
        values = [ln.get(key) for ln in lines]
        out[key] = _combine_memorization(values) if key == "memorization" else _mean_of(key, values)
        if _has_sd(key):
            nums = [v for v in values if _is_number(v)]
            out[key + "_sd"] = _six(statistics.stdev(nums)) if len(nums) > 1 else None
    out.update(fits=len(lines), run_dirs=[ln["run_dir"] for ln in lines], seeds=[ln.get("seed") for ln in lines])
    return out


# -- the suite -------------------------------------------------------------------------


def run_bench(suite_name: str, methods: list[str], epsilons: list[float], out_dir: str | Path,
              runs_dir: str | Path | None = None, options: BenchOptions | None = None) -> list[dict]:
    """Run every (method, epsilon) cell of a suite `options.repeats` times; append one results line per cell.

    Everything is checked before the first run starts (`_check_bench`): suite, method names, epsilons, presets,
    repeats and that no run directory already exists. Repeat k (0-based) of a cell runs with seed
    ``options.seed + k`` in its own run directory (``...-rK``, K = k + 1, when repeats > 1); the cell's line is
    `combine_fits` of its fits. A run that fails is reported on stderr and its cell is skipped (no line is
    written for it, its remaining repeats are not run: a mean over the fits that happened to succeed would be
    biased); the call then raises after the other cells have run.
    """
    from dpimages.data import load
    from dpimages.eval import load_real

    opts = options or BenchOptions()
    suite = _check_bench(suite_name, methods, epsilons, opts)
    out_dir = Path(out_dir)
    runs_root = Path(runs_dir) if runs_dir else out_dir.parent / "runs"
    reps = opts.repeats
    plan = [(m, e, [runs_root / run_dir_name(m, e, opts.preset, opts.variant, None if reps == 1 else k + 1)
                    for k in range(reps)]) for m in methods for e in epsilons]
    for _, _, dirs in plan:
        for d in dirs:
            if d.exists() and any(d.iterdir()):
                raise InputError(f"run directory {d} already exists: remove it or choose --runs-dir")
    public = load(opts.public) if opts.public else None
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    failures: list[str] = []
    try:
        lines = _run_cells(suite, plan, opts, out_dir, load_real(suite.real), public, failures)
    finally:
        torch.set_num_threads(old_threads)
    if failures:
        raise DPImagesError(f"{len(failures)} of {len(plan)} cells failed: " + "; ".join(failures))
    return lines


def _check_bench(suite_name: str, methods: list[str], epsilons: list[float], opts: BenchOptions) -> Suite:
    """The suite, after checking every input of a benchmark before any run starts (InputError, exit 2)."""
    from dpimages.config import PRESETS, resolve_config
    from dpimages.eval.evaluate import CLASSIFIER_SETS
    from dpimages.privacy import validate_budget
    from dpimages.registry import method_class

    if suite_name not in SUITES:
        raise InputError(f"unknown suite {suite_name!r}; available: {', '.join(SUITES)}")
    suite = SUITES[suite_name]
    if opts.preset not in PRESETS:
        raise InputError(f"unknown preset {opts.preset!r}; use one of {', '.join(PRESETS)}")
    if opts.classifiers not in (None, *CLASSIFIER_SETS):
        raise InputError(f"--classifiers must be one of {', '.join(CLASSIFIER_SETS)}, got {opts.classifiers!r}")
    if opts.fid_weights is not None and not Path(opts.fid_weights).is_file():
        raise InputError(f"--fid-weights: file not found: {opts.fid_weights}")
    if {"dpsgd-classifier", "dpsgd-classifier+scatter"} & set(methods):
        from dpimages.bench.dpsgd_classifier import PRESETS as DPSGD_PRESETS

        if opts.preset not in DPSGD_PRESETS:
            raise InputError(f"dpsgd-classifier has no preset {opts.preset!r}; available: {', '.join(DPSGD_PRESETS)}")
    if len(set(methods)) != len(methods) or len(set(epsilons)) != len(epsilons):
        raise InputError("--methods and --epsilons must not repeat a value")
    for m in methods:
        if m not in REFERENCE_METHODS:
            resolve_config(method_class(m).Config, opts.preset, list(opts.overrides))  # InputError: name, key, value
        elif opts.overrides or opts.public:
            raise InputError(f"reference method {m} takes no --public or KEY=VALUE overrides; bench it separately")
    if opts.variant is not None and not opts.variant.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--variant must be letters, digits, - or _, got {opts.variant!r}")
    for e in epsilons:
        if not math.isfinite(e):
            raise InputError(f"--epsilons must be finite, got {e}")
        validate_budget(e, suite.delta)
    if opts.n_samples is not None and opts.n_samples < 10 * 10:
        raise InputError(f"--n-samples must be >= 100 (10 per class), got {opts.n_samples}")
    if isinstance(opts.repeats, bool) or not isinstance(opts.repeats, int) or opts.repeats < 1:
        raise InputError(f"--repeats must be an integer >= 1, got {opts.repeats!r}")
    return suite


def _run_cells(suite: Suite, plan: list[tuple[str, float, list[Path]]], opts: BenchOptions, out_dir: Path,
               real, public, failures: list[str]) -> list[dict]:  # noqa: ANN001 - RealData, ImageData | None
    """Every cell's fits in turn; a cell whose fits all succeed appends its combined line to the results file."""
    results_path, reps = out_dir / suite.results_file, opts.repeats
    lines = []
    with tqdm(total=len(plan) * reps, desc=f"bench {suite.name}", unit="run", disable=not opts.progress) as bar:
        for method, eps, run_dirs in plan:
            fits = []
            for k, run_dir in enumerate(run_dirs):
                fit = f" fit {k + 1}/{reps}" if reps > 1 else ""
                bar.set_postfix_str(f"{method} eps={eps:g}{fit}")
                line = _one_fit(suite, method, eps, replace(opts, seed=opts.seed + k,
                                                            grids_dir=out_dir / "grids" if k == 0 else None),
                                run_dir, real, public, None if reps == 1 else (k + 1, reps), failures)
                bar.update(1)
                if line is None:
                    bar.update(reps - 1 - k)
                    break
                fits.append(line)
                tqdm.write(f"bench: {method} eps={eps:g}{fit}: CNN {line['acc_cnn']}, FID {line['fid']}",
                           file=sys.stderr)
            else:
                line = combine_fits(fits)
                _append_line(results_path, line)
                lines.append(line)
                sd = f" (sd {line['acc_cnn_sd']:.4f} over {reps} fits)" if line.get("acc_cnn_sd") is not None else ""
                tqdm.write(f"bench: {method} eps={eps:g}: CNN {line['acc_cnn']}{sd} -> {results_path}",
                           file=sys.stderr)
    return lines


def _one_fit(suite: Suite, method: str, eps: float, opts: BenchOptions, run_dir: Path, real, public,  # noqa: ANN001
             repeat: tuple[int, int] | None, failures: list[str]) -> dict | None:
    """Fit (or evaluate a reference) once in `run_dir`; its line, with the evaluation appended to report.md.

    On failure: None, with the reason appended to `failures` and printed.
    """
    reset_peak_memory()
    try:
        if method == "real":
            line, ev = _run_real(suite, eps, opts, run_dir, real)
        elif method in ("dpsgd-classifier", "dpsgd-classifier+scatter"):
            line, ev = _run_dpsgd(suite, eps, opts, run_dir, real, scatter=method.endswith("+scatter"))
        else:
            line, ev = _run_generator(suite, method, eps, opts, run_dir, real, public)
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others; reported by run_bench
        fit = f" fit {repeat[0]}/{repeat[1]}" if repeat else ""
        failures.append(f"{method} eps={eps:g}{fit}: {type(e).__name__}: {e}")
        tqdm.write(f"bench: {failures[-1]}", file=sys.stderr)
        return None
    line["peak_mem_mb"] = peak_memory_mb()
    with open(Path(line["run_dir"]) / "report.md", "a") as f:
        f.write(_eval_section(line, ev, repeat))
    return line


def read_results(path: str | Path) -> list[dict]:
    """Results lines of a .jsonl file (blank lines skipped)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no results file {p}: run `dpimages bench` first")
    rows = []
    for i, text in enumerate(p.read_text().splitlines(), 1):
        if text.strip():
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError:
                raise InputError(f"{p}: line {i} is not JSON") from None
    return rows


def _fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _fits(row: dict) -> int:
    """Fits behind a results line (lines written before --repeats existed: one)."""
    return row.get("fits") or 1


@dataclass(frozen=True)
class PrivacyFix:
    """A privacy fix that changed what some methods release: their rows fitted before it are marked ``pre-fix``."""

    methods: tuple[str, ...]
    fixed_at: str  # UTC time of the fix's first commit; a row dated earlier was fitted without it
    what: str


PRIVACY_FIXES = (
    PrivacyFix(("dpdm", "dpaf", "dpaf-noagg"), "2026-12-07T18:12:32Z",
               "issue 34 (commit 6127da0): dpdm's per-example training draws and dpaf's aggregation groups were keyed "
               "by dataset index with a public key, so an image added before the others moved every later image's "
               "draws and the stated sensitivity did not hold (dpdm at every preset; dpaf only with agg_groups > 1, "
               "which no preset sets); the engine fixes of commit f130e2d (ghost norms under cancellation, the "
               "whole-chunk probe, the Gaussian's tail) were not shown to matter on the presets"),
)


def pre_fix(row: dict) -> PrivacyFix | None:
    """The privacy fix this row was fitted before (it then does not have the guarantee it printed), or None."""
    method = row["method"].split("+")[0]
    return next((f for f in PRIVACY_FIXES if method in f.methods and row.get("date", "") < f.fixed_at), None)


def is_seeded(row: dict) -> bool:
    """True when the row's privacy noise came from its seed: ``seeded-insecure``, or a line from before
    ``noise_source`` was recorded (all of those were seeded). The ``real`` reference has no noise."""
    return row["method"] != "real" and row.get("noise_source") in SEEDED


def _cell(row: dict, key: str, fmt) -> str:  # noqa: ANN001 - fmt: value -> str
    """``mean ± sd (fits)`` when the line holds several fits, the plain number otherwise; ``-`` when missing."""
    v = row.get(key)
    if v is None:
        return "-"
    sd = row.get(key + "_sd")
    if _fits(row) > 1 and sd is not None:
        return f"{fmt(v)} ± {fmt(sd)} ({_fits(row)})"
    return fmt(v)


def _method_cell(row: dict, eval_mode: bool = False) -> str:
    """The row's label and notes: ``seeded``, with `eval_mode` also ``smoke eval``; e.g. ``a (seeded, smoke eval)``."""
    notes = ["seeded"] if is_seeded(row) else []
    if pre_fix(row) is not None:
        notes.append("pre-fix")
    if eval_mode and row.get("eval_mode") == "smoke":
        notes.append("smoke eval")
    return row_label(row) + (f" ({', '.join(notes)})" if notes else "")


def latest_rows(rows: list[dict]) -> list[dict]:
    """The latest line per (method, preset, epsilon, eval mode, feature network, seeded or not), sorted.

    A seeded row is kept beside a newer secure-noise row of the same cell (marked ``seeded``), so the history
    of a cell stays visible when its rows are rerun with secure noise.
    """
    latest: dict[tuple, dict] = {}
    for r in rows:
        key = (row_label(r), r["preset"], r["epsilon"], r.get("eval_mode"), r.get("feature_net"), is_seeded(r),
               pre_fix(r) is None)
        latest[key] = r
    ref_order = {"real": 0, "dpsgd-classifier": 1, "dpsgd-classifier+scatter": 1}
    return sorted(latest.values(), key=lambda r: (r["preset"], ref_order.get(r["method"], 2), row_label(r),
                                                  r["epsilon"], not is_seeded(r), pre_fix(r) is None))


def render_table(rows: list[dict], suite: str = "fmnist") -> str:
    """Markdown: one accuracy table, and one fidelity table per feature network (never mixed)."""
    rows = latest_rows(rows)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    out = [f"# Benchmark results: {suite}", "",
           "Accuracy (%) of classifiers trained on 60,000 synthetic images and tested on the 10,000 real test "
           "images (model selection on the 5,000 validation images only). epsilon spent is the run's ledger (PLD); "
           "delta 1e-5; add/remove-one neighbouring relation. Rendered by `dpimages bench --table`.", "",
           "| method | preset | epsilon | epsilon spent | CNN | MLP | LogReg | memorized | fit min | eval min "
           "| peak MB | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("memorization") or {}
        memtxt = "-" if not mem else f"{mem['frac_closer_than_heldout_p1']:.3f}" + (" (!)" if mem["flagged"] else "")
        more = f" (+{len(r['run_dirs']) - 1} more)" if len(r.get("run_dirs") or ()) > 1 else ""
        out.append(
            f"| {_method_cell(r, eval_mode=True)} | {r['preset']} | {_fmt(r['epsilon'])} | "
            f"{_fmt(r.get('epsilon_spent'))} | "
            f"{_cell(r, 'acc_cnn', pct)} | {_cell(r, 'acc_mlp', pct)} | {_cell(r, 'acc_logreg', pct)} | {memtxt} | "
            f"{_minutes(r.get('fit_s'))} | {_minutes(r.get('eval_s'))} | {_fmt(r.get('peak_mem_mb'))} | "
            f"`{r['run_dir']}`{more} |")
    out += ["", "`real`: classifiers trained on the real private training images (no privacy; its epsilon column only "
            "places it beside the private rows; fidelity is the training set against itself and memorization is "
            "flagged by construction). `dpsgd-classifier`: a GroupNorm/tanh CNN trained with DP-SGD directly on the "
            "private images (the task-specific ceiling; no images, so only its CNN column). memorized: fraction of "
            "synthetic images closer to a private image than 99% of real held-out images are; (!) above 0.05."]
    if any(_fits(r) > 1 for r in rows):
        out += ["", "`mean ± sd (R)`: mean and sample standard deviation over R fits (`dpimages bench --repeats R`), "
                "each with its own noise and seed (seed + k); a plain number is one fit. Times are means, peak memory "
                "the largest, run the first fit's directory."]
    if any(is_seeded(r) for r in rows):
        out += ["", "(seeded): the privacy noise of this row was drawn from its `--seed` (lines written before "
                "the noise came from the OS CSPRNG record no `noise_source`, and were all seeded; later ones say "
                "`seeded-insecure`). Its numbers are valid measurements of the method, but the run's outputs are "
                "not private for anyone who knows the seed."]
    fixes = {f for f in map(pre_fix, rows) if f is not None}
    for fix in sorted(fixes, key=lambda f: f.fixed_at):
        out += ["", f"(pre-fix): fitted before a privacy fix that changed what the method releases: {fix.what}. "
                "Its numbers measure the method as it then ran; its run did not have the guarantee it printed."]
    renamed = [r for r in rows if r.get("relabelled")]
    if renamed:
        out += ["", "Renamed rows (a line's `relabelled` field; the run directory keeps the old name): " + "; ".join(
            f"`{row_label(r)}` at epsilon {_fmt(r['epsilon'])} was `{r['relabelled']['from']}`: "
            f"{r['relabelled']['why']}" for r in renamed) + "."]
    for net in sorted({r["feature_net"] for r in rows if r.get("feature_net")}):
        out += ["", f"## Fidelity in the feature space of `{net}`", "",
                "| method | preset | epsilon | FID | KID | precision | recall |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("feature_net") == net:
                out.append(f"| {_method_cell(r)} | {r['preset']} | {_fmt(r['epsilon'])} | {_cell(r, 'fid', _fmt)} "
                           f"| {_fmt(r['kid'])} | {_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} |")
    students = [r for r in rows if r.get("student_test_accuracy") is not None]
    if students:
        out += ["", "## DP student classifiers", "",
                "Methods that also release a classifier (dpdfd's DP student): its own accuracy on the real test "
                "images, beside the CNN trained on its synthetic images.", "",
                "| method | preset | epsilon | student accuracy | CNN on synthetic images |", "|---|---|---|---|---|"]
        out += [f"| {_method_cell(r)} | {r['preset']} | {_fmt(r['epsilon'])} | "
                f"{_cell(r, 'student_test_accuracy', pct)} | {_cell(r, 'acc_cnn', pct)} |" for r in students]
    out += gallery(rows)
    devices = sorted({r["device"] for r in rows if r.get("device")})
    out += ["", "Measured on: " + "; ".join(devices) if devices else ""]
    return "\n".join(out).rstrip() + "\n"


def gallery(rows: list[dict], epsilons: tuple[float, ...] = (1.0, 10.0)) -> list[str]:
    """Markdown lines: one 10x10 class grid per method and preset at each of `epsilons` (rows that saved one).

    The grids are written by `bench` under OUT/grids (ten synthetic images per class, one class per row) and
    linked relative to OUT, where SUITE.md lives.
    """
    cells: dict[tuple[str, str], dict[float, str]] = {}
    for r in rows:
        if r.get("grid") and r["epsilon"] in epsilons and not is_seeded(r) and pre_fix(r) is None:
            cells.setdefault((row_label(r), r["preset"]), {})[r["epsilon"]] = Path(r["grid"]).name
    if not cells:
        return []
    head = " | ".join(f"epsilon {e:g}" for e in epsilons)
    out = ["", "## Gallery", "", "Ten synthetic images per class (one class per row) from the first fit of each "
           "results row.", "", f"| method | preset | {head} |", "|---|---|" + "---|" * len(epsilons)]
    for (label, preset), grids in sorted(cells.items()):
        imgs = " | ".join(f"![{label} epsilon {e:g}](grids/{grids[e]})" if e in grids else "-" for e in epsilons)
        out.append(f"| {label} | {preset} | {imgs} |")
    return out


def plot_accuracy(rows: list[dict], path: str | Path) -> Path:
    """PNG: test accuracy against epsilon, one line per method, one panel per classifier (bars: ± sd of fits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_rows(rows)
    series = sorted({(row_label(r), r["preset"]) for r in rows})
    legend_rows = math.ceil(len(series) / 4)
    height = 4.0 + 0.22 * legend_rows  # room under the panels for the legend, so it never covers the axis labels
    fig, axes = plt.subplots(1, 3, figsize=(13, height), sharey=True)
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    colours = {s: cmap(i % cmap.N) for i, s in enumerate(series)}  # one colour per line in every panel
    panels = (("acc_cnn", "CNN"), ("acc_mlp", "MLP"), ("acc_logreg", "logistic regression"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method in sorted({row_label(r) for r in rows}):
            for preset in sorted({r["preset"] for r in rows if row_label(r) == method}):
                pts = sorted((r["epsilon"], r[key], r.get(key + "_sd") or 0.0) for r in rows
                             if row_label(r) == method and r["preset"] == preset and r.get(key) is not None)
                if not pts:
                    continue
                xs, ys, sds = zip(*pts, strict=True)
                style = "--" if method == "real" else ":" if method.startswith("dpsgd-classifier") else "-"
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * s for s in sds] if any(sds) else None,
                            fmt=style, marker="o", capsize=3, color=colours[(method, preset)],
                            label=f"{method} ({preset})")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    labels, handles = list(seen), list(seen.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, (0.15 + 0.22 * legend_rows) / height, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The README's headline: each method's current default (the row label that runs it) and when to use it. Preset
# choices were made on Fashion-MNIST runs (docs/privacy.md).
HEADLINE: dict[str, tuple[str, str]] = {
    "dp-mepf": ("dp-mepf+scatter-relabel", "a first try at any budget, 20-25 minutes: scattering features and a "
                                           "DP labeller (the cpu preset's default; labels optional)"),
    "dpdm": ("dpdm", "the best images (FID), if one to two hours of CPU (or a GPU) are fine"),
    "dpaf": ("dpaf", "a GAN in 20-40 minutes; images close to dpdm's at epsilon 1"),
    "pe": ("pe+dp-prior-p600", "no training on private data: votes steer a generative model (here trained on "
                               "a DP prior's samples; better with a public model close to your images)"),
    "dpdfd": ("dpdfd", "you also want a DP classifier; needs labels, weakest images"),
}


REFERENCE_ROWS = {"dpsgd-classifier": "DP-SGD CNN on the private images",
                  "dpsgd-classifier+scatter": "DP-SGD linear classifier on scattering features"}


def render_headline(rows: list[dict], image_root: str = "benchmarks/results/") -> str:
    """The README's headline table: each method's current default at epsilon 1 and 10 (CNN accuracy, mean ± sd
    over fits; FID; fit minutes), its epsilon-10 grid and when to use it, from the same results as `render_table`.

    A row is the latest secure-noise cpu line of the label in `HEADLINE`; one fitted before a privacy fix is shown
    only when no later one exists, and is marked. `image_root` prefixes grid paths (relative to the README).
    """
    current = [r for r in latest_rows(rows) if r["preset"] == "cpu" and not is_seeded(r)]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    out = ["| method | CNN accuracy % at epsilon 1 / 10 | FID (eval CNN) at 1 / 10 | fit minutes at 1 / 10 "
           "| epsilon 10 samples | use it when |", "|---|---|---|---|---|---|"]
    for method, (label, when) in HEADLINE.items():
        cells = {}
        for eps in (1.0, 10.0):
            mine = [r for r in current if row_label(r) == label and r["epsilon"] == eps]
            fixed = [r for r in mine if pre_fix(r) is None]
            cells[eps] = (fixed or mine or [None])[-1]
        if not any(cells.values()):
            continue
        accs = " / ".join("-" if r is None else _cell(r, "acc_cnn", pct) + (" (pre-fix)" if pre_fix(r) else "")
                          for r in cells.values())
        fids = " / ".join("-" if r is None else _fmt(r.get("fid"), 3) for r in cells.values())
        mins = " / ".join("-" if r is None else _minutes(r.get("fit_s")) for r in cells.values())
        grid = cells[10.0].get("grid") if cells[10.0] else None
        thumb = f"<img src=\"{image_root}{grid.split('results/', 1)[-1]}\" width=\"120\">" if grid else "-"
        name = f"`{method}`" + ("" if label == method else f" (`{label}`)")
        out.append(f"| {name} | {accs} | {fids} | {mins} | {thumb} | {when} |")
    for ref_method, what in REFERENCE_ROWS.items():
        ref = [r for r in latest_rows(rows) if r["method"] == ref_method and r["preset"] == "cpu"]
        if not ref:
            continue
        by_eps = {r["epsilon"]: r for r in ref}
        accs = " / ".join(_cell(by_eps[e], "acc_cnn", pct) + (" (seeded)" if is_seeded(by_eps[e]) else "")
                          if e in by_eps else "-" for e in (1.0, 10.0))
        mins = " / ".join(_minutes(by_eps[e].get("fit_s")) if e in by_eps else "-" for e in (1.0, 10.0))
        out.append(f"| reference: {what} (`{ref_method}`) | {accs} | - | {mins} | - | the ceiling a generator "
                   "chases: what training a classifier directly with DP-SGD gives |")
    return "\n".join(out) + "\n"


HEADLINE_MARKERS = ("<!-- headline:start -->\n", "<!-- headline:end -->")


def update_readme(path: str | Path, headline: str) -> None:
    """Replace the block between `HEADLINE_MARKERS` in the README at `path` with `headline` (InputError without
    the markers)."""
    p = Path(path)
    text = p.read_text() if p.is_file() else ""
    start, end = HEADLINE_MARKERS
    if start not in text or end not in text.split(start, 1)[1]:
        raise InputError(f"{p}: no headline markers ({start.strip()} ... {end})")
    before, rest = text.split(start, 1)
    p.write_text(before + start + headline + end + rest.split(end, 1)[1])


def write_table(out_dir: str | Path, suite_name: str = "fmnist") -> tuple[str, Path, Path]:
    """Render `OUT/SUITE.md` (every row), `OUT/SUITE_headline.md` (the README's headline table) and
    `OUT/SUITE_accuracy.png` from `OUT/SUITE.jsonl`; return (markdown, md, png)."""
    if suite_name not in SUITES:
        raise InputError(f"unknown suite {suite_name!r}; available: {', '.join(SUITES)}")
    out_dir = Path(out_dir)
    rows = read_results(out_dir / SUITES[suite_name].results_file)
    md = render_table(rows, suite_name)
    png = plot_accuracy(rows, out_dir / f"{suite_name}_accuracy.png")
    md_path = out_dir / f"{suite_name}.md"
    text = md + f"\n![accuracy against epsilon]({png.name})\n"
    for path, content in ((md_path, text), (out_dir / f"{suite_name}_headline.md", render_headline(rows))):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return text, md_path, png


__all__ = ["SUITES", "BenchOptions", "Suite", "combine_fits", "is_seeded", "plot_accuracy", "read_results",
           "render_table", "run_bench", "write_table"]
