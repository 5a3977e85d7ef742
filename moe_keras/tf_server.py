r"""Runs one TensorFlow server of a cluster that one client drives.

  python -m moe_keras.tf_server --tf_servers=host0:2222,host1:2222 \
      --task_index=I [--devices=N]

Run it on every host (task I listens on the I-th address), then the client
on any host: `python -m moe_keras.train --tf_servers=host0:2222,host1:2222
--mesh_shape=batch:1,expert:2 ...`. The server keeps the variables and runs
the ops the client places on its devices (expert blocks, their Adam slots,
the replicas' compute); it holds nothing the next run needs (the client
writes the checkpoints), so a server can be restarted, or serve the next
client. It runs until killed. See `moe_keras.distribution.tf_cluster`.
"""

from moe_keras import cli_common  # sets the TF environment first

from absl import app  # pylint: disable=g-bad-import-order
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "tf_servers",
    None,
    "All servers of the cluster, host:port,host:port (the same list on"
    " every server and the client; task I is the I-th).",
)
flags.DEFINE_integer("task_index", None, "This server's index in --tf_servers.")
flags.DEFINE_string(
    "devices",
    None,
    "Devices this server offers (an int >= 1): on a host without GPUs its"
    " CPU split into that many logical devices (default 1); on a GPU host"
    " its GPUs, and --devices may only repeat their count.",
)
flags.mark_flags_as_required(["tf_servers", "task_index"])

PROGRAM = "moe_keras.tf_server"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli_common.quiet_startup():
    from moe_keras.distribution import tf_cluster  # pylint: disable=g-import-not-at-top

    try:
      servers = tf_cluster.parse_servers(FLAGS.tf_servers)
      devices = tf_cluster.parse_device_count(FLAGS.devices)
      tf_cluster.check_task_index(servers, FLAGS.task_index)
      count, kind = tf_cluster.configure_server_devices(devices)
      server = tf_cluster.make_server(servers, FLAGS.task_index)
    except Exception as e:  # pylint: disable=broad-except
      # Bad flags (ValueError) or a server that cannot start (e.g. its
      # port is taken: a tf.errors.OpError).
      error = e
    else:
      error = None
  if error is not None:
    cli_common.fail(PROGRAM, error)
  print(
      f"TF server task {FLAGS.task_index} of {len(servers)} serving at"
      f" {servers[FLAGS.task_index]} ({server.target}) with {count} {kind}"
      f" device{'s' if count > 1 else ''}",
      flush=True,
  )
  server.join()


if __name__ == "__main__":
  app.run(main)
