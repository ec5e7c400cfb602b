"""ectune: Easy Consistency Tuning (Geng et al., ICLR 2025) for any diffusion model."""

__version__ = "0.1.0"
