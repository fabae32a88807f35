"""kondense_jobs: the compression stages (distill, quantize, evaluate) behind one entrypoint."""
