"""Image-quality metrics, summaries with confidence intervals, and latent diagnostics.

One module for evaluate.py, compare_with_laq.py and training validation, so every number in
this project is computed the same way. Images enter as float tensors in [0, 1], (B, 3, H, W).

- mse   mean squared error over pixels of [0, 1] images
- bce   binary cross-entropy of the reconstruction (clamped to [1e-6, 1 - 1e-6]) as the
        probability of each target pixel, mean over pixels
- psnr  piq.psnr, data_range 1
- ssim  piq.ssim with an 11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03), no
        down-sampling (piq's default would average-pool images >= 384 px), per-channel mean;
        equal to scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1, channel_axis=-1)
- gmsd  piq.gmsd, data_range 1 (lower is better)
- lpips the lpips package (AlexNet by default, VGG selectable), inputs mapped by normalize=True
- rfid  reconstruction FID over a whole set: the Frechet distance (frechet_distance; equal to
        piq.FID's and scipy's, tested) between the 2048-d pool features of the
        FID Inception-v3 (pytorch-fid's port of TensorFlow's network, through piq) of the
        targets and of the reconstructions; images resized to 299 px by piq. A set-level
        number, biased upwards for small sets: compare rFIDs over the same number of images
"""
import contextlib
import math
import os
import warnings

import piq
import torch
import torch.nn.functional as F

from errors import WeightsMissing

SSIM_SETTINGS = {"kernel_size": 11, "kernel_sigma": 1.5, "k1": 0.01, "k2": 0.03,
                 "downsample": False, "data_range": 1.0}


class LpipsWeightsMissing(WeightsMissing):
    """The LPIPS backbone weights are not on disk."""


class InceptionWeightsMissing(WeightsMissing):
    """The FID Inception weights are not on disk."""


def lpips_backbone_file(net):
    """Where torchvision keeps the ImageNet weights that LPIPS's backbone `net` loads."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights
    url = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}[net].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def seeded(untrained):
    """An untrained backbone is initialised from seed 0, so that its numbers repeat from run to
    run, without touching the caller's random state; a no-op otherwise."""
    if not untrained:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def fixed():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    return fixed()


def build_lpips(net, device, random_backbone=False):
    """LPIPS with `net` ('alex' or 'vgg'); fails at once, naming the missing file, when the
    backbone weights are absent (torch.hub would otherwise try to download with no timeout).
    random_backbone=True builds it with untrained backbone weights, for offline plumbing tests."""
    import lpips
    if not random_backbone:
        path = lpips_backbone_file(net)
        if not os.path.isfile(path):
            raise LpipsWeightsMissing(
                f"LPIPS ({net}) needs {os.path.basename(path)} in {os.path.dirname(path)} "
                f"(set TORCH_HOME to move it); on a machine with internet run "
                f"`python fetch_weights.py --lpips {net}` and copy that file there, "
                f"or pass --lpips-net none to skip LPIPS")
    with warnings.catch_warnings(), seeded(random_backbone):   # the same untrained net each run
        warnings.simplefilter("ignore", UserWarning)   # lpips uses torchvision's `pretrained=`
        model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    return model.eval().requires_grad_(False).to(device)


def inception_weights_file():
    """Where torch.hub keeps the FID Inception weights that piq loads."""
    from piq.feature_extractors import fid_inception
    return os.path.join(torch.hub.get_dir(), "checkpoints",
                        os.path.basename(fid_inception.FID_WEIGHTS_URL))


