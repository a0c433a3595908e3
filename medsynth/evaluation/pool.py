"""The synthetic pool of the downstream experiment: synthetic variants of every training mask, generated once.

Every TRAINING mask gets ``experiment.pool_per_mask`` synthetic variants: variant ``k`` conditions on
the mask edited by ``pool_edits[k % len]`` (``none``, ``flip``, ``elastic``, ``transplant`` or a
chain; the edit's random draws from ``(sampling seed, item index, k)``; a transplant pastes a lesion
of ANOTHER SLICE OF THE SAME PATIENT into a lesion-free slice, so no pool item carries information
from a patient outside its source patient; ``counterfactual`` makes the same transplant but generates
the item IN CONTEXT: the real lesion-free slice is inverted with its own mask and regenerated with the
transplanted one, everything outside the dilated lesion kept), and the images of a batch of masks are drawn with a seed
derived from ``(sampling seed, k, index of the batch's first item)``, so a pool is reproducible given
the generator, the sampler settings (batch size included) and the masks. Each pool item keeps its
SOURCE item and SOURCE PATIENT; the conditioning (possibly edited) mask is the synthetic item's label
map. A cell of real fraction ``f`` draws only pool items whose source patient is one of its
patients (:func:`medsynth.evaluation.selection.select_cell`).

The pool is stored as ``pool.npz`` (images as float16, masks uint8, provenance, key), written
atomically and reused when its key (generator weight hashes, sampler settings, masks, variants,
edits) matches. While it is generated, each finished batch is kept under ``parts/`` and recorded in
an :class:`~medsynth.ledger.ItemLedger`, so a killed pool generation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.data.dataset import ArraySet
from medsynth.fileio import sha256_json, write_atomic
from medsynth.ledger import ItemLedger
from medsynth.progress import NullProgress, Progress

log = logging.getLogger(__name__)

__all__ = ["POOL_FILE", "PoolGenerator", "SyntheticPool", "make_pool", "pool_key"]

POOL_FILE = "pool.npz"


class PoolGenerator(Protocol):
    """What :func:`make_pool` needs of a generator (a :class:`~medsynth.generator.MaskGenerator`)."""

    hashes: dict[str, str]

    def generate(self, masks: torch.Tensor | None, sampling: SamplingConfig, seed: int) -> torch.Tensor:
        """Images ``(B, 1, *S)`` in ``[0, 1]`` for masks ``(B, 1, *S)``."""
        ...


@dataclass(frozen=True)
class SyntheticPool:
    """Synthetic images generated from the training masks, with their provenance.

    Attributes:
        images: ``(M, 1, *S)`` float16 images in ``[0, 1]`` (converted to float32 when selected).
        masks: ``(M, 1, *S)`` uint8 conditioning masks (possibly edited) = the items' labels.
        source_items: Item id of the training mask each item was generated from.
        source_patients: Patient of that training mask.
        variants: Variant index ``k`` of each item (``0 .. pool_per_mask - 1``).
        edits: The mask edit of each item ('none', 'flip', ...).
        key: Input key (generator hashes, sampler, masks, variants, edits); "" for hand-made pools.
        path: The ``.npz`` file, when stored.
    """

    images: torch.Tensor
    masks: torch.Tensor
    source_items: list[str]
    source_patients: list[str]
    variants: list[int]
    edits: list[str]
    key: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        n = int(self.images.shape[0])
        sizes = {int(self.masks.shape[0]), len(self.source_items), len(self.source_patients), len(self.variants)}
        if sizes | {len(self.edits)} != {n}:
            raise ValueError("pool images, masks, source items/patients, variants and edits differ in length")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @staticmethod
    def empty(spatial: Sequence[int]) -> SyntheticPool:
        """A pool with no item (grids without synthetic cells)."""
        shape = (0, 1, *[int(s) for s in spatial])
        return SyntheticPool(
            torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.uint8), [], [], [], []
        )

    def save(self, path: str | Path) -> Path:
        """Write the pool as an ``.npz`` atomically."""
        arrays = {
            "images": self.images.to(torch.float16).numpy(),
            "masks": self.masks.to(torch.uint8).numpy(),
            "source_items": np.asarray(self.source_items, dtype=str),
            "source_patients": np.asarray(self.source_patients, dtype=str),
            "variants": np.asarray(self.variants, dtype=np.int64),
            "edits": np.asarray(self.edits, dtype=str),
            "key": np.asarray(self.key),
        }
        return write_atomic(path, lambda p: np.savez_compressed(p, **arrays))  # type: ignore[arg-type]

    @staticmethod
    def load(path: str | Path) -> SyntheticPool:
        """Read a pool written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            return SyntheticPool(
                torch.from_numpy(z["images"]),
                torch.from_numpy(z["masks"]),
                [str(s) for s in z["source_items"]],
                [str(s) for s in z["source_patients"]],
                [int(v) for v in z["variants"]],
                [str(s) for s in z["edits"]],
                str(z["key"]),
                Path(path),
            )


