"""Model plugins: ``fn(params: dict, data: DataBundle) -> paddle.nn.Layer``.

A model may define ``loss(outputs, batch)``; without it the run uses cross-entropy on ``batch[1]``.
"""
