"""Each experiment's --quick mode runs end to end on generated data and writes its table and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(experiment: str, out, seeds: int, *extra: str) -> dict:
  """`python -m experiments.EXPERIMENT.run --quick` into `out`; its results.json."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{experiment}.run", "--quick", "--seeds", str(seeds),
                         "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    return json.load(f)


def test_ngram_vs_neural_quick(tmp_path):
  rows = run_quick("ngram_vs_neural", tmp_path, seeds=2)["rows"]
  assert len(rows) == 6
  kn3, kn5 = rows["Kneser–Ney n=3 (modified, interpolated)"], rows["Kneser–Ney n=5 (modified, interpolated)"]
  assert 1.0 < kn3["test_ppl"][0] < 20 and 1.0 < kn5["test_ppl"][0] < 20  # a 30-word grammar
  for name, row in rows.items():
    assert len(row["test_ppl"]) == (1 if name.startswith("Kneser") else 2)
  mixed = rows["mixture NPLM (direct on) + KN n=5, λ on validation"]
  # λ = 0 is in the grid: the mixture is never worse than KN alone on validation, so on test only
  # by the split's difference.
  assert all(p <= kn5["test_ppl"][0] * 1.05 for p in mixed["test_ppl"])
  assert (tmp_path / "test_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "QUICK MODE" in (tmp_path / "results.md").read_text()


def test_positional_encodings_quick(tmp_path):
  results = run_quick("positional_encodings", tmp_path, seeds=1)["results"]
  assert set(results) == {"sinusoidal", "learned", "rotary", "none"}
  assert results["learned"]["256"] == [] and len(results["rotary"]["256"]) == 1  # no rows past 64 to learn
  assert all(np.isfinite(results[e]["64"][0]) for e in results)
  assert (tmp_path / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_long_range_quick(tmp_path):
  """Two of its three parts (a minute under CI's load); the copy task, which trains as the adding
  task does, is the slow test below."""
  results = run_quick("long_range", tmp_path, 1, "--parts", "gradients,adding")
  for arch in ("rnn", "lstm"):
    for state in ("initialization", "trained"):
      g = np.asarray(results["gradients"][arch][state])
      assert g.shape == (20,) and np.all(np.isfinite(g)) and np.all(g > 0)
  assert set(results["adding"]) == {"rnn", "lstm", "transformer"} and results["lengths"] == [4]
  # an untrained answer is worth about the mean sum's error (~0.3), never more than the range
  assert all(0.0 <= x <= 1.8 for by_len in results["adding"].values() for xs in by_len.values() for x in xs)
  assert "copy" not in results


@pytest.mark.slow
def test_long_range_copy_quick(tmp_path):
  results = run_quick("long_range", tmp_path, 1, "--parts", "copy")
  assert set(results["copy"]) == {"rnn", "lstm", "transformer"} and results["gaps"] == [2]
  assert all(0.0 <= x <= 1.0 for by_gap in results["copy"].values() for xs in by_gap.values() for x in xs)


def test_copy_task_lines_recall_scoring_and_report(tmp_path):
  """What CI runs of the copy part (its training is the adding part's): the lines, the recall
  score with teacher forcing (a perfect copier scores 1, one reading a position off scores ~0),
  the table and the plot."""
  from experiments.long_range.run import K, LETTERS, copy_lines, plot, recall_accuracy, report

  gap = 4
  lines = copy_lines(30, gap, np.random.default_rng(0))
  for line in lines:
    content, recalled = line.split(":")
    assert content[:K] == recalled and content[K:] == "." * gap and set(recalled) <= set(LETTERS)

  class Tok:
    def encode(self, text):
      return np.array([ord(c) for c in text] + [10])  # a trailing newline id, as the tokenizers end lines

  class Copier:  # the logits at position t predict token t + 1: the letter K + gap + 1 before it
    def __init__(self, offset):
      self.offset = offset

    def apply(self, variables, ids):
      import jax.numpy as jnp

      ids = np.asarray(ids)
      logits = np.zeros(ids.shape + (128,), np.float32)
      for t in range(ids.shape[1]):
        logits[np.arange(len(ids)), t, ids[:, max(t - K - gap + self.offset, 0)]] = 1.0
      return type("Out", (), {"logits": jnp.asarray(logits)})

  run = type("Run", (), {"tokenizer": Tok(), "model_cfg": type("Cfg", (), {"arch": "transformer"})})
  rng = np.random.default_rng(1)
  run.model = Copier(0)
  assert recall_accuracy(run, None, lines, lambda n: copy_lines(n, gap, rng)) == 1.0
  run.model = Copier(1)
  assert recall_accuracy(run, None, lines, lambda n: copy_lines(n, gap, rng)) < 0.2
  results = {"quick": True, "seeds": 2, "steps": 10, "gaps": [gap], "copy": {"lstm": {str(gap): [1.0, 0.9]}, "rnn": {str(gap): [0.1, 0.0]}}}
  table = report(results)
  assert "copy task" in table and "| lstm | **0.95" in table and "| rnn | 0.05" in table
  plot(results, str(tmp_path))
  assert (tmp_path / "copy_task.png").read_bytes()[:4] == b"\x89PNG"


def test_adding_problem_lines_and_error():
  """Lines mark one value in each half and end with the marked sum; a model whose distribution
  puts all mass on the right answer has error 0, on the answer 0.3 away error 0.3."""
  from experiments.long_range.run import ANSWERS, MARKED, VALUES, adding_error, adding_lines

  for line in adding_lines(50, 10, np.random.default_rng(0)):
    body, answer = line.split("=")
    marked = [i for i, c in enumerate(body) if c in MARKED]
    assert len(body) == 10 and len(marked) == 2 and marked[0] < 5 <= marked[1]
    assert ANSWERS.index(answer) == sum(MARKED.index(body[i]) for i in marked)
    assert all(c in VALUES for i, c in enumerate(body) if i not in marked)

  class Tok:
    def encode(self, text):
      return np.array([ord(c) for c in text])

  class Model:
    def __init__(self, shift):
      self.shift = shift

    def apply(self, variables, ids):
      import jax.numpy as jnp

      logits = np.full(ids.shape + (128,), -1e9, np.float32)
      for i, row in enumerate(lines):  # all mass on the answer `shift` classes away from the truth
        logits[i, -1, ord(ANSWERS[ANSWERS.index(row[-1]) + self.shift])] = 0.0
      return type("Out", (), {"logits": jnp.asarray(logits)})

  lines = [l for l in adding_lines(200, 6, np.random.default_rng(1)) if ANSWERS.index(l[-1]) <= 15][:20]
  run = type("Run", (), {"tokenizer": Tok(), "model_cfg": type("Cfg", (), {"arch": "lstm"})})
  for shift, expected in ((0, 0.0), (3, 0.3)):
    run.model = Model(shift)
    assert adding_error(run, None, lines, lambda n: ["a" * 6 + "=0"] * n) == pytest.approx(expected, abs=1e-6)


def test_architectures_quick(tmp_path):
  """Word level (the corpus with more settings: files per split, <eos> padding for the FNN, tied
  embeddings); the character corpus runs the same code."""
  res = run_quick("architectures", tmp_path, 1, "--corpora", "wikitext2")["results"]["wikitext2"]
  assert list(res["rows"]) == ["fnn", "rnn", "lstm", "transformer"]
  tokens = {r["tokens"] for r in res["rows"].values()}
  assert tokens == {6 * 4 * 35}  # equal budget: the same training tokens for every model
  for r in res["rows"].values():
    assert len(r["val_ppl"]) == 1 and 1.0 < r["val_ppl"][0] < 100  # a 12-word toy vocabulary
    assert r["curves"][0][-1]["tokens"] == 6 * 4 * 35
  assert (tmp_path / "wikitext2.png").read_bytes()[:4] == b"\x89PNG"
  assert "QUICK MODE" in (tmp_path / "results.md").read_text()


def test_optimization_quick(tmp_path):
  res = run_quick("optimization", tmp_path, 1, "--workloads", "wikitext2_lstm", "--groups", "schedule")
  rows = res["results"]["wikitext2_lstm"]["rows"]
  assert list(rows) == ["AdamW (baseline)", "AdamW, constant lr", "AdamW, plateau ÷4"]
  for r in rows.values():
    assert len(r["val_ppl"]) == 1 and 1.0 < r["val_ppl"][0] < 100  # a 12-word toy vocabulary
    assert [s for s, _ in r["curves"][0]] == [1, 2, 3, 4]
  # the schedules differ, so the runs do (a setting that changed nothing would give the baseline's curve)
  assert rows["AdamW, constant lr"]["curves"] != rows["AdamW (baseline)"]["curves"]
  assert (tmp_path / "wikitext2_lstm.png").read_bytes()[:4] == b"\x89PNG"


def test_embeddings_quick(tmp_path):
  res = run_quick("embeddings", tmp_path, 1)
  trained, random_ = res["probes"]["trained"][0], res["probes"]["random"][0]
  for p in (trained, random_):
    assert 0.0 <= p["purity"]["overall"] <= 1.0 and 0.0 < p["purity"]["chance"] < 1.0
    assert p["analogies"]["all"]["questions"] > 0  # the toy corpus holds the gender and ordinal words
  assert trained["purity"]["words"] == random_["purity"]["words"] == 61
  assert set(res["first_seed"]["neighbours"]["trained"]) <= {"king", "France", "Monday", "three", "guitar", "war",
                                                             "played", "river"}
  assert (tmp_path / "embeddings_pca.png").read_bytes()[:4] == b"\x89PNG"


def test_embedding_probes_on_constructed_embeddings():
  """The probes find structure put there on purpose, and none in random vectors."""
  from experiments.embeddings.run import CATEGORIES, RELATIONS, analogies, category_purity

  rng = np.random.default_rng(0)
  words = list(dict.fromkeys([w for ws in CATEGORIES.values() for w in ws]
                             + [w for ps in RELATIONS.values() for p in ps for w in p] + [f"w{i}" for i in range(200)]))
  index = {w: i for i, w in enumerate(words)}
  clustered = rng.normal(size=(len(words), 64))
  for c, ws in CATEGORIES.items():
    clustered[[index[w] for w in ws]] = rng.normal(size=64) * 3 + rng.normal(size=(len(ws), 64))
  assert category_purity(clustered, index)["overall"] > 0.9
  assert category_purity(rng.normal(size=clustered.shape), index)["overall"] < 0.4

  related = rng.normal(size=(len(words), 256))
  for rel, pairs in RELATIONS.items():
    offset = rng.normal(size=256) * 0.5
    for a, b in pairs:
      related[index[b]] = related[index[a]] + offset
  assert analogies(related, index, len(words))["all"]["accuracy"] > 0.9
  assert analogies(rng.normal(size=related.shape), index, len(words))["all"]["accuracy"] < 0.1


@pytest.mark.slow  # ~7 `nlm-jax` processes (minutes on 2 cores); tests/test_tasks.py covers the tasks in CI
def test_pretrain_finetune_quick(tmp_path):
  res = run_quick("pretrain_finetune", tmp_path, 1, "--pairs", "sst2/lstm,multi30k/transformer", "--jobs", "2",
                  "--arm", "body x0.5=finetune.body_lr_scale=0.5", "--arm-tasks", "sst2")
  results = res["results"]
  assert set(results) == {"sst2/lstm", "multi30k/transformer"} and res["errors"] == {}
  assert set(results["sst2/lstm"]) == {"pretrain", "scratch", "pretrained", "body x0.5"}
  assert set(results["multi30k/transformer"]) == {"pretrain", "scratch", "pretrained"}  # --arm-tasks
  for rows in results.values():
    assert np.isfinite(rows["pretrain"]["val_loss"])
    for arm, row in rows.items():
      if arm != "pretrain":
        assert len(row["score"]) == 1 and row["curve"][0]
  assert 0 <= results["sst2/lstm"]["pretrained"]["score"][0] <= 100
  assert 0 <= results["multi30k/transformer"]["pretrained"]["score"][0] <= 100  # test BLEU
  assert (tmp_path / "sst2_lstm_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrain_finetune_scheduler():
  """Runs start after the runs they need, `n` at a time; a failure fails its dependants only,
  and nothing starts after --start-by."""
  import threading
  import time

  from experiments.pretrain_finetune.run import Clock, Job, run_jobs

  lock, events, active, most = threading.Lock(), [], [0], [0]

  def work(name, seconds=0.05, fail=False):
    def run():
      with lock:
        events.append(f"start {name}")
        active[0] += 1
        most[0] = max(most[0], active[0])
      time.sleep(seconds)
      with lock:
        active[0] -= 1
        events.append(f"end {name}")
      if fail:
        raise SystemExit(f"{name} broke")
      return {"name": name}
    return run

  # "pre" is slow: "a" must wait for its end although a worker is free, and "c" goes first
  jobs = [Job("pre", work("pre", 0.3)), Job("bad", work("bad", fail=True)), Job("a", work("a"), ("pre",)),
          Job("b", work("b"), ("bad",)), Job("c", work("c")), Job("d", work("d"), ("a",)), Job("e", work("e")),
          Job("f", work("f"))]
  reports = []
  results, errors = run_jobs(jobs, 3, Clock(None, None), lambda r, e: reports.append((len(r), len(e))))
  assert set(results) == {"pre", "a", "c", "d", "e", "f"} and set(errors) == {"bad", "b"}
  assert errors["bad"] == "bad broke" and errors["b"] == "needs bad, which failed"
  assert events.index("start a") > events.index("end pre") and events.index("start d") > events.index("end a")
  assert events.index("start c") < events.index("end pre")
  assert "start b" not in events and most[0] == 3
  assert reports[-1] == (6, 2)  # the table is rewritten after every finished run

  # one at a time (in-process runs: each in this thread, in the order given, as it is started)
  events.clear()
  main = threading.current_thread()
  jobs[0] = Job("pre", lambda: {"thread": threading.current_thread() is main})
  results, errors = run_jobs(jobs, 1, Clock(None, None), lambda r, e: None)
  assert set(results) == {"pre", "a", "c", "d", "e", "f"} and set(errors) == {"bad", "b"} and results["pre"]["thread"]
  assert [e for e in events if e.startswith("start")] == ["start bad", "start a", "start c", "start d", "start e",
                                                           "start f"]
  assert all(events[i].replace("start", "end") == events[i + 1] for i in range(0, len(events), 2))

  late = Clock(start_by=0.0, kill_at=None)
  results, errors = run_jobs([Job("x", work("x"))], 2, late, lambda r, e: None)
  assert results == {} and errors == {"x": "not started: past --start-by"}
  with pytest.raises(ValueError, match="needs jobs that are not in the list"):  # not a wait for ever
    run_jobs([Job("y", work("y"), ("nowhere",))], 2, Clock(None, None), lambda r, e: None)


def record_runs(monkeypatch) -> dict:
  """The pretrain_finetune runner's runs not trained but recorded: {workdir: overrides}."""
  from experiments.pretrain_finetune import run as pf

  calls = {}

  def fake_train_summary(workdir, overrides, config=None, timeout=None):
    calls[workdir] = overrides
    return {"wall_s": 1.0, "final_validation_loss": 0.5, "final_validation_accuracy": 0.5}

  monkeypatch.setattr(pf, "train_summary", fake_train_summary)
  monkeypatch.setattr(pf, "curve", lambda workdir, key: [])
  return calls


def test_pretrain_finetune_sets_reach_their_runs_and_name_their_directories(tmp_path, monkeypatch):
  """--set reaches every fine-tuning run, --pretrain-set the pretraining; runs of other settings
  get other directories (a kept --runs folder must not pass one setting's run off as another's)."""
  from experiments.pretrain_finetune import run as pf

  calls = record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  clock = pf.Clock(None, None)
  arms = {"scratch": None, "pretrained": []}

  def dirs(sets, pretrain_sets):
    calls.clear()
    for job in pf.jobs_of("sst2", "lstm", 1, str(tmp_path), data, True, clock, arms, sets, pretrain_sets):
      job.run()
    return {os.path.basename(w).split("_seed")[0].removeprefix("sst2_lstm_"): (w, o) for w, o in calls.items()}

  plain = dirs([], [])
  assert set(plain) == {"pretrain_sst2_lstm", "scratch", "pretrained"}
  both = dirs(["task.pooling=concat"], ["tokenizer.vocab_size=50"])
  pre = next(v for k, v in both.items() if k.startswith("pretrain_sst2_lstm_"))
  assert "tokenizer.vocab_size=50" in pre[1] and "task.pooling=concat" not in pre[1]
  for arm in ("scratch", "pretrained"):
    [(workdir, overrides)] = [v for k, v in both.items() if k.startswith(arm)]
    assert "task.pooling=concat" in overrides and workdir != plain[arm][0]
    # the pretrained arm fine-tunes with the pretrained tokenizer, so it names the same settings
    assert ("tokenizer.vocab_size=50" in overrides) == (arm == "pretrained")
  assert f"train.init_from={pre[0]}" in [v for k, v in both.items() if k.startswith("pretrained")][0][1]
  # the scratch arm does not depend on the pretraining: only --set names its directory
  scratch_only = dirs(["task.pooling=concat"], [])
  assert [v for k, v in scratch_only.items() if k.startswith("scratch")][0][0] == \
         [v for k, v in both.items() if k.startswith("scratch")][0][0]
  assert [v for k, v in scratch_only.items() if k.startswith("pretrained")][0][0] != \
         [v for k, v in both.items() if k.startswith("pretrained")][0][0]


def test_pretrain_finetune_backward_pretrains_a_reversed_model_and_fills_the_backward_body(tmp_path, monkeypatch):
  """--backward: a second pretraining reads the text reversed (data.reverse=true); every fine-tuning
  has a backward body, and the pretrained arm waits for both language models and loads both."""
  from experiments.pretrain_finetune import run as pf

  calls = record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  jobs = pf.jobs_of("sst2", "lstm", 1, str(tmp_path), data, True, pf.Clock(None, None),
                    {"scratch": None, "pretrained": []}, [], ["model.dropout=0.4"], backward=True)
  by_name = {job.name: job for job in jobs}
  assert set(by_name) == {"sst2/lstm/pretrain", "sst2/lstm/pretrain_backward", "sst2/lstm/scratch/1",
                          "sst2/lstm/pretrained/1"}
  assert set(by_name["sst2/lstm/pretrained/1"].needs) == {"sst2/lstm/pretrain", "sst2/lstm/pretrain_backward"}
  assert by_name["sst2/lstm/scratch/1"].needs == ()
  for job in jobs:
    job.run()
  pre = {os.path.basename(w): (w, o) for w, o in calls.items() if os.path.basename(w).startswith("pretrain_")}
  [(forward, f_over)] = [v for k, v in pre.items() if not k.endswith("_backward")]
  [(backward, b_over)] = [v for k, v in pre.items() if k.endswith("_backward")]
  assert "data.reverse=true" in b_over and "data.reverse=true" not in f_over
  assert "model.dropout=0.4" in b_over and forward != backward
  tuned = {os.path.basename(w).split("_seed")[0]: o for w, o in calls.items() if "_seed" in w}
  assert all("task.backward=true" in o for o in tuned.values())
  assert f"train.init_from={forward}" in tuned["sst2_lstm_pretrained"]
  assert f"train.init_backward_from={backward}" in tuned["sst2_lstm_pretrained"]
  assert not any(o.startswith("train.init") for o in tuned["sst2_lstm_scratch"])


def test_linear_probe_reads_the_body_as_the_classifier_does(tmp_path, monkeypatch):
  """probe.features of a trained classifier, through its own head, are the classifier's logits
  (same start token, zero state, padding ignored, concat pooling); a trained body separates the toy
  sentiment; the logistic regression is at its optimum (penalised gradient zero)."""
  from support import train, write_sentiment

  from experiments.pretrain_finetune import probe
  from nlm_jax.tasks import classify
  from nlm_jax.training import trainer
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  sst = write_sentiment(tmp_path)
  run_dir = str(tmp_path / "run")
  train(f"workdir={run_dir}", "task.kind=classify", f"data.files.train={sst['train']}",
        f"data.files.validation={sst['dev']}", "tokenizer.kind=word", "data.batch_size=16", "task.max_len=32",
        "task.pooling=concat", "train.steps=60", "train.eval_every=60", "train.progress=false", "optim.lr=1e-2",
        "model.arch=lstm", "model.d_embed=16", "model.d_hidden=16", "model.n_layers=2", "seed=2")
  texts, labels = probe.read_tsv(sst["dev"])
  feats = probe.features(run_dir, texts, max_len=32)
  run, params, _ = trainer.load_run(run_dir)
  batch = classify.collate(classify.encode_texts(run.tokenizer, texts, 32), labels, len(texts), 32)
  logits = np.asarray(run.task.model.apply({"params": params}, batch["inputs"], batch["mask"]))
  head = params["head"]
  np.testing.assert_allclose(feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), logits,
                             rtol=1e-4, atol=1e-4)

  result = probe.probe(run_dir, os.path.dirname(sst["dev"]))
  assert result["dev"] > 0.9 and result["train"] > 0.9

  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 5))
  y = (x @ rng.normal(size=5) + 0.5 * rng.normal(size=300) > 0).astype(float)
  w = probe.logistic_regression(x, y, penalty=0.01)
  p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
  np.testing.assert_allclose(x.T @ (p - y) / len(y) + 0.01 * w[:-1], 0, atol=1e-9)
  np.testing.assert_allclose((p - y).mean(), 0, atol=1e-9)  # the bias is not penalised
  table = np.asarray(params["body"]["embed"]["embedding"])
  good, bad = (table[run.tokenizer.index[w]] for w in ("good", "bad"))
  assert probe.similarities(run_dir, [("good", "bad"), ("good", "good")]) == pytest.approx(
      [good @ bad / np.linalg.norm(good) / np.linalg.norm(bad), 1.0])


