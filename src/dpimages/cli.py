"""The `dpimages` command.

Exit codes: 0 done, 2 bad input or usage (one line on stderr, no
traceback), 3 privacy budget refused. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import click

from dpimages.allocator import keep_freed_memory
from dpimages.budget_cli import BOOK_OPTION_HELP, budget_group, tune_cmd
from dpimages.errors import DPImagesError, InputError, require_empty_folder
from dpimages.runs import check_private_eval_path


def _emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpimages")
def cli() -> None:
    """Differentially private synthetic images."""


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def methods_cmd(as_json: bool) -> None:
    """List the generation methods."""
    from dpimages.registry import method_class, methods

    rows = []
    for name in methods():
        cls = method_class(name)
        rows.append({"name": name, "needs_public": cls.needs_public, "description": cls.description,
                     "presets": sorted(cls.Config.presets)})
    text = "\n".join(f"{r['name']:<10} {'public data ' if r['needs_public'] else ''}{r['description']}" for r in rows)
    _emit({"methods": rows}, as_json, text or "no methods installed yet")


@cli.command("data")
@click.argument("spec")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images in a folder (the count is reported).")
@click.option("--json", "as_json", is_flag=True)
def data_cmd(spec: str, skip_bad: bool, as_json: bool) -> None:
    """Load a data SPEC, validate it and describe it.

    These are facts about your own data shown to you; they are not released
    by any run (runs release class counts only through a DP mechanism).
    """
    import numpy as np

    from dpimages.data import load

    d = load(spec, skip_bad=skip_bad)
    counts = np.bincount(d.labels, minlength=d.num_classes).tolist() if d.labels is not None else None
    info = {
        "name": d.name, "size": len(d), "image_shape": list(d.image_shape), "dtype": str(d.images.dtype),
        "classes": d.classes, "class_counts": counts, "fingerprint": d.fingerprint,
        "skipped_bad_files": d.notes.get("skipped_bad_files", 0),
    }
    lines = [f"{d.name}: {len(d)} images of {d.image_shape[0]}x{d.image_shape[1]}x{d.image_shape[2]} uint8",
             f"fingerprint {d.fingerprint}"]
    if counts is not None:
        lines += [f"  {i:>2} {c:<12} {n}" for i, (c, n) in enumerate(zip(d.classes, counts, strict=True))]
    if info["skipped_bad_files"]:
        lines.append(f"skipped {info['skipped_bad_files']} unreadable files")
    _emit(info, as_json, "\n".join(lines))


@cli.command("account")
@click.option("--sigma", type=float, help="Noise multiplier: print the epsilon it gives.")
@click.option("--epsilon", type=float, help="Target epsilon: print the noise multiplier that meets it.")
@click.option("--sample-rate", type=float, required=True, help="Poisson sampling rate q (1 for no subsampling).")
@click.option("--steps", type=int, required=True)
@click.option("--delta", type=float, required=True)
@click.option("--json", "as_json", is_flag=True)
def account_cmd(sigma: float | None, epsilon: float | None, sample_rate: float, steps: int, delta: float,
                as_json: bool) -> None:
    """Epsilon of a DP-SGD schedule (PLD, RDP cross-check), or the sigma for a target epsilon."""
    from dpimages.privacy import PrivacyEvent, calibrate
    from dpimages.privacy.ledger import check_positive, epsilon_pld, epsilon_rdp

    if (sigma is None) == (epsilon is None):
        raise InputError("give exactly one of --sigma or --epsilon")
    if not (0 < sample_rate <= 1):
        raise InputError(f"--sample-rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    check_positive("delta", delta)
    if delta >= 1:
        raise InputError(f"--delta must be < 1, got {delta}")

    def events(s: float) -> list[PrivacyEvent]:
        if sample_rate == 1:
            return [PrivacyEvent.gaussian(s, steps)]
        return [PrivacyEvent.subsampled_gaussian(s, sample_rate, steps)]

    if epsilon is not None:
        sigma = calibrate(events, epsilon, delta)
    else:
        check_positive("sigma", sigma)
    eps, eps_rdp = epsilon_pld(events(sigma), delta), epsilon_rdp(events(sigma), delta)
    out = {"epsilon": eps, "epsilon_rdp": eps_rdp, "sigma": sigma, "delta": delta, "sample_rate": sample_rate,
           "steps": steps}
    _emit(out, as_json, f"sigma {sigma:.6g}  q {sample_rate:g}  steps {steps}  delta {delta:g}\n"
          f"epsilon {eps:.4f} (PLD)   {eps_rdp:.4f} (RDP)")


def _world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it); 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise InputError(f"WORLD_SIZE must be an integer, got {text!r}") from None


@contextmanager
def _process_group(device: str | None) -> Iterator[str | None]:
    """Under torchrun (WORLD_SIZE > 1): a torch.distributed process group for the block; yields the device.

    nccl on cuda:LOCAL_RANK when the device is CUDA (the default when available), gloo on CPU. Without
    WORLD_SIZE > 1 nothing happens and `device` is yielded unchanged.
    """
    world = _world_size()
    if world <= 1:
        yield device
        return
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0").strip() or 0)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s): start at most "
                             "that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if cuda else "gloo"
    try:
        torch.distributed.init_process_group(backend)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"WORLD_SIZE={world}: cannot start torch.distributed ({backend}); launch with torchrun "
                         f"({first})") from None
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


@cli.command("fit", context_settings={"ignore_unknown_options": False})
@click.argument("method")
@click.argument("overrides", nargs=-1)
@click.option("--data", "data_spec", required=True, help="Private data SPEC, e.g. fashion-mnist.")
@click.option("--epsilon", type=float, required=True)
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--preset", default="cpu", show_default=True, help="smoke, cpu, gpu or gpu-short.")
@click.option("--public", "public_spec", default=None, help="Public data SPEC (methods that use it).")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False))
@click.option("--config", "config_file", default=None, help="YAML file of config keys.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds initialisation, data split and generator sampling; never the privacy noise.")
@click.option("--insecure-seeded-noise", is_flag=True,
              help="TESTS ONLY: draw privacy noise and Poisson sampling from --seed (reproducible). Not private for "
              "anyone who knows the seed; the run is marked seeded-insecure and cannot be exported.")
@click.option("--num-classes", type=int, default=None,
              help="Class count of an npz without a 'classes' array (never read from the private labels).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images in a folder data set.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--budget", default=None, help="The data set's name in the budget book: refused (exit 3) past its total.")
@click.option("--budget-book", default=None, type=click.Path(dir_okay=False), help=BOOK_OPTION_HELP)
@click.option("--image-size", type=int, default=None,
              help="Resize (shorter side) and centre-crop every image of a folder to S x S (images of mixed sizes).")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads (default: torch's, all cores); see the README's table of times by threads.")
@click.option("--json", "as_json", is_flag=True)
def fit_cmd(method: str, overrides: Sequence[str], data_spec: str, epsilon: float, delta: float, preset: str,
            public_spec: str | None, run_dir: str, config_file: str | None, resume: bool, seed: int,
            insecure_seeded_noise: bool, num_classes: int | None, skip_bad: bool, device: str | None,
            budget: str | None, budget_book: str | None, image_size: int | None, threads: int | None,
            as_json: bool) -> None:
    """Fit METHOD on private data under (epsilon, delta); KEY=VALUE overrides the config.

    A folder with one sub-folder per class is class-conditional; a flat folder of images (or an npz without labels)
    is read as one class and fitted unconditionally. Under torchrun (WORLD_SIZE > 1) the processes train one model
    (dpdm only); rank 0 writes the run and prints.
    """
    import torch

    from dpimages.fit_runner import check_distributed, fit_run
    from dpimages.registry import method_class

    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    check_distributed(method_class(method), _world_size())  # before waiting for other processes
    with _process_group(device) as dev:
        res = fit_run(method, data_spec, epsilon=epsilon, delta=delta, run_dir=run_dir, preset=preset,
                      public=public_spec, overrides=list(overrides), config_file=config_file, resume=resume,
                      seed=seed, insecure_seeded_noise=insecure_seeded_noise, num_classes=num_classes,
                      skip_bad=skip_bad, device=dev, progress=not as_json, budget=budget, budget_book=budget_book,
                      image_size=image_size)
    if not res.run.writer:  # the other ranks of a process group: rank 0 reports
        return
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    out = {"run_dir": str(res.run.path), "epsilon": res.ledger.epsilon(), "epsilon_rdp": res.ledger.epsilon_rdp(),
           "delta": res.ledger.delta, "epsilon_budget": res.ledger.epsilon_budget}
    out["noise_source"] = res.ledger.noise_source
    out["notes"] = res.notes
    warning = "" if res.ledger.noise_source == "os-csprng" else (
        "\nWARNING: seeded-insecure noise (--insecure-seeded-noise): not private for anyone who knows the seed")
    book = out["budget_book"] = res.ledger.extra.get("budget_book")
    if book is not None:
        warning += (f"\nbudget {book['budget']}: {book['epsilon_total']:.4f} of {book['epsilon_budget']:g} spent over "
                    f"{book['runs']} runs (composed; naive sum {book['epsilon_sum']:.4f})")
    _emit(out, as_json, f"run {res.run.path}: epsilon {out['epsilon']:.4f} (PLD), {out['epsilon_rdp']:.4f} (RDP) "
          f"at delta {out['delta']:g}; report {res.run.report_path}{warning}")


@cli.command("sample")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, required=True, help="Number of images (balanced over classes).")
@click.option("--out", required=True, type=click.Path(),
              help="FILE.npz (images, labels, classes) or a new folder DIR: one sub-folder of PNGs per class, "
              "readable as folder:DIR.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.argument("overrides", nargs=-1)
def sample_cmd(run_dir: str, n: int, out: str, seed: int, device: str | None, overrides: tuple[str, ...]) -> None:
    """Draw N synthetic images from a fitted run into an .npz or a folder of PNGs (one sub-folder per class).

    KEY=VALUE arguments change the method's sampling settings only (post-processing, no privacy cost; e.g. dpdm
    `guidance=1 sample_steps=18`); the run directory is left as it is.
    """

    import numpy as np

    from dpimages.data.writers import save_folder
    from dpimages.fit_runner import load_synthesizer

    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    to_npz = out.endswith(".npz")
    if not to_npz:
        require_empty_folder(out)  # before sampling: a refusal costs nothing
    synth = load_synthesizer(run_dir, device, list(overrides))
    data = synth.sample(n, synth.balanced_labels(n), seed=seed)
    if to_npz:
        np.savez_compressed(out, images=data.images, labels=data.labels, classes=np.array(data.classes))
        click.echo(f"wrote {n} images to {out}")
    else:
        save_folder(data, out)
        shown = out.rstrip("/") or out
        click.echo(f"wrote {n} PNGs to {shown}/ (one sub-folder per class; read back with --data folder:{shown})")


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def export_cmd(run_dir: str, out_dir: str) -> None:
    """Copy what may be shared of a finished run (samples, grids, report, ledger, DP weights) to OUT_DIR.

    OUT_DIR/MANIFEST lists each file and why it may be shared. checkpoints/ and private-eval/ are never
    copied; a run with --insecure-seeded-noise is refused.
    """
    from dpimages.export import export_run

    written = export_run(run_dir, out_dir)
    shown = out_dir.rstrip("/") or out_dir
    click.echo(f"exported {len(written)} files to {shown}/ (see {shown}/MANIFEST)")


@cli.command("evaluate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--real", "real_spec", required=True, help="The real training data SPEC, e.g. fashion-mnist.")
@click.option("--test", "test_spec", default=None, 
              help="Real test SPEC (needed unless --real is fashion-mnist or cifar10).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the results to FILE.json "
              "(and FILE.grid.png, FILE.closest_pairs.png beside it), in a folder named private-eval/ (e.g. "
              "RUN/private-eval/eval.json). These use the real data without noise (closest pairs shows private "
              "images): for the data owner only, do not share; dpimages export never copies them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--classifiers", default="default", show_default=True,
              help="default (CNN, MLP, logistic regression) or wrn (adds WRN-40-4 and ResNet; for GPUs).")
@click.option("--fid-weights", default=None, help="pytorch-fid Inception-v3 weights file: Inception features.")
@click.option("--smoke", is_flag=True, help="Small subsets and few epochs: for tests, no quality claim.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (1 is fastest on a shared machine; 2 on a dedicated one).")
def evaluate_cmd(file: str, real_spec: str, test_spec: str | None, out: str | None, as_json: bool, classifiers: str,
                 fid_weights: str | None, smoke: bool, seed: int, device: str | None, threads: int) -> None:
    """Evaluate labelled synthetic images in FILE (.npz with images, labels) against real data."""
    import os
    from pathlib import Path

    from dpimages.data import load
    from dpimages.eval import EvalOptions, evaluate, load_real

    if out is not None:
        if not out.endswith(".json"):
            raise InputError(f"--out must end in .json, got {out}")
        if not Path(out).resolve().parent.is_dir():
            raise InputError(f"--out: directory {Path(out).parent} does not exist")
        check_private_eval_path(out, "--out")
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    synthetic = load(f"npz:{file}")
    prefix = Path(out).with_suffix("") if out else None
    opts = EvalOptions(classifiers=classifiers, fid_weights=fid_weights, smoke=smoke, seed=seed, device=device,
                       threads=threads, progress=not as_json)
    res = evaluate(synthetic, load_real(real_spec, test_spec), artifacts=prefix, options=opts)
    if out:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)
    mem = res["memorization"]
    text = (f"{file}: {res['n_synthetic']} images vs {res['real']} ({res['mode']} evaluation)\n"
            f"accuracy  CNN {res['acc_cnn']:.4f}  MLP {res['acc_mlp']:.4f}  logreg {res['acc_logreg']:.4f}\n"
            f"{res['feature_net']}: FID {res['fid']:.3f}  KID {res['kid']:.5f}  precision {res['precision']:.3f}  "
            f"recall {res['recall']:.3f}\n"
            f"memorization: {mem['frac_closer_than_heldout_p1']:.4f} of synthetic images closer to a private image "
            f"than 99% of held-out images{' (FLAGGED)' if mem['flagged'] else ''}")
    _emit(res, as_json, text + (f"\nwrote {out}" if out else ""))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
def report_cmd(run_dir: str) -> None:
    """Rewrite RUN_DIR/report.md from the run's files (config, ledger, metrics, grids) and print it."""
    from dpimages.fit_runner import load_synthesizer
    from dpimages.report import render_report
    from dpimages.runs import Run

    run = Run(run_dir)
    if not run.exists():
        raise InputError(f"not a run directory (config.yaml missing): {run_dir}")
    try:
        method_section = load_synthesizer(run_dir, "cpu").report_section()
    except InputError:  # an unfinished run: report what it has
        method_section = ""
    text = render_report(run, method_section)
    run.write_report(text)
    click.echo(text)


