"""The command line explains itself: `config show` lists every key with its meaning, every option
has help text and shows its default."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import types
import typing

import pytest

from support import run_cli

from nlm_jax import cli, models
from nlm_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_transformer.yaml")


def config_keys(cls=config_lib.Config, prefix=""):
  """Every dotted key of the run config except the model section."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.name == "model":
      continue
    if dataclasses.is_dataclass(hints[f.name]):
      yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
    else:
      yield prefix + f.name


def shown(*argv) -> dict[str, tuple[str, str]]:
  """`nlm-jax config show ARGV` as {key: (value, description)}."""
  code, out, err = run_cli("config", "show", *argv)
  assert code == 0, err
  rows = {}
  for line in out.splitlines():
    if line.startswith("#"):
      continue
    setting, _, description = line.partition("  # ")
    key, _, value = setting.strip().partition("=")
    rows.setdefault(key, (value, description))
  return rows


def test_every_config_field_has_a_description():
  """A new config or model field without a trailing `# comment` (or a MODEL_FIELD_HELP entry) fails here."""
  def sections(cls):
    yield cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if dataclasses.is_dataclass(hints[f.name]):
        yield from sections(hints[f.name])

  for cls in sections(config_lib.Config):
    described = config_lib.field_help(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not described.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a description (add a trailing # comment): {missing}"
  for arch, cls in models.CONFIGS.items():
    described = config_lib._model_help(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not described.get(f.name)]
    assert not missing, (f"{cls.__name__} fields without a description (a trailing # comment, or "
                         f"config.MODEL_FIELD_HELP): {missing}")


def test_config_show_lists_every_key_with_its_default_and_meaning():
  rows = shown()
  for key in config_keys():
    assert key in rows, key
    assert rows[key][1].strip(), f"{key} has no description"
  assert rows["train.eval_batches"][0] == "20" and rows["data.batching"][0] == "windows"
  assert rows["workdir"][0] == "???"
  # Without model.arch, every architecture's fields are listed, tagged with it.
  assert rows["model.arch"][0] == "???"
  assert "[fnn]" in rows["model.context"][1]
  code, out, _ = run_cli("config", "show")
  for arch in models.CONFIGS:
    assert f"[{arch}]" in out


def test_config_show_gives_a_recipes_values_and_the_defaults_they_replace():
  rows = shown("--config", RECIPE, "train.steps=7", "model.n_layers=2")
  assert rows["seed"][0] == "1337" and "[default: 0]" in rows["seed"][1]
  assert rows["train.steps"][0] == "7" and "[default: 1000]" in rows["train.steps"][1]
  assert rows["model.arch"][0] == "transformer"
  assert rows["model.n_layers"][0] == "2" and rows["model.d_model"][0] == "128"
  assert "model.d_hidden" not in rows  # an LSTM field: not the recipe's architecture
  assert rows["optim.lr"][1].startswith("peak learning rate")


@pytest.mark.parametrize("bad,mentions", [("train.stpes=3", "stpes"), ("model.n_layer=3", "n_layer"),
                                          ("model.arch=gru", "model.arch")])
def test_config_show_rejects_unknown_keys_in_one_line(bad, mentions):
  code, out, err = run_cli("config", "show", "--config", RECIPE, bad)
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert mentions in err


@pytest.mark.parametrize("bad,mentions", [("model.d_embedd=3", "d_embedd"), ("model.d_embed=abc", "d_embed")])
def test_config_show_without_an_architecture_still_checks_model_keys(bad, mentions):
  """(Without model.arch, `config show` listed every architecture's defaults and dropped these.)"""
  code, out, err = run_cli("config", "show", bad)
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert mentions in err
  code, out, err = run_cli("config", "show", "model.d_embed=3", "model.n_heads=7")
  assert code == 0, err
  shown = [line.split("#")[0].strip() for line in out.splitlines() if line.startswith("model.")]
  assert shown.count("model.d_embed=3") == 3 and "model.n_heads=7" in shown  # fnn, rnn, lstm; transformer


def subparsers(p: argparse.ArgumentParser, prefix=()):
  for action in p._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield prefix + (name,), sub
        yield from subparsers(sub, prefix + (name,))


def test_every_option_has_help_and_shows_its_default():
  for path, sub in subparsers(cli.parser()):
    text = sub.format_help()
    for action in sub._actions:
      if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
        continue
      assert action.help, f"nlm-jax {' '.join(path)} {action.dest}: no help text"
      formatted = sub._get_formatter()._get_help_string(action) % vars(action)
      if action.option_strings and not action.required:
        assert "default" in formatted, f"nlm-jax {' '.join(path)} {action.option_strings[0]}: no default shown"
    assert "error" not in text


def test_train_help_points_to_config_show():
  code, out, _ = _help("train")
  assert "nlm-jax config show" in out


def _help(*argv):
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
    cli.main([*argv, "--help"])
  return e.value.code, out.getvalue(), ""


def test_plot_curves_keep_estimates_and_the_final_score_apart():
  from nlm_jax.plotting import curves

  records = [{"step": 5, "tokens": 50, "train_loss": 3.0},
             {"step": 10, "tokens": 100, "train_loss": 2.0, "val_loss": 2.5, "eval_train_loss": 1.9}]
  summary = {"steps": 10, "tokens_seen": 100, "final_validation_loss": 2.45, "final_validation_perplexity": 11.6}
  lines = curves(records, summary)
  assert lines["train"] == [(5, 50, 3.0), (10, 100, 2.0)]
  assert lines["validation"] == [(10, 100, 2.5)] and lines["train (eval mode)"] == [(10, 100, 1.9)]
  assert lines["final"] == [(10, 100, 2.45)]


def test_plot_reads_a_metrics_file_being_written_and_names_a_damaged_one(tmp_path):
  from nlm_jax.errors import UserError
  from nlm_jax.plotting import read_metrics

  good = '{"step": 5, "train_loss": 3.0}\n{"step": 10, "train_loss": 2.0}\n'
  (tmp_path / "metrics.jsonl").write_text(good + '{"step": 15, "train_l')  # a line half-written
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [5, 10]
  (tmp_path / "metrics.jsonl").write_text('{"step": 5, "tr\n' + good)
  with pytest.raises(UserError, match="line 1 is not JSON"):
    read_metrics(str(tmp_path))


@pytest.fixture
def tiny_lm_run(monkeypatch):
  """`nlm-jax generate` finds a run: a tiny untrained LSTM over the characters of a short text (so the
  commands' own options are what is tested, not a training run)."""
  import jax
  import numpy as np

  from nlm_jax.data import tokenizers

  tok = tokenizers.CharTokenizer.train("the cat sat on the mat\n")
  model = models.build(models.LSTMConfig(vocab_size=tok.vocab_size, d_embed=8, d_hidden=8, n_layers=1))
  params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
  cfg = types.SimpleNamespace(data=types.SimpleNamespace(reverse=False))
  run = types.SimpleNamespace(model=model, tokenizer=tok, cfg=cfg)
  monkeypatch.setattr(cli, "_load_run_of", lambda args, kind: (run, params))
  return run


def test_generate_zero_new_tokens_prints_the_prompt(tiny_lm_run):
  """--max-new-tokens 0 is allowed (≥ 0): the prompt alone, streamed or as samples."""
  code, out, err = run_cli("generate", "--workdir", "w", "--prompt", "the cat", "--max-new-tokens", 0)
  assert (code, out) == (0, "the cat\n"), err
  code, out, err = run_cli("generate", "--workdir", "w", "--prompt", "the", "--max-new-tokens", 0, "--num-samples", 2)
  assert code == 0 and out == "--- sample 1 of 2 ---\nthe\n--- sample 2 of 2 ---\nthe\n", err
  code, out, err = run_cli("generate", "--workdir", "w", "--prompt", "the", "--max-new-tokens", -1)
  assert code == 2 and "--max-new-tokens -1" in err


def test_generate_temperature_zero_is_greedy(tiny_lm_run):
  """--temperature 0 is allowed: greedy decoding, the same text whatever the seed."""
  texts = []
  for seed in (1, 2):
    code, out, err = run_cli("generate", "--workdir", "w", "--prompt", "the", "--max-new-tokens", 12,
                             "--temperature", 0, "--seed", seed)
    assert code == 0, err
    texts.append(out)
  assert texts[0] == texts[1] and texts[0].startswith("the") and len(texts[0]) == len("the") + 12 + 1
  code, out, err = run_cli("generate", "--workdir", "w", "--prompt", "the", "--temperature", -0.5)
  assert code == 2 and "--temperature -0.5" in err


def test_generate_passes_each_sampling_option_to_its_parameter(tiny_lm_run, monkeypatch):
  from nlm_jax import generate

  seen, signature = [], inspect.signature(generate.generate_text)

  def record(*args, **kwargs):
    seen.append(signature.bind(*args, **kwargs).arguments)
    return ["x"] * kwargs.get("num_samples", 1)

  monkeypatch.setattr(generate, "generate_text", record)
  for samples in (1, 2):
    code, _, err = run_cli("generate", "--workdir", "w", "--prompt", "the", "--num-samples", samples, "--top-k", 3,
                           "--top-p", 0.5, "--temperature", 0.7, "--seed", 9, "--max-new-tokens", 11)
    assert code == 0, err
  for arguments in seen:
    assert (arguments["top_k"], arguments["top_p"], arguments["temperature"], arguments["seed"],
            arguments["max_new_tokens"], arguments["prompt"]) == (3, 0.5, 0.7, 9, 11, "the")
  assert len(seen) == 2 and seen[1]["num_samples"] == 2


def test_an_os_error_is_one_line_and_exit_status_2(tmp_path):
  """An OSError no command turned into a UserError (here: plot --output into a folder that does not exist)
  is still one line, exit status 2."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 5, "tokens": 50, "train_loss": 3.0}\n')
  code, out, err = run_cli("plot", "--workdir", tmp_path, "--output", tmp_path / "no" / "such" / "dir" / "c.png")
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert err.startswith("nlm-jax: error: ") and "check the path" in err
