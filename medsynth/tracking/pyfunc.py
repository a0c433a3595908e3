"""The generator and the segmenter as MLflow pyfunc models (models from code: no pickled objects).

A registered ``generator`` (or ``segmenter``) version is an MLflow model folder::

    MLmodel                     pyfunc flavor, signature (tensor in/out + params), loader: code model
    <code file>                 medsynth/tracking/pyfunc_generator.py (or _segmenter): two lines, no pickle
    artifacts/<bundle>/         config.json + safetensors checkpoints (+ JSON pointers)
    requirements.txt, python_env.yaml, conda.yaml

so ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` (or ``models:/<name>@<alias>``) works in
any process that has mlflow and medsynth installed::

    gen = mlflow.pyfunc.load_model(uri)
    images = gen.predict(masks, params={"seed": 3, "sampler": "ddim", "steps": 20, "guidance_scale": 1.5})

Generator: ``masks`` int64 ``(B, 1, *S)`` label maps (2D or 3D, as trained) -> float32 ``(B, 1, *S)``
images in ``[0, 1]``. With the same masks, seed and sampling it reproduces ``medsynth synthesize`` bit for bit
on the same device (synthesis seeds a batch with its first image's seed, recorded in the manifest).
Segmenter: float32 images ``(B, 1, *S)`` -> uint8 label maps ``(B, 1, *S)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import medsynth
from medsynth.errors import DataError

GENERATOR, SEGMENTER = "generator", "segmenter"
PYFUNC_KINDS = (GENERATOR, SEGMENTER)
BUNDLE = "bundle"
CODE = {GENERATOR: "pyfunc_generator.py", SEGMENTER: "pyfunc_segmenter.py"}


def _device(context: Any) -> Any:
    import torch

    dev = (getattr(context, "model_config", None) or {}).get("device")
    return torch.device(dev) if dev else torch.device("cpu")


class GeneratorModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """pyfunc wrapper of :class:`medsynth.generator.MaskGenerator` (loaded from the model's bundle)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the networks from the bundle's config and load its safetensors weights (CPU by default)."""
        from medsynth.synthesis.bundle import bundle_config, load_bundle

        bundle = Path(context.artifacts[BUNDLE])
        self.cfg = bundle_config(bundle)
        self.generator = load_bundle(bundle, _device(context))

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        """Images ``(B, 1, *S)`` float32 in [0, 1] for int64 label maps ``(B, 1, *S)`` (the signature enforces both).

        Params (defaults: the training config's ``sampling`` and seed 0): ``seed``, ``sampler``,
        ``steps``, ``guidance_scale``.
        """
        import torch

        p = dict(params or {})
        masks = torch.as_tensor(np.asarray(model_input)).long()
        dims = self.cfg.preprocess.spatial_dims
        if masks.ndim != dims + 2 or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, *S) with {dims} spatial dims, got {tuple(masks.shape)}")
        from medsynth.config.stages import SamplingConfig

        update = {k: p[k] for k in ("sampler", "steps", "guidance_scale") if p.get(k) is not None}
        sampling = SamplingConfig.model_validate({**self.cfg.sampling.model_dump(), **update})
        return self.generator.generate(masks, sampling, int(p.get("seed") or 0)).numpy()


class SegmenterModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """pyfunc wrapper of the reference segmenter (:func:`medsynth.evaluation.segmenter.predict`)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the segmenter from the bundle's config and final checkpoint."""
        from medsynth.evaluation.segmenter import load_segmenter
        from medsynth.synthesis.bundle import bundle_config

        bundle = Path(context.artifacts[BUNDLE])
        self.cfg = bundle_config(bundle)
        self.model = load_segmenter(self.cfg, bundle / SEGMENTER, _device(context))

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        """uint8 label maps ``(B, 1, *S)`` of float images ``(B, 1, *S)`` (intensities on the preprocessing scale)."""
        import torch

        from medsynth.evaluation.segmenter import predict

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        bs = int((params or {}).get("batch_size") or self.cfg.segmenter.predict_batch_size)
        return predict(self.model, x, bs).numpy()


def _signature(kind: str, cfg: Any) -> ModelSignature:
    spatial = (-1,) * int(cfg.preprocess.spatial_dims)
    if kind == GENERATOR:
        s = cfg.sampling
        return ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, 1, *spatial))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, *spatial))]),
            params=ParamSchema(
                [
                    ParamSpec("seed", "long", 0),
                    ParamSpec("sampler", "string", str(s.sampler)),
                    ParamSpec("steps", "long", int(s.steps)),
                    # an uncalibrated 'auto' (a bundle made without the calibration stage): no guidance by default
                    ParamSpec(
                        "guidance_scale", "double", 1.0 if s.guidance_scale == "auto" else float(s.guidance_scale)
                    ),
                ]
            ),
        )
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, *spatial))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 1, *spatial))]),
        params=ParamSchema([ParamSpec("batch_size", "long", int(cfg.segmenter.predict_batch_size))]),
    )


def _requirements() -> list[str]:
    out = [f"medsynth=={medsynth.__version__}"]
    for dist in ("mlflow", "torch", "monai", "safetensors"):
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def segmenter_bundle(cfg_json: dict[str, Any], checkpoint: str | Path, dst: str | Path) -> Path:
    """A segmenter bundle: ``config.json`` + ``segmenter/checkpoints/{final,latest}.json`` + the checkpoint folder."""
    ckpt = Path(checkpoint)
    out = Path(dst)
    target = out / SEGMENTER / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, target)
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    for ptr in ("final.json", "latest.json"):
        (target.parent / ptr).write_text(json.dumps({"path": ckpt.name, "step": int(state["step"])}))
    (out / "config.json").write_text(json.dumps(cfg_json))
    return out


def save_pyfunc(kind: str, cfg: Any, folder: str | Path, dst: str | Path) -> Path:
    """Write the MLflow model folder of a generator bundle or a segmenter checkpoint.

    Args:
        kind: ``generator`` (``folder`` is a bundle from :func:`medsynth.synthesis.bundle.export_bundle`) or
            ``segmenter`` (``folder`` is its final checkpoint folder).
        cfg: The resolved :class:`~medsynth.config.schema.MedsynthConfig` the networks were trained with.
        folder: See ``kind``.
        dst: The model folder to create (must not exist).

    Returns:
        ``dst``.
    """
    from medsynth.config.loader import config_dict

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(folder) if kind == GENERATOR else segmenter_bundle(config_dict(cfg), folder, Path(tmp) / BUNDLE)
        if kind == GENERATOR and (bundle / "config.json").is_file():
            from medsynth.synthesis.bundle import bundle_config

            cfg = bundle_config(bundle)  # the bundle's own config: its sampling defaults (e.g. calibrated guidance)
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=str(Path(__file__).with_name(CODE[kind])),
            artifacts={BUNDLE: str(bundle)},
            signature=_signature(kind, cfg),
            pip_requirements=_requirements(),
            metadata={"medsynth_kind": kind, "medsynth_version": medsynth.__version__},
        )
    return Path(dst)


def bundle_in(model_dir: str | Path) -> Path:
    """The bundle folder inside a downloaded model: the artifact folder of a pyfunc model, else the folder itself.

    Raises:
        DataError: Neither holds a ``config.json``.
    """
    d = Path(model_dir)
    arts = sorted(p for p in (d / "artifacts").glob("*") if p.is_dir()) if (d / "MLmodel").is_file() else []
    for cand in (*arts, d):
        if (cand / "config.json").is_file():
            return cand
    raise DataError(d, "not a medsynth model (no MLmodel bundle and no config.json)")
