"""kondense: distill, quantize and evaluate LLMs as Kubernetes Jobs or on one machine."""

__version__ = "0.1.0"
