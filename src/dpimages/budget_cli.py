"""`dpimages budget ...` (the owner's budget book) and `dpimages tune` (private tuning that pays for itself).

Exit codes as everywhere: 0 done, 2 bad input (one line, nothing written), 3 budget refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from dpimages.errors import InputError

BOOK_OPTION_HELP = ("The budget book (SQLite; default $DPIMAGES_BUDGET_BOOK, else "
                    "$XDG_DATA_HOME/dpimages/budget.sqlite or ~/.local/share/dpimages/budget.sqlite). Owner only.")


def _emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj) if as_json else text)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@click.group("budget")
def budget_group() -> None:
    """The owner's budget book: one privacy budget per named data set, composed over every run on it."""


@budget_group.command("set")
@click.argument("name")
@click.option("--epsilon", type=float, required=True, help="The data set's total epsilon over all runs.")
@click.option("--delta", type=float, required=True, help="The delta at which every run on it is composed.")
@click.option("--budget-book", "book_path", default=None, type=click.Path(dir_okay=False), help=BOOK_OPTION_HELP)
@click.option("--json", "as_json", is_flag=True)
def budget_set_cmd(name: str, epsilon: float, delta: float, book_path: str | None, as_json: bool) -> None:
    """Give data set NAME a total budget (creates the book if needed; changes an existing budget)."""
    from dpimages.budget.book import BudgetBook, check_name
    from dpimages.privacy import validate_budget

    check_name(name)
    validate_budget(epsilon, delta)  # before the book is created or opened: bad input writes nothing
    with BudgetBook(book_path, create=True) as book:
        book.set_budget(name, epsilon, delta)
        s = book.summary(name)
        path = book.path
    _emit({**s, "book": str(path)}, as_json, f"budget {name}: epsilon {epsilon:g} at delta {delta:g}; spent "
          f"{s['epsilon_total']:.4f} over {s['runs']} runs (book {path})")


@budget_group.command("show")
@click.argument("name", required=False)
@click.option("--budget-book", "book_path", default=None, type=click.Path(dir_okay=False), help=BOOK_OPTION_HELP)
@click.option("--json", "as_json", is_flag=True)
def budget_show_cmd(name: str | None, book_path: str | None, as_json: bool) -> None:
    """A table of the budgets (or NAME's): total (PLD composition of all runs) beside the naive sum."""
    from dpimages.budget.book import BudgetBook

    with BudgetBook(book_path) as book:
        names = [name] if name is not None else book.names()
        rows = [book.summary(n) for n in names]
        path = book.path
    head = f"{'budget':<20} {'epsilon':>9} {'delta':>9} {'runs':>5} {'spent (PLD)':>12} {'sum':>9} {'left':>9}"
    lines = [f"book {path}", head] + [
        f"{r['budget']:<20} {r['epsilon_budget']:>9g} {r['delta']:>9g} {r['runs']:>5} {r['epsilon_total']:>12.4f} "
        f"{r['epsilon_sum']:>9.4f} {r['epsilon_remaining']:>9.4f}" for r in rows]
    if not rows:
        lines.append("(no budgets yet: dpimages budget set NAME --epsilon E --delta D)")
    lines.append("spent: dp-accounting PLD composition of every run's events at the budget's delta; sum: the naive "
                 "sum of each run's epsilon, for comparison only")
    out: dict[str, Any] = {"book": str(path), "budgets": rows}
    _emit(rows[0] if (as_json and name is not None) else out, as_json, "\n".join(lines))


def _events_text(events: list[dict]) -> str:
    return "; ".join(f"{e.get('label') or e['kind']} x{e['steps']} (nm {e['noise_multiplier']:.3g}"
                     + (f", q {e['sample_rate']:.3g}" if 'sample_rate' in e else "") + ")" for e in events)


