"""ParameterServerStrategy (one worker, one parameter server, in-process on loopback) is
refused with StrategyNotSupportedError before any variable is written, for the Keras 3
and the legacy classes. Run by ``tests/tf/test_dropin_errors.py`` in its own process: a
parameter-server strategy connects the whole process to its cluster.

Arguments: two free loopback ports (worker, parameter server). Prints ``OK <module>``
per refusal, then ``DONE``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparseopt_tf  # noqa: E402
from sparseopt_tf._handover import StrategyNotSupportedError  # noqa: E402


def main():
    ports = [int(p) for p in sys.argv[1:3]]
    cluster = tf.train.ClusterSpec({"worker": [f"localhost:{ports[0]}"], "ps": [f"localhost:{ports[1]}"]})
    servers = [tf.distribute.Server(cluster, job_name=job, task_index=0, protocol="grpc", start=True)
               for job in ("worker", "ps")]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    for cls in (sparseopt_tf.Adam, sparseopt_tf.legacy.Adam):
        with strategy.scope():
            var = tf.Variable(np.ones((4, 2), np.float32))
            opt = cls(0.1)
            try:
                opt.apply_gradients([(tf.ones((4, 2)), var)])
            except StrategyNotSupportedError as e:
                assert "MirroredStrategy" in str(e), e
                assert np.array_equal(var.numpy(), np.ones((4, 2), np.float32))
                print("OK", cls.__module__, flush=True)
            else:
                print("NOT REFUSED", cls.__module__, flush=True)
                return 1
    print("DONE", flush=True)
    del servers
    return 0


if __name__ == "__main__":
    sys.exit(main())
