"""Private Evolution (Lin et al., ICLR 2024, "Differentially Private Synthetic Data via Foundation Model APIs
1: Images"): a public generative model's samples, steered by noisy nearest-neighbour votes of private images.

Steps of `PE.fit` (T = ``iterations``, population ``population_per_class``
per class, lookahead k, degrees d_1 > ... > d_T):

1. Public parts: load the generative-model API (`diffusion_api` /
   `diffusers_api`) and check it makes images of the private data's shape.
2. Before any private access: calibrate the noise multiplier sigma of the
   T vote releases for the target (epsilon, delta), reserve the whole
   schedule in the ledger (`release.calibrate_votes`) and build the
   feature network (public, path or random; never trained on private data).
3. Embed the private images once (`release.PrivateVotes`: the only read of
   private pixels) and draw
   the initial population with ``random``; labels are uniform:
   ``population_per_class`` samples per class. Class sizes of the private
   data are *not* released, and no budget is spent on them.
4. For t = 1..T: embed the population (lookahead: the mean embedding of k
   variations of degree d_t of each sample); every private image votes for
   its nearest synthetic sample of its own class; the histogram over the
   whole population is released with Gaussian noise (one ledger event,
   sensitivity 1; `release` has the contract); bins below H =
   ``threshold_sigmas`` x sigma are zeroed; the next population is drawn per
   class in proportion to the noisy counts and each draw is replaced by its
   variation of degree d_t. Checkpoints after the release and after the
   variation; a grid of the population and the noisy histogram's statistics
   go to the run directory.
5. The final population is the synthetic data; `sample(n)` returns it and
   draws extra variations (degree d_T) of its members when n is larger.

Neighbouring relation: add or remove one image together with its label. The
ledger holds T Gaussian events ``pe vote histogram`` with noise multiplier
sigma. Resuming: the ledger's count of releases already spent decides which
release comes next, so a killed run never spends more or fewer than T; a
release recorded but lost to a crash before its histogram was checkpointed is
counted and not redone (with a seeded noise source its noise draw is skipped,
so later releases get the noise an uninterrupted run would have drawn).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpimages.config import resolve_config
from dpimages.data import ImageData, to_uint8, to_unit_range
from dpimages.errors import InputError
from dpimages.eval.grid import save_grid
from dpimages.methods.base import TrainedSynthesizer
from dpimages.methods.feature_sources import build_trunks
from dpimages.methods.pe import release as rel
from dpimages.methods.pe.config import PEConfig, PublicModelConfig
from dpimages.methods.pe.diffusion_api import DiffusionAPI, model_arch, save_public_model, train_public_model
from dpimages.methods.pe.image_api import ImageAPI, check_degree
from dpimages.methods.pe.public_model import cached_public_model, public_model_config, train_and_save_public_model
from dpimages.methods.pe.report import report_text
from dpimages.methods.prior import Prior, fit_prior, plan_prior, refuse_spent_stage
from dpimages.methods.training import RunClock, TimeEstimate
from dpimages.nets.feature_extractors import FeatureExtractor, Trunk, embed_in_chunks, trunk_from_config
from dpimages.privacy import PrivacyEvent
from dpimages.runs import prefixed, rng_state, set_rng_state, unprefixed
from dpimages.seeds import stream_seed
from dpimages.synthesizer import FitContext


class PE(TrainedSynthesizer[PEConfig]):
    """Private Evolution over a generative-model API (see the module docstring).

    ``train_info`` (public facts, saved with every checkpoint): the API's description, the vote features'
    source, embedding dimension, noise multiplier, threshold, schedule, ``train_s`` (the whole fit) and
    ``lost_releases``.
    """

    name = "pe"
    Config = PEConfig
    description = "Private Evolution: noisy nearest-neighbour votes steer a public generative model (no training)"

    def __init__(self, config: PEConfig) -> None:
        super().__init__(config)
        self.api: ImageAPI | None = None
        self.population: np.ndarray | None = None  # uint8 (P, H, W, C)
        self.population_labels: np.ndarray | None = None  # int64 (P,)
        self._trunk: Trunk | None = None
        self._extractor: FeatureExtractor | None = None
        self._save_index = 0

    @classmethod
    def smoke_requirements(cls, workdir: Path) -> dict[str, Any]:
        """A tiny public diffusion model trained on generated noise images (offline), and random vote features."""
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(64, 28, 28, 1, generator=g) * 255).to(torch.uint8).numpy()
        public = ImageData(images, np.arange(64, dtype=np.int64) % 2, ["a", "b"], "toy public")
        cfg = PublicModelConfig(channels=8, channel_mult=(1, 2), epochs=1, max_steps=2, batch_size=16)
        model, facts = train_public_model(public, cfg)
        path = save_public_model(Path(workdir) / "public-model", model, {
            "arch": model_arch(cfg, (28, 28, 1)), "image_shape": [28, 28, 1], "trained_on": public.name, **facts})
        return {"overrides": [f"api_path={path}", "features=random"]}

    # -- parts -----------------------------------------------------------------------------------
    # `dpimages public-model train` reaches these through the registry (nothing imports a method package)
    public_model_config = staticmethod(public_model_config)
    train_public_model = staticmethod(train_and_save_public_model)

    def with_api(self, api: ImageAPI) -> PE:
        """Use `api` instead of loading one from the config (e.g. a custom model in a script or test)."""
        self.api = api
        return self

    def _train_public_api(self, public: ImageData, ctx: FitContext) -> None:
        """First stage without ``api_path``: train (or reuse from the cache) the public model on `public`."""

        def log(**kv: Any) -> None:  # public-data training progress (its own step counter as train_step)
            if ctx.run is not None:
                ctx.run.log(0, event="public_model_training", **{"train_" + k if k == "step" else k: v
                                                                  for k, v in kv.items()})

        path = cached_public_model(public, self.config.public_model_preset, device=self.device, log=log,
                                   progress=ctx.progress)
        self.train_info["api_path"] = str(path)

    def _check_api(self) -> None:
        api = self.load_api()
        api.check_shape(self.image_shape)
        api.set_classes(self.classes)

    def _train_prior_api(self, prior: Prior, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """api=dp-prior: fit the DP prior (its planned, reserved releases), train the diffusion API on its samples.

        The API is post-processing of the prior's releases: trained without privacy accounting on
        ``prior_images`` of its samples (unconditional: PE's votes decide which class a sample serves), saved
        under the run's checkpoints (``prior-api``; a temporary folder without a run) and used like a public model.
        """
        cfg = self.config
        refuse_spent_stage(ctx.ledger, prior.events, "dp-prior")
        fit_prior(prior, private, public, ctx)
        samples = prior.synthesizer.sample(cfg.prior_images, seed=stream_seed(ctx.seed, "pe", "prior-samples"))
        model_cfg = resolve_config(PublicModelConfig, cfg.public_model_preset)
        model, facts = train_public_model(samples, model_cfg, device=self.device, progress=ctx.progress,
                                          desc="pe API on DP-prior samples (post-processing, no privacy cost)")
        out = (ctx.run.checkpoint_dir / "prior-api") if ctx.run is not None else Path(tempfile.mkdtemp()) / "api"
        shutil.rmtree(out, ignore_errors=True)
        save_public_model(out, model.cpu(), {
            "arch": model_arch(model_cfg, samples.image_shape), "image_shape": list(samples.image_shape),
            "trained_on": f"{cfg.prior_images} samples of the DP prior ({prior.synthesizer.name}, epsilon "
                          f"{prior.epsilon:.4g})", **facts})
        self.train_info["api_path"] = str(out)
        self.api = None
        if ctx.run is not None:
            ctx.run.log(0, event="prior_api_trained", steps=facts["steps"], train_s=facts["train_s"])

    def load_api(self) -> ImageAPI:
        """The configured API (loaded once from ``api_path``, or the public model trained at fit); public inputs."""
        if self.api is not None:
            return self.api
        cfg = self.config
        api_path = cfg.api_path or self.train_info.get("api_path", "")
        if not api_path:
            raise InputError(f"pe: api={cfg.api} needs api_path=DIR (a model from `dpimages public-model train`"
                             + (") or --public SPEC to train one first" if cfg.api == "diffusion"
                                else " or a local diffusers pipeline directory)"))
        if not Path(api_path).exists():
            raise InputError(f"pe: the public model {api_path} is gone (the cache was cleared?): refit, or pass "
                             "api_path=DIR")
        if cfg.api in ("diffusion", "dp-prior"):
            api: ImageAPI = DiffusionAPI.load(api_path, sample_steps=cfg.sample_steps,
                                              variation_steps=cfg.variation_steps, sampler=cfg.sampler,
                                              batch=cfg.api_batch, device=self.device)
        else:
            from dpimages.methods.pe.diffusers_api import DiffusersAPI

            api = DiffusersAPI.load(api_path, steps=cfg.sample_steps, guidance=cfg.guidance,
                                    prompt_template=cfg.prompt_template, batch=cfg.api_batch,
                                    image_shape=self.image_shape if self.num_classes else None, device=self.device)
        recorded = self.train_info.get("api", {}).get("sha256")
        if recorded and api.describe().get("sha256") != recorded:
            raise InputError(f"pe: the model in {api_path} is not the one this run used (sha256 differs)")
        if self.classes:
            api.set_classes(self.classes)
        self.api = api
        return api

    def _build_trunk(self, public: ImageData | None, ctx: FitContext) -> tuple[Trunk, dict[str, Any]]:
        """The vote feature network from public information only (`methods.feature_sources`; `_plan` has refused
        features=public without public data)."""

        def log(**kv: Any) -> None:
            if ctx.run is not None:
                ctx.run.log(0, event="public_feature_training", **kv)

        (trunk,), facts = build_trunks(self.config, self.image_shape[2], public, log, self.image_shape[:2])
        return trunk, facts

    def _set_trunk(self, trunk: Trunk) -> None:
        cfg = self.config
        self._trunk = trunk
        self._extractor = FeatureExtractor([trunk], cfg.feature_layers, cfg.feature_pool).to(self.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) unit-norm embeddings of the vote feature network."""
        assert self._extractor is not None
        first, _ = embed_in_chunks(self._extractor, x.to(self.device), self.config.embed_chunk)
        return first

    def _synthetic_embeddings(self, api: ImageAPI, x: torch.Tensor, labels: torch.Tensor, degree: float,
                              g: torch.Generator) -> torch.Tensor:
        """Embeddings the votes compare with: the mean over k lookahead variations (k = 0: the samples)."""
        k = self.config.lookahead
        if k == 0:
            return self.embed(x)
        total = None
        for _ in range(k):
            e = self.embed(api.variation(x, labels, degree, generator=g))
            total = e if total is None else total + e
        assert total is not None
        return total / k

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Calibrate and reserve, then T rounds of vote -> noisy histogram -> resample -> vary (module docstring)."""
        if private.labels is None:
            raise InputError(f"{private.name}: pe needs labelled private data (votes are cast within classes)")
        tensors, state = self.begin_fit(private, ctx)
        saved = dict(state.get("train_info", {}))
        sigma, planned = self._plan(private, public, ctx, saved)
        api = self.load_api()
        self._prepare(public, ctx, tensors, state, saved, api.describe(), sigma)
        g = ctx.generator("api")  # API and resampling randomness: a seed stream, apart from the privacy noise
        if "api_rng" in state:
            set_rng_state(g, state["api_rng"])
        self._save_index = int(state.get("step", -1)) + 1
        if state.get("finished"):
            self._restore_population(tensors)
            return
        spent = self._releases_spent(ctx, state, planned[0])
        self._vote_rounds(private, ctx, api, g, tensors, state, spent, sigma)

    def _plan(self, private: ImageData, public: ImageData | None, ctx: FitContext,
              saved: dict[str, Any]) -> tuple[float, list[PrivacyEvent]]:
        """Step 1: the public parts (cheap refusals first), the votes calibrated jointly with a DP prior's events and
        all of it reserved before any private access; then the prior's stage (if any). Returns (sigma, the votes'
        planned events)."""
        cfg = self.config
        prior = None
        if cfg.api == "dp-prior":  # planned here from public facts; fitted after the joint reservation
            prior = plan_prior(cfg.prior_preset, private, public, cfg.prior_share * ctx.target_epsilon,
                               ctx.ledger.delta, ctx.public_size(private))
        elif cfg.api == "diffusion" and not cfg.api_path and self.api is None and public is not None:
            self._train_public_api(public, ctx)
        if prior is None:
            self._check_api()
        if cfg.features == "public" and public is None:
            raise InputError("pe: features=public needs public data: pass --public SPEC (e.g. mnist-5k), or "
                             "use features=path feature_path=DIR or features=random")
        before = [] if prior is None else prior.events
        sigma = rel.calibrate_votes(ctx.target_epsilon, ctx.ledger.delta, cfg.iterations, before)
        planned = rel.vote_events(sigma, cfg.iterations)
        ctx.ledger.reserve(*before, *planned)
        if prior is not None:
            if saved.get("api_path"):  # resumed: the API trained on the prior's samples is in the run
                self.train_info["api_path"] = saved["api_path"]
            else:
                self._train_prior_api(prior, private, public, ctx)
            self.train_info["prior"] = prior.describe()
            self._check_api()
        return sigma, planned

    def _prepare(self, public: ImageData | None, ctx: FitContext, tensors: dict[str, torch.Tensor],
                 state: dict[str, Any], saved: dict[str, Any], api_info: dict[str, Any], sigma: float) -> None:
        """Step 2: the vote features (restored, or built from public data or at random) and `train_info`."""
        cfg = self.config
        if state and "feature_trunk" in state:
            trunk = trunk_from_config(state["feature_trunk"], "post")
            trunk.load_state_dict(unprefixed("features", tensors))
            feature_info = dict(saved.get("features", {}))
        else:
            trunk, feature_info = self._build_trunk(public, ctx)
        self._set_trunk(trunk)
        dim = int(self.embed(torch.zeros(1, self.image_shape[2], *self.image_shape[:2])).shape[1])
        self.train_info = {
            "api": api_info, "features": feature_info, "embedding_dim": dim, "noise_multiplier": sigma,
            "threshold": cfg.threshold_sigmas * sigma, "iterations": cfg.iterations, "degrees": cfg.degrees(),
            "population_per_class": cfg.population_per_class, "lookahead": cfg.lookahead, "labels": "uniform",
            "train_s": float(saved.get("train_s", 0.0)), "lost_releases": int(saved.get("lost_releases", 0)),
            **({k: self.train_info[k] for k in ("api_path", "prior") if k in self.train_info}),
        }

    def _releases_spent(self, ctx: FitContext, state: dict[str, Any], vote: PrivacyEvent) -> int:
        """Step 3 (resume): the vote releases the ledger records; those recorded after the last checkpoint (noise
        drawn, histogram lost in a crash) are counted, not redone. InputError for an inconsistent run."""
        spent, accounted = ctx.ledger.steps(like=vote), int(state.get("releases", 0))
        if spent < accounted or spent > self.config.iterations:
            raise InputError(f"pe: the ledger records {spent} vote releases but the checkpoint accounts for "
                             f"{accounted} (plan: {self.config.iterations}); the run directory is inconsistent")
        if spent > accounted:
            self.train_info["lost_releases"] += spent - accounted
            if ctx.run is not None:
                ctx.run.log(spent, event="lost_releases", count=spent - accounted,
                            note="recorded in the ledger before a crash; counted, not redone")
        return spent

    def _vote_rounds(self, private: ImageData, ctx: FitContext, api: ImageAPI, g: torch.Generator,
                     tensors: dict[str, torch.Tensor], state: dict[str, Any], spent: int, sigma: float) -> None:
        """Step 4: the rounds the ledger still lacks: private votes (the only read of private pixels, release.py)
        -> noisy histogram -> resample -> vary, a checkpoint after each half; the final grid and ``train_done``."""
        cfg, run = self.config, ctx.run
        k, per, t_total, degrees = self.num_classes, cfg.population_per_class, cfg.iterations, cfg.degrees()
        h = cfg.threshold_sigmas * sigma
        clock, train_s0 = RunClock(), self.train_info["train_s"]

        def elapsed() -> float:
            return train_s0 + clock.elapsed()

        votes = rel.PrivateVotes(self.embed, private, k, backend=cfg.nn_backend, chunk=cfg.nn_chunk)
        labels = torch.arange(k * per) // per
        if "population.images" in tensors:
            self._restore_population(tensors)
        else:
            self._set_population(api.random(k * per, labels, generator=g), labels)
            self._grid(run, "grid-000.png")
            self._checkpoint(ctx, g, phase="initial", votes_done=0, releases=spent)
        votes_done = int(state.get("votes_done", 0))
        if state.get("phase") == "voted":  # the histogram of release votes_done-1 was saved; its variation was not
            self._evolve(ctx, api, g, tensors["histogram"], votes_done - 1, degrees[votes_done - 1], h, sigma,
                         spent, elapsed)
        estimate = TimeEstimate(t_total, spent, "pe iterations", enabled=ctx.progress, min_steps=1)
        for t in tqdm(range(spent, t_total), total=t_total, initial=spent, desc="pe", unit="iter",
                      disable=not ctx.progress):
            estimate.update(t)
            x = to_unit_range(torch.from_numpy(self.population))
            syn_emb = self._synthetic_embeddings(api, x, labels, degrees[t], g)
            noisy = votes.release(syn_emb, labels, noise_multiplier=sigma, ledger=ctx.ledger, noise=ctx.noise)
            self._checkpoint(ctx, g, phase="voted", votes_done=t + 1, releases=t + 1, histogram=noisy,
                             train_s=elapsed())
            self._evolve(ctx, api, g, noisy, t, degrees[t], h, sigma, t + 1, elapsed)
        train_s = elapsed()
        self._checkpoint(ctx, g, phase="varied", votes_done=t_total, releases=t_total, finished=True,
                         train_s=train_s)
        if run is not None:
            self._grid(run, "grid-final.png")
            run.log(t_total, event="train_done", releases=t_total, lost_releases=self.train_info["lost_releases"],
                    **clock.run_times(t_total - spent, train_s))

    def _evolve(self, ctx: FitContext, api: ImageAPI, g: torch.Generator, noisy: torch.Tensor, t: int,
                degree: float, h: float, sigma: float, releases: int, elapsed: Callable[[], float]) -> None:
        """Post-processing of release t: threshold, resample, vary; then log, grid and checkpoint.

        The votes line carries no time: the time of one release is not logged, only the whole fit's (``train_s`` in
        the ``train_done`` event).
        """
        assert self.population is not None and self.population_labels is not None
        labels = torch.from_numpy(self.population_labels)
        kept = rel.threshold(noisy, h)
        idx, empty = rel.resample(kept, labels, self.num_classes, self.config.population_per_class, g)
        parents = to_unit_range(torch.from_numpy(self.population[idx.numpy()]))
        children = api.variation(parents, labels[idx], degree, generator=g)
        self._set_population(children, labels[idx])
        run = ctx.run
        if run is not None:
            stats = rel.histogram_stats(noisy, kept, labels, self.num_classes, h, idx)
            run.log(t + 1, event="votes", degree=round(degree, 4), noise_multiplier=round(sigma, 5),
                    classes_without_votes=empty, **stats)
            self._grid(run, f"grid-{t + 1:03d}.png")
        self._checkpoint(ctx, g, phase="varied", votes_done=t + 1, releases=releases, train_s=elapsed())

    # -- population, checkpoints, grids ------------------------------------------------------------
    def _set_population(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.population = to_uint8(x)
        self.population_labels = labels.cpu().numpy().astype(np.int64)

    def _restore_population(self, tensors: dict[str, torch.Tensor]) -> None:
        if "population.images" not in tensors or "population.labels" not in tensors:
            raise InputError("pe checkpoint has no population (population.images, population.labels)")
        self.population = tensors["population.images"].numpy().astype(np.uint8)
        self.population_labels = tensors["population.labels"].numpy().astype(np.int64)

    def _checkpoint(self, ctx: FitContext, g: torch.Generator, *, phase: str, votes_done: int, releases: int,
                    histogram: torch.Tensor | None = None, finished: bool = False, train_s: float = 0.0) -> None:
        if ctx.run is None:
            return
        assert self._trunk is not None
        tensors = {**self.state_dict(), **prefixed("features", self._trunk.state_dict())}
        if histogram is not None:
            tensors["histogram"] = histogram.double().cpu()
        self.train_info["train_s"] = float(train_s or self.train_info.get("train_s", 0.0))
        self.save_checkpoint(ctx, tensors, step=self._save_index, finished=finished, phase=phase,
                             votes_done=votes_done, releases=releases, api_rng=rng_state(g),
                             feature_trunk=self._trunk.config())
        self._save_index += 1

    def _grid(self, run: Any, name: str) -> None:
        if run is None or self.population is None or self.population_labels is None:
            return
        per = min(self.config.grid_per_class, self.config.population_per_class)
        save_grid(run.grid_path(name), self.population, self.population_labels, self.num_classes, per)

    # -- sampling and state --------------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """The final population (a seeded choice of members per class); extra variations when n exceeds it."""
        if self.population is None or self.population_labels is None:
            raise InputError("pe: fit or load the synthesizer before sampling")
        labels = self.checked_labels(n, labels)
        g = torch.Generator().manual_seed(int(seed or 0))
        out = np.empty((n, *self.population.shape[1:]), np.uint8)
        extra_pos, extra_parent = [], []
        for c in range(self.num_classes):
            want = np.flatnonzero(labels == c)
            if want.size == 0:
                continue
            members = np.flatnonzero(self.population_labels == c)
            if members.size == 0:
                raise InputError(f"pe: the population has no sample of class {c}")
            order = members[torch.randperm(members.size, generator=g).numpy()]
            take = order[: want.size]
            out[want[: take.size]] = self.population[take]
            rest = want[take.size :]
            if rest.size:
                extra_pos.append(rest)
                extra_parent.append(members[torch.randint(members.size, (rest.size,), generator=g).numpy()])
        if extra_pos:
            pos, parents = np.concatenate(extra_pos), np.concatenate(extra_parent)
            degrees = self.train_info.get("degrees") or self.config.degrees()
            degree = check_degree(degrees[-1])
            api = self.load_api()
            x = to_unit_range(torch.from_numpy(self.population[parents]))
            out[pos] = to_uint8(api.variation(x, torch.from_numpy(labels[pos]), degree, generator=g))
        return ImageData(out, labels, list(self.classes), "pe samples")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The population: ``population.images`` uint8 (P, H, W, C) and ``population.labels`` int64 (P,)."""
        if self.population is None or self.population_labels is None:
            raise InputError("pe: nothing to save before fit")
        return {"population.images": torch.from_numpy(np.ascontiguousarray(self.population)),
                "population.labels": torch.from_numpy(np.ascontiguousarray(self.population_labels))}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self._restore_population(tensors)

    # -- report --------------------------------------------------------------------------------------
    def report_section(self) -> str:
        """API, public data, feature network, releases and schedule (for report.md)."""
        if not self.train_info:
            return ""
        return report_text(self.config, self.num_classes, self.image_shape, self.train_info)