def _plot(rows: list[dict], budget: dict, name: str, out: str) -> None:
    """Spend over time: the composed total and the naive sum after each run (at its first reservation)."""
    from datetime import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    when = [datetime.fromtimestamp(r["created"]) for r in rows]
    ax.step(when, [r["epsilon_total"] for r in rows], where="post", marker="o", label="composed total (PLD)")
    ax.step(when, [r["epsilon_sum"] for r in rows], where="post", linestyle="--", marker=".",
            label="naive sum of the runs' epsilons")
    ax.axhline(budget["epsilon_budget"], color="red", linewidth=1, label=f"budget {budget['epsilon_budget']:g}")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("run reserved at")
    ax.set_ylabel(f"epsilon at delta {budget['delta']:g}")
    ax.set_title(f"privacy spent on {name} ({len(rows)} runs)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = Path(out).with_name(Path(out).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


@budget_group.command("history")
@click.argument("name")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the spend over time into FILE.png (matplotlib).")
@click.option("--budget-book", "book_path", default=None, type=click.Path(dir_okay=False), help=BOOK_OPTION_HELP)
@click.option("--json", "as_json", is_flag=True)
def budget_history_cmd(name: str, plot_path: str | None, book_path: str | None, as_json: bool) -> None:
    """NAME's runs in order: their events, their own epsilon and the running total (composed) and sum."""
    from dpimages.budget.book import BudgetBook

    if plot_path is not None:
        if not plot_path.endswith(".png"):
            raise InputError(f"--plot must end in .png, got {plot_path}")
        if not Path(plot_path).resolve().parent.is_dir():
            raise InputError(f"--plot: directory {Path(plot_path).parent} does not exist")
    with BudgetBook(book_path) as book:
        rows = book.history(name)
        s = book.summary(name)
    lines = [f"budget {name}: epsilon {s['epsilon_budget']:g} at delta {s['delta']:g}",
             f"{'#':>3} {'updated':<19} {'status':<9} {'run':<10} {'method':<12} {'run eps':>8} {'total':>8} "
             f"{'sum':>8}  events"]
    for r in rows:
        lines.append(f"{r['index']:>3} {_when(r['updated']):<19} {r['status']:<9} {r['run_id'][:8]:<10} "
                     f"{str(r['info'].get('method', ''))[:12]:<12} {r['epsilon']:>8.4f} {r['epsilon_total']:>8.4f} "
                     f"{r['epsilon_sum']:>8.4f}  {_events_text(r['events'])}")
    if not rows:
        lines.append("(no runs yet)")
    if plot_path is not None:
        if not rows:
            raise InputError(f"budget {name!r} has no runs yet: nothing to plot")
        _plot(rows, s, name, plot_path)
        lines.append(f"wrote {plot_path}")
    _emit({"summary": s, "runs": rows}, as_json, "\n".join(lines))


@click.command("tune")
@click.argument("method")
@click.argument("grid", nargs=-1)
@click.option("--data", "data_spec", required=True, help="Private data SPEC.")
@click.option("--epsilon", type=float, required=True,
              help="The whole tuning's epsilon: every candidate's fit and every score release together.")
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--preset", default="cpu", show_default=True, help="The preset the grid varies.")
@click.option("--public", "public_spec", default=None, help="Public data SPEC (methods that use it).")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="A new folder: the chosen candidate's run directory.")
@click.option("--budget", "budget", default=None, help="The data set's name in the budget book.")
@click.option("--budget-book", "book_path", default=None, type=click.Path(dir_okay=False), help=BOOK_OPTION_HELP)
@click.option("--heldout", type=float, default=0.1, show_default=True,
              help="Fraction of the data held out (by content, with a secret key) to score the candidates.")
@click.option("--score-share", type=float, default=0.1, show_default=True,
              help="Share of epsilon left to the score releases: the candidates' fits alone compose to "
              "(1 - share) x epsilon.")
@click.option("--score-samples", type=int, default=None,
              help="Synthetic images each candidate's score classifier trains on (default 5000; smoke 500).")
@click.option("--score-classifier", type=click.Choice(["logreg", "mlp", "cnn"]), default="logreg", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Never the privacy noise.")
@click.option("--num-classes", type=int, default=None)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True)
def tune_cmd(method: str, grid: Sequence[str], data_spec: str, epsilon: float, delta: float, preset: str,
             public_spec: str | None, run_dir: str, budget: str | None, book_path: str | None, heldout: float,
             score_share: float, score_samples: int | None, score_classifier: str, seed: int,
             num_classes: int | None, device: str | None, as_json: bool) -> None:
    """Choose METHOD's settings on private data by report-noisy-max, paying for every candidate.

    GRID: KEY=v1,v2,... (or KEY=v1|v2 for list values); the candidates are their cartesian product over
    --preset. The whole plan (every candidate's fit and score) is calibrated to --epsilon and reserved
    (in the book too, with --budget) before any private read; the chosen run's ledger holds all of it.
    """
    from dpimages.tune import TuneOptions, tune

    opts = TuneOptions(heldout=heldout, score_share=score_share, score_samples=score_samples,
                       score_classifier=score_classifier, seed=seed, device=device, progress=not as_json)
    res = tune(method, data_spec, list(grid), epsilon=epsilon, delta=delta, preset=preset, public=public_spec,
               run_dir=run_dir, budget=budget, budget_book=book_path, num_classes=num_classes, options=opts)
    t = res.tuning
    chosen = t["candidates"][t["chosen"]]
    settings = ", ".join(f"{k}={v}" for k, v in chosen["overrides"].items()) or "the preset"
    lines = [f"c{i}: {', '.join(f'{k}={v}' for k, v in c['overrides'].items()) or 'preset'}  noisy accuracy "
             f"{c['noisy_accuracy']:.4f}" for i, c in enumerate(t["candidates"])]
    lines.append(f"chosen c{t['chosen']} ({settings}): run {res.run_dir}; epsilon {res.epsilon:.4f} (PLD) for the "
                 f"whole tuning at delta {delta:g}")
    if res.budget_book:
        b = res.budget_book
        lines.append(f"budget {b['budget']}: {b['epsilon_total']:.4f} of {b['epsilon_budget']:g} spent "
                     f"(composed over {b['runs']} runs; naive sum {b['epsilon_sum']:.4f})")
    _emit({"run_dir": str(res.run_dir), "epsilon": res.epsilon, "chosen": t["chosen"],
           "chosen_overrides": chosen["overrides"], "tuning": t, "budget_book": res.budget_book}, as_json,
          "\n".join(lines))
