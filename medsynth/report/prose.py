"""Fixed text of the whitepaper: the question, method descriptions, limitations and published context.

Nothing here is a measured number of ours: measured numbers are rendered from tracked runs by
:mod:`medsynth.report.whitepaper`. The published figures quoted in :data:`CONTEXT` are the papers'
own and are given as context, never as a like-for-like comparison.
"""

from __future__ import annotations

QUESTION = """\
Medical-imaging groups often hold a few hundred scans with expert segmentation masks. Does a
mask-conditioned generative model, trained on those same scans, produce image/mask pairs that (a) follow
the mask — a segmenter trained on real data finds the structures where the mask puts them — (b) do not copy
training patients, and (c) help a diagnostic model trained on limited real data when added to its
training set? This document answers with measurements of medsynth's pipeline on real brain MRI (LGG
FLAIR, 2D; hippocampus, 3D) and on the project's procedural phantom."""

METHODS = """\
**Generator.** A latent diffusion model with a mask ControlNet, built from MONAI networks and trained from
scratch on each dataset's training split: a `AutoencoderKL` (L1 + KL, optional patch adversarial loss)
compresses an image by the factor its channel list implies; the training set is encoded once (latent means,
scaled to unit variance); a `DiffusionModelUNet` is trained on the cached latents with the configured
objective; a `ControlNet` initialised from that UNet (base frozen, zero-convolution outputs, so it adds exactly
nothing at initialisation) is trained on the **full-resolution one-hot mask**, whose conditioning embedding
downsamples by exactly the autoencoder's factor, with mask dropout so classifier-free guidance works at
sampling. Loops use AdamW with warm-up, gradient clipping and EMA weights (used for sampling).

**Sampling.** Samplers (DDPM, DDIM, DPM-Solver++, rectified-flow Euler) are separate from the networks and
call one function `denoise(x, t, cond)`; classifier-free guidance is applied once, in a wrapper.

**Plausibility.** A reference segmenter (MONAI UNet) is trained on the **real** training split only. It
segments each synthetic image generated from a test-split mask; Dice against the conditioning mask is
reported next to the same segmenter's Dice on the real image of that mask, with 95% bootstrap intervals over
patients. Masks without the structure give a false-positive rate instead of a 0/0 Dice.

**Realism, diversity, memorisation.** Fréchet distance and KID in the feature space of an encoder the
project trains itself on the training split (not Inception, not comparable to published FIDs); Wasserstein
distances between real and synthetic intensities inside each label; mean pairwise MS-SSIM among seeds of one
mask; for memorisation, each synthetic image's nearest training image compared with real test images'
nearest-training distances (fraction closer than the real test images' 1st percentile).

**Downstream experiment.** A task network is trained from scratch on a patient-level fraction of the real
training split, with and without synthetic images generated from the masks of **those same patients**
(and edits of them), and scored on the fixed patient-level test split. Arms: real (+ r synthetic per real
image), real with classical MONAI augmentation, synthetic only. 95% intervals are percentile bootstraps over
test patients of the seed-mean metric; the paired comparison with the real-only arm of the same fraction
uses the same seeds and resampled patients."""

LIMITATIONS = """\
- **CPU scale.** Every model here was trained from scratch on a 2-core CPU within minutes to an hour per
  stage (budgets in the training table). Published generators train for days on GPUs; our images are
  blurrier, and every conclusion is about this budget, not about the method's ceiling.
- **Resolution and data.** LGG slices are resampled to 64x64 (4 mm pixels) and hippocampus volumes to small
  crops; 90 LGG patients and a few hundred 2D slices per split are a small data regime, and results on 5%
  or 10% of the training patients rest on 3 to 6 patients.
- **Data quality (LGG).** `configs/lgg-2d.yaml`'s QC drops constant (black) slices but lets through
  noise-only edge slices of each stack; percentile normalisation stretches them into full-range noise and the
  derived brain label covers that noise; the worst plausibility cases of that run are such slices.
  `configs/lgg-2d-clean.yaml` excludes them (`qc.min_signal`) and is the LGG run to read; it also trains the
  UNet and ControlNet longer and samples with guidance 5, so the two LGG runs differ in more than the QC.
- **Guidance trades realism for faithfulness.** At the guidance scale of `lgg-2d-clean` (5.0) tumours appear
  where the mask puts them, but brighter than real ones (see the contrast ratio) and less varied across
  seeds; they are easier for the segmenter than real tumours, which is why its Dice can exceed the real
  images'. The guidance sweep (section 4) shows the trade: lower scales match the real contrast more closely,
  at a lower Dice and more false positives on tumour-free masks. The lesion false-positive rate counts a case
  when the segmenter marks any pixel of the lesion.
- **In-domain features.** Fréchet distance and KID use an encoder trained here on the same training split;
  they rank our own runs and are **not comparable** to published Inception/RadImageNet FIDs.
- **The downstream task is a proxy.** Slice-level tumour presence on LGG (and lesion presence on the
  phantom) stands in for a diagnostic task; the phantom is procedural, not anatomy.
- **Not tested.** Other modalities and scanners, 3D downstream classification, radiologist reading of
  synthetic images, privacy beyond the nearest-neighbour memorisation audit, and GPU-scale training."""

CONTEXT = """\
Stated as context only: the works below use other data, resolutions, networks, compute and protocols, so
their numbers are **not** like-for-like with ours.

- **Med-DDPM** (Dorjsembe et al., IEEE JBHI 2024, arXiv:2305.18453): pixel-space 3D diffusion conditioned
  on semantic masks by channel concatenation, brain MRI. Tumour segmentation Dice 0.6207 when trained on
  synthetic images vs 0.6531 on real images, and 0.6675 on real + synthetic (1k real + 2k synthetic).
- **MAISI** (Guo et al., WACV 2025, arXiv:2409.11169): a 3D CT latent diffusion model with a ControlNet on
  segmentations of up to 127 structures, volumes up to 512x512x768, trained on GPUs on large CT collections;
  reports tumour-segmentation gains when synthetic pairs are added; its rectified-flow version reports about
  33x faster inference than its DDPM version.
- **Segmentation-guided diffusion** (Konz et al., MICCAI 2024, arXiv:2402.05210): pixel-space 2D diffusion
  conditioned on multi-class masks (breast MRI, abdominal CT) at 256x256 on GPUs, with mask-ablated training
  to sample with partial masks; evaluates faithfulness with a segmenter applied to generated images, the same
  protocol as our plausibility Dice."""
