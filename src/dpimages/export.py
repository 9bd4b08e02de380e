"""`dpimages export RUN OUT`: copy exactly the shareable part of a finished run, with a MANIFEST.

By allow-list: only the files the run recorded as shareable when it wrote them (``RUN/shareable.json``,
`Run.record_shareable`), never whatever else lies in a folder: a file someone dropped into ``samples/`` is not
copied. A run without the list (written before issue 34) is refused. What is shareable, and why (each file's
reason is written into ``OUT/MANIFEST``):

* ``report.md``, ``privacy.json``, ``config.yaml``: the run's description and
  ledger. They hold the method's settings, the budget, the noise scales and N
  (treated as public), no statistic of the private data and no unkeyed
  fingerprint of it.
* ``metrics.jsonl``: noisy or public values only (no per-step timing).
* ``samples/``: synthetic images and grids, post-processing of DP releases.
* ``model/weights.safetensors`` + ``model/model.json``: the weights a method
  samples from (`Synthesizer.state_dict`), post-processing of its DP releases,
  with the public facts needed to rebuild it.

Never copied: ``checkpoints/`` (training state, optimizer moments and the
keyed data check, whose key would let its holder confirm a candidate data
set) and ``private-eval/`` (evaluation against the private data without
noise). A run whose noise was seeded (``--insecure-seeded-noise``) is refused:
its noise can be recomputed from the seed, so nothing in it is private.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from dpimages.errors import InputError, require_empty_folder
from dpimages.filehash import file_sha256
from dpimages.runs import PRIVATE_EVAL, Run

NEVER = ("checkpoints", PRIVATE_EVAL)  # owner-only folders: never exported, whatever a list says
WEIGHTS_REASON = "the sampling model's weights: post-processing of the run's DP releases"
MODEL_JSON_REASON = "public facts needed to sample the weights (method, config, classes, image shape)"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Copy the shareable files of the finished run in `run_dir` to the new folder `out_dir`.

    Returns the (relative path, reason) pairs written to ``OUT/MANIFEST``. InputError (nothing written) for a
    folder that is not a run, an unfinished run, a seeded-insecure run or a non-empty `out_dir`.
    """
    from dpimages.fit_runner import load_synthesizer  # the registry imports methods; keep `dpimages export` light

    run = Run(run_dir)
    cfg = run.read_config()
    if not run.privacy_path.exists():
        raise InputError(f"{run.path}: no privacy.json: not a run that can be exported")
    privacy = json.loads(run.privacy_path.read_text())
    source = privacy.get("noise_source", "seeded-insecure")  # ledgers from before noise_source were seeded
    if source != "os-csprng":
        raise InputError(f"{run.path}: its noise is {source} (drawn from the seed), so its outputs are not private; "
                         "refit without --insecure-seeded-noise to get something to share")
    allowed = run.shareable()
    if not allowed:
        raise InputError(f"{run.path}: no list of shareable files ({run.path / 'shareable.json'}; runs before "
                         "issue 34 have none): refit it to export, or copy files by hand after reading them")
    out = require_empty_folder(out_dir, "export:")
    synth = load_synthesizer(run.path, "cpu")  # InputError for an unfinished run
    tensors = synth.state_dict()

    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, str]] = []
    for rel, why in sorted(allowed.items()):
        parts = Path(rel).parts
        source = run.path / rel
        if Path(rel).is_absolute() or ".." in parts or parts[0] in NEVER or not source.is_file() or \
                source.is_symlink():
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out / rel)
        written.append((rel, why))
    (out / "model").mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(weights, str(out / "model" / "weights.safetensors"))
    written.append(("model/weights.safetensors", WEIGHTS_REASON))
    model_json = {"method": cfg.get("method"), "config": cfg.get("config"), **synth.meta()}
    (out / "model" / "model.json").write_text(json.dumps(model_json, indent=1))
    written.append(("model/model.json", MODEL_JSON_REASON))

    lines = [f"# dpimages export of {run.path.name}: every file here may be shared (epsilon "
             f"{privacy['epsilon']:.4f}, delta {privacy['delta']:g}, noise {source})",
             "# sha256  path  why it may be shared"]
    lines += [f"{file_sha256(out / rel)}  {rel}  {why}" for rel, why in written]
    lines.append("# not exported (owner only): checkpoints/ (training state, keyed data check), private-eval/ "
                 "(evaluation against the private data without noise)")
    (out / "MANIFEST").write_text("\n".join(lines) + "\n")
    return written
