"""DPDFD (after Liu et al., "Differentially Private Data-Free Distillation"): a DP student and a generator.

Steps of `DPDFD.fit`
--------------------
1. Before any private pixel is read: fix the number of student steps T
   (config ``steps``), calibrate the noise multiplier s of one step so that T
   composed Gaussian releases meet the target (epsilon, delta)
   (`dpimages.privacy.calibrate_gaussian`), and reserve the whole schedule in
   the ledger (refused up front if it would exceed the budget).
2. Split the private images into M disjoint shards (config ``teachers``) by a
   keyed hash of each image and its label (`release.shard_of`) and train one
   teacher (a CNN) per shard without privacy, in memory (M = 1: one teacher
   on all the data, the original method).
3. Repeat T times: the label-conditional generator makes a synthetic batch;
   the teachers and the student classify it; for every teacher, the gradient
   of its distillation loss (KL(teacher || student), or the L1 logit
   distance) is taken with respect to all student parameters
   (``release_space=parameters``: d entries) or to the student's logits on
   the batch (``release_space=outputs``: B x K entries), flattened and scaled
   to L2 norm exactly C; the M vectors are summed into g; it is released as
   ``g + N(0, (2 C s)^2 I)`` (`release.release_update`: one Gaussian event in
   the ledger, written before the noise is drawn). SGD with momentum steps the
   student with the released vector, post-processed: with ``outputs``, the
   vector-Jacobian product J^T g~ through the current student on the same
   synthetic batch (`release.backprop_released`), scaled to norm C; with
   ``parameters``, g~ times the public constant ``C / sqrt((M C)^2 + d (2 C s)^2)``
   (expected norm about C). Either way ``student_lr`` means the same at every
   budget. Then the generator takes
   ``gen_steps`` Adam steps against the *fixed student* (no teacher): cross-
   entropy of the student's prediction against the conditioning label, minus
   ``w_entropy`` x the student's per-image entropy (hard images near the
   student's decision boundaries, where the teacher's labels are most
   informative: an uncertainty-sampling proxy for teacher/student
   disagreement), minus ``w_balance`` x the entropy of the batch-mean
   prediction (every class used), minus ``w_diversity`` x a mode-seeking ratio
   (image distance over latent distance for pairs with the same label).
4. Outputs: the generator (``dpimages sample``), the student's weights as
   ``RUN/student.safetensors``, and, when the private data is Fashion-MNIST,
   the student's accuracy on the public test set ``fashion-mnist:test``.

Privacy argument
----------------
Neighbouring relation: add or remove one image together with its label.

* Shards: image x goes to shard h(x, y) mod M, h a BLAKE2b hash keyed by a
  seed stream (public). The shard of an image depends on that image alone,
  so for neighbouring D' = D + {x}, every shard of D' equals the same shard
  of D except shard h(x, y), which gains x. (A split by position, e.g. a
  seeded permutation of indices, lacks this: removing image j shifts every
  later index and changes many shards.) Teacher i's initialisation and batch
  order come from its own seed streams, so teacher i is a function of shard
  i (and public seeds) alone: between D and D' exactly one teacher differs.
* A teacher is a function of its shard and no single image's influence on
  it is bounded. Teachers are kept in memory only: not attributes of the
  synthesizer, not in any checkpoint (which holds the student, the generator
  and their optimiser states), not logged; neither their accuracy nor the
  shard sizes are reported (unaccounted releases).
* The only channel from the teachers to anything else is the sum of the
  normalised gradients of step t (w.r.t. the student's logits or its
  parameters). Each term has norm at most C (exactly C unless the gradient
  is zero) whatever the teacher, and between D and D' only the term of
  teacher h(x, y) differs, so ``||g_t(D) - g_t(D')|| <= 2C``: L2 sensitivity
  2C under add/remove, whatever M (the signal, up to M C, grows with M; the
  noise does not). With M = 1 the same bound holds for any two data sets.
  There is no per-example clipping, so no subsampling amplification is
  claimed (subsampling teachers per step would need an argument for a
  replace-one relation on teachers; not built).
* Step t is therefore a Gaussian mechanism with noise std 2 C s, i.e. noise
  multiplier s (METHODS.md writes the std as sigma C, so sigma = 2 s). Its
  input, besides the private data, is the synthetic batch and the student,
  both functions of the earlier noisy releases and of public randomness: T
  adaptively composed Gaussian mechanisms, accounted by dp-accounting's PLD
  accountant as one event ``gaussian(s, T)``.
* The generator is trained against the student only: post-processing of
  the released updates. The teacher labels generator images (a DP output),
  never the other way round. Logged values are functions of released
  quantities only (the norm of the noisy update, the generator's loss
  against the student, the student's public test accuracy).
* Cost: the T releases together are worth one Gaussian release of a vector
  of norm <= M T C with noise std 2 C T s_1, where s_1 is the single-release
  multiplier for the target epsilon (about 0.5 at epsilon 10, 3.7 at epsilon
  1, delta 1e-5). The signal-to-noise ratio per released coordinate is thus
  at best about M / (2 s_1 sqrt(D)) whatever T, for D released entries: d
  student parameters (tens of thousands) or B x K logits (640 at batch 64,
  160 at batch 16). With one teacher (M = 1) the guarantee is valid but
  costs all the utility; M in the hundreds, on the logits, is what makes the
  student useful (measured in docs/dpdfd.md).

The DP-SGD teacher (``teacher=dp-sgd``)
---------------------------------------
Our variant, not in METHODS.md (there the teacher is non-private): one classifier on
fixed scattering coefficients (`dpimages.methods.labeller`'s classifier and
``labeller_*`` schedule) is trained with DP-SGD on all private images,
its steps calibrated to the whole budget and reserved before any pixel is
read: Poisson sampling at rate ``labeller_batch / N``, per-example clipping,
Gaussian noise on the sum (`dpimages.scatter_classifier`). That is the only
private read and the only release. The student is then distilled from this
DP teacher on generator batches with the same loss, its gradient scaled to
norm C and no noise (the teacher is a DP output: post-processing), and the
generator is trained against the student as above. The teacher's weights
are in the checkpoint (``labeller.*``: a DP release, so a resumed run
restores it rather than spending its steps again); with ``labeller=relabel``
or ``filter`` it also labels the samples.

Resume
------
``--resume`` is supported. The teachers are never saved, so a resumed run
trains them again from the private data (same seeds, so the same teachers on
the same machine and thread count; not guaranteed bit-identical elsewhere).
This does not change the guarantee: each remaining step's release still has
sensitivity 2C whichever teachers computed it. The ledger decides how many
steps remain: a crash after a release but before its checkpoint loses that
step's update (the ledger over-counts, never under-counts), and the noise
draws of lost steps are skipped, never reused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.methods import labeller as lab
from dpimages.methods.base import TrainedSynthesizer
from dpimages.methods.dpdfd import release as rel
from dpimages.methods.dpdfd.config import DPDFDConfig
from dpimages.methods.dpdfd.report import report_text
from dpimages.methods.dpdfd.student import STUDENT_FILE, accuracy, public_test_set, save_student
from dpimages.methods.training import RunClock, TrainLoop, write_grid
from dpimages.nets.classifiers import SmallCNN, num_parameters
from dpimages.nets.generators import ConditionalGenerator
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed
from dpimages.synthesizer import FitContext


class DPDFD(TrainedSynthesizer[DPDFDConfig]):
    """DPDFD: a student distilled from a non-private teacher through normalised noisy gradients; a generator."""

    unconditional = False  # distils a classifier: needs at least 2 classes
    name = "dpdfd"
    Config = DPDFDConfig
    description = ("DP data-free distillation: teachers on disjoint shards, a DP student from their summed "
                   "normalised noisy distillation gradients; generator. Delivers a useful student, not realistic "
                   "images (Fashion-MNIST cpu, eps 10 / 1: student 58% / 50%, CNN on its images 58% / 46%)")
    device_modules = ("generator", "student")

    def __init__(self, config: DPDFDConfig) -> None:
        super().__init__(config)
        self.generator: ConditionalGenerator | None = None
        self.student: SmallCNN | None = None

    @classmethod
    def contract_cases(cls, workdir: Path) -> list[dict[str, Any]]:
        """The DP-SGD teacher (its steps are the whole plan; the student steps release nothing), filtering."""
        return [{"name": "dp-sgd teacher", "overrides": ["teacher=dp-sgd", "labeller=filter"]}]

    # -- networks (public facts only: shapes, classes, config, seeds) ---------------------------
    def new_generator(self) -> ConditionalGenerator:
        h, w, c = self.image_shape
        cfg = self.config
        return ConditionalGenerator((c, h, w), self.num_classes, cfg.z_dim, cfg.gen_channels, cfg.generator)

    def new_student(self) -> SmallCNN:
        h, w, c = self.image_shape
        cfg = self.config
        return SmallCNN(c, self.num_classes, (h, w), tuple(cfg.student_channels), cfg.student_hidden)  # type: ignore[arg-type]

    def new_teacher(self) -> SmallCNN:
        h, w, c = self.image_shape
        cfg = self.config
        return SmallCNN(c, self.num_classes, (h, w), tuple(cfg.teacher_channels), cfg.teacher_hidden)  # type: ignore[arg-type]

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Calibrate and reserve, train the teacher, then the noisy student/generator loop (module docstring)."""
        cfg = self.config
        if private.labels is None:
            raise InputError(f"{private.name}: dpdfd needs labelled private data (teacher and conditional generator)")
        h, w, c = private.image_shape
        if min(h, w) < 16:
            raise InputError(f"dpdfd needs images of at least 16x16 pixels (SmallCNN), got {h}x{w}x{c}")
        if private.num_classes < 2:
            raise InputError(f"dpdfd needs at least 2 classes (it distils a classifier), got {private.num_classes}: "
                             "give the images class sub-folders, or fit unlabelled images with another method")
        if cfg.teacher == "shards" and cfg.teachers > len(private):
            raise InputError(f"dpdfd: teachers={cfg.teachers} shards cannot exceed the {len(private)} private images")
        tensors, state = self.begin_fit(private, ctx)
        # 1. schedule and noise from public choices only, before any private pixel is read
        dp_teacher = cfg.teacher == "dp-sgd"
        if dp_teacher:  # the DP-SGD teacher's steps are the whole plan; the student steps release nothing
            plan = lab.plan_labeller(cfg, ctx.public_size(private), ctx.target_epsilon, ctx.ledger.delta, share=1.0)
            assert plan is not None
            sigma = plan.noise_multiplier
            ctx.ledger.reserve(*plan.events())
        else:
            sigma = rel.calibrate_steps(ctx.target_epsilon, ctx.ledger.delta, cfg.steps)
            ctx.ledger.reserve(rel.planned_event(sigma, cfg.steps))
        with ctx.seeded_init("model"):
            student = self.new_student().to(self.device)
            gen = self.new_generator().to(self.device)
        s_params = [p for p in student.parameters() if p.requires_grad]
        sopt = torch.optim.SGD(s_params, lr=cfg.student_lr, momentum=cfg.student_momentum)
        gopt = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr, betas=(cfg.gen_beta1, 0.999))
        g = ctx.generator("train")  # latent codes and labels of synthetic batches (public randomness)
        self.train_info = {
            "steps": cfg.steps, "noise_multiplier": sigma, "sigma_methods_md": 2.0 * sigma, "clip_norm": cfg.clip_norm,
            "noise_std": 2.0 * cfg.clip_norm * sigma, "student_parameters": num_parameters(student),
            "generator_parameters": num_parameters(gen), "train_s": 0.0, "teacher_s": 0.0, "teacher_trainings": 0,
            "student_test_accuracy": None, "student_test_set": None, "teachers": cfg.teachers,
            "update_scale": rel.update_scale(cfg.clip_norm, sigma, num_parameters(student), cfg.teachers),
        }
        if dp_teacher:
            self.train_info.update(teachers=1, noise_std=0.0, update_scale=1.0, sigma_methods_md=None)
        ckpt_step = 0
        if "student.head.1.weight" in tensors:
            if abs(float(state["train_info"]["noise_multiplier"]) - sigma) > 1e-12:
                raise InputError("--resume: the calibrated noise multiplier differs from the checkpoint's")
            student.load_state_dict(unprefixed("student", tensors))
            gen.load_state_dict(unprefixed("gen", tensors))
            load_optimizer("sopt", sopt, tensors, state["sopt"], self.device)
            load_optimizer("gopt", gopt, tensors, state["gopt"], self.device)
            set_rng_state(g, state["train_rng"])
            self.train_info.update({k: state["train_info"][k] for k in ("train_s", "teacher_s", "teacher_trainings",
                                                                        "student_test_accuracy", "student_test_set")})
            ckpt_step = int(state["step"])
        self.student, self.generator = student, gen
        test, test_name = public_test_set(private) if cfg.student_eval else (None, "student_eval=false")
        self.train_info["student_test_set"] = test_name if test is not None else f"skipped: {test_name}"
        if dp_teacher:  # 2'. the DP-SGD teacher (restored from the checkpoint when resumed); steps release nothing
            self._fit_dp_teacher(plan, private, ctx, tensors)
        if state.get("finished"):
            return
        if dp_teacher:
            self._train(ctx, [self.labeller], sopt, gopt, g, sigma, ckpt_step, test)
            return
        spent = ctx.ledger.steps(like=rel.planned_event(sigma, 1))
        # releases lost in a crash are counted, not redone; a seeded source was re-keyed (fit_run's resume_noise)
        if spent > ckpt_step and ctx.run is not None:
            ctx.run.log(spent, event="lost_steps", steps=spent - ckpt_step)
        # 2. the non-private teachers, one per shard: in memory only, retrained on every (re)start
        teachers = self._train_teachers(private, ctx, spent) if spent < cfg.steps else []
        # 3. the noisy student steps alternating with generator steps
        self._train(ctx, teachers, sopt, gopt, g, sigma, spent, test)
        del teachers

    def _fit_dp_teacher(self, plan: lab.LabellerPlan, private: ImageData, ctx: FitContext,
                        tensors: dict[str, torch.Tensor]) -> None:
        """``teacher=dp-sgd``: the DP-SGD classifier (`fit_labeller`: trained, or restored when resumed), frozen, in
        ``self.labeller``; `sample_in_batches` lets it label the samples unless ``labeller=none``."""
        t0 = time.time()
        self.fit_labeller(plan, private, ctx, tensors)
        self.train_info["dp_teacher"] = self.train_info.pop("labeller")
        assert self.labeller is not None
        self.labeller.requires_grad_(False)
        self.train_info["teacher_s"] = float(self.train_info.get("teacher_s", 0.0)) + time.time() - t0

    def _train_teachers(self, private: ImageData, ctx: FitContext, spent: int) -> list[torch.nn.Module]:
        """T non-private teachers (`release.train_teacher`), teacher i on shard i (`release.shard_of`).

        Kept in memory only. Teacher i's initialisation and batch order come from seed streams of its own
        (``teacher-i``), so it is a function of shard i (and the seed) alone. Time and count are recorded,
        nothing about the shards (their sizes are exact statistics).
        """
        cfg = self.config
        t0 = time.time()
        shards = rel.shard_of(private.images, private.labels, cfg.teachers,
                              key=ctx.generator("shards").initial_seed())
        images, labels = private.to_tensor(self.device), private.label_tensor(self.device)
        steps = rel.teacher_steps(cfg.teacher_epochs, len(private), cfg.teachers, cfg.teacher_batch)  # N is public
        teachers = []
        for i in tqdm(range(cfg.teachers), desc="dpdfd teachers", disable=not ctx.progress, leave=False):
            idx = torch.from_numpy(np.flatnonzero(shards == i)).to(self.device)
            with ctx.seeded_init(f"teacher-{i}"):
                teacher = self.new_teacher().to(self.device)
            teachers.append(rel.train_teacher(teacher, images[idx], labels[idx], steps=steps,
                                              batch_size=cfg.teacher_batch, lr=cfg.teacher_lr,
                                              generator=ctx.generator(f"teacher-{i}")))
        self.train_info["teacher_s"] = float(self.train_info.get("teacher_s", 0.0)) + time.time() - t0
        self.train_info["teacher_trainings"] = int(self.train_info.get("teacher_trainings", 0)) + 1
        if ctx.run is not None:
            ctx.run.log(spent, event="teacher_trained", teachers=cfg.teachers, teacher_s=round(time.time() - t0, 1))
        return teachers

    def _draws(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent codes and labels of n synthetic images (public randomness)."""
        z = torch.randn(n, self.config.z_dim, generator=g).to(self.device)
        y = torch.randint(self.num_classes, (n,), generator=g).to(self.device)
        return z, y

    def generator_loss(self, gen: ConditionalGenerator, student: torch.nn.Module,
                       g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's objective against the fixed student (no teacher; see the module docstring)."""
        cfg = self.config
        half = max(1, cfg.batch_size // 2)
        z, y_half = self._draws(2 * half, g)
        y = torch.cat([y_half[:half], y_half[:half]])
        x = gen(z, y)
        logits = student(x)
        p = logits.softmax(1)
        log_p = logits.log_softmax(1)
        ce = F.cross_entropy(logits, y)
        entropy = -(p * log_p).sum(1).mean()
        mean_p = p.mean(0)
        balance = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        img_d = (x[:half] - x[half:]).abs().flatten(1).mean(1)
        z_d = (z[:half] - z[half:]).abs().mean(1)
        diversity = (img_d / z_d.clamp_min(1e-8)).mean()
        loss = cfg.w_ce * ce - cfg.w_entropy * entropy - cfg.w_balance * balance - cfg.w_diversity * diversity
        terms = {k: float(v.detach()) for k, v in
                 (("gen_ce", ce), ("gen_entropy", entropy), ("gen_balance", balance), ("gen_diversity", diversity))}
        return loss, terms

    def _train(self, ctx: FitContext, teachers: list[torch.nn.Module], sopt: torch.optim.Optimizer,
               gopt: torch.optim.Optimizer, g: torch.Generator, sigma: float, spent: int,
               test: ImageData | None) -> None:
        """The remaining steps in a `TrainLoop`, which pauses at ``max_minutes`` (counted from the end of the
        teacher's training) or ``steps_per_run`` and finishes with the student's file, checkpoint and grid."""
        cfg = self.config
        run = ctx.run
        student, gen = self.student, self.generator
        assert student is not None and gen is not None
        s_params = [p for p in student.parameters() if p.requires_grad]
        g_params = list(gen.parameters())
        outputs = cfg.release_space == "outputs"
        scale = float(self.train_info["update_scale"])  # the parameters release's public step scale
        dp_teacher = cfg.teacher == "dp-sgd"
        student.train()
        gen.train()

        def step(t: int) -> dict[str, Any]:
            z, y = self._draws(cfg.batch_size, g)
            with torch.no_grad():
                x = gen(z, y)
            if dp_teacher:  # distilling a DP classifier: post-processing, no release
                update = rel.distillation_step(student, teachers[0], x, clip_norm=cfg.clip_norm, loss=cfg.loss,
                                               temperature=cfg.temperature)
                rel.set_gradients(s_params, update)
                norms = {"update_norm": round(float(update.norm()), 4)}
            else:
                update = rel.ensemble_gradient(student, teachers, x, clip_norm=cfg.clip_norm, loss=cfg.loss,
                                               temperature=cfg.temperature, space=cfg.release_space)
                noisy = rel.release_update(update, clip_norm=cfg.clip_norm, noise_multiplier=sigma,
                                           ledger=ctx.ledger, noise=ctx.noise).to(x.dtype)  # float64 -> float32
                del update
                # post-processing: the released vector (outputs: through J^T of the public student) as the step
                rel.set_gradients(s_params, rel.backprop_released(student, x, noisy, cfg.clip_norm) if outputs
                                  else noisy * scale)
                norms = {"noisy_update_norm": round(float(noisy.norm()), 4)}
            sopt.step()
            sopt.zero_grad(set_to_none=True)
            terms: dict[str, float] = {}
            if t % cfg.gen_every == 0:
                for _ in range(cfg.gen_steps):
                    loss, terms = self.generator_loss(gen, student, g)
                    gopt.zero_grad(set_to_none=True)
                    loss.backward(inputs=g_params)
                    gopt.step()
                    terms["gen_loss"] = float(loss.detach())
            values: dict[str, Any] = {**norms, **{k: round(v, 5) for k, v in terms.items()}}
            if test is not None and (t == cfg.steps or (run is not None and t % cfg.eval_every == 0)):
                values["student_test_accuracy"] = round(accuracy(student, test, self.device), 5)
                self.train_info["student_test_accuracy"] = values["student_test_accuracy"]
                if run is not None and t % cfg.log_every and t != cfg.steps:  # between two log lines: log it now
                    run.log(t, **values)
            return values

        def checkpoint(t: int, finished: bool) -> None:
            if finished:  # the final student: its public test accuracy and its weights file
                if test is not None:
                    self.train_info["student_test_accuracy"] = round(accuracy(student, test, self.device), 5)
                assert run is not None
                self.save_student(run.path / STUDENT_FILE)
            self._checkpoint(ctx, sopt, gopt, g, t, finished=finished)

        def after_step(t: int) -> None:
            self.train_info["train_s"] = loop.train_s()

        loop = TrainLoop(run, cfg.steps, step, checkpoint, clock=RunClock(cfg.max_minutes, cfg.steps_per_run),
                         grid=lambda path: self._grid(gen, path), log_every=cfg.log_every, grid_every=cfg.grid_every,
                         checkpoint_every=cfg.checkpoint_every, progress=ctx.progress, desc="dpdfd student steps",
                         train_s0=float(self.train_info["train_s"]), after_step=after_step)
        loop(spent)

    def save_student(self, path: str | Path) -> Path:
        """The student's weights as safetensors (metadata: architecture, classes, image shape)."""
        assert self.student is not None
        h, w, c = self.image_shape
        meta = {"model": "dpimages.nets.classifiers.SmallCNN", "in_channels": str(c), "image_size": f"{h},{w}",
                "channels": ",".join(str(v) for v in self.config.student_channels),
                "hidden": str(self.config.student_hidden), "num_classes": str(self.num_classes),
                "input": "float (N, C, H, W) in [-1, 1]", "classes": "\t".join(self.classes)}
        return save_student(self.student, path, meta)

    def _checkpoint(self, ctx: FitContext, sopt: torch.optim.Optimizer, gopt: torch.optim.Optimizer,
                    g: torch.Generator, step: int, *, finished: bool) -> None:
        """Student, generator and optimiser states (never the teacher), RNG states, meta."""
        assert ctx.run is not None and self.student is not None and self.generator is not None
        s_tensors, s_groups = optimizer_tensors("sopt", sopt)
        g_tensors, g_groups = optimizer_tensors("gopt", gopt)
        tensors = {**prefixed("student", self.student.state_dict()), **prefixed("gen", self.generator.state_dict()),
                   **s_tensors, **g_tensors, **self.labeller_tensors()}  # teacher=dp-sgd: the DP teacher
        self.save_checkpoint(ctx, tensors, step=step, finished=finished, sopt=s_groups, gopt=g_groups,
                             train_rng=rng_state(g))

    def _grid(self, gen: ConditionalGenerator, path: Path) -> None:
        """Per-class sample grid (post-processing; `write_grid`'s fixed seed); the generator's mode is restored."""
        was = gen.training
        gen.eval()
        write_grid(path, lambda y, g: self._generate(gen, y, g), self.num_classes)
        gen.train(was)

    @torch.no_grad()
    def _generate(self, gen: ConditionalGenerator, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Images in [-1, 1] for `labels`, in chunks of ``sample_batch``, latent codes drawn from `g` chunk by chunk."""
        z_dim = self.config.z_dim
        return torch.cat([gen(torch.randn(len(y), z_dim, generator=g).to(self.device), y.to(self.device))
                          for y in labels.split(self.config.sample_batch)])

    # -- sampling and state -----------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the generator; labels (n,) integers, or None for balanced classes."""
        gen = self.generator
        if gen is None:
            raise InputError("dpdfd: fit or load the synthesizer before sampling")
        gen.eval()
        return self.sample_in_batches(n, labels, seed, self.config.sample_batch,
                                      lambda y, g: self._generate(gen, y, g))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator (``gen.``) and student (``student.``) weights, and the DP labeller's (``labeller.``) when the
        samples use it."""
        if self.generator is None or self.student is None:
            raise InputError("dpdfd: nothing to save before fit")
        return {**prefixed("gen", self.generator.state_dict()), **prefixed("student", self.student.state_dict()),
                **(self.labeller_tensors() if self.config.labeller != "none" else {})}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        gen_w, student_w = unprefixed("gen", tensors), unprefixed("student", tensors)
        if not gen_w or not student_w:
            raise InputError("dpdfd checkpoint needs 'gen.*' and 'student.*' weights")
        gen, student = self.new_generator(), self.new_student()
        gen.load_state_dict(gen_w)
        student.load_state_dict(student_w)
        self.generator, self.student = gen.to(self.device).eval(), student.to(self.device).eval()
        self.load_labeller(tensors)

    # -- report ------------------------------------------------------------------------------------
    def bench_extras(self) -> dict[str, Any]:
        """The DP student's own accuracy on the real test images (the student is released too)."""
        return {k: self.train_info.get(k) for k in ("student_test_accuracy", "student_test_set")}

    def report_section(self) -> str:
        """The method's part of report.md: the releases, the privacy argument in brief, student, generator."""
        return report_text(self.config, self.train_info) if self.train_info else ""