def test_pretrain_finetune_scores_each_sst2_arm_s_seeds_as_one_ensemble(tmp_path, monkeypatch):
  """Each SST-2 arm with ≥ 2 finished seeds is scored as one ensemble by `nlm-jax eval` over all
  its seeds' runs (and only those); a failing one is left out, and the table shows the rest."""
  from experiments.pretrain_finetune import run as pf

  record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  clock = pf.Clock(None, None)
  arms = {"scratch": None, "pretrained": [], "x0.5": ["finetune.body_lr_scale=0.5"]}
  results = {job.name: job.run() for job in pf.jobs_of("sst2", "lstm", 3, str(tmp_path), data, True, clock, arms)}
  results.pop("sst2/lstm/x0.5/2"), results.pop("sst2/lstm/x0.5/3")  # one seed: no ensemble
  asked = []

  def fake_command(argv, timeout=None, what=""):
    runs = [argv[i + 1] for i, a in enumerate(argv) if a == "--workdir"]
    asked.append(runs)
    if "pretrained" in runs[0]:
      return 1, "", "nlm-jax: error: something"
    return 0, json.dumps({"accuracy": 0.9 + 0.01 * len(runs)}), ""

  monkeypatch.setattr(pf, "nlm_jax_command", fake_command)
  scores = pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, 3, clock)
  assert scores == {"sst2/lstm/scratch": pytest.approx(93.0)}
  assert [len(r) for r in asked] == [3, 3]
  assert asked[0] == [results[f"sst2/lstm/scratch/{s}"]["workdir"] for s in (1, 2, 3)]
  assert all("--workdir" not in w and "_scratch_" in w for w in asked[0])
  text, _ = pf.table(results, {}, [("sst2", "lstm")], lambda task: arms, 3, True, ensembles=scores)
  rows = {line.split(" | ")[3]: line for line in text.splitlines()[2:] if line.startswith("| sst2")}
  assert rows["scratch"].endswith("| 3 of 3 | 93.00 |") and rows["pretrained"].endswith("| 3 of 3 |  |")


