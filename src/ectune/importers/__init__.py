"""Teachers in, standard models out.

* :func:`import_edm_pickle` — an EDM/ECT network snapshot ``.pkl`` → an ectune weights file, read
  with a restricted unpickler that never runs code from the file (``ectune import edm-pkl``);
  :func:`read_edm_pickle` + :func:`snapshot_metadata` read any EDM/ECT/EDM2 snapshot as data.
* :class:`VPEpsDenoiser` / :func:`load_diffusers_teacher` — a diffusers ``UNet2DModel`` DDPM
  (ε-prediction, VP) wrapped as an EDM denoiser D(x, σ) (needs ``pip install 'ectune[diffusers]'``).
* :func:`export_weights` — one set of weights + config as a standalone ``.safetensors``
  (``ectune export``), loadable by ``ectune sample`` and plain PyTorch.
"""

from .diffusers_vp import (
    VPEpsDenoiser,
    alphas_cumprod_from,
    load_diffusers_teacher,
    vp_alphas_cumprod,
)
from .edm import edm_to_ectune, import_edm_pickle
from .files import export_weights, write_model_file
from .metadata import snapshot_metadata
from .pickles import SafeUnpickler, read_edm_pickle
from .records import PickledArray, PickledAttribute, PickledModule

__all__ = [
    "PickledArray", "PickledAttribute", "PickledModule", "SafeUnpickler", "VPEpsDenoiser", "alphas_cumprod_from",
    "edm_to_ectune", "export_weights", "import_edm_pickle", "load_diffusers_teacher", "read_edm_pickle",
    "snapshot_metadata", "vp_alphas_cumprod", "write_model_file",
]
