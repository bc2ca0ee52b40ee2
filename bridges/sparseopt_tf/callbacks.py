"""``ExactFlush``: flush exact-mode optimizers wherever Keras reads whole tables."""

import keras


class FlushMixin:
    """The hooks of :class:`ExactFlush`, shared with ``sparseopt_tf.legacy.ExactFlush``."""

    def __init__(self, optimizer=None):
        super().__init__()
        self._flush_optimizer = optimizer

    def flush(self):
        """Flush the optimizer (the given one, else the model's); others defer nothing."""
        optimizer = self._flush_optimizer
        if optimizer is None:
            optimizer = getattr(self.model, "optimizer", None)
            optimizer = getattr(optimizer, "inner_optimizer", optimizer)   # LossScaleOptimizer
        flush = getattr(optimizer, "flush", None)
        if flush is not None and getattr(optimizer, "sparse_mode", None) == "exact":
            flush()

    def on_test_begin(self, logs=None):
        self.flush()

    def on_predict_begin(self, logs=None):
        self.flush()

    def on_epoch_end(self, epoch, logs=None):
        self.flush()

    def on_train_end(self, logs=None):
        self.flush()


class ExactFlush(FlushMixin, keras.callbacks.Callback):
    """Flush an exact-mode optimizer before Keras reads whole tables.

    In ``sparse_mode="exact"`` rows a step skipped are behind until they are caught up.
    :class:`sparseopt_tf.Embedding` catches up the rows it reads, and the optimizer
    flushes itself before it saves or returns its state; this callback covers the
    readers that neither sees: evaluation and prediction through a plain
    ``keras.layers.Embedding`` or a layer that reads the whole table, and the callbacks
    that read weights at the end of an epoch (``ModelCheckpoint``, ``EarlyStopping``'s
    best weights; list ``ExactFlush`` before them). It flushes on ``on_test_begin``
    (also the validation inside ``fit``), ``on_predict_begin``, ``on_epoch_end`` and
    ``on_train_end``: one pass over each table, a few times per epoch.

    Args:
        optimizer: the optimizer to flush; by default the model's.

    For example:

        model.fit(x, y, validation_data=(xv, yv),
                  callbacks=[sparseopt_tf.ExactFlush(), keras.callbacks.ModelCheckpoint(path)])
    """
