"""The one batch encoder that mining, teacher filtering, evaluation and serving share.

It sits below all of them (it imports only ``modeling``), so data flows one way:

- :mod:`.engine`  :class:`~.engine.EmbeddingEngine`: tokenise, token batches, run the transformer
  on a backend (torch / ONNX fp32 / ONNX int8) on ``device``, then the model's own remaining
  modules (Pooling, Dense, Normalize), so every consumer gets the trained model's vectors;
- :mod:`.tokens`  the special-token frame and :func:`~.tokens.token_batches`;
- :mod:`.onnx`    the ONNX export (fused fp32, int8) and its runtime session;
- :mod:`.cache`   per-text keyed shards (evaluation) and resumable vector files (mining);
- :mod:`.texts`   :class:`~.texts.TextEncoder`: dedup, chunks and a resumable cache over a stream,
  shared by the ranks of a ``torchrun`` launch (:meth:`~.texts.TextEncoder.encode_shards`);
- :mod:`.device`  ``"auto"`` = ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; the
  launcher's processes (:func:`~.device.join_processes`).
"""