@cli.group("features")
def features_group() -> None:
    """Feature networks for dp-mepf (trained on public data only)."""


@features_group.command("train")
@click.option("--public", "public_spec", required=True, help="Public labelled data SPEC, e.g. mnist-5k. Never "
              "private data: the network is used without privacy accounting.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New directory for weights.safetensors + features.json.")
@click.option("--channels", default="32,64,128", show_default=True, help="Conv channels per block.")
@click.option("--kernel", type=int, default=3, show_default=True)
@click.option("--act", type=click.Choice(["relu", "lrelu", "tanh"]), default="relu", show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True)
def features_train_cmd(public_spec: str, out: str, channels: str, kernel: int, act: str, epochs: int, seed: int,
                       threads: int | None, as_json: bool) -> None:
    """Pre-train a conv feature network on a PUBLIC set (for `fit dp-mepf features=path feature_path=OUT`)."""
    import torch

    from dpimages.data import load
    from dpimages.nets.feature_extractors import train_and_save_feature_net

    try:
        chans = tuple(int(c) for c in channels.split(",") if c.strip())
    except ValueError:
        raise InputError(f"--channels must be comma-separated integers, got {channels!r}") from None
    if threads:
        torch.set_num_threads(threads)
    path, meta = train_and_save_feature_net(load(public_spec), out, channels=chans, kernel=kernel, act=act,
                                            epochs=epochs, seed=seed)
    _emit({"out": str(path), **meta}, as_json, f"wrote {path} (trained on {meta['trained_on']}, public validation "
          f"accuracy {meta.get('public_val_accuracy', float('nan')):.3f})")