def test_pretrain_finetune_scores_each_sst2_arm_s_seeds_as_one_soup_beside_the_ensemble(tmp_path, monkeypatch):
  """--soups: each SST-2 arm's seeds are also scored by `nlm-jax eval --soup` (once, whatever the
  ensemble's `tried` says), in a column of its own; without it the table has no such column."""
  from experiments.pretrain_finetune import run as pf

  record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  clock = pf.Clock(None, None)
  arms = {"scratch": None, "pretrained": []}
  results = {job.name: job.run() for job in pf.jobs_of("sst2", "lstm", 2, str(tmp_path), data, True, clock, arms)}
  asked = []

  def fake_command(argv, timeout=None, what=""):
    asked.append(argv)
    return 0, json.dumps({"accuracy": 0.5 if "--soup" in argv else 0.75}), ""

  monkeypatch.setattr(pf, "nlm_jax_command", fake_command)
  tried = set()
  together = pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, 2, clock, {}, tried)
  soups = pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, 2, clock, {}, tried, soup=True)
  assert together == {"sst2/lstm/scratch": 75.0, "sst2/lstm/pretrained": 75.0}
  assert soups == {"sst2/lstm/scratch": 50.0, "sst2/lstm/pretrained": 50.0}
  assert ["--soup" in argv for argv in asked] == [False, False, True, True]
  assert pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, 2, clock, {}, tried, soup=True) == {}
  text, _ = pf.table(results, {}, [("sst2", "lstm")], lambda task: arms, 2, True, ensembles=together, soups=soups)
  assert text.splitlines()[0].endswith("| the seeds as one ensemble | the seeds as one soup |")
  rows = [line for line in text.splitlines()[2:] if line.startswith("| sst2")]
  assert len(rows) == 2 and all(row.endswith("| 2 of 2 | 75.00 | 50.00 |") for row in rows)
  text, _ = pf.table(results, {}, [("sst2", "lstm")], lambda task: arms, 2, True, ensembles=together)
  assert "soup" not in text and text.splitlines()[2].endswith("| 75.00 |")


def test_pretrain_finetune_scores_an_arm_s_ensemble_once_all_its_seeds_have_ended(tmp_path, monkeypatch):
  """While runs go on (`errors` given), an arm is scored as soon as each of its seeds has finished
  or failed, once (`tried`), so a --kill-at that stops another arm's runs does not leave it no time."""
  from experiments.pretrain_finetune import run as pf

  clock = pf.Clock(None, None)
  arms = {"scratch": None, "pretrained": []}
  results = {f"sst2/lstm/{arm}/{s}": {"workdir": f"/runs/{arm}{s}"} for arm in arms for s in (1, 2)}
  asked = []
  monkeypatch.setattr(pf, "nlm_jax_command", lambda argv, timeout=None, what="": (
      asked.append([argv[i + 1] for i, a in enumerate(argv) if a == "--workdir"]) or (0, '{"accuracy": 0.9}', "")))
  tried = set()
  score = lambda errors: pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, 3, clock, errors, tried)
  assert score({}) == {} and asked == []  # seed 3 of each arm still runs
  assert score({"sst2/lstm/scratch/3": "stopped"}) == {"sst2/lstm/scratch": pytest.approx(90.0)}
  assert asked == [["/runs/scratch1", "/runs/scratch2"]]
  assert score({"sst2/lstm/scratch/3": "stopped"}) == {} and len(asked) == 1  # not again
  results["sst2/lstm/pretrained/3"] = {"workdir": "/runs/pretrained3"}
  assert set(score({"sst2/lstm/scratch/3": "stopped"})) == {"sst2/lstm/pretrained"} and len(asked[-1]) == 3


def test_pretrain_finetune_first_seed_runs_a_disjoint_set_of_seeds(tmp_path, monkeypatch):
  """--first-seed 6: the fine-tunings are seeds 6, 7, ... (seed=S reaches each run, their own
  directories), one pretraining as before; the table and the ensemble read those seeds, not 1, 2."""
  from experiments.pretrain_finetune import run as pf

  calls = record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  clock = pf.Clock(None, None)
  arms = {"scratch": None, "pretrained": []}
  jobs = pf.jobs_of("sst2", "lstm", {"scratch": 1, "pretrained": 2}, str(tmp_path), data, True, clock, arms,
                    first=6)
  assert [j.name for j in jobs] == ["sst2/lstm/pretrain", "sst2/lstm/scratch/6", "sst2/lstm/pretrained/6",
                                    "sst2/lstm/pretrained/7"]
  results = {job.name: job.run() for job in jobs}
  seeds = {w: [o for o in calls[w] if o.startswith("seed=")] for w in calls if "_seed" in w}
  assert sorted(v[-1] for v in seeds.values()) == ["seed=6", "seed=6", "seed=7"]
  assert all(w.rsplit("_seed", 1)[1].startswith(v[-1][5:]) for w, v in seeds.items())
  asked = []
  monkeypatch.setattr(pf, "nlm_jax_command", lambda argv, timeout=None, what="": (
      asked.append([argv[i + 1] for i, a in enumerate(argv) if a == "--workdir"]) or (0, '{"accuracy": 0.9}', "")))
  counts = {"scratch": 1, "pretrained": 2}
  scores = pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, counts, clock, first=6)
  assert asked == [[results[f"sst2/lstm/pretrained/{s}"]["workdir"] for s in (6, 7)]]
  assert pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: arms, counts, clock) == {}  # seeds 1, 2: none
  text, _ = pf.table(results, {}, [("sst2", "lstm")], lambda task: arms, counts, True, ensembles=scores, first=6)
  rows = {line.split(" | ")[3]: line for line in text.splitlines()[2:] if line.startswith("| sst2")}
  assert rows["scratch"].endswith("| 1 of 1 |  |") and rows["pretrained"].endswith("| 2 of 2 | 90.00 |")


def test_ensembles_get_their_own_time_after_kill_at(monkeypatch):
  """An arm whose last seed was stopped at --kill-at is scored with --ensemble-s seconds to spare
  (it had 1 s: the ensemble of the seeds that finished was lost)."""
  from experiments.pretrain_finetune import run as pf

  clock = pf.Clock(None, kill_at=0.0, ensemble_s=20.0)
  assert clock.left() == 1.0 and 18.0 < clock.left_for_ensembles() <= 20.0
  assert pf.Clock(None, None, 20.0).left_for_ensembles() is None
  timeouts = []
  monkeypatch.setattr(pf, "nlm_jax_command", lambda argv, timeout=None, what="": (
      timeouts.append(timeout) or (0, '{"accuracy": 0.9}', "")))
  results = {f"sst2/lstm/pretrained/{s}": {"workdir": f"/runs/p{s}"} for s in (1, 2)}
  scores = pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: {"pretrained": []}, 3, clock,
                             {"sst2/lstm/pretrained/3": "stopped at --kill-at"}, set())
  assert scores == {"sst2/lstm/pretrained": pytest.approx(90.0)} and timeouts[0] > 18.0


def test_a_run_stopped_after_it_finished_counts_as_finished(tmp_path, monkeypatch):
  """nlm_jax_train: a run whose time limit came after it wrote its final summary.json is finished;
  one stopped before is not (its summary, if any, is not a finished run's)."""
  import experiments.common as common

  workdir = tmp_path / "r"
  workdir.mkdir()

  def stopped_after(summary):
    def command(argv, timeout=None, what=""):
      if summary is not None:
        (workdir / "summary.json").write_text(json.dumps(summary))
      raise SystemExit(f"{what} stopped after 1 s (the time limit)")
    return command

  monkeypatch.setattr(common, "nlm_jax_command", stopped_after({"steps": 10, "final_validation_loss": 0.5}))
  assert common.nlm_jax_train(str(workdir), [], timeout=1) >= 0
  for summary in (None, {"steps": 5}):  # stopped mid-run; or a train.stop_after run's partial summary
    (workdir / "summary.json").unlink(missing_ok=True)
    (workdir / "experiment_wall_s.json").unlink(missing_ok=True)
    monkeypatch.setattr(common, "nlm_jax_command", stopped_after(summary))
    with pytest.raises(SystemExit, match="time limit"):
      common.nlm_jax_train(str(workdir), [], timeout=1)


