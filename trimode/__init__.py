"""trimode: tri-mode diffusion language models (AR, block diffusion, self-speculation) on Apache TVM."""
__version__ = "0.1.0"
