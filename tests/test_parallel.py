"""Sharded = unsharded. JAX fixes its device count when it starts, so the 8-device runs happen in
subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from support import metrics, overrides, run_cli, train, write_corpus, write_sentiment

HERE = os.path.dirname(os.path.abspath(__file__))
# data2_fsdp2_tensor2: XLA miscompiles the RNN/LSTM gradient there unless their parameters are
# gathered over fsdp first (parallel.GATHER_FSDP_ARCHS): the LSTM's parameters were 6e-2 off after 4 steps
MESHES = ("data8", "fsdp8", "data2_tensor4", "data2_fsdp2_tensor2")


def env_with_devices(n: int, cache: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}",
             NLM_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
  return env


def nlm_jax(*argv, env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "nlm_jax", *map(str, argv)], env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory):
  """arch → (arrays, layouts): per-step losses, final params and layouts of 20 steps on 1 device
  and on 8-device meshes, from one worker subprocess per architecture.

  Each architecture is computed at most once per test session: under pytest-xdist the workers
  share the session's base temporary directory, and a file lock per architecture lets the first
  worker that needs it compute it, while another worker computes another architecture (one lock
  for all made the second worker wait ~90 s for nothing).
  """
  import fcntl

  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  loaded = {}

  def get(arch: str):
    if arch not in os.environ.get("NLM_JAX_PARALLEL_ARCHS", "transformer,lstm,rnn,fnn").split(","):
      pytest.skip(f"{arch} not in NLM_JAX_PARALLEL_ARCHS")
    if arch not in loaded:
      out = str(shared / f"parallel-runs-{arch}.npz")
      with open(str(shared / f"parallel-runs-{arch}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out + ".json"):
          proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_worker.py"), out, "20", arch],
                                env=env_with_devices(8, str(shared / f"parallel-cache-{arch}")), capture_output=True,
                                text=True, timeout=900)
          assert proc.returncode == 0, proc.stderr[-3000:]
      with open(out + ".json") as f:
        loaded[arch] = np.load(out), json.load(f)
    return loaded[arch]

  return get


@pytest.mark.parametrize("arch", ["transformer", "lstm", "rnn", "fnn"])
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_match_one_device(sharded_runs, arch, mesh):
  runs, _ = sharded_runs(arch)
  single = runs[f"{arch}/single/losses"]
  assert single.shape == (20,) and single[-1] < single[0]
  np.testing.assert_allclose(runs[f"{arch}/{mesh}/losses"], single, rtol=1e-4)
  names = [k[len(f"{arch}/single/params"):] for k in runs.files if k.startswith(f"{arch}/single/params")]
  assert names
  for name in names:
    np.testing.assert_allclose(runs[f"{arch}/{mesh}/params{name}"], runs[f"{arch}/single/params{name}"],
                               rtol=1e-3, atol=5e-4, err_msg=name)


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_layouts_are_as_configured(sharded_runs, arch):
  layout = sharded_runs(arch)[1]
  if arch == "transformer":
    fsdp = layout["transformer/fsdp8"]
    assert fsdp["params"]["['block_0']['ffn']['w1']['kernel']"] == "P('fsdp', None)"  # (embed, mlp)
    assert fsdp["params"]["['block_0']['attn']['query']['kernel']"] == "P('fsdp', None, None)"
    assert fsdp["mu"]["['block_0']['ffn']['w1']['kernel']"] == "P('fsdp', None)"  # optimizer state too
    tp = layout["transformer/data2_tensor4"]
    assert tp["params"]["['block_0']['ffn']['w1']['kernel']"] == "P(None, 'tensor')"  # MLP hidden units
    assert tp["params"]["['block_0']['attn']['query']['kernel']"] == "P(None, 'tensor', None)"  # heads
    assert tp["params"]["['block_0']['attn']['out']['kernel']"] == "P('tensor', None, None)"
    dp = layout["transformer/data8"]
    assert set(dp["params"].values()) <= {"P()", "P(None,)", "P(None, None)", "P(None, None, None)"}
    # vocab 40 does not divide over fsdp=8: the embedding keeps 'embed' on fsdp, vocab replicated.
    assert fsdp["params"]["['embed']['embedding']"] == "P(None, 'fsdp')"
  else:
    tp = layout["lstm/data2_tensor4"]
    assert tp["params"]["['layer_0']['W']"] == "P(None, None, 'tensor')"  # gate units
    assert tp["params"]["['layer_0']['U']"] == "P(None, None, 'tensor')"
    # the step gathers U over fsdp for its use; the state keeps it sharded (FSDP's memory saving)
    three = layout["lstm/data2_fsdp2_tensor2"]
    assert three["params"]["['layer_0']['U']"] == "P('fsdp', None, 'tensor')"
    assert three["mu"]["['layer_0']['U']"] == "P('fsdp', None, 'tensor')"


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_activations_are_constrained_as_the_rules_say(sharded_runs, arch):
  """The step's activations carry the layouts `parallel.RULES` gives their logical axes (the
  models' `layers.constrain`): the batch over data (and fsdp), the MLP's hidden units and the
  logits' vocabulary over tensor, the residual stream replicated along its model dimension.
  Without them XLA's propagation resharded activations between layers (benchmarks/collectives.py)."""
  layout = sharded_runs(arch)[1]
  acts = {mesh: set(layout[f"{arch}/{mesh}"]["activations"]["on"]) for mesh in MESHES}
  if arch == "transformer":  # (the LSTM's step constrains its parameters too: the fsdp gather)
    assert not layout["transformer/data2_fsdp2_tensor2"]["activations"]["off"]  # mesh.activation_sharding=false
    assert not layout["transformer/single"]["activations"]["on"]  # one device: the program as without them
    assert {'[{"data"}, {}]', '[{"data"}, {"tensor"}]', '[{"data"}, {}, {"tensor"}]'} <= acts["data2_tensor4"]
    assert {'[{"fsdp"}, {}]', '[{"fsdp"}, {}, {}]'} <= acts["fsdp8"]  # vocab 40 does not divide over 8
    assert {'[{"data", "fsdp"}, {}]', '[{"data", "fsdp"}, {"tensor"}]'} <= acts["data2_fsdp2_tensor2"]
  else:  # the layers' outputs (B, T, H) and the logits (B, T, V)
    assert {'[{"data", "fsdp"}, {}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}]'} <= acts["data2_fsdp2_tensor2"]
    assert '[{"fsdp"}, {}, {}]' in acts["fsdp8"]