def build_inception(device, random_backbone=False):
    """piq's FID Inception-v3 (pool features), failing at once, naming the file, when its
    weights are absent. random_backbone=True builds the same network untrained, for offline
    plumbing tests: piq's builder is run with its weight download replaced by nothing."""
    from unittest import mock

    from piq.feature_extractors import fid_inception
    if random_backbone:
        def untrained(*args, **kwargs):
            model = original(*args, **kwargs)
            model.load_state_dict = lambda *a, **k: None      # this instance keeps its init
            return model
        original = fid_inception.models.inception_v3
        with mock.patch.object(fid_inception.models, "inception_v3", untrained), \
                mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
                warnings.catch_warnings(), seeded(True):
            warnings.simplefilter("ignore")       # torchvision's deprecation notes for piq
            net = fid_inception.InceptionV3()
    else:
        path = inception_weights_file()
        if not os.path.isfile(path):
            raise InceptionWeightsMissing(
                f"rFID needs the FID Inception weights {os.path.basename(path)} in "
                f"{os.path.dirname(path)} (set TORCH_HOME to move it); on a machine with "
                f"internet run `python fetch_weights.py --fid` and copy that file there, or "
                f"pass --fid none to skip rFID")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = fid_inception.InceptionV3()
    return net.eval().requires_grad_(False).to(device)


class FidFeatures:
    """Inception pool features of named image sets, gathered batch by batch, for rFID."""

    def __init__(self, device, random_backbone=False):
        self.net = build_inception(device, random_backbone)
        self.random_backbone = random_backbone
        self.sets = {}

    RANDOM_BACKBONE_SIZE = 96      # untrained network: plumbing only, so not at 299 px

    @torch.no_grad()
    def add(self, name, images01):
        """images01: float (B, 3, H, W) in [0, 1] on the network's device."""
        images01 = images01.float().clamp(0, 1)
        if self.random_backbone:
            self.net.resize_input = False
            images01 = F.interpolate(images01, size=(self.RANDOM_BACKBONE_SIZE,) * 2,
                                     mode="bilinear", align_corners=False)
        features = self.net(images01)[0].flatten(1)
        self.sets.setdefault(name, []).append(features.double().cpu())

    def fid(self, a, b):
        """Frechet distance between the Gaussians fitted to sets a and b."""
        x, y = torch.cat(self.sets[a]), torch.cat(self.sets[b])
        if len(x) < 2 or len(y) < 2:
            return None
        return frechet_distance(x, y)


