"""The one batch encoder that mining, teacher filtering, evaluation and serving share.

It sits above ``modeling`` (whose models it runs) and below builders, mining, evaluation and
serving, so data flows one way (docs/architecture.md, enforced by tests/test_layers.py):

- :mod:`.engine`  :class:`~.engine.EmbeddingEngine`: tokenise, token batches, run the transformer
  on a backend (torch / ONNX fp32 / ONNX int8) on ``device``, then the model's own remaining
  modules (Pooling, Dense, Normalize), so every consumer gets the trained model's vectors;
- :mod:`.tokens`  the special-token frame and :func:`~.tokens.token_batches`;
- :mod:`.onnx`    the ONNX export (fused fp32, int8) and its runtime session;
- :mod:`.cache`   per-text keyed shards (evaluation) and resumable vector files (mining);
- :mod:`.texts`   :class:`~.texts.TextEncoder`: dedup, chunks and a resumable cache over a stream,
  shared by the ranks of a ``torchrun`` launch (:meth:`~.texts.TextEncoder.encode_shards`);
- devices and processes come from :mod:`conan_embedding.runtime` (``"auto"`` = ``cuda:LOCAL_RANK``
  when CUDA is available; the launcher's processes).
"""