@cli.command("bench")
@click.argument("overrides", nargs=-1)
@click.option("--suite", "suite_name", default="fmnist", show_default=True, help="Benchmark suite.")
@click.option("--methods", default=None, help="Comma-separated methods; also the references real, dpsgd-classifier.")
@click.option("--epsilons", default="1,10", show_default=True, help="Comma-separated epsilons.")
@click.option("--preset", default="cpu", show_default=True, help="smoke, cpu, gpu or gpu-short.")
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Results folder: SUITE.jsonl (appended), SUITE.md and the plot.")
@click.option("--runs-dir", default=None, type=click.Path(file_okay=False),
              help="Where run directories go (default: OUT/../runs).")
@click.option("--table", is_flag=True, help="Only render OUT/SUITE.md, OUT/SUITE_headline.md and the accuracy plot "
              "from the results.")
@click.option("--readme", default=None, type=click.Path(dir_okay=False),
              help="With --table: also put the headline table into this README, between its headline markers.")
@click.option("--n-samples", type=int, default=None, help="Synthetic images per run (default 60,000; smoke 2,000).")
@click.option("--classifiers", default=None, help="default or wrn (default: wrn on gpu presets).")
@click.option("--fid-weights", default=None, help="pytorch-fid Inception-v3 weights file: Inception features.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the first fit of each cell (repeat k uses seed + k); never the privacy noise.")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Fits per (method, epsilon): one results line with the mean and sd of each accuracy and FID "
              "(the noise is secret, so two fits differ). Run directories get -r1..-rR when R > 1.")
