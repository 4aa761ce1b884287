"""The one batch encoder that mining, teacher filtering, evaluation and serving share.

It sits above ``modeling`` (whose models it runs) and below builders, mining, evaluation and
serving, so data flows one way (docs/architecture.md, enforced by tests/test_layers.py):

- :mod:`.engine`  :class:`~.engine.EmbeddingEngine`: tokenise, token batches, run the transformer
  on a backend (torch / bf16 / ONNX fp32 / ONNX int8) on ``device``, then the model's own
  remaining modules (Pooling, Dense, Normalize), so every consumer gets the trained model's
  vectors;
- :mod:`.backends` the inference-backend registry (:class:`~.backends.InferenceBackend`,
  :func:`~.backends.get_backend`); one module per backend family: ``torch_modules``
  (``torch``, ``torch-bf16``) and ``onnx`` (the export, fused fp32 and int8, and its runtime
  session); a new backend is one new module there;
- :mod:`.tokens`  the special-token frame and :func:`~.tokens.token_batches`;
- :mod:`.cache`   per-text keyed shards (evaluation) and resumable vector files (mining);
- :mod:`.texts`   :class:`~.texts.TextEncoder`: dedup, chunks and a resumable cache over a stream,
  shared by the ranks of a ``torchrun`` launch (:meth:`~.texts.TextEncoder.encode_shards`);
- devices and processes come from :mod:`conan_embedding.runtime` (``"auto"`` = ``cuda:LOCAL_RANK``
  when CUDA is available; the launcher's processes).
"""