def _masks_digest(data: ArraySet) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.masks.numpy()).tobytes())
    h.update(json.dumps([data.item_ids, data.patients]).encode())
    return h.hexdigest()


def _images_digest(data: ArraySet) -> str:
    return hashlib.sha256(np.ascontiguousarray(data.images.numpy()).tobytes()).hexdigest()


COUNTERFACTUAL = "counterfactual"
"""The pool variant generated in context from a real slice (see :func:`make_pool`)."""

POOL_VERSION = 2
"""Bumped when the pool's content changes for the same inputs (2: same-patient transplants, fallbacks)."""


def counterfactual_settings(cfg: MedsynthConfig) -> dict[str, Any] | None:
    """The settings a 'counterfactual' pool variant reads (None when ``pool_edits`` has none)."""
    if COUNTERFACTUAL not in cfg.experiment.pool_edits:
        return None
    cc = cfg.counterfactual
    return {
        "steps": cc.steps,
        "guidance_scale": cc.guidance_scale,
        "dilate": cc.dilate,
        "region_noise": cc.region_noise,
    }


def pool_key(gen_hashes: dict[str, str], sampling: SamplingConfig, train: ArraySet, cfg: MedsynthConfig) -> str:
    """Input key of a pool: generator weights, sampler settings, training masks, variants and edits
    (and the counterfactual settings, only when a variant uses them: other pools keep their keys)."""
    ec = cfg.experiment
    extra: dict[str, Any] = {}
    cf = counterfactual_settings(cfg)
    if cf is not None:
        extra["counterfactual"] = {**cf, "images": _images_digest(train)}
    return sha256_json(
        {
            **extra,
            "version": POOL_VERSION,
            "generator": dict(sorted(gen_hashes.items())),
            "sampling": sampling.model_dump(mode="json", exclude={"calibration"}),
            "masks": _masks_digest(train),
            "per_mask": ec.pool_per_mask,
            "edits": list(ec.pool_edits),
            "elastic": [cfg.synthesis.elastic_sigma, cfg.synthesis.elastic_magnitude],
            "lesion": [cfg.synthesis.lesion_label, cfg.synthesis.transplant_component],
        }
    )


def _lesion_label_or_none(labels: dict[int, str], configured: int | None) -> int | None:
    from medsynth.errors import ConfigError
    from medsynth.synthesis.edits import default_lesion_label

    try:
        return default_lesion_label(labels, configured)
    except ConfigError:
        return None


def pool_edit(
    spec: str,
    index: int,
    items: Sequence[Any],
    same_patient: Sequence[int],
    rng: np.random.Generator,
    cfg: MedsynthConfig,
    labels: dict[int, str],
    lesion: int | None,
) -> tuple[npt.NDArray[np.uint8], str]:
    """The pool's edit of mask ``items[index]``: ``spec`` with transplants kept inside the patient.

    A ``transplant`` step pastes a lesion of another slice of the SAME patient (``same_patient``:
    indices of that patient's items) into a LESION-FREE mask. Where that is impossible (the mask
    already holds the lesion, the patient has no other lesion-bearing slice, or the vocabulary names
    no lesion) the step becomes ``elastic``.

    Returns:
        The edited ``(1, *S)`` mask and the edit actually applied (e.g. ``"elastic"`` for a fallback).
    """
    from medsynth.config.synthesis import parse_edit
    from medsynth.synthesis.edits import apply_edit

    names = list(parse_edit(spec))
    item = items[index]
    donors: list[Any] = []
    if "transplant" in names:
        if lesion is not None and not np.any(item.mask == lesion):
            donors = [items[j] for j in same_patient if j != index and np.any(items[j].mask == lesion)]
        if not donors:
            names = list(dict.fromkeys("elastic" if n == "transplant" else n for n in names))
    used = "+".join(names)
    mask, _ = apply_edit(used, item, donors or [item], rng, cfg.synthesis, labels)
    return np.asarray(mask, dtype=np.uint8), used