@click.option("--insecure-seeded-noise", is_flag=True,
              help="TESTS ONLY: draw privacy noise from each fit's seed (reproducible, not private); lines record "
              "noise_source seeded-insecure and the table marks them seeded.")
@click.option("--device", default=None)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (1 is fastest on a shared machine; 2 on a dedicated one).")
@click.option("--public", default=None, help="Public data SPEC passed to every method's fit (e.g. mnist-5k).")
@click.option("--variant", default=None,
              help="Name for a non-default configuration: rows and run directories read METHOD+VARIANT.")
def bench_cmd(overrides: tuple[str, ...], suite_name: str, methods: str | None, epsilons: str, preset: str,
              out_dir: str, runs_dir: str | None, table: bool, n_samples: int | None, classifiers: str | None,
              fid_weights: str | None, seed: int, repeats: int, insecure_seeded_noise: bool, device: str | None,
              threads: int, public: str | None, variant: str | None, readme: str | None) -> None:
    """Fit, sample and evaluate each method at each epsilon (--repeats times); append one JSON line per cell.

    KEY=VALUE arguments override the preset's settings for every method
    (e.g. `features=public`); give such a run a --variant name. Privacy
    noise comes from the OS CSPRNG, so a cell's line is the mean (and sd)
    of its --repeats fits, fit k with seed --seed + k.
    """
    from dpimages.bench.suite import BenchOptions, parse_list, run_bench, update_readme, write_table

    if table:
        text, md_path, png = write_table(out_dir, suite_name)
        if readme:
            update_readme(readme, (md_path.parent / f"{suite_name}_headline.md").read_text())
        click.echo(text + f"\nwrote {md_path} and {png}" + (f"; the headline in {readme}" if readme else ""))
        return
    if not methods:
        raise InputError("--methods is required (e.g. --methods dpdm,real), or use --table")
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    opts = BenchOptions(preset=preset, seed=seed, device=device, n_samples=n_samples, classifiers=classifiers,
                        fid_weights=fid_weights, threads=threads, public=public, overrides=overrides,
                        variant=variant, repeats=repeats, insecure_seeded_noise=insecure_seeded_noise)
    lines = run_bench(suite_name, parse_list(methods, "methods"), parse_list(epsilons, "epsilons", float), out_dir,
                      runs_dir, opts)
    warning = ("\nWARNING: seeded-insecure noise (--insecure-seeded-noise): these runs are not private for anyone "
               "who knows the seed" if insecure_seeded_noise else "")
    click.echo(f"{len(lines)} results lines ({repeats} fit{'s' if repeats > 1 else ''} each) appended to {out_dir}; "
               f"render them with `dpimages bench --table`{warning}")