def test_activation_sharding_can_be_left_to_xla(tmp_path):
  """`mesh.activation_sharding=false` reaches the task (its program: the 8-device test above)."""
  from nlm_jax import config as config_lib
  from nlm_jax.training import trainer

  corpus = write_corpus(tmp_path / "corpus.txt")

  def task(*extra):
    return trainer.make_run(config_lib.load_config(None, [*overrides(tmp_path / "run", corpus), *extra])).task

  assert task().activation_sharding is True
  assert task("mesh.activation_sharding=false").activation_sharding is False


def test_every_task_gathers_fsdp_for_recurrent_models_by_default(config):
  """The 2×2×2 tests above build LMTask without `gather_fsdp`: the default must be right for a
  language model and for a task's network around one (a classifier's body), or a recurrent model
  trained through the library's own tasks gets XLA's wrong gradients."""
  from nlm_jax import models, parallel
  from nlm_jax.tasks.classify import Classifier

  recurrent = config.arch in ("rnn", "lstm")
  assert parallel.gathers_fsdp(models.build(config)) == recurrent
  assert parallel.gathers_fsdp(Classifier(config, 2)) == recurrent


def test_batch_that_does_not_divide_the_mesh(tmp_path):
  corpus = write_corpus(tmp_path / "c.txt")
  proc = nlm_jax("train", *overrides(tmp_path / "r", corpus, steps=2), "data.batch_size=6", "mesh.data=4",
                 "mesh.fsdp=2", env=env_with_devices(8, str(tmp_path / "cache")))
  assert proc.returncode == 2
  assert "data.batch_size=6" in proc.stderr and "8 devices" in proc.stderr
  proc = nlm_jax("train", *overrides(tmp_path / "r", corpus, steps=2), "mesh.data=3",
                 env=env_with_devices(8, str(tmp_path / "cache")))
  assert proc.returncode == 2 and "8 devices" in proc.stderr