def _variant_mask(
    spec: str,
    index: int,
    items: Sequence[Any],
    same_patient: Sequence[int],
    rng: np.random.Generator,
    cfg: MedsynthConfig,
    labels: dict[int, str],
    lesion: int | None,
) -> tuple[npt.NDArray[np.uint8], str]:
    """The conditioning mask of one pool item and what was done: :func:`pool_edit`, or for the
    ``counterfactual`` variant its same-patient transplant (``counterfactual`` when it changed the mask;
    otherwise the transplant's fallback, ``elastic``, or ``none`` when the lesion fitted nowhere)."""
    if spec != COUNTERFACTUAL:
        return pool_edit(spec, index, items, same_patient, rng, cfg, labels, lesion)
    mask, used = pool_edit("transplant", index, items, same_patient, rng, cfg, labels, lesion)
    if used != "transplant":
        return mask, used
    changed = bool(np.any(mask != np.asarray(items[index].mask)))
    return mask, COUNTERFACTUAL if changed else "none"


def _generate(
    gen: PoolGenerator,
    batch: torch.Tensor,
    train: ArraySet,
    start: int,
    in_context: list[int],
    sampling: SamplingConfig,
    cfg: MedsynthConfig,
    seed: int,
) -> torch.Tensor:
    """Images of one pool batch (float16, CPU): from noise, except the ``in_context`` items (absolute
    indices), which are their real slices edited to the batch's masks
    (:func:`medsynth.synthesis.counterfactual.counterfactual`)."""
    rel = [j - start for j in in_context]
    plain = [j for j in range(batch.shape[0]) if j not in rel]
    # images carry the data's channels (several for multi-contrast data), masks one
    out = torch.zeros((batch.shape[0], train.images.shape[1], *batch.shape[2:]), dtype=torch.float32)
    if plain:
        out[plain] = gen.generate(batch[plain], sampling, seed).float().cpu()
    if rel:
        from medsynth.generator import MaskGenerator
        from medsynth.synthesis.counterfactual import counterfactual

        if not isinstance(gen, MaskGenerator):
            raise TypeError("the 'counterfactual' pool variant needs a MaskGenerator (encoder, networks, objective)")
        cc = cfg.counterfactual
        res = counterfactual(
            gen,
            train.images[in_context].float(),
            train.masks[in_context].to(torch.uint8),
            batch[rel],
            steps=cc.steps or sampling.steps,
            guidance_scale=cc.guidance_scale if cc.guidance_scale is not None else sampling.scale,
            dilate=cc.dilate,
            seed=seed,
            region_noise=cc.region_noise,
        )
        out[rel] = res.images
    return out.clamp(0, 1).to(torch.float16)


def _save_npy(path: Path, arr: npt.NDArray[Any]) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    write_atomic(path, writer)