def test_a_time_limit_stops_a_training_run_with_sigterm_so_it_saves(tmp_path):
  """nlm_jax_command's time limit sends SIGTERM first: the trainer saves a checkpoint on its way
  out (the run resumes), rather than dying at its last periodic save."""
  import experiments.common as common

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the cat sat on the mat. " * 400)
  workdir = tmp_path / "r"
  with pytest.raises(SystemExit, match="time limit"):
    common.nlm_jax_train(str(workdir), ["data.source=text", f"data.file={corpus}", "tokenizer.kind=char",
                                        "model.arch=lstm", "model.d_embed=8", "model.d_hidden=8", "data.seq_len=16",
                                        "data.batch_size=4", "train.steps=100000000", "train.eval_every=100000000",
                                        "train.checkpoint_every=100000000", "train.log_every=50"], timeout=20)
  saved = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert saved and int(saved[0]) > 0, os.listdir(workdir / "checkpoints")


def test_pretrain_finetune_keeps_the_curve_of_a_run_stopped_before_its_end(tmp_path, monkeypatch):
  """A run stopped at --kill-at (or failed) keeps what it logged: its validation curve is plotted
  (dotted) and its last evaluation named under the table, never counted in the arm's mean."""
  from experiments.pretrain_finetune import run as pf

  def fake_train_summary(workdir, overrides, config=None, timeout=None):
    os.makedirs(workdir, exist_ok=True)
    stopped = "seed=2" in overrides and "_pretrained_" in workdir
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in (10, 20) if stopped else (10, 20, 30):
        f.write(json.dumps({"step": step, "val_accuracy": 0.7 + step / 1000}) + "\n")
    if stopped:
      raise SystemExit("nlm-jax train stopped after 5 s (the time limit)")
    return {"wall_s": 1.0, "final_validation_loss": 0.5, "final_validation_accuracy": 0.73}

  monkeypatch.setattr(pf, "train_summary", fake_train_summary)
  data = pf.toy_data(str(tmp_path / "toy"))
  arms = {"scratch": None, "pretrained": []}
  jobs = pf.jobs_of("sst2", "lstm", 2, str(tmp_path), data, True, pf.Clock(None, None), arms)
  partial = {}
  results, errors = pf.run_jobs(jobs, 1, pf.Clock(None, None), lambda r, e: None, partial)
  assert set(errors) == {"sst2/lstm/pretrained/2"} and set(partial) == {"sst2/lstm/pretrained/2"}
  assert partial["sst2/lstm/pretrained/2"]["curve"] == [(10, pytest.approx(0.71)), (20, pytest.approx(0.72))]
  text, rows = pf.table(results, errors, [("sst2", "lstm")], lambda task: arms, 2, True, partial=partial)
  assert "sst2/lstm/pretrained/2 (nlm-jax train stopped after 5 s (the time limit); its last evaluation: " \
         "0.7200 at step 20)" in text
  pretrained = rows["sst2/lstm"]["pretrained"]
  assert pretrained["score"] == [pytest.approx(73.0)] and len(pretrained["curve"]) == 1
  assert pretrained["stopped"] == [partial["sst2/lstm/pretrained/2"]["curve"]]
  assert rows["sst2/lstm"]["scratch"]["stopped"] == []
  pf.plot(rows, str(tmp_path))
  assert (tmp_path / "sst2_lstm_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # a run that failed before logging anything: no curve, no "last evaluation"
  monkeypatch.setattr(pf, "train_summary", lambda *a, **k: (_ for _ in ()).throw(SystemExit("bad config")))
  partial.clear()
  (tmp_path / "other").mkdir()
  jobs = pf.jobs_of("sst2", "lstm", 1, str(tmp_path / "other"), data, True, pf.Clock(None, None), arms)
  results, errors = pf.run_jobs(jobs, 1, pf.Clock(None, None), lambda r, e: None, partial)
  assert partial["sst2/lstm/scratch/1"]["curve"] == [] and "last evaluation" not in \
      pf.table(results, errors, [("sst2", "lstm")], lambda task: arms, 1, True, partial=partial)[0]


@pytest.mark.parametrize("scratch_seeds", [1, 0])
def test_pretrain_finetune_scratch_seeds_gives_the_scratch_arm_its_own_number_of_runs(tmp_path, monkeypatch,
                                                                                     scratch_seeds):
  """--scratch-seeds N: the scratch arm runs seeds 1..N, every other arm --seeds; the table counts
  each arm's runs against its own number, and a scratch arm without runs leaves the gain blank."""
  from experiments.pretrain_finetune import run as pf

  record_runs(monkeypatch)
  data = pf.toy_data(str(tmp_path / "toy"))
  arms = {"scratch": None, "pretrained": [], "x0.5": ["finetune.body_lr_scale=0.5"]}
  seeds = {"scratch": scratch_seeds, "pretrained": 3, "x0.5": 3}
  jobs = pf.jobs_of("sst2", "lstm", seeds, str(tmp_path), data, True, pf.Clock(None, None), arms)
  expected = {"sst2/lstm/pretrain"} | {f"sst2/lstm/scratch/{s}" for s in range(1, scratch_seeds + 1)} | \
             {f"sst2/lstm/{arm}/{s}" for arm in ("pretrained", "x0.5") for s in (1, 2, 3)}
  assert {job.name for job in jobs} == expected
  results = {job.name: {"score": 80.0 + i, "val_loss": 0.5, "wall_s": 1.0, "curve": []}
             for i, job in enumerate(jobs) if not job.name.endswith("/pretrain")}
  text, _ = pf.table(results, {}, [("sst2", "lstm")], lambda task: arms, seeds, True)
  rows = {line.split(" | ")[3]: line.split(" | ") for line in text.splitlines()[2:] if line.startswith("| sst2")}
  assert rows["scratch"][7] == f"{scratch_seeds} of {scratch_seeds}"
  assert rows["pretrained"][7] == rows["x0.5"][7] == "3 of 3"
  assert (rows["pretrained"][5] == "") == (scratch_seeds == 0)  # the gain over scratch


def test_pretrain_finetune_overrides_and_time_limits_reach_the_right_runs(tmp_path, monkeypatch):
  """An arm's own overrides reach its runs only; of --pretrain-set only the tokenizer.* ones reach
  the pretrained arms; quick mode's fine-tuning settings (task.max_len) reach the fine-tunings, not
  the language model, and --set comes after them (the last override wins: --set beats quick's
  defaults); every run, pretraining too, is stopped at --kill-at (`Clock.left`); a pretraining's
  row is its wall time and final validation loss."""
  from experiments.pretrain_finetune import run as pf

  calls, timeouts = {}, {}

  def fake_train_summary(workdir, overrides, config=None, timeout=None):
    calls[workdir], timeouts[workdir] = overrides, timeout
    return {"wall_s": 2.5, "final_validation_loss": 0.25, "final_validation_accuracy": 0.5}

  monkeypatch.setattr(pf, "train_summary", fake_train_summary)
  monkeypatch.setattr(pf, "curve", lambda workdir, key: [])
  data = pf.toy_data(str(tmp_path / "toy"))
  arms = {"scratch": None, "pretrained": [], "x0.5": ["finetune.body_lr_scale=0.5"]}
  jobs = pf.jobs_of("sst2", "lstm", 1, str(tmp_path), data, True, pf.Clock(None, kill_at=1000.0), arms,
                    ["task.max_len=64"], ["tokenizer.vocab_size=50", "model.dropout=0.4"])
  results = {job.name: job.run() for job in jobs}
  assert results["sst2/lstm/pretrain"] == {"wall_s": 2.5, "val_loss": 0.25}
  tuned = {os.path.basename(w).split("_seed")[0].removeprefix("sst2_lstm_"): o for w, o in calls.items() if "_seed" in w}
  [pretraining] = [o for w, o in calls.items() if "_seed" not in w]
  assert set(tuned) == {"scratch", "pretrained", "x0.5"}
  assert "finetune.body_lr_scale=0.5" in tuned["x0.5"]
  assert not any("body_lr_scale" in o for arm in ("scratch", "pretrained") for o in tuned[arm])
  for arm in ("pretrained", "x0.5"):
    assert "tokenizer.vocab_size=50" in tuned[arm] and "model.dropout=0.4" not in tuned[arm]
  assert "model.dropout=0.4" in pretraining and "task.max_len=32" not in pretraining
  for overrides in tuned.values():
    assert overrides.index("task.max_len=64") > overrides.index("task.max_len=32")
  assert all(990.0 < t <= 1000.0 for t in timeouts.values()) and len(timeouts) == 4


def test_pretrain_finetune_multi30k_scores_test_bleu_once_and_keeps_it(tmp_path, monkeypatch):
  """Multi30k: each fine-tuning's score is the BLEU of `nlm-jax eval --split test` on its run
  (within --kill-at), stored beside the run so a rerun over kept runs does not evaluate again; its
  curve is the validation loss; quick mode adds its decoding settings; no seed ensembles (those
  are SST-2's)."""
  from experiments.pretrain_finetune import run as pf

  calls = {}

  def fake_train_summary(workdir, overrides, config=None, timeout=None):
    calls[workdir] = overrides
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 10, "val_loss": 2.5, "val_accuracy": 0.1}) + "\n")
      f.write(json.dumps({"step": 20, "val_loss": 2.0, "val_accuracy": 0.2}) + "\n")
    return {"wall_s": 1.0, "final_validation_loss": 2.0}

  asked = []

  def fake_command(argv, timeout=None, what=""):
    asked.append((argv, timeout))
    return 0, json.dumps({"bleu": 27.5, "loss": 2.0}), ""

  monkeypatch.setattr(pf, "train_summary", fake_train_summary)
  monkeypatch.setattr(pf, "nlm_jax_command", fake_command)
  data = pf.toy_data(str(tmp_path / "toy"))
  clock = pf.Clock(None, kill_at=1000.0)
  arms = {"scratch": None, "pretrained": []}
  jobs = {job.name: job for job in pf.jobs_of("multi30k", "transformer", 2, str(tmp_path), data, True, clock, arms)}
  result = jobs["multi30k/transformer/scratch/1"].run()
  workdir = result["workdir"]
  assert result["score"] == 27.5 and result["val_loss"] == 2.0 and result["curve"] == [(10, 2.5), (20, 2.0)]
  [(argv, timeout)] = asked
  assert argv == ["eval", "--workdir", workdir, "--split", "test", "--json"] and 990.0 < timeout <= 1000.0
  assert json.load(open(os.path.join(workdir, "eval_test.json")))["bleu"] == 27.5
  assert jobs["multi30k/transformer/scratch/1"].run()["score"] == 27.5 and len(asked) == 1  # kept: not again
  assert "task.max_decode_len=12" in calls[workdir] and "task.max_len=32" in calls[workdir]
  results = {name: job.run() for name, job in jobs.items()}
  asked.clear()
  assert pf.seed_ensembles(results, [("multi30k", "transformer")], lambda task: arms, 2, clock) == {}
  assert asked == []


