"""BLASST for SGLang and Hugging Face models.

Modules (imported on use, so ``import blasst_sglang`` stays light and needs no SGLang):

- :mod:`~blasst_sglang.plugin`, :mod:`~blasst_sglang.backend`, :mod:`~blasst_sglang.config`,
  :mod:`~blasst_sglang.stats`: the ``blasst`` SGLang attention backend, its flags and counters;
- :mod:`~blasst_sglang.hf_attention`: BLASST inside transformers models (reference on CPU,
  Triton kernels on CUDA);
- :mod:`~blasst_sglang.calibration`, :mod:`~blasst_sglang.evaluate`: threshold calibration and
  accuracy against dense attention;
- :mod:`~blasst_sglang.skipmaps`, :mod:`~blasst_sglang.plotting`: skip-map capture and pictures;
- :mod:`~blasst_sglang.model`, :mod:`~blasst_sglang.text`: the embedded SmolLM2 model and long texts;
- :mod:`~blasst_sglang.cli`, :mod:`~blasst_sglang.demo`: the ``blasst`` command.
"""