def make_pool(
    gen: PoolGenerator,
    train: ArraySet,
    cfg: MedsynthConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
) -> SyntheticPool:
    """Generate ``experiment.pool_per_mask`` synthetic variants of EVERY training mask, once (resumable).

    Variant ``k`` of item ``i`` conditions on the mask edited by ``pool_edits[k % len]`` (see
    :func:`pool_edit`; random draws from ``(sampling.seed, i, k)``); images are generated in batches
    of ``sampling.batch_size`` masks of one variant, each batch with a seed derived from
    ``(sampling.seed, k, first item index)``. ``sampling`` is ``experiment.pool_sampling`` or the
    top-level ``sampling`` section. Each finished batch is stored under ``parts/`` and recorded in
    ``parts/items.jsonl`` (:class:`~medsynth.ledger.ItemLedger`); a re-run after a kill generates
    only the missing batches.

    Args:
        gen: The trained generator (``generate`` and ``hashes``).
        train: The real TRAINING split (only its masks and provenance are used).
        cfg: Resolved config (``experiment``, ``sampling``, ``synthesis`` edit parameters).
        out_dir: Folder of ``pool.npz``; an existing pool with the same key is loaded instead.
        progress: Advanced once per generated image.

    Returns:
        The pool (items ordered variant-major: all items of variant 0, then variant 1, ...).
    """
    from medsynth.synthesis.masks import MaskItem

    ec = cfg.experiment
    sampling = ec.pool_sampling or cfg.sampling
    progress = progress or NullProgress()
    key = pool_key(gen.hashes, sampling, train, cfg)
    path = Path(out_dir) / POOL_FILE
    if path.is_file():
        try:
            stored = SyntheticPool.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable pool %s: %s", path, exc)
        else:
            if stored.key == key:
                log.info("reusing synthetic pool %s (%d items)", path, len(stored))
                return stored
    per_mask = ec.pool_per_mask
    if per_mask == 0 or len(train) == 0:
        return SyntheticPool.empty(train.masks.shape[2:])
    items = [
        MaskItem(iid, train.masks[i].numpy().astype(np.uint8), train.affines[i], pat, "cache:train")
        for i, (iid, pat) in enumerate(zip(train.item_ids, train.patients, strict=True))
    ]
    by_patient: dict[str, list[int]] = {}
    for i, pat in enumerate(train.patients):
        by_patient.setdefault(pat, []).append(i)
    lesion = _lesion_label_or_none(train.labels, cfg.synthesis.lesion_label)
    parts = Path(out_dir) / "parts"
    ledger = ItemLedger(parts / "items.jsonl", key)
    done = ledger.done()
    n, bs = len(train), sampling.batch_size
    images, masks, src_items, src_pats, variants, edits = [], [], [], [], [], []
    for k in range(per_mask):
        spec = ec.pool_edits[k % len(ec.pool_edits)]
        edited_k: list[npt.NDArray[np.uint8]] = []
        used_k: list[str] = []
        for i in range(n):
            rng = np.random.default_rng([sampling.seed, i, k])
            m, used = _variant_mask(spec, i, items, by_patient[train.patients[i]], rng, cfg, train.labels, lesion)
            edited_k.append(m)
            used_k.append(used)
        edited = np.stack(edited_k)
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            part_id = f"v{k}-i{start}"
            part = parts / f"{part_id}.npy"
            batch = torch.from_numpy(edited[start:stop])
            out_img: torch.Tensor | None = None
            if part_id in done and part.is_file():
                try:
                    arr = np.load(part, allow_pickle=False)
                    if arr.shape == tuple(batch.shape):
                        out_img = torch.from_numpy(arr)
                except (OSError, ValueError) as exc:
                    log.warning("regenerating unreadable pool part %s: %s", part, exc)
            if out_img is None:
                seed = int(np.random.default_rng([sampling.seed, k, start, 17]).integers(2**31 - 1))
                in_context = [j for j in range(start, stop) if used_k[j] == COUNTERFACTUAL]
                out_img = _generate(gen, batch, train, start, in_context, sampling, cfg, seed)
                _save_npy(part, out_img.numpy())
                ledger.record(part_id, {"variant": k, "start": start, "stop": stop})
            images.append(out_img.to(torch.float16))
            masks.append(batch)
            progress.advance(stop - start, f"pool variant {k + 1}/{per_mask}")
        src_items += list(train.item_ids)
        src_pats += list(train.patients)
        variants += [k] * n
        edits += used_k
    pool = SyntheticPool(torch.cat(images), torch.cat(masks), src_items, src_pats, variants, edits, key, path)
    pool.save(path)
    ledger.reset()
    for f in parts.glob("v*-i*.npy"):
        f.unlink(missing_ok=True)
    return pool