def frechet_distance(x, y):
    """||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^1/2) for Gaussians fitted to the
    rows of x and y, exactly. With A the centred rows over sqrt(n - 1) (S = A^T A), the
    eigenvalues of S_x S_y are the squared singular values of A_x A_y^T, so the last trace is
    that matrix's nuclear norm: an (n_x, n_y) problem when the sets are smaller than the feature
    width (2,048 for Inception), as they are below thousands of images. Larger sets take
    sum sqrt eig(S_x^1/2 S_y S_x^1/2). piq's Newton-Schulz square root of the 2048 x 2048
    product took 17 s per distance on a CPU core, at any set size."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    a_x, a_y = (x - mean_x) / math.sqrt(len(x) - 1), (y - mean_y) / math.sqrt(len(y) - 1)
    if min(len(x), len(y)) <= x.shape[1]:
        cross = torch.linalg.svdvals(a_x @ a_y.T).sum()
    else:
        w, v = torch.linalg.eigh(a_x.T @ a_x)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        cross = torch.linalg.eigvalsh(root @ (a_y.T @ a_y) @ root).clamp_min(0).sqrt().sum()
    return float((mean_x - mean_y).pow(2).sum() + a_x.pow(2).sum() + a_y.pow(2).sum() - 2 * cross)


class ImageMetrics:
    """Per-image reconstruction metrics on one device; the LPIPS network is built once."""

    def __init__(self, device, lpips_net="alex", lpips_random_backbone=False):
        self.lpips_net = lpips_net
        self.lpips = (None if lpips_net == "none"
                      else build_lpips(lpips_net, device, lpips_random_backbone))

    @property
    def names(self):
        return ["mse", "bce", "psnr", "ssim", "gmsd"] + (["lpips"] if self.lpips else [])

    @torch.no_grad()
    def __call__(self, target, recon, names=None):
        """dict name -> (B,) float64 CPU tensor for `names` (default: all of self.names).
        Both inputs are clamped into [0, 1] first (model outputs may overshoot; piq asserts
        the range)."""
        # an image with NaN/inf pixels (a diverged model) scores NaN, not a traceback
        finite = (torch.isfinite(recon.float()).flatten(1).all(1)
                  & torch.isfinite(target.float()).flatten(1).all(1))
        target = torch.nan_to_num(target.float(), nan=0.0).clamp(0, 1)
        recon = torch.nan_to_num(recon.float(), nan=0.0).clamp(0, 1)
        compute = {
            "mse": lambda: (recon - target).pow(2).flatten(1).mean(1),
            "bce": lambda: F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), target,
                                                  reduction="none").flatten(1).mean(1),
            "psnr": lambda: piq.psnr(recon, target, data_range=1.0, reduction="none"),
            "ssim": lambda: piq.ssim(recon, target, reduction="none", **SSIM_SETTINGS),
            "gmsd": lambda: piq.gmsd(recon, target, data_range=1.0, reduction="none"),
            "lpips": lambda: self.lpips(recon, target, normalize=True).flatten(),
        }
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {k: torch.where(finite.cpu(), compute[k]().double().cpu(), nan)
                for k in (names or self.names)}


def build_fid(args, device):
    """FidFeatures for --fid inception, or None for --fid none (fails fast on missing weights)."""
    return None if args.fid == "none" else FidFeatures(device, args.fid_random_backbone)


def latent_diagnostics(mu, logvar=None, active_threshold=0.01):
    """Posterior statistics over a dataset: mu, logvar (N, D) float tensors. Without logvar
    (an encoder that is not a diagonal Gaussian: its output, or its location parameter, as mu)
    only the activity: the KL and sigma entries are None.

    A unit u is active when Cov_x(E[z_u | x]) = Var_x(mu_u) > active_threshold (Burda et al.).
    """
    mu = mu.double()
    n, dim = mu.shape
    activity = mu.var(0, unbiased=False) if n > 1 else torch.zeros(dim, dtype=torch.float64)
    active = int((activity > active_threshold).sum())
    kl_per_dim = sigma = None
    if logvar is not None:
        logvar = logvar.double()
        kl_per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
        sigma = (0.5 * logvar).exp()
    out = {"latent_dim": dim, "num_images": n,
           "kl_per_dim": None if kl_per_dim is None else kl_per_dim.tolist(),
           "kl_total": None if kl_per_dim is None else float(kl_per_dim.sum()),
           "active_units": active, "active_threshold": active_threshold,
           "activity_per_dim": activity.tolist(),
           "mu_mean": float(mu.mean()), "mu_std": float(mu.std()) if mu.numel() > 1 else 0.0,
           "sigma_mean": None if sigma is None else float(sigma.mean()),
           "sigma_std": None if sigma is None else (float(sigma.std()) if sigma.numel() > 1
                                                     else 0.0),
           "posterior_collapse_warning": None}
    if active < max(1, math.ceil(0.1 * dim)):
        out["posterior_collapse_warning"] = (
            f"only {active} of {dim} latent units are active (Var_x(mu) > {active_threshold}): "
            + ("the posterior has largely collapsed to the prior" if logvar is not None else
               "the encoder's output hardly varies over the data"))
    return out


def latent_summary(batches, codebook_size=None):
    """Diagnostics from the `latents` dicts that evaluate_batch returned for every batch:
    Gaussian (mu, logvar) or codebook (codes); None when the model reports neither."""
    if batches and "mu" in batches[0]:
        return latent_diagnostics(torch.cat([b["mu"] for b in batches]),
                                  torch.cat([b["logvar"] for b in batches])
                                  if "logvar" in batches[0] else None)
    if batches and "codes" in batches[0]:
        return codebook_diagnostics(torch.cat([b["codes"] for b in batches]), codebook_size)
    return None


def codebook_diagnostics(codes, codebook_size):
    """Usage of discrete codes: histogram, perplexity, unique codes. codes: integer tensor."""
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_size": codebook_size, "histogram": counts.long().tolist(),
            "perplexity": float(entropy.exp()), "unique_codes": int((counts > 0).sum()),
            "num_codes": int(counts.sum())}
