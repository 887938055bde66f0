"""Faults a run directory must survive (issue 12): a second trainer, NaN, damaged checkpoints, bad
settings, changed data, full disks. Each gives one line and a non-zero exit (or, for a damaged
newest checkpoint, one warning and the newest intact one), and leaves every earlier checkpoint's
bytes as they were (sha256 of every file before and after)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from support import assert_trees_equal, final_state, metrics, overrides, run_cli, train, write_corpus


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A run stopped at step 10 of 20 with checkpoints 5 and 10 (copied by each test)."""
  d = tmp_path_factory.mktemp("faults")
  old = os.environ.get("NLM_JAX_CACHE")
  os.environ["NLM_JAX_CACHE"] = str(d / "cache")
  corpus = write_corpus(d / "corpus.txt")
  train(*args_for(d / "run", corpus), "train.stop_after=10")
  yield d / "run", corpus
  if old is None:
    os.environ.pop("NLM_JAX_CACHE")
  else:
    os.environ["NLM_JAX_CACHE"] = old


@pytest.fixture
def run(base, tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(base[0].parent / "cache"))
  workdir = tmp_path / "run"
  shutil.copytree(base[0], workdir)
  return workdir, base[1]


def args_for(workdir, corpus, **extra) -> list[str]:
  return overrides(workdir, corpus, steps=20, train__checkpoint_every=5, train__keep_checkpoints=3, **extra)


def checkpoint_hashes(workdir) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, workdir)] = hashlib.sha256(f.read()).hexdigest()
  assert out
  return out


def one_line_error(code: int, err: str, mention: str) -> str:
  lines = [line for line in err.splitlines() if line.startswith("nlm-jax: error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
  assert mention.lower() in lines[0].lower(), lines[0]
  return lines[0]


def warnings_of(err: str) -> list[str]:
  assert "Traceback" not in err, err
  return [line for line in err.splitlines() if line.startswith("nlm-jax: warning:")]


# ----------------------------------------------------------------------------- 1, 5: lock, readers


def test_second_trainer_is_refused_readers_see_whole_checkpoints_stale_lock_is_taken_over(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  corpus = write_corpus(tmp_path / "corpus.txt")
  workdir = tmp_path / "r"
  # Saves and prunes every step (keep 1): the worst case for readers.
  args = overrides(workdir, corpus, steps=100000, train__log_every=1, train__eval_every=100000,
                   train__checkpoint_every=1, train__keep_checkpoints=1)
  proc = subprocess.Popen([sys.executable, "-m", "nlm_jax", "train", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ))
  try:
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() or len(metrics(workdir)) < 2:
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.2)
    config_before = (workdir / "resolved_config.yaml").read_bytes()
    start = time.time()
    code, _, err = run_cli("train", *args, "model.d_model=64", "seed=7")
    line = one_line_error(code, err, "in use by another nlm-jax train")
    assert f"pid {proc.pid} on host " in line and time.time() - start < 10
    assert (workdir / "resolved_config.yaml").read_bytes() == config_before
    for _ in range(3):  # readers while the trainer saves and prunes
      code, out, err = run_cli("eval", "--workdir", workdir, "--json")
      assert code == 0 and "Traceback" not in err, err[-3000:]
      assert json.loads(out)["step"] >= 1
    code, out, err = run_cli("generate", "--workdir", workdir, "--prompt", "the ", "--max-new-tokens", 5)
    assert code == 0 and out.startswith("the "), err[-3000:]
  finally:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "interrupted at step" in err, err[-3000:]
  step = int(err.split("interrupted at step")[1].split(";")[0])
  # The dead trainer's lock file (its pid and host inside) is taken over.
  assert str(proc.pid) in (workdir / ".lock").read_text()
  resumed = train(*args, f"train.stop_after={step + 2}")
  assert resumed["steps"] == step + 2


# ----------------------------------------------------------------------------- 2: NaN


def test_nan_is_never_saved_and_the_error_names_the_last_good_step(run):
  workdir, corpus = run
  before = checkpoint_hashes(workdir)
  code, _, err = run_cli("train", *args_for(workdir, corpus), "optim.lr=1e9", "optim.warmup_steps=0",
                         "train.log_every=1", "train.eval_every=1")
  line = one_line_error(code, err, "last good checkpoint (step 10)")
  assert "nan" in line.lower()  # the parameters, or the validation loss computed from them
  assert checkpoint_hashes(workdir) == before
  # The last good checkpoint is good: a sane rerun goes on from it.
  assert train(*args_for(workdir, corpus), "train.stop_after=12")["steps"] == 12


@pytest.mark.parametrize("cadence", [
    # The case: the validation loss is the first number computed from the new parameters.
    {"optim__lr": 1e9, "train__eval_every": 1},
    # No evaluation, a save every step: only the step's finiteness flag sees the new parameters.
    {"optim__lr": 1e38, "optim__name": "sgd", "train__eval_every": 1000, "train__checkpoint_every": 1},
])
def test_with_a_huge_lr_every_saved_checkpoint_is_good(tmp_path, monkeypatch, cadence):
  """The guard was one step late and named a NaN checkpoint the last good one."""
  import jax

  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  corpus = write_corpus(tmp_path / "corpus.txt")
  workdir = tmp_path / "r"
  code, _, err = run_cli("train", *overrides(workdir, corpus, steps=10, optim__schedule="constant",
                                             optim__warmup_steps=0, train__log_every=1, **cadence))
  line = one_line_error(code, err, "stopped")
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  if not saved:
    assert "no checkpoint was saved" in line
    return
  assert f"last good checkpoint (step {saved[-1]})" in line
  for step in saved:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_state(workdir, step)["params"]))
  code, out, err = run_cli("eval", "--workdir", workdir, "--json")  # and it scores
  assert code == 0 and json.loads(out)["step"] == saved[-1], err[-2000:]
  assert json.loads(out)["loss"] is not None and np.isfinite(json.loads(out)["loss"])


