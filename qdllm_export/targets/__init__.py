"""The ways a checkpoint leaves the pipeline: what each linear of a block is turned into.

* ``planes``: binary planes (``formats.qtensor.QuantizedTensor``) by Quant-dLLM, RTN or GPTQ; the
  method's exact form, run by qdllm's runtimes (GGUF planes, the ONNX function).
* ``ggml``: ggml's own types (q2_k ... iq3_s) for stock llama.cpp, fitted by the grid driver.
* ``nbits``: onnxruntime's MatMulNBits grid (int2 / int4 / int8) for stock onnxruntime.
* ``mix``: a per-tensor choice among a target's grids under a bits budget (the ``auto`` outtypes).

* ``tables``: the precision of the embedding and the head, chosen once where the model is made.

``base`` holds what every target promises the streaming pipeline (``Target``) and the grid target the
``ggml`` and ``nbits`` targets share. The package imports nothing itself, so the CLI reads ``tables``
without importing torch.
"""