def test_save_on_8_devices_evaluate_on_1_and_back(tmp_path):
  corpus = write_corpus(tmp_path / "c.txt")
  env8 = env_with_devices(8, str(tmp_path / "cache"))
  proc = nlm_jax("train", *overrides(tmp_path / "r8", corpus, steps=10), "mesh.data=2", "mesh.fsdp=2",
                 "mesh.tensor=2", env=env8)
  assert proc.returncode == 0, proc.stderr[-2000:]
  saved = json.loads(proc.stdout[proc.stdout.index("{"):])
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r8", "--json")  # this process: 1 device
  assert code == 0, err
  assert json.loads(out)["loss"] == pytest.approx(saved["final_validation_loss"], rel=1e-5)

  one = train(*overrides(tmp_path / "r1", corpus, steps=10))
  proc = nlm_jax("eval", "--workdir", tmp_path / "r1", "--json", env=env8)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["loss"] == pytest.approx(one["final_validation_loss"], rel=1e-5)
  # Resuming a 1-device run on 8 devices continues it (elastic restore of the whole state).
  proc = nlm_jax("train", *overrides(tmp_path / "r1", corpus, steps=14), "mesh.fsdp=8", "mesh.data=1", env=env8)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [r["step"] for r in metrics(tmp_path / "r1")][-1] == 14


def test_evaluation_does_not_depend_on_the_devices(tmp_path):
  """An evaluation batch that the devices do not divide is padded with mask-0 rows: an LSTM's
  streams (whose layout depends on the number of rows) and the random windows of an estimate
  are those of data.eval_batch_size rows on any mesh."""
  corpus = write_corpus(tmp_path / "c.txt")
  env8 = env_with_devices(8, str(tmp_path / "cache"))
  for arch, batching, key in (("lstm", "streams", "loss"), ("transformer", "windows", "val_loss")):
    workdir = tmp_path / arch
    if key == "loss":  # the whole split, read as 3 streams
      one = train(*overrides(workdir, corpus, arch=arch, batching=batching, steps=4), "data.batch_size=3")
      proc = nlm_jax("eval", "--workdir", workdir, "--json", env=env8)
      assert proc.returncode == 0, proc.stderr[-2000:]
      assert json.loads(proc.stdout)["loss"] == pytest.approx(one["final_validation_loss"], rel=2e-6)
    else:  # train.eval_batches=4 batches of 3 random windows, then on 4 × 2 devices: resumed from step 2
      two, extra = tmp_path / "eight", ["data.batch_size=4", "data.eval_batch_size=3", "train.eval_every=2",
                                         "train.checkpoint_every=2"]
      one = train(*overrides(workdir, corpus, arch=arch, batching=batching, steps=4), *extra)
      train(*overrides(two, corpus, arch=arch, batching=batching, steps=4), *extra, "train.stop_after=2")
      proc = nlm_jax("train", *overrides(two, corpus, arch=arch, batching=batching, steps=4), *extra,
                     "mesh.data=4", "mesh.tensor=2", env=env8)
      assert proc.returncode == 0, proc.stderr[-2000:]
      estimates = [[(r["step"], r[key]) for r in metrics(w) if key in r and r["step"] > 2] for w in (workdir, two)]
      assert estimates[0] and [s for s, _ in estimates[0]] == [s for s, _ in estimates[1]]
      np.testing.assert_allclose([v for _, v in estimates[1]], [v for _, v in estimates[0]], rtol=2e-6)


