"""The diffusers-flash benchmark: Stable Diffusion v1.x end to end and its attention kernels alone.

Run from a checkout of this repository (BENCHMARKS.md has the commands and what every column means):

  python -m bench [options]            the pipeline, per attention backend and batch size
  python -m bench attention [options]  the attention kernels on the shapes SD 1.x makes

``bench.pipeline.time_pipeline(pipe, images, ...)`` times any pipeline object with Diffusers'
``__call__(prompt, height, width, num_inference_steps, guidance_scale, generator, output_type)`` and the
parts ``unet``, ``text_encoder`` and ``vae.decode``.
"""
