"""The teacher of a distillation (`--teacher`): finished runs of this project, read once before
training; their probabilities at the distillation's temperature, averaged over the runs,
become the log-probabilities the student's loss is pulled towards
(`steps.distillation_loss`): on every clean training image once (`teacher_logprobs`), or
on each augmented batch inside the step (`load_teachers`, `--teacher-view augmented`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.run import checkpoints, folder
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.steps import Teacher, inference_state, mean_logprobs, predict_logits


def teacher_dirs(cfg: TrainConfig) -> list[Path]:
    """The run folders of `cfg.teacher`: each comma-separated folder, or each member's of a
    folder of several seeds (or of a sweep). Cheap, and checked: each must hold a finished
    run (FmnistError naming the folder and the fix)."""
    dirs: list[Path] = []
    for part in filter(None, (p.strip() for p in cfg.teacher.split(","))):
        path = Path(part)
        if not path.is_dir():
            raise FmnistError(f"--teacher {part}: no such folder: pass the folder of a finished "
                              f"run of scripts/train.py")
        dirs.extend(folder.seed_run_dirs(path) or [path])
    if not dirs:
        raise FmnistError("--teacher names no folder: pass run folders, comma-separated")
    for path in dirs:
        folder.load_config(path)  # a run folder, with a config this version reads
        folder.check_finished(path)
    return dirs


def load_teachers(cfg: TrainConfig, train: data.Split, test: data.Split,
                  dirs: list[Path] | None = None) -> tuple[Teacher, ...]:
    """The teachers of `cfg`, each checked to have been trained on these same images
    `train` (before the validation split is held out) and `test` (`folder.check_data`), so
    none has seen the test images, and ready to evaluate as it was trained: its own model,
    normalization, and weights' average. `dirs`: `teacher_dirs(cfg)`, when the caller has
    them already."""
    teachers = []
    for path in dirs or teacher_dirs(cfg):
        folder.check_data(path, train, test)
        teacher_cfg = folder.load_config(path)
        state = inference_state(get_model(teacher_cfg.model),
                                checkpoints.load_variables(path, teacher_cfg))
        teachers.append(Teacher(state, folder.load_normalization(path)))
    return tuple(teachers)


def validation_seen(teacher_cfg: TrainConfig, labels_N: np.ndarray,
                    val_idx: np.ndarray) -> int:
    """How many of the student's validation images `val_idx` (indices into the training
    images, whose labels are `labels_N`) the teacher of config `teacher_cfg` trained on: its
    own split of the same images, from its val_fraction and split seed."""
    teacher_train_idx, _ = data.train_val_indices(labels_N, teacher_cfg.val_fraction,
                                                  teacher_cfg.split_seed)
    return int(np.isin(val_idx, teacher_train_idx, assume_unique=True).sum())


def validation_note(dirs: list[Path], labels_N: np.ndarray,
                    val_of: dict[int, np.ndarray]) -> str | None:
    """One `note:` line when a teacher in `dirs` trained on some of the student's validation
    images (`val_of`: each of its splits' indices by split seed; {}: no validation split),
    naming the teacher that saw the most; None when none did. Index arithmetic only."""
    seen = [(validation_seen(folder.load_config(path), labels_N, val_idx), str(path),
             split_seed, len(val_idx))
            for path in dirs for split_seed, val_idx in val_of.items()]
    leaking = {path for n, path, _, _ in seen if n}
    if not leaking:
        return None
    n, path, split_seed, n_val = max(seen, key=lambda row: row[0])
    others = len(leaking) - 1
    also = f" (and {others} other teacher{'s' * (others > 1)} on some)" if others else ""
    if len(val_of) == 1:
        whose = "this run's"
        fix = f"train the teachers with --val-seed {split_seed} (the seed of this run's split)"
    else:  # the members of --seeds hold out their own splits: no teacher avoids them all
        whose = f"seed {split_seed}'s"
        fix = ("pass this run --val-seed S, so that its seeds share one split, and train the "
               "teachers with the same --val-seed S")
    return (f"note: teacher {path} trained on {n} of {whose} {n_val} validation "
            f"images{also}: the validation accuracy will read high; {fix}")


def _logits_VxNxC(teachers: tuple[Teacher, ...], images_NxHxWx1, tta: str) -> jax.Array:
    """Each teacher's logits of each view of the images (V: the teachers, times two with
    `tta` "flip": the images, then their mirror images)."""
    images_NxHxWx1 = jnp.asarray(images_NxHxWx1)
    views = [images_NxHxWx1] + ([images_NxHxWx1[:, :, ::-1, :]] if tta == "flip" else [])
    return jnp.stack([predict_logits(teacher.state, view, batch_size=1000, norm=teacher.norm)
                      for view in views for teacher in teachers])


def teacher_logprobs(cfg: TrainConfig, train: data.Split, test: data.Split,
                     dirs: list[Path] | None = None,
                     teachers: tuple[Teacher, ...] | None = None) -> np.ndarray:
    """(N, C) float32: log of the teachers' mean probability, at `cfg.distill_temperature`,
    of each class for each of the N training images `train` (before the validation split is
    held out: the student indexes these images), un-augmented, the mean over each image and
    its mirror image too with `cfg.teacher_tta` "flip" (`load_teachers` says which teachers
    pass; `teachers`: theirs, when the caller has them already)."""
    teachers = teachers or load_teachers(cfg, train, test, dirs)
    return np.asarray(mean_logprobs(_logits_VxNxC(teachers, train.images_NxHxWx1,
                                                  cfg.teacher_tta),
                                    cfg.distill_temperature), np.float32)


def teachers_accuracy(teachers: tuple[Teacher, ...], split: data.Split,
                      tta: str = "none") -> float:
    """The teachers' accuracy on the images of `split` (the test set) as one model (an
    ensemble when several, over the mirror images too with `tta` "flip"): the most probable
    class of their mean probability at temperature 1. Reported only: no choice of the
    student's is made by it."""
    logprobs_NxC = mean_logprobs(_logits_VxNxC(teachers, split.images_NxHxWx1, tta), 1.0)
    return float(np.mean(np.argmax(np.asarray(logprobs_NxC), axis=-1) == split.labels_N))


def agreement(teacher_NxC: np.ndarray, labels_N: np.ndarray) -> float:
    """The share of the images whose most probable class under the teacher is their label."""
    return float(np.mean(np.argmax(teacher_NxC, axis=-1) == labels_N))