@cli.group("public-model")
def public_model_group() -> None:
    """Public generative models for PE (trained on PUBLIC data only, without privacy)."""


@public_model_group.command("train")
@click.argument("overrides", nargs=-1)
@click.option("--data", "data_spec", required=True, help="Public data SPEC, e.g. mnist-5k. Never private data: "
              "the model is used by PE without privacy accounting.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New directory for model.safetensors + model.json (+ samples.png).")
@click.option("--preset", default="cpu", show_default=True, help="smoke, cpu or gpu (U-Net size and epochs).")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--json", "as_json", is_flag=True)
def public_model_train_cmd(overrides: Sequence[str], data_spec: str, out: str, preset: str, threads: int | None,
                           device: str | None, as_json: bool) -> None:
    """Train PE's diffusion API (an EDM U-Net) on a PUBLIC set; KEY=VALUE overrides (e.g. epochs=5).

    Use it with `dpimages fit pe ... api_path=OUT`.
    """
    import torch

    from dpimages.data import load
    from dpimages.registry import method_class

    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def log(**kv: object) -> None:
        if not as_json:
            click.echo(" ".join(f"{k}={v}" for k, v in kv.items()), err=True)

    pe = method_class("pe")
    cfg = pe.public_model_config(preset, list(overrides))  # bad keys refused before the data is read
    path, meta = pe.train_public_model(load(data_spec), cfg, out, preset=preset, device=dev, log=log)
    _emit({"out": str(path), **meta}, as_json, f"wrote {path} (EDM U-Net, {meta['parameters']:,} parameters, "
          f"trained on {meta['trained_on']} for {cfg.epochs} epochs in {meta['train_s']:.0f} s); use: dpimages fit "
          f"pe ... api_path={path}")


