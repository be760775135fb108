"""The diffusers-flash benchmark: Stable Diffusion end to end, its attention kernels, warm-up and profile.

Run from a checkout of this repository (BENCHMARKS.md has the commands and what every column means):

  python -m bench [options]            the pipeline, per attention backend and batch size
  python -m bench attention [options]  the attention kernels on the shapes SD 1.x makes
  python -m bench coldstart [options]  the compiled fast path's warm-up, each run in a new process
  python -m bench profile [options]    the compiled fast path's kernels and FLOPs by class
  python -m bench models MODEL ...     SDXL, SD3 or Flux at full size (``models work``: their FLOPs, no GPU)

``bench.pipeline.time_pipeline(pipe, images, ...)`` times any pipeline object with Diffusers'
``__call__(prompt, height, width, num_inference_steps, guidance_scale, generator, output_type)`` and the
parts ``unet``, ``text_encoder`` and ``vae.decode``.
"""