def test_eval_and_generate_refuse_nan_parameters(run):
  from nlm_jax.training.checkpoint import Checkpoints

  workdir, _ = run
  import jax

  state = final_state(workdir)
  state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
  ckpts = Checkpoints(str(workdir), keep=5)
  ckpts.save(15, state, None, {}, {})
  ckpts.wait()
  ckpts.close()
  for argv in (("eval", "--json"), ("generate", "--prompt", "the ")):
    code, out, err = run_cli(argv[0], "--workdir", workdir, *argv[1:])
    one_line_error(code, err, "NaN or Inf parameters")
    assert "NaN" not in out


def test_eval_json_has_no_nan():
  from nlm_jax.cli import json_safe

  text = json.dumps(json_safe({"loss": float("nan"), "perplexity": float("inf"), "step": 3}), allow_nan=False)
  assert json.loads(text) == {"loss": None, "perplexity": None, "step": 3}


# ----------------------------------------------------------------------------- 3: damaged checkpoints


def _largest_file(path) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def _flip(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read(64))
    f.seek(0)
    f.write(bytes(b ^ 0xFF for b in data))


DAMAGES = {
    "flipped_bytes": lambda step: _flip(_largest_file(step / "state")),
    "no_manifest_ocdbt": lambda step: os.remove(step / "state" / "manifest.ocdbt"),
    "no_METADATA": lambda step: os.remove(step / "state" / "_METADATA"),
    "truncated": lambda step: os.truncate(_largest_file(step / "state"), 10),
    "no_commit_marker": lambda step: os.remove(step / "commit_success.txt"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(run, damage):
  workdir, _ = run
  DAMAGES[damage](workdir / "checkpoints" / "10")
  before = checkpoint_hashes(workdir)
  code, out, err = run_cli("eval", "--workdir", workdir, "--json")
  assert code == 0, err[-3000:]
  (warning,) = warnings_of(err)
  assert "checkpoints/10 is not used" in warning and "left in place" in warning
  assert json.loads(out)["step"] == 5 and np.isfinite(json.loads(out)["loss"])
  assert checkpoint_hashes(workdir) == before  # nothing deleted, nothing changed


def test_trainer_resumes_from_the_newest_intact_checkpoint_and_keeps_the_damaged_one(run):
  workdir, corpus = run
  _flip(_largest_file(workdir / "checkpoints" / "10" / "state"))
  damaged = checkpoint_hashes(workdir)
  code, out, err = run_cli("train", *args_for(workdir, corpus), "train.stop_after=12")
  assert code == 0, err[-3000:]
  (warning,) = warnings_of(err)
  assert "checkpoints/10 is not used" in warning and "does not match its checksum" in warning
  assert json.loads(out[out.index("{"):])["steps"] == 12
  moved = {k.replace("checkpoints/10/", "checkpoints.damaged/10/"): v for k, v in damaged.items()
           if k.startswith("checkpoints/10/")}
  for rel, digest in moved.items():
    with open(workdir / rel, "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest
  assert [r["step"] for r in metrics(workdir)][-1] == 12


def test_when_every_checkpoint_is_damaged_the_trainer_refuses_to_start_over(run):
  workdir, corpus = run
  for step in ("5", "10"):
    _flip(_largest_file(workdir / "checkpoints" / step / "state"))
  before = sorted(checkpoint_hashes(workdir).values())
  code, _, err = run_cli("train", *args_for(workdir, corpus))
  one_line_error(code, err, "no intact checkpoint is left")
  assert len(warnings_of(err)) == 2
  kept = []
  for root, _, files in os.walk(workdir / "checkpoints.damaged"):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        kept.append(hashlib.sha256(f.read()).hexdigest())
  assert sorted(kept) == before  # moved aside, byte for byte, not deleted
  assert not (workdir / "metrics.jsonl").read_text().count('"step": 1,')
  # and again at the next try, whatever its config: nothing is left in checkpoints/ now, yet the
  # damaged run's records are not a new run's to overwrite
  records = {f: (workdir / f).read_bytes() for f in ("metrics.jsonl", "resolved_config.yaml")}
  code, _, err = run_cli("train", *args_for(workdir, corpus), "seed=7")
  one_line_error(code, err, "no intact checkpoint is left")
  assert {f: (workdir / f).read_bytes() for f in records} == records


def test_a_checkpoint_without_checksums_is_used_with_a_warning(run):
  """Saved before checksums were kept: restored, but not silently."""
  workdir, _ = run
  os.remove(workdir / "checkpoints" / "10" / "sha256.json")
  code, out, err = run_cli("eval", "--workdir", workdir, "--json")
  assert code == 0 and json.loads(out)["step"] == 10, err[-3000:]
  (warning,) = warnings_of(err)
  assert "checkpoints/10 has no sha256.json" in warning


def test_the_best_checkpoint_by_val_loss_is_kept_beside_the_last_ones(tmp_path):
  """keep=1: after steps with val_loss 3, 1, 2, 4 the disk holds the latest step and the one with
  the lowest val_loss, and best_step names that one."""
  from nlm_jax.training.checkpoint import Checkpoints

  ckpts = Checkpoints(str(tmp_path), keep=1)
  for step, val_loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)):
    ckpts.save(step, {"w": np.full(3, float(step), np.float32)}, None, {}, {}, val_loss=val_loss)
    ckpts.wait()
  assert ckpts.best_step() == 2
  ckpts.close()
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 4]
  reader = Checkpoints(str(tmp_path), read_only=True)
  assert reader.best_step() == 2 and reader.latest_step() == 4
  reader.close()