def test_pretrain_finetune_pretraining_text(tmp_path):
  """SST-2's pretraining text: WikiText-2's training lines lowercased, without headings or blank
  lines, then SST-2's training sentences (not its header); those sentences alone also go to
  sst2_train_text.txt. Multi30k's: its English and German training lines, shuffled together."""
  from experiments.pretrain_finetune import run as pf

  data = tmp_path / "data"
  (data / "wikitext-2").mkdir(parents=True)
  (data / "sst2").mkdir()
  (data / "wikitext-2" / "train.txt").write_text(" = Valkyria Chronicles = \n\n The Cat SAT . \n = = Plot = = \n It ran \n")
  (data / "sst2" / "train.tsv").write_text("sentence\tlabel\na fine movie\t1\nso dull\t0\n")
  out = tmp_path / "out"
  out.mkdir()
  with open(pf.unlabelled_text("sst2", str(out), str(data))) as f:
    assert f.read().splitlines() == ["the cat sat .", "it ran", "a fine movie", "so dull"]
  assert (out / "sst2_train_text.txt").read_text().splitlines() == ["a fine movie", "so dull"]
  toy = pf.toy_data(str(tmp_path / "toy"))
  with open(pf.unlabelled_text("multi30k", str(out), toy)) as f:
    lines = f.read().splitlines()
  en, de = ((tmp_path / "toy" / "multi30k" / f"train.{lang}").read_text().split("\n") for lang in ("en", "de"))
  assert sorted(lines) == sorted(line for line in en + de if line)
  assert any(line.startswith("die") for line in lines[:100]) and any(line.startswith("the") for line in lines[:100])


def test_pretrain_finetune_table_gain_spread_and_notes():
  """The table's numbers: each arm's mean ± std over its seeds (2 decimals), its gain over the
  first arm (scratch; none on scratch's own row), the spread as the larger sample std of the arm
  and scratch (nan where neither has 2 seeds); the pretraining's row kept; notes for --set and
  --pretrain-set, the unfinished runs in name order, and QUICK MODE only when quick."""
  from experiments.pretrain_finetune import run as pf

  scores = {"scratch": [80.0, 82.0], "pretrained": [85.0, 89.0, 90.0], "x0.5": [70.0, 71.0]}
  results = {f"sst2/lstm/{arm}/{i + 1}": {"score": x, "val_loss": 0.5, "wall_s": 1.0, "curve": []}
             for arm, xs in scores.items() for i, x in enumerate(xs)}
  results["sst2/lstm/pretrain"] = {"wall_s": 9.0, "val_loss": 3.0}
  results.update({f"multi30k/lstm/{arm}/1": {"score": s, "val_loss": 2.0, "wall_s": 1.0, "curve": []}
                  for arm, s in (("scratch", 20.0), ("pretrained", 23.5))})
  arms = lambda task: {"scratch": None, "pretrained": [], "x0.5": ["finetune.body_lr_scale=0.5"]} \
      if task == "sst2" else {"scratch": None, "pretrained": []}
  errors = {"sst2/lstm/x0.5/3": "stopped", "multi30k/lstm/pretrained/2": "failed"}
  text, rows = pf.table(results, errors, [("sst2", "lstm"), ("multi30k", "lstm")], arms, 3, True,
                        ["task.pooling=concat"], ["tokenizer.vocab_size=50"])
  cells = {(line.split(" | ")[0][2:], line.split(" | ")[3]): line.split(" | ")[4:8]
           for line in text.splitlines()[2:] if line.startswith("| ")}
  assert cells["sst2", "scratch"] == ["81.00 ± 1.41", "", "1.41", "2 of 3"]
  assert cells["sst2", "pretrained"] == ["88.00 ± 2.65", "+7.00", "2.65", "3 of 3"]
  assert cells["sst2", "x0.5"] == ["70.50 ± 0.71", "-10.50", "1.41", "2 of 3"]
  assert cells["multi30k", "pretrained"] == ["23.50", "+3.50", "nan", "1 of 3"]
  assert rows["sst2/lstm"]["pretrain"] == {"wall_s": 9.0, "val_loss": 3.0} and rows["multi30k/lstm"]["pretrain"] is None
  assert rows["sst2/lstm"]["pretrained"]["score"] == [85.0, 89.0, 90.0]
  assert "Every fine-tuning run added to its recipe: `task.pooling=concat`." in text
  assert "Every pretraining added to its recipe: `tokenizer.vocab_size=50`." in text
  assert "Not finished: multi30k/lstm/pretrained/2 (failed); sst2/lstm/x0.5/3 (stopped)" in text
  assert text.endswith("QUICK MODE on toy data, not a result.")
  assert "QUICK MODE" not in pf.table(results, {}, [("sst2", "lstm")], arms, 3, False)[0]


def test_pretrain_finetune_scheduler_keeps_the_order_and_waits_for_every_need():
  """A job starts only once every job it needs has finished (the pretrained arm of --backward
  needs both language models), and a job whose needs end goes before later jobs in the list (no
  job waits queued behind a busy worker); the table is rewritten after a failed run too; a
  failure is named by its message's last line (the error under a command's output), or its type."""
  import threading
  import time

  from experiments.pretrain_finetune.run import Clock, Job, run_jobs

  lock, events = threading.Lock(), []

  def work(name, seconds=0.05, error=None):
    def run():
      with lock:
        events.append(f"start {name}")
      time.sleep(seconds)
      with lock:
        events.append(f"end {name}")
      if error is not None:
        raise error
      return {"name": name}
    return run

  jobs = [Job("slow", work("slow", 0.4)), Job("fast", work("fast")), Job("both", work("both"), ("slow", "fast"))]
  results, errors = run_jobs(jobs, 3, Clock(None, None), lambda r, e: None)
  assert set(results) == {"slow", "fast", "both"} and events.index("start both") > events.index("end slow")
  events.clear()
  jobs = [Job("p1", work("p1", 0.1)), Job("p2", work("p2", 0.4)), Job("a", work("a"), ("p1",)), Job("z", work("z"))]
  results, errors = run_jobs(jobs, 2, Clock(None, None), lambda r, e: None)
  assert set(results) == {"p1", "p2", "a", "z"} and events.index("start a") < events.index("start z")
  reports = []
  jobs = [Job("ok", work("ok", 0)),
          Job("bad", work("bad", 0, SystemExit("nlm-jax train failed for /runs/bad:\nTraceback\nValueError: no lr"))),
          Job("empty", work("empty", 0, RuntimeError()))]
  results, errors = run_jobs(jobs, 1, Clock(None, None), lambda r, e: reports.append((len(r), len(e))))
  assert errors == {"bad": "ValueError: no lr", "empty": "RuntimeError"}
  assert reports == [(1, 0), (1, 1), (1, 2)]


def test_pretrain_finetune_a_failed_ensemble_is_tried_once(monkeypatch):
  """An arm whose ensemble evaluation fails is named in `tried` too: a later finished run does
  not start its `nlm-jax eval --split validation` again."""
  from experiments.pretrain_finetune import run as pf

  asked = []

  def failing(argv, timeout=None, what=""):
    asked.append(argv)
    return 1, "", "nlm-jax: error: out of memory"

  results = {f"sst2/lstm/pretrained/{s}": {"workdir": f"/runs/p{s}"} for s in (1, 2)}
  tried = set()
  monkeypatch.setattr(pf, "nlm_jax_command", failing)
  for _ in range(2):
    assert pf.seed_ensembles(results, [("sst2", "lstm")], lambda task: {"pretrained": []}, 2, pf.Clock(None, None),
                             {}, tried) == {}
  assert asked == [["eval", "--workdir", "/runs/p1", "--workdir", "/runs/p2", "--split", "validation", "--json"]]
  assert tried == {"sst2/lstm/pretrained"}


def test_pretrain_finetune_run_directory_names():
  """An arm's name becomes a directory name of letters, digits, dots and single underscores;
  `tag` is '_' and the first 8 hex digits of the overrides' SHA-256 (space-joined): a kept --runs
  folder's directories keep their names from one version to the next."""
  import hashlib

  from experiments.pretrain_finetune import run as pf

  assert pf.slug("body lr (x0.25)") == "body_lr_x0.25" and pf.slug("pretrained") == "pretrained"
  assert pf.tag([]) == ""
  assert pf.tag(["a=1", "b=2"]) == "_" + hashlib.sha256(b"a=1 b=2").hexdigest()[:8]


def test_pretrain_finetune_main_runs_every_pair_arm_and_seed(tmp_path, monkeypatch):
  """The command line end to end, its runs faked: the pretrainings go first (not the arms named
  "pretrained..."); --arm runs on
  --arm-tasks only, beside scratch and pretrained; --scratch-seeds and --first-seed pick each arm's
  seeds; results.json holds the rows and the SST-2 ensembles; a run that failed fails the command
  (after the table is written); an --arm named like an existing arm is refused."""
  import sys

  from experiments.pretrain_finetune import run as pf

  order = []

  def fake_train_summary(workdir, overrides, config=None, timeout=None):
    order.append((os.path.basename(workdir), [o for o in overrides if o.startswith("seed=")]))
    os.makedirs(workdir, exist_ok=True)
    if "multi30k_lstm_pretrained_seed4" in workdir:
      raise SystemExit("nlm-jax train failed: boom")
    return {"wall_s": 1.0, "final_validation_loss": 0.5, "final_validation_accuracy": 0.75}

  def fake_command(argv, timeout=None, what=""):
    return 0, json.dumps({"bleu": 30.0} if "test" in argv else {"accuracy": 0.8}), ""

  monkeypatch.setattr(pf, "train_summary", fake_train_summary)
  monkeypatch.setattr(pf, "nlm_jax_command", fake_command)
  monkeypatch.setattr(pf, "curve", lambda workdir, key: [])
  monkeypatch.setattr(pf, "train_in_process", lambda enabled: None)
  monkeypatch.setattr(pf, "plot", lambda rows, out: None)
  data = pf.toy_data(str(tmp_path / "toy"))
  out = tmp_path / "out"
  argv = ["run", "--pairs", "sst2/lstm,multi30k/lstm", "--arm", "x half=finetune.body_lr_scale=0.5",
          "--arm-tasks", "sst2", "--seeds", "2", "--scratch-seeds", "1", "--first-seed", "3", "--data", data,
          "--runs", str(tmp_path / "runs"), "--out", str(out)]
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(SystemExit, match="1 of 10 runs did not finish"):
    pf.main()
  names = [name for name, _ in order]
  assert names[:2] == ["pretrain_sst2_lstm", "pretrain_multi30k_lstm"]  # before any fine-tuning (one at a time)
  assert sorted(s for _, seeds in order for s in seeds) == ["seed=3"] * 5 + ["seed=4"] * 3
  res = json.load(open(out / "results.json"))
  sst2, multi30k = res["results"]["sst2/lstm"], res["results"]["multi30k/lstm"]
  assert set(sst2) == {"pretrain", "scratch", "pretrained", "x half"} and set(multi30k) == {"pretrain", "scratch", "pretrained"}
  assert [len(sst2[arm]["score"]) for arm in ("scratch", "pretrained", "x half")] == [1, 2, 2]
  assert sst2["pretrained"]["score"] == [75.0, 75.0] and multi30k["pretrained"]["score"] == [30.0]
  assert res["ensembles"] == {"sst2/lstm/pretrained": pytest.approx(80.0), "sst2/lstm/x half": pytest.approx(80.0)}
  assert res["errors"] == {"multi30k/lstm/pretrained/4": "nlm-jax train failed: boom"}
  monkeypatch.setattr(sys, "argv", argv + ["--arm", "pretrained=finetune.body_lr_scale=0.1"])
  order.clear()
  with pytest.raises(SystemExit, match="expected a new NAME=OVERRIDES"):
    pf.main()
  assert order == []