@cli.command("audit")
@click.option("--method", default="all", show_default=True,
              help="A registered method (white-box audit of its own releases on neighbours), `methods` (all of "
              "them), a mechanism (gaussian-sum, histogram, dpsgd, gaussian-release: canary audit) or all "
              "(every mechanism).")
@click.option("--epsilon", type=float, default=1.0, show_default=True, help="Claimed epsilon (sigma is calibrated).")
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--canaries", type=int, default=None, help="Number of canaries m (default: 200 smoke, 2000 full).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--self-test", is_flag=True, help="Also audit deliberately broken variants (each must be flagged).")
@click.option("--size", type=click.Choice(["smoke", "full"]), default="smoke", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def audit_cmd(method: str, epsilon: float, delta: float, canaries: int | None, seed: int, self_test: bool, size: str,
              as_json: bool) -> None:
    """Audit the privacy claims: a method's own releases on neighbours, or a mechanism by canaries.

    A registered method (or `methods`): its smoke fit and its neighbours with a worst-case image added first, in
    the middle and last; every release's move against its declared sensitivity, and the epsilon implied by the
    worst move (`dpimages.audit.method_audit`). A mechanism (or `all`): the one-run canary audit (Steinke et al.
    2023), a 95% lower bound on epsilon beside the claimed epsilon. Exit 1 when the audit fails: a release moves
    further than declared, an honest variant is flagged, or (--self-test) a broken one is not.
    """
    import torch

    from dpimages.audit import METHOD_TARGETS, TARGETS, audit_passed, run_audit
    from dpimages.registry import methods as registered

    torch.set_num_threads(1)
    if method == "methods" or method in registered():
        if self_test or canaries is not None or size != "smoke":
            raise InputError("--self-test, --canaries and --size apply to mechanism audits; a method's broken "
                             "variants are in tests/methods/test_contract_mutations.py")
        _audit_methods(registered() if method == "methods" else [method], epsilon, delta, as_json)
        return
    methods = list(TARGETS) if method == "all" else [method]
    results = run_audit(methods, self_test=self_test, epsilon=epsilon, delta=delta, size=size, canaries=canaries,
                        seed=seed)
    rows = [r.to_json() for r in results]
    lines = []
    for r in results:
        used = ", ".join(m for m, t in METHOD_TARGETS.items() if t == r.target)
        lines.append(f"{r.method:<17} {r.variant:<19} claimed {r.claimed_epsilon:6.3f}  lower bound "
                     f"{r.epsilon_lower_bound:6.3f}  ({r.correct}/{r.guesses} correct)  "
                     f"{'VIOLATION' if r.violation else 'ok'}  [{r.mechanism}; used by {used}]")
    first = results[0]
    lines.append(f"delta {delta:g}, {first.canaries} canaries, {first.guesses} guesses, 95% confidence: a lower "
                 "bound on epsilon, not a proof of privacy")
    if first.max_lower_bound <= epsilon:
        lines.append(f"note: with {first.guesses} guesses the bound cannot exceed {first.max_lower_bound:.3f} <= "
                     f"claimed epsilon {epsilon:g}: no violation is detectable; use more --canaries or --size full")
    _emit({"results": rows}, as_json, "\n".join(lines))
    if not audit_passed(results):
        why = ("an honest variant exceeded its claim or a broken variant was not flagged" if self_test
               else "the lower bound exceeds the claimed epsilon")
        raise DPImagesError(f"audit failed: {why}")


def _audit_methods(names: list[str], epsilon: float, delta: float, as_json: bool) -> None:
    """`dpimages audit --method NAME|methods`: the white-box neighbour audit of each method's own releases."""
    from dpimages.audit.method_audit import audit_method
    from dpimages.privacy import validate_budget

    validate_budget(epsilon, delta)
    results = [audit_method(name, epsilon=epsilon, delta=delta) for name in names]
    lines = [f"{r.method:<11} claimed {r.claimed_epsilon:7.4f}  implied {r.implied_epsilon:7.4f}  worst move "
             f"{r.worst_ratio:.4f} of the declared sensitivity ({r.releases} releases; {r.worst_release!r}, image "
             f"added at {r.worst_position})  {'VIOLATION' if r.violation else 'ok'}" for r in results]
    lines.append(f"each method's smoke fit on 200 generated images, neighbours with a worst-case image added at "
                 f"{', '.join(map(str, results[0].positions))}; delta {delta:g}: a measurement, not a proof")
    _emit({"results": [r.to_json() for r in results]}, as_json, "\n".join(lines))
    if any(r.violation for r in results):
        raise DPImagesError("audit failed: a release moved further than its declared sensitivity")


cli.add_command(budget_group)
cli.add_command(tune_cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: map errors to exit codes with one line on stderr."""
    keep_freed_memory()
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="dpimages", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"dpimages: error: {e.format_message()}", err=True)
        return 2
    except DPImagesError as e:
        click.echo(f"dpimages: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