def test_classifier_estimates_do_not_depend_on_the_devices(tmp_path):
  """Classification too: an estimate of train.eval_batches batches scores data.eval_batch_size
  examples per batch on any mesh (the mesh's extra rows are weight-0 padding, not more examples)."""
  base = _classify_args(tmp_path / "one", tmp_path)
  extra = ["train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "data.eval_batch_size=6",
           "train.eval_batches=2"]
  train(*base, *extra)
  other = [a.replace(str(tmp_path / "one"), str(tmp_path / "eight")) for a in base]
  train(*other, *extra, "train.stop_after=4")
  proc = nlm_jax("train", *other, *extra, "mesh.data=4", "mesh.tensor=2",
                 env=env_with_devices(8, str(tmp_path / "cache8")))
  assert proc.returncode == 0, proc.stderr[-2000:]
  scores = [[(r["step"], r["val_loss"], r["val_accuracy"]) for r in metrics(tmp_path / w) if "val_loss" in r
             and r["step"] > 4] for w in ("one", "eight")]
  assert scores[0] and [s[:1] for s in scores[0]] == [s[:1] for s in scores[1]]
  np.testing.assert_allclose([s[1:] for s in scores[1]], [s[1:] for s in scores[0]], rtol=2e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _classify_args(workdir, tmp_path) -> list[str]:
  """A tiny SST-style classification run whose batches pad to 16 or 32 tokens by their longest text
  (with this seed, batch 9 has a longest text of ≤ 16 tokens in one half and > 16 in the other)."""
  sst = write_sentiment(tmp_path)
  return [f"workdir={workdir}", "task.kind=classify", f"data.files.train={sst['train']}",
          f"data.files.validation={sst['dev']}", "tokenizer.kind=word", "data.batch_size=16", "task.max_len=32",
          "train.steps=24", "train.log_every=1", "train.eval_every=12", "train.progress=false", "optim.lr=1e-2",
          "seed=1", "model.arch=lstm", "model.d_embed=16", "model.d_hidden=16", "model.n_layers=1"]


@pytest.mark.parametrize("task", ["lm", "classify", "lm_tensor_over_processes"])
def test_two_processes_match_one_process(tmp_path, task):
  """Two processes of two devices each train as one process does: the LM, and a classifier whose
  training batches have as many padded lengths as texts have (each process's rows of a batch must
  be padded to the whole batch's longest text, or the processes' parts disagree); and the LM with
  its tensor axis over both processes (each then loads the whole batch: it crashed)."""
  mesh = ["mesh.data=1", "mesh.tensor=4"] if task == "lm_tensor_over_processes" else []
  if task != "classify":
    args = overrides(tmp_path / "one", write_corpus(tmp_path / "c.txt"), steps=8, train__log_every=1,
                     train__eval_every=4)
  else:
    args = _classify_args(tmp_path / "one", tmp_path)
  train(*args)
  port = _free_port()
  two = [a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args]
  procs = [subprocess.Popen([sys.executable, "-m", "nlm_jax", "train", *two,
                             *mesh, f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                             f"distributed.process_id={i}"], env=env_with_devices(2, str(tmp_path / f"cache{i}")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 reports (Gloo itself prints connection lines on both).
  assert '"workdir"' in outs[0][0] and '"workdir"' not in outs[1][0]
  assert "train:" not in outs[1][1]  # no progress bar either
  one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
  assert [r["step"] for r in one] == [r["step"] for r in two]
  np.testing.assert_allclose([r["train_loss"] for r in two], [r["train_loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["val_loss"] for r in two if "val_loss" in r],
                             [r["val_loss"] for r in one if "val_loss" in r], rtol=1e-5)
  assert os.path.isdir(tmp_path / "two" / "checkpoints" / str(one[-1]["step"]))


def test_a_process_loads_only_the_rows_its_devices_hold(monkeypatch):
  """process_rows: the block of a global batch this process's devices hold under the batch
  sharding (here devices holding rows 8-11 and 12-15 of 16, as process 1 of 2 on a data axis of
  4), the whole batch where every device holds it (a tensor axis across processes), and a one-line
  error for rows that are not one block."""
  from nlm_jax import parallel
  from nlm_jax.errors import UserError

  def holding(*blocks):
    stub = type("Sharding", (), {"addressable_devices_indices_map": lambda self, shape: {
        d: (slice(a, b),) for d, (a, b) in enumerate(blocks)}})
    monkeypatch.setattr(parallel, "batch_sharding", lambda mesh: stub())

  holding((8, 12), (12, 16))
  assert parallel.process_rows(16, mesh=None) == slice(8, 16)
  holding((None, None), (None, None))  # every device holds the whole batch
  assert parallel.process_rows(16, mesh=None) == slice(0, 16)
  holding((0, 4), (8, 12))
  with pytest.raises(UserError, match="not one block"):
    parallel.process_rows(16, mesh=None)