def test_nlm_jax_train_reuses_finished_runs_and_reports_failures(tmp_path, monkeypatch):
  """nlm_jax_train: a finished run (its wall time and summary.json kept) is not started again and
  reports its first wall time; a kept wall time without a summary is not a finished run; a
  failing command stops the experiment with its error; a complete summary.json older than the
  run stopped at the time limit is an earlier run's, not this one's."""
  import experiments.common as common

  workdir = tmp_path / "r"
  workdir.mkdir()
  started = []

  def finishing(argv, timeout=None, what=""):
    started.append(argv)
    (workdir / "summary.json").write_text(json.dumps({"final_validation_loss": 0.5}))
    return 0, "", ""

  monkeypatch.setattr(common, "nlm_jax_command", finishing)
  wall = common.nlm_jax_train(str(workdir), ["seed=1"])
  assert len(started) == 1 and started[0][-1] == "seed=1"
  assert common.nlm_jax_train(str(workdir), ["seed=1"]) == wall and len(started) == 1
  (workdir / "summary.json").unlink()
  common.nlm_jax_train(str(workdir), ["seed=1"])
  assert len(started) == 2
  (workdir / "experiment_wall_s.json").unlink()
  monkeypatch.setattr(common, "nlm_jax_command", lambda argv, timeout=None, what="": (1, "", "lots\nValueError: bad lr"))
  with pytest.raises(SystemExit, match="ValueError: bad lr"):
    common.nlm_jax_train(str(workdir), [])
  os.utime(workdir / "summary.json", (1e9, 1e9))  # complete, but from before this run started

  def stopped(argv, timeout=None, what=""):
    raise SystemExit(f"{what} stopped after 1 s (the time limit)")

  monkeypatch.setattr(common, "nlm_jax_command", stopped)
  with pytest.raises(SystemExit, match="time limit"):
    common.nlm_jax_train(str(workdir), [], timeout=1)


def test_experiment_common_scratch_mean_std_results_and_parallel(tmp_path, monkeypatch):
  """scratch: a --runs folder is kept as it is; a temporary one loses its run directories at exit
  but keeps the files at its top. mean_std: mean ± sample std with `digits` decimals, the value
  alone for one, '—' for none. write_results: the table replaces what stands between README.md's
  markers (markers kept), only with update_readme. run_parallel: results in the tasks' order;
  one job at a time: each called in this thread."""
  import atexit
  import threading
  import time

  import experiments.common as common

  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
  registered = []
  monkeypatch.setattr(atexit, "register", registered.append)
  kept = tmp_path / "kept"
  (kept / "run1").mkdir(parents=True)
  assert common.scratch("x-", str(kept)) == str(kept) and registered == []
  folder = common.scratch("x-", None)
  os.makedirs(os.path.join(folder, "run1", "checkpoints"))
  with open(os.path.join(folder, "results.json"), "w") as f:
    f.write("{}")
  [remove_runs] = registered
  remove_runs()
  assert os.listdir(folder) == ["results.json"] and os.listdir(kept) == ["run1"]
  os.remove(os.path.join(folder, "results.json"))
  os.rmdir(folder)

  assert common.mean_std([], 2) == "—" and common.mean_std([1.23456], 3) == "1.235"
  assert common.mean_std([1.0, 2.0, 6.0], 1) == "3.0 ± 2.6"

  out = tmp_path / "out"
  out.mkdir()
  readme = "# X\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n"
  (out / "README.md").write_text(readme)
  common.write_results(str(out), "| new |", {"a": 1}, update_readme=False)
  assert (out / "README.md").read_text() == readme and json.load(open(out / "results.json")) == {"a": 1}
  common.write_results(str(out), "| new |", {"a": 1}, update_readme=True)
  assert (out / "README.md").read_text() == "# X\n<!-- results:start -->\n| new |\n<!-- results:end -->\ntail\n"
  assert (out / "results.md").read_text() == "| new |\n"

  main = threading.current_thread()
  assert common.run_parallel([lambda: (time.sleep(0.2), "first")[1], lambda: "second"], 2) == ["first", "second"]
  assert common.run_parallel([lambda: threading.current_thread() is main], 1) == [True]


def test_category_purity_counts_other_words_and_averages_over_words():
  """Two tight categories, 4 directions and 5 ordinals: a direction's 5 nearest other words hold
  the 3 other directions (0.6), an ordinal's the 4 other ordinals (0.8); overall is the mean over
  words, chance the mean of (n_c − 1) / (n − 1)."""
  from experiments.embeddings.run import CATEGORIES, category_purity

  rng = np.random.default_rng(0)
  words = CATEGORIES["directions"] + CATEGORIES["ordinals"] + ["filler"]
  index = {w: i for i, w in enumerate(words)}
  E = rng.normal(size=(len(words), 16)) * 0.01
  E[:4, 0] += 1.0
  E[4:9, 1] += 1.0
  p = category_purity(E, index)
  assert p["words"] == 9 and p["by_category"] == pytest.approx({"directions": 0.6, "ordinals": 0.8})
  assert p["overall"] == pytest.approx((4 * 0.6 + 5 * 0.8) / 9)
  assert p["chance"] == pytest.approx((4 * 3 / 8 + 5 * 4 / 8) / 9)


def test_analogies_exclude_the_question_words_and_weigh_relations_by_questions():
  """b = a + ε·o_a with every offset o orthogonal to the rest: b − a + c points at c, then at d;
  with a, b, c excluded every gender question finds d. Ordinal words are orthogonal one-hots, so
  each question finds the first word not excluded (a filler): 0. A pair with a word past `search`
  is left out; `all` weighs each relation by its questions."""
  from experiments.embeddings.run import analogies

  words = ["filler", "man", "woman", "king", "queen", "he", "she", "her", "one", "first", "two", "second", "his"]
  index = {w: i for i, w in enumerate(words)}
  E = np.zeros((len(words), 2 * len(words)))
  E[np.arange(len(words)), np.arange(len(words))] = 1.0
  for k, (a, b) in enumerate([("man", "woman"), ("king", "queen"), ("he", "she"), ("his", "her")]):
    E[index[b]] = E[index[a]]
    E[index[b], len(words) + k] = 0.1
  out = analogies(E, index, search=len(words) - 1)  # "his" is past the search
  assert out["gender"] == {"accuracy": 1.0, "questions": 6} and out["ordinal"] == {"accuracy": 0.0, "questions": 2}
  assert out["plural"] == {"accuracy": None, "questions": 0}
  assert out["all"] == {"accuracy": pytest.approx(6 / 8), "questions": 8}


def test_neighbours_are_the_nearest_other_words_by_cosine_and_pca_keeps_the_plane():
  """Neighbours: the TOP_K highest cosines, the query itself excluded. PCA: category words on a
  plane through a far-off point come back as their centred coordinates along the plane's axes
  (wider spread first; each axis up to its sign)."""
  from experiments.embeddings.run import CATEGORIES, TOP_K, neighbours, pca_points

  rng = np.random.default_rng(0)
  words = ["king", "three"] + [f"w{i}" for i in range(20)]
  index = {w: i for i, w in enumerate(words)}
  E = rng.normal(size=(len(words), 8))
  out = neighbours(E, words, index, len(words))
  assert set(out) == {"king", "three"}
  U = E / np.linalg.norm(E, axis=1, keepdims=True)
  for q in out:
    cos = {w: float(U[index[w]] @ U[index[q]]) for w in words if w != q}
    assert out[q] == sorted(cos, key=cos.get, reverse=True)[:TOP_K]

  cat_words = CATEGORIES["days"] + CATEGORIES["directions"]
  index = {w: i for i, w in enumerate(cat_words)}
  a, b = rng.normal(size=len(cat_words)), rng.normal(size=len(cat_words))
  a, b = 3 * (a - a.mean()), b - b.mean()
  b -= (a @ b) / (a @ a) * a  # uncorrelated: the plane's axes are the principal ones
  u, v = np.eye(6)[0], np.eye(6)[1]
  E = 5.0 + a[:, None] * u + b[:, None] * v
  points = pca_points(E, index)
  assert [(p["word"], p["category"]) for p in points] == [(w, "days") for w in CATEGORIES["days"]] + [
      (w, "directions") for w in CATEGORIES["directions"]]
  np.testing.assert_allclose(np.abs([p["x"] for p in points]), np.abs(a), atol=1e-9)
  np.testing.assert_allclose(np.abs([p["y"] for p in points]), np.abs(b), atol=1e-9)


def test_embeddings_report_rows_and_chance_levels():
  """mean ± std over seeds per probe, the purity's chance from the first seed, an analogy's chance
  1 / the words searched."""
  import types

  from experiments.embeddings.run import report

  def probe(purity, analogy, ppl):
    return {"purity": {"overall": purity, "by_category": {"days": purity}, "chance": 0.125, "words": 9},
            "analogies": {**{r: {"accuracy": None, "questions": 0} for r in ("gender", "nationality", "plural",
                                                                              "past tense")},
                          "ordinal": {"accuracy": analogy, "questions": 4}, "all": {"accuracy": analogy, "questions": 4}},
            "search": 200, "val_ppl": ppl}

  probes = {"trained": [probe(0.5, 0.25, 100.0), probe(0.7, 0.75, 120.0)], "random": [probe(0.1, 0.0, None)] * 2}
  first = {"neighbours": {"trained": {"king": ["queen", "man"]}, "random": {"king": ["a", "b"]}}}
  table = report(probes, first, types.SimpleNamespace(quick=False, seeds=2), 800)
  assert "validation perplexity 110.0 ± 14.1 (mean ± std over 2 seeds)" in table
  assert "(9 words) | 0.600 ± 0.141 | 0.100 ± 0.000 | 0.125 |" in table
  assert "| … days | 0.600 ± 0.141 | 0.100 ± 0.000 | |" in table
  assert "| analogies, ordinal (3CosAdd, 4 questions) | 0.500 ± 0.354 | 0.000 ± 0.000 | 0.0050 |" in table
  assert "gender" not in table and "| king | queen, man | a, b |" in table


