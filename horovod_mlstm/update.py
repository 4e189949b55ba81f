"""The data-parallel update step, shared by pretraining (train.py) and fine-tuning.

    update = make_update(loss_fn, [(optimizer, variables), ...], micro_batches, clip_norm, xla)
    loss, grad_norm, finite, votes, carry = update(batch, stop_vote)

A rank's batch (a dict of tensors, rows first) is split into `micro_batches` whose gradients are
summed; one fused ring-allreduce averages them over ranks (or Adasum combines them:
distributed.init); the combined, unscaled gradients are clipped to `clip_norm` (0 = off) and
applied by each group's optimizer to its variables, unless one is not finite (then the update is
skipped, as loss scaling does). The global mean loss and the ranks' stop votes are allreduced with
the gradients, so every rank takes the same decision after the step. With a LossScaleOptimizer
first (float16), its dynamic loss scale scales the loss for every group.
"""

from __future__ import annotations

import tensorflow as tf

from horovod_mlstm import distributed as dist


def make_update(loss_fn, groups, micro_batches: int = 1, clip_norm: float = 0.0, xla: bool = False):
    """The update step over `groups` [(optimizer, variables)], for loss_fn(**micro_batch) -> (mean loss, carry).

    `carry` (a tuple of tensors, rows first, e.g. the RNN state after the batch) is concatenated over the
    micro-batches and returned as it is, so a caller can thread state through the steps.
    """
    variables = [v for _, group in groups for v in group]
    scaler = groups[0][0] if isinstance(groups[0][0], tf.keras.mixed_precision.LossScaleOptimizer) else None

    # reduce_retracing: batches whose length varies (fine-tuning pads each to its longest text) share
    # one trace with that dimension unknown, instead of one trace per length.
    @tf.function(jit_compile=xla or None, reduce_retracing=True)
    def local_gradients(micro_batch):
        """Loss and this rank's gradients for one micro-batch (XLA-compiled with --xla)."""
        with tf.GradientTape() as tape:
            loss, carry = loss_fn(**micro_batch)
            scaled = scaler.get_scaled_loss(loss) if scaler else loss
        # Dense gradients (a byte embedding is tiny): they add across micro-batches and allreduce as one
        # fused buffer, like DistributedGradientTape(sparse_as_dense=True).
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, variables)]
        return loss, grads, carry

    @tf.function
    def apply(grads, loss, stop_vote):
        # Enqueued with the gradients (same Horovod cycle): the global loss and the stop votes.
        with tf.control_dependencies(grads):
            loss, votes = tf.unstack(dist.mean(tf.stack([loss, stop_vote])))
        grads = dist.allreduce_gradients([g / micro_batches for g in grads] if micro_batches > 1 else grads)
        if scaler:
            grads = scaler.get_unscaled_gradients(grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        if clip_norm:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)
        else:
            norm = tf.linalg.global_norm(grads)
        first = 0
        for optimizer, group in groups:
            pairs = list(zip(grads[first:first + len(group)], group))
            first += len(group)
            if optimizer is scaler:
                optimizer.apply_gradients(pairs)  # skips the update itself, and lowers the scale, when not finite
            else:
                tf.cond(finite, lambda: optimizer.apply_gradients(pairs), lambda: optimizer.iterations)
        return loss, norm, finite, votes

    def update(batch: dict, stop_vote):
        # Micro-batches run one after another from Python: inside one graph TensorFlow runs them side
        # by side and holds all their activations at once, so accumulation would not save memory.
        rows = next(iter(batch.values())).shape[0] // micro_batches
        grads, losses, carries = None, [], []
        for j in range(micro_batches):
            loss, g, carry = local_gradients({k: v[j * rows:(j + 1) * rows] for k, v in batch.items()})
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            losses.append(loss)
            carries.append(carry)
        loss, norm, finite, votes = apply(grads, tf.reduce_mean(tf.stack(losses)), tf.cast(stop_vote, tf.float32))
        carry = tuple(tf.concat(parts, 0) for parts in zip(*carries))
        return loss, norm, finite, votes, carry

    return update
