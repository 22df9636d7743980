"""Evaluate models saved by the pythae library with this project's metrics.

A pythae model is a folder (model_config.json, model.pt, and .pkl files when it has custom
networks, a discriminator or a metric) or `hf:OWNER/NAME[@REVISION]`, a model on the Hugging
Face Hub, read from the local Hub cache (HF_HUB_OFFLINE=1 on compute nodes) or downloaded where
the network allows. Pickled files run code when loaded. Without --allow-pickle a folder is refused
when an entry is named like a pickle (encoder.pkl, ...: whatever it is, FIFO or dangling link
included, listed and never opened), a regular file begins with a pickle header, or its
model_config.json asks pythae to unpickle a part (`uses_default_encoder: false`, ...); pythae
then reads a private copy holding only the checked config and model.pt, never the folder.
A Hub file is checked against the hash the Hub names it by before it is used.

Each model type is scored under its own model, as pythae defines it (PYTHAE_MODELS): the
reconstruction decodes the posterior's own mean (the normalised direction for SVAE, the
flow-transformed mean for VAE_IAF / VAE_LinNF, the quantised code for VQVAE), `kl` is reported
only where the posterior is a diagonal Gaussian and the prior N(0, I), and samples come from the
model's prior. A metric that cannot be computed under the model is null, with the reason.
pythae models take images in [0, 1]; the adapter presents them with the interface evaluate.py
uses for this project's models ([-1, 1] images).
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile

import torch
import torch.nn as nn

from autoencoder import Autoencoder, gaussian_kl
from errors import PythaeError
from files import open_regular as open_regular_file

HUB_PREFIX = "hf:"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pck", ".dill")
NOT_GAUSSIAN_KL = "the {what}; a KL against N(0, I) from the encoder's Gaussian would be wrong"

# pythae model name -> (posterior, prior); what evaluate.py reports follows from these.
#   gaussian: diagonal Gaussian posterior, decoded at its mean
#   deterministic: the encoder's output is the code
#   vq: quantised through the codebook
#   vmf: von Mises-Fisher, decoded at its normalised mean direction
#   flow: Gaussian then a normalising flow, decoded at the flow applied to the mean
#   hamiltonian: Gaussian then Hamiltonian steps (no posterior mean in closed form)
PYTHAE_MODELS = {
    "VAE": ("gaussian", "normal"), "BetaVAE": ("gaussian", "normal"),
    "DisentangledBetaVAE": ("gaussian", "normal"), "BetaTCVAE": ("gaussian", "normal"),
    "FactorVAE": ("gaussian", "normal"), "MSSSIM_VAE": ("gaussian", "normal"),
    "INFOVAE_MMD": ("gaussian", "normal"), "IWAE": ("gaussian", "normal"),
    "CIWAE": ("gaussian", "normal"), "MIWAE": ("gaussian", "normal"),
    "PIWAE": ("gaussian", "normal"), "Adversarial_AE": ("gaussian", "normal"),
    "VAEGAN": ("gaussian", "normal"),
    "VAMP": ("gaussian", "vamp"), "PoincareVAE": ("gaussian", "poincare"),
    "SVAE": ("vmf", "sphere"),
    "VAE_IAF": ("flow", "normal"), "VAE_LinNF": ("flow", "normal"),
    "HVAE": ("hamiltonian", "normal"), "RHVAE": ("hamiltonian", "riemannian"),
    "AE": ("deterministic", None), "RAE_L2": ("deterministic", None),
    "RAE_GP": ("deterministic", None), "WAE_MMD": ("deterministic", "normal"),
    "VQVAE": ("vq", "codebook"),
}
KL_REASONS = {
    "vamp": NOT_GAUSSIAN_KL.format(what="prior is a VampPrior (a mixture of posteriors)"),
    "poincare": NOT_GAUSSIAN_KL.format(what="posterior and prior live on the Poincaré ball"),
    "sphere": "the posterior is von Mises-Fisher and the prior uniform on the sphere",
    "flow": "the posterior is a normalising flow; its KL has no closed form (pythae estimates "
            "it by sampling)",
    "hamiltonian": "the posterior follows Hamiltonian steps; its KL has no closed form",
    "deterministic": "{name} has a deterministic encoder, no posterior to compare with a prior",
    "vq": "{name} has a deterministic encoder, no posterior to compare with a prior",
}
SAMPLE_REASONS = {
    None: "{name} defines no prior to sample (pythae fits a separate sampler on training "
          "latents)",
    "riemannian": "RHVAE's prior is a Riemannian distribution sampled by HMC (pythae's "
                  "RHVAESampler), not reproduced here",
}


def is_pythae_source(path):
    return path.startswith(HUB_PREFIX) or (
        os.path.isdir(path) and os.path.lexists(os.path.join(path, "model_config.json")))


# What pythae's load_from_folder unpickles: the file named here when the config says False.
PICKLED_PARTS = {"uses_default_encoder": "encoder.pkl", "uses_default_decoder": "decoder.pkl",
                 "uses_default_discriminator": "discriminator.pkl",
                 "uses_default_metric": "metric.pkl"}


def parse_hub_spec(spec):
    """(repo id, revision or None) of hf:OWNER/NAME[@REVISION]."""
    repo, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (_ and not revision):
        raise PythaeError(f"{spec}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION")
    return repo, revision or None


def hub_folder(spec):
    """(local snapshot folder, provenance) of hf:OWNER/NAME[@REVISION], from the cache or
    downloaded; each cause of failure has its own message."""
    repo, revision = parse_hub_spec(spec)
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise PythaeError(f"{spec} needs the huggingface_hub package: "
                          f"pip install huggingface_hub==2.4.0") from None
    named = f"{repo}{'@' + revision if revision else ''}"
    fetch = (f"fetch it where there is internet with `hf download {repo}"
             f"{' --revision ' + revision if revision else ''}` and copy the cache folder "
             f"({constants.HF_HUB_CACHE}) here, or set HF_HUB_CACHE to where it is")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision)
    except errors.GatedRepoError:
        raise PythaeError(f"{named} is gated: accept its terms on huggingface.co and log in "
                          f"with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise PythaeError(f"{repo} is not on the Hugging Face Hub, or it is private: check "
                          f"the name (e.g. hf:clementchadebec/reproduced_vae), or log in with "
                          f"`hf auth login` if it is yours") from None
    except errors.RevisionNotFoundError:
        raise PythaeError(f"{repo} has no revision {revision!r} (a branch, tag or commit "
                          f"hash)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else \
            "the Hub cannot be reached"
        raise PythaeError(f"{named} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
                          f" and {why}: {fetch}") from None
    except (OSError, ValueError, errors.HfHubHTTPError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise PythaeError(f"{named} could not be downloaded ({type(e).__name__}: {reason}); "
                          f"{fetch}") from None
    return folder, {"repo_id": repo, "revision_requested": revision or "main",
                    "commit": os.path.basename(os.path.normpath(folder))}


def check_hub_blob(path):
    """A file of a Hub snapshot is a link to blobs/<hash>: the sha256 of an LFS file, the git
    blob hash of a small one. Refuse a file whose bytes no longer have its hash."""
    if not os.path.islink(path):
        return
    blob = os.path.realpath(path)
    name = os.path.basename(blob)
    with open_regular(blob) as f:
        data_hash = hashlib.sha256() if len(name) == 64 else hashlib.sha1(
            f"blob {os.fstat(f.fileno()).st_size}\0".encode())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            data_hash.update(chunk)
    if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name) and data_hash.hexdigest() != name:
        raise PythaeError(f"{path}: the cached file is damaged (its content no longer has the "
                          f"hash {name} the Hub named it by); delete {blob} and fetch it again")


def open_regular(path):
    """`path` opened for reading if it is a regular file (after links); a FIFO or a device is
    refused without blocking on it."""
    try:
        return open_regular_file(path)
    except OSError as e:
        raise PythaeError(f"{path} cannot be read ({e.strerror})") from None
    except ValueError:
        raise PythaeError(f"{path} is not a regular file") from None


def pickled_entries(folder):
    """Entries of the folder named like pickles, whatever they are (files, FIFOs, links,
    dangling links): listed, never opened; plus regular files with a pickle header (protocol
    2 and later begin with 0x80 and the protocol number)."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.lower().endswith(PICKLE_SUFFIXES):
            found.append(name)
        elif name != "model.pt" and os.path.isfile(path):
            try:
                with open_regular(path) as f:
                    head = f.read(2)
            except PythaeError:
                continue
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                found.append(name)
    return found