def test_long_range_report_gradient_ratios_and_bold_thresholds():
  """Gradient cells: ‖∂L_T/∂x_{T−d}‖ / ‖∂L_T/∂x_T‖ for d = 10, 50, 90 ('—' past the window);
  copy: bold at a mean ≥ 0.9; adding: bold at a mean error < 0.04."""
  from experiments.long_range.run import report

  results = {"quick": False, "seeds": 2, "steps": 100,
             "gradients": {"rnn": {"trained": list(range(1, 61))}, "lstm": {"initialization": list(range(1, 51))}},
             "gaps": [5, 10], "copy": {"lstm": {"5": [0.9, 0.9], "10": [1.0, 0.7]}},
             "lengths": [10, 20], "adding": {"lstm": {"10": [0.04, 0.04], "20": [0.01, 0.2]},
                                             "rnn": {"10": [0.03, 0.04], "20": [0.5, 0.5]}}}
  table = report(results)
  assert "| RNN, trained | 8.3e-01 | 1.7e-01 | — |" in table
  assert "| LSTM, initialization | 8.0e-01 | — | — |" in table
  assert "| lstm | **0.90 ± 0.00** | 0.85 ± 0.21 |" in table
  assert "| lstm | 0.040 ± 0.000 | 0.105 ± 0.134 |" in table
  assert "| rnn | **0.035 ± 0.007** | 0.500 ± 0.000 |" in table