# ----------------------------------------------------------------------------- 4: settings


@pytest.mark.parametrize("override,mention", [
    ("optim.lr=-1", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
    ("train.stop_after=-5", "train.stop_after"), ("optim.warmup_steps=-10", "optim.warmup_steps"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.eval_batches=0", "train.eval_batches"),
    ("optim.b2=1.5", "optim.b2"), ("train.steps=99999999999", "train.steps"),
])
def test_bad_settings_are_refused_at_load_time(run, override, mention):
  workdir, corpus = run
  before = checkpoint_hashes(workdir)
  code, _, err = run_cli("train", *args_for(workdir, corpus), override)
  one_line_error(code, err, mention)
  assert checkpoint_hashes(workdir) == before


@pytest.mark.parametrize("short,text,extra,error", [
    # 12 characters: fewer than the windows of the validation batches (16 + 8)
    ("validation", "the cat sat\n", {}, "'validation' split has 12 tokens: too few for 8 windows"),
    # enough for 8 stream rows (9), not for the estimator's random windows (24), which any batching uses
    ("validation", "the cat sat on a mat\n", dict(arch="lstm", batching="streams", train__eval_estimator="random_windows"),
     "'validation' split has 21 tokens: too few for 8 windows"),
    # enough to train on (8 windows of 16), not for eval_train_loss's 32 windows (16 + 32)
    ("train", "the cat sat on a mat. " * 2, dict(data__eval_batch_size=32, tokenizer__kind="byte"),
     "'train' split has 44 tokens: too few for eval_train_loss's 32 windows"),
])
def test_a_split_too_short_to_evaluate_fails_before_training(tmp_path, monkeypatch, short, text, extra, error):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  files = {"train": write_corpus(tmp_path / "train.txt"), "validation": write_corpus(tmp_path / "val.txt", seed=1)}
  (tmp_path / f"{short}.short.txt").write_text(text)
  files[short] = tmp_path / f"{short}.short.txt"
  argv = [a for a in overrides(tmp_path / "r", files["train"], steps=20, **extra) if not a.startswith("data.file=")]
  code, _, err = run_cli("train", *argv, f"data.files.train={files['train']}", f"data.files.validation={files['validation']}")
  one_line_error(code, err, error)
  assert not (tmp_path / "r" / "checkpoints").exists() or not os.listdir(tmp_path / "r" / "checkpoints")
  assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize("option,value", [("--top-k", 0), ("--top-k", -3), ("--temperature", "nan"),
                                          ("--temperature", "inf"), ("--temperature", -1), ("--top-p", 0),
                                          ("--top-p", 1.5), ("--max-new-tokens", -1),
                                          ("--seed", 2**32), ("--seed", -1)])
def test_bad_generate_options(tmp_path, option, value):
  code, out, err = run_cli("generate", "--workdir", tmp_path, option, value)
  one_line_error(code, err, option)
  assert out == ""


def test_streams_evaluate_a_split_shorter_than_their_rows(tmp_path, monkeypatch):
  """Rows past a split's end are mask-0 padding: a 35-token training split is scored for
  eval_train_loss in 64 stream rows (the length check must not refuse it)."""
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  (tmp_path / "short.txt").write_text("the cat sat on the mat, and a dog.\n")
  val = write_corpus(tmp_path / "val.txt")
  argv = [a for a in overrides(tmp_path / "r", val, arch="lstm", batching="streams", steps=4, train__eval_every=2,
                               data__batch_size=2, data__seq_len=4, data__eval_batch_size=64, tokenizer__kind="byte")
          if not a.startswith("data.file=")]
  train(*argv, f"data.files.train={tmp_path / 'short.txt'}", f"data.files.validation={val}")
  assert [r["step"] for r in metrics(tmp_path / "r") if "eval_train_loss" in r] == [2, 4]


def test_best_names_a_checkpoint_with_a_val_loss_or_is_an_error(tmp_path, monkeypatch):
  """--best on a run none of whose checkpoints was saved at an evaluation used the latest, as if
  it were the best; --step with --best silently took --step."""
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  corpus = write_corpus(tmp_path / "c.txt")
  train(*overrides(tmp_path / "r", corpus, steps=6, train__eval_every=100), "train.stop_after=3")
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r", "--best")
  one_line_error(code, err, "--best: no checkpoint")
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r", "--step", "3", "--best")
  one_line_error(code, err, "give one")
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r")
  assert code == 0, err


@pytest.mark.parametrize("command,option", [("generate", "--prompt"), ("predict", "--text"), ("translate", "--text")])
def test_text_that_is_not_utf8_is_a_one_line_error(tmp_path, command, option):
  """Python reads argv's undecodable bytes as lone surrogates (b'Fi\\xffrst' -> 'Fi\\udcffrst'),
  which every tokenizer failed on with a traceback (or, a word's, read as <unk>)."""
  text = b"Fi\xffrst".decode("utf-8", "surrogateescape")
  code, out, err = run_cli(command, "--workdir", tmp_path, option, text)
  one_line_error(code, err, "not valid UTF-8")
  assert out == ""


# ----------------------------------------------------------------------------- changed data / settings


def test_resume_on_changed_data_is_refused_unless_allowed(run):
  workdir, corpus = run
  before = checkpoint_hashes(workdir)
  original = open(corpus).read()
  try:  # the same path (part of the checked config) with other text
    write_corpus(corpus, seed=5)
    code, _, err = run_cli("train", *args_for(workdir, corpus))
    one_line_error(code, err, "text changed since this run started")
    assert checkpoint_hashes(workdir) == before
    code, out, err = run_cli("train", *args_for(workdir, corpus), "train.allow_data_change=true",
                             "train.stop_after=11")
    assert code == 0 and any("text changed" in w for w in warnings_of(err)), err[-3000:]
  finally:
    with open(corpus, "w") as f:
      f.write(original)


def test_a_resume_refused_by_its_checkpoint_leaves_the_run_s_records_as_they_were(run):
  """A resume that passes the config checks and fails restoring (another optimizer state: a clip
  norm added) writes nothing: the recorded config and data fingerprint stay, so the changed-data
  check still refuses the next try."""
  workdir, corpus = run
  records = {f: (workdir / f).read_bytes() for f in ("resolved_config.yaml", "data_fingerprint.json",
                                                      "tokenizer.json")}
  original = open(corpus).read()
  try:
    write_corpus(corpus, seed=5)
    code, _, err = run_cli("train", *args_for(workdir, corpus), "train.allow_data_change=true",
                           "optim.clip_norm=1.0")
    one_line_error(code, err, "does not match this run's model or optimizer")
    assert not any("now records them" in w for w in warnings_of(err))
    assert {f: (workdir / f).read_bytes() for f in records} == records
    code, _, err = run_cli("train", *args_for(workdir, corpus))
    one_line_error(code, err, "text changed since this run started")
  finally:
    with open(corpus, "w") as f:
      f.write(original)


def test_resume_with_changed_lr_says_so_and_changed_schedule_is_refused(run):
  workdir, corpus = run
  code, out, err = run_cli("train", *args_for(workdir, corpus), "optim.lr=0.001", "train.stop_after=11")
  assert code == 0, err[-3000:]
  (warning,) = warnings_of(err)
  assert "optim.lr: 0.003 (checkpoint) vs 0.001 (now)" in warning
  assert "lr: 0.001" in (workdir / "resolved_config.yaml").read_text()


def test_changed_cosine_length_is_refused_unless_allowed(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  corpus = write_corpus(tmp_path / "corpus.txt")
  args = overrides(tmp_path / "r", corpus, steps=20, optim__schedule="warmup_cosine", optim__warmup_steps=2,
                   train__checkpoint_every=5)
  train(*args, "train.stop_after=5")
  before = checkpoint_hashes(tmp_path / "r")
  code, _, err = run_cli("train", *args, "train.steps=40", "train.stop_after=6")
  one_line_error(code, err, "train.allow_schedule_change")
  assert checkpoint_hashes(tmp_path / "r") == before
  assert train(*args, "train.steps=40", "train.stop_after=6", "train.allow_schedule_change=true")["steps"] == 6


# ----------------------------------------------------------------------------- 5: environment faults


def test_damaged_tokenizer_json(run):
  workdir, _ = run
  (workdir / "tokenizer.json").write_text('{"kind": "char", "chars": [')
  for argv in (("eval",), ("generate", "--prompt", "the")):
    code, _, err = run_cli(*argv, "--workdir", workdir)
    one_line_error(code, err, "tokenizer.json is damaged")


def test_a_torn_last_line_of_the_metrics_log_does_not_stop_a_resume(run):
  """A metrics.jsonl line cut short while written (disk full, power lost) is dropped with a
  warning when the run resumes; the records before it are kept."""
  workdir, corpus = run
  before = (workdir / "metrics.jsonl").read_text()
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 15, "train_lo')
  code, _, err = run_cli("train", *args_for(workdir, corpus), "train.stop_after=12")
  assert code == 0, err[-3000:]
  assert any("not JSON records dropped" in w for w in warnings_of(err))
  after = (workdir / "metrics.jsonl").read_text()
  assert after.startswith(before) and [r["step"] for r in metrics(workdir)][-1] == 12


@pytest.mark.parametrize("content", [b'{"labels": ["0", "1"', b"\x00\xff\xfe binary", b'["a", "b", "c"]',
                                     b'{"labels": 3}'])
def test_damaged_labels_file_of_a_classifier(tmp_path, monkeypatch, content):
  from test_tasks import classify

  from support import write_sentiment

  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  train(*classify(tmp_path / "c", write_sentiment(tmp_path), steps=2))
  (tmp_path / "c" / "labels.json").write_bytes(content)
  for argv in (("eval",), ("predict", "--text", "a fine film")):
    code, _, err = run_cli(*argv, "--workdir", tmp_path / "c")
    one_line_error(code, err, "labels.json is damaged")


def test_damaged_sentencepiece_model_in_a_tokenizer_file(tmp_path):
  """A sentencepiece model its library cannot parse (it raises RuntimeError) is a damaged file too."""
  import base64

  from nlm_jax.data import tokenizers
  from nlm_jax.errors import UserError

  good = tokenizers.SentencePieceTokenizer.train("the cat sat on the mat\nthe dog sat\n" * 20, vocab_size=30)
  proto = base64.b64decode(good.to_dict()["model"])
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps({"kind": "sentencepiece", "model": base64.b64encode(proto[:len(proto) // 2]).decode()}))
  with pytest.raises(UserError, match="tokenizer.json is damaged"):
    tokenizers.load(str(path))


def test_yaml_whose_top_level_is_a_list(tmp_path):
  recipe = tmp_path / "recipe.yaml"
  recipe.write_text("- model\n- data\n")
  code, _, err = run_cli("train", "--config", recipe, f"workdir={tmp_path / 'r'}")
  one_line_error(code, err, "recipe.yaml holds a list")


def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  corpus = write_corpus(tmp_path / "corpus.txt")
  code, _, err = run_cli("train", *overrides(blocker / "run", corpus, steps=5))
  one_line_error(code, err, str(blocker / "run"))


def test_disk_full_during_a_save_keeps_earlier_checkpoints(run, monkeypatch):
  from nlm_jax.training import checkpoint

  workdir, corpus = run
  before = checkpoint_hashes(workdir)

  def full(step_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step_dir)

  monkeypatch.setattr(checkpoint, "write_checksums", full)
  code, _, err = run_cli("train", *args_for(workdir, corpus), "train.stop_after=15")
  line = one_line_error(code, err, "saving checkpoint")
  assert "checkpoints/15 failed" in line and "No space left on device" in line
  assert {k: v for k, v in checkpoint_hashes(workdir).items() if k in before} == before
  monkeypatch.undo()
  monkeypatch.setenv("NLM_JAX_CACHE", str(workdir.parent.parent / "cache"))
  # After freeing space, the same command resumes from step 10.
  code, out, err = run_cli("train", *args_for(workdir, corpus), "train.stop_after=15")
  assert code == 0, err[-3000:]


# ----------------------------------------------------------------------------- signals


def test_a_stop_request_during_the_last_step_lets_the_run_finish(run, monkeypatch):
  from nlm_jax.training import trainer

  workdir, corpus = run
  requests = []
  original = trainer._finite_mean_loss

  def signal_during_last_step(fetched, step, *rest):
    if step == 12:
      requests.append(signal.SIGINT)
    return original(fetched, step, *rest)

  monkeypatch.setattr(trainer, "_finite_mean_loss", signal_during_last_step)
  monkeypatch.setattr(trainer, "_stop_requests", lambda: __import__("contextlib").nullcontext(requests))
  summary = train(*args_for(workdir, corpus), "train.stop_after=12")
  assert requests and summary["steps"] == 12 and summary["latest_checkpoint"] == 12


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_only_one_is_signalled(tmp_path):
  """Multi-host: a SIGTERM seen by one process is agreed on (an all-gather every log step), so
  both stop at, and save, the same step instead of one entering a collective save alone."""
  import socket

  corpus = write_corpus(tmp_path / "c.txt")
  workdir = tmp_path / "two"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = overrides(workdir, corpus, steps=100000, train__log_every=2, train__eval_every=100000)
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  env = lambda i: dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", NLM_JAX_CACHE=str(tmp_path / f"cache{i}"))
  procs = [subprocess.Popen([sys.executable, "-m", "nlm_jax", "train", *args,
                             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                             f"distributed.process_id={i}"], env=env(i), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    deadline = time.time() + 400
    while not (workdir / "metrics.jsonl").exists() or len(metrics(workdir)) < 2:
      assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].communicate()[1][-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # the non-coordinator process only
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  steps = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2 and "interrupted at step" in err, err[-3000:]
    steps.append(int(err.split("interrupted at step")[1].split(";")[0]))
  assert steps[0] == steps[1] and steps[0] % 2 == 0
  assert (workdir / "checkpoints" / str(steps[0]) / "commit_success.txt").exists()


def test_eval_says_when_the_split_is_not_the_text_the_run_recorded(run, tmp_path):
  """A relative data path is read from the current directory: eval from elsewhere scores other
  text, and says so (its fingerprint against data_fingerprint.json); from the run's own, not."""
  workdir, corpus = run
  code, _, err = run_cli("eval", "--workdir", workdir)
  assert code == 0 and warnings_of(err) == [], err[-3000:]
  original = open(corpus).read()
  try:
    write_corpus(corpus, seed=5)
    code, _, err = run_cli("eval", "--workdir", workdir)
    assert code == 0, err[-3000:]
    (warning,) = warnings_of(err)
    assert "'validation' split's text is not the one this run recorded" in warning
  finally:
    with open(corpus, "w") as f:
      f.write(original)


@pytest.mark.parametrize("saved_by", [2, "2 that differ"])
def test_a_checkpoint_saved_by_another_number_of_processes_resumes(run, tmp_path, saved_by):
  """Grain saves one iterator state per process (process_i-of-N.json), all the same here (each
  process takes its rows of the same batches): a run saved by 2 processes resumes in 1, bitwise
  as from its own file (it failed as "does not match this run's model or optimizer"); states
  that differ are refused, naming the number of processes to resume with."""
  workdir, corpus = run
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  step = other / "checkpoints" / "10"
  state = (step / "data_iter" / "process_0-of-1.json").read_text()
  os.remove(step / "data_iter" / "process_0-of-1.json")
  for i in range(2):
    text = state if (i == 0 or saved_by == 2) else state.replace("10", "11")
    (step / "data_iter" / f"process_{i}-of-2.json").write_text(text)
  sums = json.loads((step / "sha256.json").read_text())
  sums.pop("data_iter/process_0-of-1.json")
  for i in range(2):
    sums[f"data_iter/process_{i}-of-2.json"] = hashlib.sha256(
        (step / "data_iter" / f"process_{i}-of-2.json").read_bytes()).hexdigest()
  (step / "sha256.json").write_text(json.dumps(sums))
  if saved_by != 2:
    code, _, err = run_cli("train", *args_for(other, corpus))
    one_line_error(code, err, "resume it with 2 processes")
    return
  train(*args_for(workdir, corpus))
  train(*args_for(other, corpus))
  assert [r["train_loss"] for r in metrics(other) if "train_loss" in r] == \
         [r["train_loss"] for r in metrics(workdir) if "train_loss" in r]
  assert_trees_equal(final_state(other), final_state(workdir))


def test_a_damaged_metrics_file_of_a_checkpoint(run):
  """Orbax reads every kept step's metrics when it starts: one damaged file stopped eval ("kept
  vanishing") and resume (a JSONDecodeError traceback) whichever step it was in. The trainer moves
  that step aside and resumes from the newest intact one; a reader names it."""
  workdir, corpus = run
  (workdir / "checkpoints" / "10" / "metrics" / "metrics").write_text("garbage{")  # step 5 has none
  code, _, err = run_cli("eval", "--workdir", workdir)
  one_line_error(code, err, "checkpoints/10 is damaged: metrics/metrics is unreadable")
  code, out, err = run_cli("train", *args_for(workdir, corpus), "train.stop_after=12")
  assert code == 0, err[-3000:]
  (warning,) = warnings_of(err)
  assert "checkpoints/10 is not used: metrics/metrics is unreadable" in warning and "checkpoints.damaged" in warning
  assert (workdir / "checkpoints.damaged" / "10").is_dir() and [r["step"] for r in metrics(workdir)][-1] == 12
  assert metrics(workdir)[0]["step"] == 5  # resumed from step 5 (its record kept), not started over


def test_resuming_with_a_model_key_set_to_its_default_is_no_change(run):
  """model.* is compared as the network is built from it: naming a default is not "a different
  config" (it was refused); a real change still is."""
  import dataclasses

  from nlm_jax import models

  workdir, corpus = run
  dropout = {f.name: f.default for f in dataclasses.fields(models.TransformerConfig)}["dropout"]
  code, out, err = run_cli("train", *args_for(workdir, corpus), f"model.dropout={dropout}", "train.stop_after=11")
  assert code == 0 and warnings_of(err) == [], err[-3000:]
  code, _, err = run_cli("train", *args_for(workdir, corpus), f"model.dropout={dropout + 0.25}")
  one_line_error(code, err, f"model.dropout: {dropout} (checkpoint) vs {dropout + 0.25} (now)")


def test_a_step_pruned_while_listed_is_not_called_damaged(run, monkeypatch):
  """A reader lists the steps' metrics while a trainer prunes one: a file gone since the listing is
  not damage (it told the user to move a healthy checkpoint); two processes moving the same damaged
  step aside do not fail on the second rename."""
  import glob as glob_module

  from nlm_jax.training import checkpoint as ckpt_lib

  workdir, _ = run
  listed = glob_module.glob

  def list_then_prune(pattern, *a, **k):
    out = listed(pattern, *a, **k)
    if pattern.endswith(os.path.join("metrics", "metrics")) and (workdir / "checkpoints" / "10").exists():
      shutil.rmtree(workdir / "checkpoints" / "10")  # a trainer's LatestN pruning, right after the listing
    return out

  monkeypatch.setattr(ckpt_lib.glob, "glob", list_then_prune)
  ckpts = ckpt_lib.Checkpoints(str(workdir), read_only=True)
  assert ckpts.latest_step() == 5
  ckpts._move_aside(str(workdir / "checkpoints" / "10"), str(workdir / "aside"), "damaged")  # already gone
  assert ckpts.set_aside == [str(workdir / "aside" / "10")]


@pytest.mark.parametrize("override,key", [
    ("data.seq_len=8", "data.seq_len"), ("data.batch_size=4", "data.batch_size"), ("seed=4", "seed"),
    ("optim.name=sgd", "optim.name"), ("optim.grad_accum=2", "optim.grad_accum"),
    ("data.batching=streams", "data.batching"),
])
def test_a_resume_with_another_setting_of_the_run_s_arithmetic_is_refused_naming_it(run, override, key):
  """Each of RESUME_MUST_MATCH's settings changed on its own: a one-line refusal naming it, the
  checkpoints untouched."""
  workdir, corpus = run
  before = checkpoint_hashes(workdir)
  code, _, err = run_cli("train", *args_for(workdir, corpus), override, "train.stop_after=11")
  line = one_line_error(code, err, "holds a run with a different config")
  assert f"({key}: " in line
  assert checkpoint_hashes(workdir) == before


@pytest.mark.parametrize("override,key", [("optim.schedule=plateau", "optim.schedule"),
                                          ("optim.warmup_steps=3", "optim.warmup_steps")])
def test_a_resume_with_another_schedule_kind_or_warmup_is_refused_unless_allowed(run, override, key):
  """The schedule's shape is its kind and warm-up too, not only the cosine's length."""
  workdir, corpus = run
  before = checkpoint_hashes(workdir)
  code, _, err = run_cli("train", *args_for(workdir, corpus), override, "train.stop_after=11")
  line = one_line_error(code, err, "train.allow_schedule_change")
  assert key in line
  assert checkpoint_hashes(workdir) == before


def test_a_resume_on_a_changed_validation_file_alone_is_refused_naming_it(tmp_path, monkeypatch):
  """data.files: the training file as it was, the validation file's text changed: refused, naming
  the validation split (every split of the fingerprint is compared, not the first)."""
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  train_file = write_corpus(tmp_path / "train.txt")
  val_file = write_corpus(tmp_path / "validation.txt", n_lines=60, seed=1)
  args = [a for a in overrides(tmp_path / "r", train_file, steps=20, train__checkpoint_every=5)
          if not a.startswith("data.file=")] + [f"data.files.train={train_file}", f"data.files.validation={val_file}"]
  train(*args, "train.stop_after=5")
  before = checkpoint_hashes(tmp_path / "r")
  write_corpus(val_file, n_lines=60, seed=2)
  code, _, err = run_cli("train", *args, "train.stop_after=6")
  one_line_error(code, err, "the 'validation' split's text changed since this run started")
  assert checkpoint_hashes(tmp_path / "r") == before


def test_a_nan_validation_loss_stops_the_run_before_that_step_s_checkpoint(run, monkeypatch):
  """Finite parameters and training losses but a NaN validation loss (at 20): the run stops with
  one line naming it, and keeps its last good checkpoint (15) as the newest."""
  from nlm_jax.training import trainer

  workdir, corpus = run
  evaluate = trainer.Run.periodic_evaluation

  def nan_at_20(self, params, step):
    scores, val = evaluate(self, params, step)
    if step == 20:
      val, scores = {**val, "loss": float("nan")}, {**scores, "val_loss": float("nan")}
    return scores, val

  monkeypatch.setattr(trainer.Run, "periodic_evaluation", nan_at_20)
  code, _, err = run_cli("train", *args_for(workdir, corpus))
  line = one_line_error(code, err, "validation loss is nan by step 20")
  assert "last good checkpoint (step 15)" in line
  assert (workdir / "checkpoints" / "15").is_dir() and not (workdir / "checkpoints" / "20").exists()


def test_keep_checkpoints_keeps_that_many_of_the_latest_beside_the_best(run):
  """keep_checkpoints=3, a checkpoint every step, no evaluation since the best one (10): on disk,
  the last 3 steps and 10."""
  workdir, corpus = run
  code, _, err = run_cli("train", *args_for(workdir, corpus), "train.checkpoint_every=1", "train.eval_every=100",
                         "train.stop_after=14")
  assert code == 0, err[-3000:]
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [10, 12, 13, 14]