def check_folder(folder, allow_pickle, hub=False):
    """The model's config after refusing what cannot be loaded safely or at all. Without
    --allow-pickle nothing pythae would unpickle may be there, and the config may not ask for
    any (uses_default_*: false), before any file of the folder is opened. A Hub snapshot's
    files are checked against their hashes before the config is read."""
    pickles = pickled_entries(folder) if not allow_pickle else []
    if pickles:
        raise PythaeError(f"{folder} holds {', '.join(pickles)}: pickled code that runs when "
                          f"loaded; pass --allow-pickle only if you trust its origin")
    if hub:                                   # every file the model may read, pickles included
        for name in sorted(os.listdir(folder)):
            check_hub_blob(os.path.join(folder, name))
    path = os.path.join(folder, "model_config.json")
    try:
        with open_regular(path) as f:
            config = json.loads(f.read(1 << 20).decode())
    except (OSError, ValueError) as e:
        raise PythaeError(f"{path} is not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise PythaeError(f"{path} has no model name (a pythae config holds e.g. "
                          f"\"name\": \"VAEConfig\")")
    wanted = [f"{PICKLED_PARTS[key]} ({key}: false)" for key in PICKLED_PARTS
              if config.get(key) is False]
    if wanted and not allow_pickle:
        raise PythaeError(f"{path} asks for custom networks pythae loads by unpickling "
                          f"{', '.join(wanted)}: code that runs when loaded; pass "
                          f"--allow-pickle only if you trust its origin")
    return config


def private_copy(folder, config, into):
    """What pythae reads, copied into `into`: the config as checked and model.pt as a regular
    file; pythae never opens the folder itself, so nothing put there after the check (a
    pickle, a FIFO, a swapped link) is read."""
    weights = os.path.join(folder, "model.pt")
    with open_regular(weights) as src, open(os.path.join(into, "model.pt"), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    with open(os.path.join(into, "model_config.json"), "w") as f:
        json.dump(config, f)
    try:
        state = torch.load(os.path.join(into, "model.pt"), map_location="cpu",
                           weights_only=True)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise PythaeError(f"{weights} is truncated or not a torch file ({type(e).__name__})") \
            from None
    except Exception as e:                     # weights_only's refusal: objects, not tensors
        raise PythaeError(f"{weights} holds objects other than tensors, which could run code "
                          f"({type(e).__name__}); refused") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise PythaeError(f"{weights} has no model_state_dict: not a pythae model.pt")


def load_pythae(source, device, allow_pickle=False):
    """(adapter in eval mode, a config-like dict for evaluate.py, with `source`: where the
    model came from)."""
    hub = source.startswith(HUB_PREFIX)
    folder, provenance = hub_folder(source) if hub else (source, {"folder": os.path.abspath(
        source)})
    config = check_folder(folder, allow_pickle, hub)
    if not os.path.lexists(os.path.join(folder, "model.pt")):
        raise PythaeError(f"{folder} has no model.pt")
    try:
        from pythae.models import AutoModel
    except ImportError:
        raise PythaeError("evaluating a pythae model needs the pythae package: "
                          "pip install pythae==0.1.2") from None
    with tempfile.TemporaryDirectory(prefix="pythae_model_") as private:
        if not allow_pickle:
            private_copy(folder, config, private)
        try:
            model = AutoModel.load_from_folder(folder if allow_pickle else private)
        except (OSError, ValueError, KeyError, RuntimeError, NameError, AttributeError,
                TypeError, EOFError) as e:
            reason = " ".join(str(e).split())
            raise PythaeError(f"pythae could not load {folder}: {type(e).__name__}"
                              f"{': ' + reason if reason else ''}") from None
    name = model.model_name
    if name not in PYTHAE_MODELS:
        raise PythaeError(f"pythae model {name} is not supported here (supported: "
                          f"{', '.join(sorted(PYTHAE_MODELS))})")
    shape = tuple(model.model_config.input_dim or ())
    if len(shape) != 3 or shape[1] != shape[2]:
        raise PythaeError(f"{source}: input_dim {list(shape)} is not a square (C, H, W) image")
    adapter = PythaeAdapter(model, name).to(device).eval()
    config = {"model_params": {"name": f"pythae:{name}", "image_size": shape[1],
                               "in_channels": shape[0]},
              "exp_params": {"kld_weight": 1.0}, "data_params": {},
              "reconstruction_loss": getattr(model.model_config, "reconstruction_loss", None),
              "source": provenance}
    return adapter, config


class PythaeAdapter(Autoencoder):
    """A pythae model behind evaluate.py's interface: [-1, 1] images in and out."""

    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name
        self.posterior, self.prior = PYTHAE_MODELS[name]
        self.latent_dim = model.model_config.latent_dim
        self.latent_shape = None                   # the encoder's output shape, once seen
        self.not_applicable = {"elbo": "pythae models define their own likelihoods; not "
                                       "comparable"}
        if self.posterior != "vq":
            self.not_applicable["vq_loss"] = f"{name} has no codebook"
        reason = KL_REASONS.get(self.posterior) or KL_REASONS.get(self.prior)
        if reason:
            self.not_applicable["kl"] = reason.format(name=name)
        reason = SAMPLE_REASONS.get(self.prior)
        self.cannot_sample = reason.format(name=name) if reason else None
        if self.posterior == "vq":
            self.num_embeddings = model.quantizer.num_embeddings

    # --- the posterior's own mean ---------------------------------------------------------
    def _code(self, x01):
        """(latent to decode, as pythae's decoder takes it; encoder outputs; the quantizer's
        output for VQVAE, else None)."""
        out = self.model.encoder(x01)
        mu = out.embedding
        if self.latent_shape is None:
            self.latent_shape = tuple(mu.shape[1:])
        if self.posterior == "vmf":
            return mu / mu.norm(dim=-1, keepdim=True), out, None
        if self.posterior == "flow":
            return self._flow(mu), out, None
        if self.posterior == "vq":
            quantized, q = self._quantize(mu)
            return quantized, out, q
        return mu, out, None

    def _flow(self, z):
        if self.name == "VAE_IAF":
            return self.model.iaf_flow.inverse(z).out
        for layer in self.model.net:                    # VAE_LinNF
            z = layer(z).out
        return z

    def _quantize(self, embeddings):
        """pythae's VQVAE.forward around its quantizer: (quantised latent, quantizer output)."""
        flat = embeddings.dim() == 2
        e = embeddings.reshape(len(embeddings), 1, 1, -1) if flat else embeddings
        out = self.model.quantizer(e.permute(0, 2, 3, 1), uses_ddp=False)
        q = out.quantized_vector
        return (q.reshape(len(embeddings), -1) if flat else q), out

    def _decode(self, z):
        return self.model.decoder(z).reconstruction.float() * 2 - 1

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        x01 = (x + 1) / 2
        z, out, q = self._code(x01)
        metrics, latents = {}, {}
        log_var = out.get("log_covariance")
        if self.posterior == "gaussian" and log_var is None and "kl" not in self.not_applicable:
            self.not_applicable["kl"] = f"{self.name}'s encoder gives no variance"
        if "kl" not in self.not_applicable:   # the latent diagnostics too assume N(0, I)
            mu = out.embedding.flatten(1).float()
            latents = {"mu": mu, "logvar": log_var.flatten(1).float()}
            metrics["kl"] = gaussian_kl(mu, latents["logvar"])
        else:                                  # activity of the encoder's output, any type
            latents = {"mu": out.embedding.flatten(1).float()}
        if q is not None:
            metrics["vq_loss"] = self._per_image_vq_loss(out.embedding, q)
            latents = {"codes": q.quantized_indices.flatten(1)}
        recon = self._decode(z)
        if self.name == "VAEGAN":
            metrics.update(self._vaegan_losses(x01, out, recon, generator))
        return recon, metrics, latents

    def _per_image_vq_loss(self, embeddings, q):
        """pythae's quantizer loss (mean over the latent's values), per image."""
        quantizer = self.model.quantizer
        e = embeddings.reshape(len(embeddings), -1).float()
        d = (q.quantized_vector.reshape(len(embeddings), -1).float() - e).pow(2).mean(1)
        if hasattr(quantizer, "quantization_loss_factor"):      # the codebook term too
            return d * (quantizer.commitment_loss_factor + quantizer.quantization_loss_factor)
        return d * quantizer.commitment_loss_factor                 # EMA codebook

    def _vaegan_losses(self, x01, out, recon, generator):
        """pythae's VAEGAN.loss_function per image, with posterior and prior noise drawn from
        the evaluation's generator: encoder, decoder and discriminator losses and the
        feature-space reconstruction (pythae's `recon_loss`)."""
        mu, log_var = out.embedding, out.log_covariance
        eps = torch.randn(mu.shape, device=mu.device, generator=generator, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * log_var) * eps
        z_prior = torch.randn(mu.shape, device=mu.device, generator=generator, dtype=mu.dtype)
        recon_x = self.model.decoder(z).reconstruction
        rows = []
        for i in range(len(x01)):
            values = self.model.loss_function(recon_x[i:i + 1], x01[i:i + 1], z[i:i + 1],
                                              z_prior[i:i + 1], mu[i:i + 1], log_var[i:i + 1])
            rows.append(torch.stack([v.float() for v in values[:4]]))
        feature_recon, encoder, decoder, discriminator = torch.stack(rows).unbind(1)
        return {"encoder_loss": encoder, "decoder_loss": decoder,
                "discriminator_loss": discriminator, "feature_recon": feature_recon}

    @torch.no_grad()
    def reconstruct(self, x):
        return self._decode(self._code((x + 1) / 2)[0])

    @torch.no_grad()
    def sample(self, num_samples, device=None, generator=None):
        """Decoded draws from the model's prior, in the latent's own shape."""
        if self.cannot_sample:
            raise PythaeError(self.cannot_sample)
        device = device or next(self.parameters()).device
        if self.latent_shape is None:                   # learn the shape from one image
            size = self.model.model_config.input_dim
            self._code(torch.zeros(1, *size, device=device))
        shape = (num_samples, *self.latent_shape)
        if self.prior == "codebook":
            codebook = self.model.quantizer.embeddings     # a buffer when the codebook is EMA
            codebook = codebook.weight if isinstance(codebook, nn.Embedding) else codebook
            # pythae quantises a flat latent of size L as a 1 x L grid of scalars
            grid = (1, shape[1]) if len(shape) == 2 else shape[2:]
            codes = torch.randint(0, len(codebook), (num_samples, *grid), device=device,
                                  generator=generator)
            z = codebook[codes].permute(0, 3, 1, 2)           # (n, D, H, W) as the decoder takes
            return self._decode(z.reshape(shape))
        if self.prior == "vamp":
            return self._decode(self._vamp_prior(num_samples, device, generator))
        z = torch.randn(shape, device=device, generator=generator)
        if self.prior == "sphere":
            z = z / z.norm(dim=-1, keepdim=True)
        elif self.prior == "poincare":
            z = self._poincare_prior(num_samples, device, generator)
        return self._decode(z)

    def _vamp_prior(self, n, device, generator):
        """z ~ q(z | u_k) for pseudo-inputs u_k chosen uniformly (pythae's VampPrior)."""
        model = self.model
        k = torch.randint(0, model.number_components, (n,), device=device, generator=generator)
        pseudo = model.pseudo_inputs(model.idle_input.to(device))[k]
        out = model.encoder(pseudo.reshape((n,) + tuple(model.model_config.input_dim)))
        eps = torch.randn(out.embedding.shape, device=device, generator=generator)
        return out.embedding + torch.exp(0.5 * out.log_covariance) * eps

    def _poincare_prior(self, n, device, generator):
        """pythae's PoincareVAE prior, sampled under the evaluation's generator (its
        distributions draw from torch's global generator, seeded from ours and restored)."""
        model = self.model
        prior = model.prior(loc=model._pz_mu.to(device), scale=model._pz_logvar.exp().to(device),
                            manifold=model.latent_manifold)
        seed = int(torch.randint(0, 2 ** 62, (), device=device, generator=generator))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return prior.rsample(torch.Size([n])).reshape(n, -1)