def test_input_gradient_norms_average_rows_and_score_each_row_s_own_target():
  """The norms of a batch are the mean of each row's own: duplicated rows change nothing, and one
  row's loss is its own target's."""
  import flax.linen as nn
  import jax

  from experiments.long_range.run import input_gradient_norms
  from nlm_jax import models

  cfg = models.RNNConfig(vocab_size=7, d_embed=4, d_hidden=5, n_layers=1)
  params = nn.unbox(models.build(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
  windows = np.random.default_rng(0).integers(0, 7, (2, 4))
  both = input_gradient_norms(cfg, params, windows)
  rows = [input_gradient_norms(cfg, params, windows[i:i + 1]) for i in range(2)]
  assert both.shape == (3,) and np.all(both > 0)
  np.testing.assert_allclose(both, (rows[0] + rows[1]) / 2, rtol=1e-5)


def test_in_context_reads_each_line_after_earlier_ones():
  """Eight earlier lines before each line for the recurrent models, one for the Transformer; no
  trailing <eos>."""
  import types

  from experiments.long_range.run import in_context

  tok = types.SimpleNamespace(encode=lambda text: np.array([ord(c) for c in text] + [0]))
  for arch, n_prev in (("lstm", 8), ("rnn", 8), ("transformer", 1)):
    run = types.SimpleNamespace(tokenizer=tok, model_cfg=types.SimpleNamespace(arch=arch))
    ids = in_context(run, ["ab:ab", "cd:cd"], lambda n: ["xy:xy"] * n)
    assert [bytes(row.astype(np.uint8)).decode() for row in ids] == ["xy:xy\n" * n_prev + line
                                                                      for line in ("ab:ab", "cd:cd")]


def test_line_tasks_train_on_windows_of_two_lines_and_keep_seed_order(tmp_path, monkeypatch):
  """Copy and adding runs: seq_len is two lines with their newline; every held-out line is
  scored; each cell lists the seeds' scores in seed order."""
  from experiments.long_range import run as lr

  calls = []

  def scored_run(workdir, arch, size, files, seq_len, steps, seed, score, label):
    calls.append((workdir, seq_len, steps, score.args))
    return {"rnn": 0.0, "lstm": 0.5, "transformer": 1.0}[arch] + seed / 10

  monkeypatch.setattr(lr, "scored_run", scored_run)
  copy = lr.copy_task(str(tmp_path), True, 2, [3], 7, 1)
  line = lr.copy_lines(1, 3, np.random.default_rng(0))[0]
  assert {c[1] for c in calls} == {2 * (len(line) + 1)} and {c[2] for c in calls} == {7}
  assert all(len(c[3][1]) == 20 for c in calls)
  assert copy == {"rnn": {"3": [0.1, 0.2]}, "lstm": {"3": [0.6, 0.7]}, "transformer": {"3": [1.1, 1.2]}}
  calls.clear()
  adding = lr.adding_task(str(tmp_path), True, 1, [6], 7, 1)
  line = lr.adding_lines(1, 6, np.random.default_rng(0))[0]
  assert {c[1] for c in calls} == {2 * (len(line) + 1)} and all(len(c[3][1]) == 20 for c in calls)
  assert adding == {"rnn": {"6": [0.1]}, "lstm": {"6": [0.6]}, "transformer": {"6": [1.1]}}


def test_long_range_full_settings_and_merge(tmp_path, monkeypatch):
  """Without --quick: gaps 5, 10, 20, lengths 10, 20, 2000 steps; --merge keeps the parts not run."""
  from experiments.long_range import run as lr

  text = tmp_path / "input.txt"
  text.write_text("text\n")
  monkeypatch.setattr(lr, "TEXT", str(text))
  got = {}

  def task(name):
    def run(tmp, quick, seeds, sizes, steps, jobs):
      got[name] = (quick, seeds, sizes, steps, jobs)
      return {"lstm": {str(s): [0.5] * seeds for s in sizes}}
    return run

  monkeypatch.setattr(lr, "copy_task", task("copy"))
  monkeypatch.setattr(lr, "adding_task", task("adding"))
  monkeypatch.setattr(lr, "plot", lambda results, out: None)
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text(json.dumps({"gradients": {"rnn": {"trained": [1.0, 2.0]}}, "steps": 2000}))
  monkeypatch.setattr(sys, "argv", ["run", "--seeds", "2", "--parts", "copy,adding", "--merge", "--jobs", "1",
                                    "--out", str(out), "--runs", str(tmp_path / "runs")])
  lr.main()
  assert got == {"copy": (False, 2, [5, 10, 20], 2000, 1), "adding": (False, 2, [10, 20], 2000, 1)}
  results = json.loads((out / "results.json").read_text())
  assert results["gradients"] == {"rnn": {"trained": [1.0, 2.0]}} and results["gaps"] == [5, 10, 20]


def test_loss_by_position_averages_consecutive_windows(monkeypatch):
  """Position i's loss: the mean over the whole consecutive windows of `length` tokens (the tail
  left out) of each window's −log P at i, every window scored from an empty context."""
  import nlm_jax.scoring

  from experiments.positional_encodings.run import loss_by_position

  chunks = []

  def token_log_probs(model, params, tokens, chunk):  # −log P(w_{t+1}) := w_{t+1}
    chunks.append(chunk)
    return -np.asarray(tokens[1:], np.float64)

  monkeypatch.setattr(nlm_jax.scoring, "token_log_probs", token_log_probs)
  nll = loss_by_position(None, None, np.arange(22), 5)  # windows 0-4, 5-9, 10-14, 15-19
  np.testing.assert_allclose(nll, np.arange(1, 5) + 7.5)
  assert chunks == [5] * 4


def fake_load_run(tokens, **cfg):
  """`trainer.load_run` of a run whose corpus is `tokens` and whose config's data section is `cfg`."""
  import types

  def load_run(workdir):
    corpus = types.SimpleNamespace(tokens=lambda split: tokens)
    run = types.SimpleNamespace(corpus=corpus, cfg=types.SimpleNamespace(data=types.SimpleNamespace(**cfg)),
                                model=workdir)
    return run, {}, None
  return load_run


def test_positional_encodings_table_cells_context_and_beyond(tmp_path, monkeypatch):
  """Each length's cell: the mean over positions of the loss by position; beyond: positions
  64..255 of the 256 windows; a learned table has 64 rows and is scored at 64 only, the others
  have 256; the first --eval-chars validation tokens are scored; curves are the seeds' mean."""
  from experiments.positional_encodings import run as pe
  from nlm_jax.training import trainer

  contexts, scored = {}, []
  walls = iter([1.0, 2.0, 6.0] * 4)

  def nlm_jax_train(workdir, overrides, config=None):
    contexts[os.path.basename(workdir)] = [o for o in overrides if o.startswith("model.context=")]
    return next(walls)

  def loss_by_position(model, params, tokens, length):
    scored.append(len(tokens))
    seed = int(model[-1])
    return np.arange(length - 1, dtype=np.float64) + seed

  monkeypatch.setattr(pe, "nlm_jax_train", nlm_jax_train)
  monkeypatch.setattr(pe, "loss_by_position", loss_by_position)
  monkeypatch.setattr(trainer, "load_run", fake_load_run(np.arange(5000), eval_split="validation", batch_size=4))
  monkeypatch.setattr(sys, "argv", ["run", "--quick", "--seeds", "3", "--eval-chars", "1000", "--out", str(tmp_path)])
  pe.main()
  assert contexts["learned_seed1"] == ["model.context=64"] and contexts["rotary_seed2"] == ["model.context=256"]
  assert set(scored) == {1000}
  res = json.loads((tmp_path / "results.json").read_text())
  rotary, learned = res["results"]["rotary"], res["results"]["learned"]
  assert rotary["64"] == [32.0, 33.0, 34.0] and rotary["128"] == [64.0, 65.0, 66.0]
  assert rotary["256"] == [128.0, 129.0, 130.0] and rotary["beyond"] == [160.0, 161.0, 162.0]
  assert learned["64"] == [32.0, 33.0, 34.0] and learned["128"] == learned["256"] == learned["beyond"] == []
  assert res["loss_by_position"]["none"] == list(np.arange(255) + 2.0)
  assert res["loss_by_position"]["learned"] == list(np.arange(63) + 2.0)
  table = (tmp_path / "results.md").read_text()
  assert "| rotary | 33.0000 ± 1.0000 | 65.0000 ± 1.0000 | 129.0000 ± 1.0000 | 161.0000 ± 1.0000 | 3 s |" in table
  assert "| learned | 33.0000 ± 1.0000 | — | — | — | 3 s |" in table


def test_architectures_one_run_settings_and_curve(tmp_path, monkeypatch):
  """A run's optimizer decays to a tenth of its rate, evaluates and logs six times; its curve is
  the evaluations' tokens, seconds and validation loss."""
  from experiments.architectures import run as ar

  seen = []

  def train_summary(workdir, overrides):
    seen.extend(overrides)
    return {"wall_s": 12.0, "final_validation_perplexity": 50.0, "params": 1234, "tokens_seen": 600}

  monkeypatch.setattr(ar, "train_summary", train_summary)
  rows = [{"step": 10, "tokens": 100, "elapsed_s": 1.5, "train_loss": 3.0},
          {"step": 10, "tokens": 100, "elapsed_s": 2.0, "val_loss": 2.5},
          {"step": 20, "tokens": 200, "elapsed_s": 4.0, "val_loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  corpus = {"data": ["data.x=1"], "lr": 2e-3, "steps": 60}
  r = ar.one_run("toy", corpus, "lstm", ["model.arch=lstm"], str(tmp_path), 2)
  assert {"optim.lr=0.002", "optim.min_lr=0.0002", "train.steps=60", "train.eval_every=10", "train.log_every=10",
          "seed=2", "data.x=1", "model.arch=lstm"} <= set(seen)
  assert r == {"val_ppl": 50.0, "wall_s": 12.0, "params": 1234, "tokens": 600,
               "curve": [{"tokens": 100, "elapsed_s": 2.0, "val_loss": 2.5}, {"tokens": 200, "elapsed_s": 4.0,
                                                                             "val_loss": 2.0}]}


def test_architectures_rows_and_table(tmp_path, monkeypatch):
  """Rows gather every seed's perplexity and wall time; the table's cells are their mean ± std."""
  from experiments.architectures import run as ar

  def one_run(name, corpus, arch, model, workdir, seed):
    return {"val_ppl": {"fnn": 40.0, "rnn": 30.0, "lstm": 20.0, "transformer": 10.0}[arch] + 2 * seed,
            "wall_s": 10.0 * seed, "params": len(arch) * 1000, "tokens": 840,
            "curve": [{"tokens": 420, "elapsed_s": 1.0, "val_loss": 3.0}, {"tokens": 840, "elapsed_s": 2.0,
                                                                          "val_loss": 2.0}]}

  monkeypatch.setattr(ar, "one_run", one_run)
  monkeypatch.setattr(ar, "unigram_perplexity", lambda overrides, workdir: 99.0)
  monkeypatch.setattr(sys, "argv", ["run", "--quick", "--seeds", "2", "--corpora", "wikitext2", "--out", str(tmp_path)])
  ar.main()
  rows = json.loads((tmp_path / "results.json").read_text())["results"]["wikitext2"]["rows"]
  assert rows["lstm"]["val_ppl"] == [22.0, 24.0] and rows["lstm"]["wall_s"] == [10.0, 20.0]
  assert len(rows["lstm"]["curves"]) == 2 and rows["lstm"]["params"] == 4000
  table = (tmp_path / "results.md").read_text()
  assert "6 steps, 840 training tokens for every model" in table
  assert "| unigram (training-split frequencies, no training) | — | 99.00 | — |" in table
  assert "| LSTM | 4,000 | 23.00 ± 1.41 | 15 ± 7 s |" in table
  assert "| Transformer | 11,000 | 13.00 ± 1.41 | 15 ± 7 s |" in table


def test_optimization_settings_change_one_thing_each():
  """Against the baseline (AdamW at the workload's rate, decay to a tenth, 10% warm-up, cosine):
  L2 in the loss at the same λ, a constant or plateau (÷4) schedule, the rate × 0.3, 3, 10."""
  from experiments.optimization.run import WORKLOADS, settings

  s = settings(WORKLOADS["wikitext2_lstm"])  # 200 steps, AdamW 5e-3, weight decay 0.01, clip 0.25
  common = ["optim.clip_norm=0.25"]
  assert s["AdamW (baseline)"] == ("optimizer", ["optim.name=adamw", "optim.lr=0.005", "optim.min_lr=0.0005", *common,
                                                 "optim.weight_decay=0.01", "optim.schedule=warmup_cosine",
                                                 "optim.warmup_steps=20"])
  assert s["SGD"][1][:3] == ["optim.name=sgd", "optim.lr=20", "optim.min_lr=2"]
  assert s["Adam + L2 in the loss (λ = 0.01)"] == ("weight decay", [
      "optim.name=adam", "optim.lr=0.005", "optim.min_lr=0.0005", *common, "optim.weight_decay=0.01",
      "optim.weight_decay_mode=l2", "optim.schedule=warmup_cosine", "optim.warmup_steps=20"])
  assert s["AdamW, plateau ÷4"][1][-3:] == ["optim.schedule=plateau", "optim.plateau_factor=0.25",
                                             "optim.plateau_patience=1"]
  assert [s[f"AdamW, lr × {f}"][1][1:3] for f in ("0.3", "3", "10")] == [
      ["optim.lr=0.0015", "optim.min_lr=0.00015"], ["optim.lr=0.015", "optim.min_lr=0.0015"],
      ["optim.lr=0.05", "optim.min_lr=0.005"]]


def test_optimization_table_against_the_baseline_s_mean(tmp_path, monkeypatch):
  """'vs baseline': a setting's mean perplexity over the baseline's mean, less one (the unigram's
  too); only the chosen groups run, the baseline always."""
  from experiments.optimization import run as op

  ppl = {"AdamW (baseline)": [10.0, 11.0, 15.0], "AdamW, constant lr": [24.0] * 3, "AdamW, plateau ÷4": [6.0] * 3}

  def one_run(name, w, setting, optim, workdir, seed):
    return {"val_ppl": ppl[setting][seed - 1], "curve": [(1, 3.0), (2, 2.0)], "wall_s": 1.0}

  monkeypatch.setattr(op, "one_run", one_run)
  monkeypatch.setattr(op, "unigram_perplexity", lambda overrides, workdir: 18.0)
  monkeypatch.setattr(sys, "argv", ["run", "--quick", "--seeds", "3", "--workloads", "wikitext2_lstm", "--groups",
                                    "schedule", "--out", str(tmp_path)])
  op.main()
  table = (tmp_path / "results.md").read_text()
  assert "| unigram (training-split frequencies, no training) | reference | 18.00 | +50.0% |" in table
  assert "| AdamW (baseline) | optimizer | 12.00 ± 2.65 | +0.0% |" in table
  assert "| AdamW, constant lr | schedule | 24.00 ± 0.00 | +100.0% |" in table
  assert "| AdamW, plateau ÷4 | schedule | 6.00 ± 0.00 | -50.0% |" in table


def test_ngram_mixture_lambda_on_validation_and_perplexity():
  """λ maximizes the validation likelihood (1 of 4 validation tokens only model a predicts:
  λ = 0.25); the test perplexity is that of λ·P_a + (1 − λ)·P_b; perplexity is e^(mean NLL)."""
  from experiments.ngram_vs_neural.run import mixture, ppl

  assert ppl(np.log([0.5, 0.125])) == pytest.approx(4.0)
  a_val, b_val = np.array([0.0, -1e9, -1e9, -1e9]), np.array([-1e9, 0.0, 0.0, 0.0])
  lam, test_ppl = mixture(a_val, b_val, np.log([0.5, 0.5]), np.log([0.1, 0.1]))
  assert lam == pytest.approx(0.25) and test_ppl == pytest.approx(1 / (0.25 * 0.5 + 0.75 * 0.1))


def test_ngram_vs_neural_rows_and_table(tmp_path, monkeypatch):
  """Every model scores the test tokens w_1..w_{N−1} (Kneser–Ney's first score and trailing EOS
  ones left out); the summary compares the best neural or mixed model's mean perplexity with the
  best n-gram's; training time is the mean over seeds."""
  import types

  import nlm_jax.ngram
  import nlm_jax.scoring
  from experiments.ngram_vs_neural import run as ng
  from nlm_jax.training import trainer

  tokens = np.arange(50) % 7
  nplm = {(1, 1): 4.0, (1, 2): 6.0, (1, 3): 8.0, (0, 1): 10.0, (0, 2): 10.0, (0, 3): 10.0}  # (direct, seed): ppl

  def token_log_probs(model, params, t):
    return np.full(len(t) - 1, -np.log(nplm[model]))

  class KneserNey:
    def __init__(self, n, vocab_size, bos_id, eos_id):
      self.n = n

    def fit(self, sentences):
      return self

    def log_prob(self, sentences):  # w_0 (from BOS), w_1..w_{N−1}, then n − 1 EOS
      [t] = sentences
      return np.r_[np.log(1e-3), np.full(len(t) - 1, -np.log({3: 9.0, 5: 7.0}[self.n])), np.full(self.n - 1, 0.0)]

    def num_ngrams(self):
      return [10, 20]

  def load_run(workdir):
    name = os.path.basename(workdir)  # fnn_direct{d}_seed{s}
    corpus = types.SimpleNamespace(tokens=lambda split: tokens)
    run = types.SimpleNamespace(corpus=corpus, model=(int(name[10]), int(name[-1])),
                                tokenizer=types.SimpleNamespace(eos_id=0, vocab_size=7))
    return run, {"w": np.zeros(3)}, None

  monkeypatch.setattr(ng, "train_fnn", lambda workdir, direct, seed, steps, extra: {1: 1.0, 2: 2.0, 3: 6.0}[seed])
  monkeypatch.setattr(trainer, "load_run", load_run)
  monkeypatch.setattr(nlm_jax.scoring, "token_log_probs", token_log_probs)
  monkeypatch.setattr(nlm_jax.ngram, "KneserNey", KneserNey)
  monkeypatch.setattr(sys, "argv", ["run", "--quick", "--seeds", "3", "--out", str(tmp_path)])
  ng.main()
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert rows["Kneser–Ney n=5 (modified, interpolated)"]["test_ppl"] == [pytest.approx(7.0)]
  assert rows["NPLM n=5, direct connections on"]["test_ppl"] == pytest.approx([4.0, 6.0, 8.0])
  # constant probabilities: λ = 1 where the NPLM is better on validation, else 0
  mixed = rows["mixture NPLM (direct on) + KN n=5, λ on validation"]
  assert mixed["lambda"] == [1.0, 1.0, 0.0] and mixed["test_ppl"] == pytest.approx([4.0, 6.0, 7.0])
  table = (tmp_path / "results.md").read_text()
  assert "| NPLM n=5, direct connections on | 6.0 ± 2.0 | 3 | 3 s |" in table
  assert "| Kneser–Ney n=3 (modified, interpolated) | 9.0 | 30 n-grams |" in table
  best_neural, best_kn = (4.0 + 6.0 + 7.0) / 3, 7.0
  assert f"{100 * (best_neural / best_kn - 1):+.1f}% test perplexity" in table
