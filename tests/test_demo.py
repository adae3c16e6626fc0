"""The demo stage's config, stage links, done / stale logic and report helpers, without
training anything (the tiny end-to-end run is tests/test_notebooks.py)."""

import json
import os

import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax.evaluation import report
from gae_jax.trainers import demo


def test_full_demo_uses_the_readme_runlocal_configs():
  c = demo.demo_config()
  assert c.stage == "demo" and not c.tiny
  same = {
      "teacher": configs_lib.teacher_config("runlocal", latent_dim=32),
      "gae": configs_lib.autoencoder_config("runlocal", latent_dim=32),
      "cache": configs_lib.cache_latents_config("runlocal"),
      "dit": configs_lib.dit_config("runlocal", latent_dim=32, epochs=80),
      "sample": configs_lib.dit_config("sample,runlocal", latent_dim=32, epochs=80),
  }
  same["gae"].loss.sp_weight = 1.0   # the README's stage 2 ':runlocal,teacher=...' (L_sp on)
  for key, want in same.items():
    assert demo.fingerprint(c[key]) == demo.fingerprint(want), key
  ev = configs_lib.eval_config("runlocal", kind=demo.EVAL_KINDS)
  ev.eval.generation.num_samples = -1
  ev.eval.num_images, ev.eval.generation.reference_num_images = 32, 88   # the demo's counts
  assert demo.fingerprint(c.eval) == demo.fingerprint(ev)


def test_stage_configs_link_each_stage_to_its_inputs(tmp_path):
  c = demo.demo_config("tiny")
  w = str(tmp_path)
  cf = demo.stage_configs(c, w)
  d = {s.key: os.path.join(w, s.subdir) for s in demo.STAGES}
  assert cf["gae"].teacher.init_from == d["teacher"]
  assert cf["cache"].tokenizer.path == d["gae"]
  assert cf["dit"].data.cache_dir == d["cache"]
  assert cf["sample"].dit.init_from == d["dit"]
  assert cf["eval"].tokenizer.path == d["gae"]
  assert cf["eval"].eval.generation.samples == os.path.join(d["sample"], "samples.npz")
  assert c.gae.teacher.init_from is None          # the demo config itself is not modified
  # Tiny: the GAE's 32 px / patch 8 grid equals the teacher's VGG16 relu5_3 grid at 64 px.
  assert cf["gae"].data.image_size // cf["gae"].model.patch_size == \
      cf["teacher"].data.image_size // 16 == cf["dit"].model.latent_size
  for key in demo.TRAINING_STAGES:
    assert cf[key].total_steps == 3 and cf[key].batch_size % 8 == 0


def test_fingerprint_changes_with_any_field():
  c = demo.demo_config("tiny")
  before = demo.fingerprint(c.dit)
  c.dit.optim.lr = c.dit.optim.lr * 2
  assert demo.fingerprint(c.dit) != before
  assert demo.fingerprint(c.gae) == demo.fingerprint(demo.demo_config("tiny").gae)


def test_demo_config_rejects_unknown_args():
  with pytest.raises(ValueError, match="unknown config arg 'tyni'"):
    demo.demo_config("tyni")


def test_plan_lists_the_six_stages():
  plan = demo.plan(demo.demo_config("tiny"))
  assert [s["name"] for s in plan["stages"]] == [s.key for s in demo.STAGES]
  assert [s["trainer"] for s in plan["stages"]] == [s.trainer for s in demo.STAGES]
  assert plan["stages"][1]["total_steps"] == 3


def test_output_signature_needs_the_final_checkpoint(tmp_path):
  c = demo.demo_config("tiny")
  stages = {s.key: s for s in demo.STAGES}
  w = str(tmp_path)
  assert demo.output_signature(stages["gae"], c.gae, w) is None
  os.makedirs(os.path.join(w, "checkpoints", "2"))
  assert demo.output_signature(stages["gae"], c.gae, w) is None     # total_steps is 3
  os.makedirs(os.path.join(w, "checkpoints", "3"))
  assert demo.output_signature(stages["gae"], c.gae, w) == "step 3"
  assert demo.output_signature(stages["sample"], c.sample, w) is None
  with open(os.path.join(w, "samples.npz"), "wb") as f:
    f.write(b"x")
  assert demo.output_signature(stages["sample"], c.sample, w) is not None


def test_log_prefix_tags_every_record_inside_the_block():
  import logging as py_logging
  records = []

  class Keep(py_logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  logger = py_logging.getLogger("gae_jax_test_demo_prefix")
  logger.addHandler(Keep())
  logger.setLevel(py_logging.INFO)
  with demo.log_prefix("stage 3/6 latent cache", t0=0.0):
    logger.info("shard %d of %d", 1, 2)
  logger.info("after")
  assert records[0].startswith("[stage 3/6 latent cache | ") and \
      records[0].endswith("] shard 1 of 2")
  assert records[1] == "after"


def test_read_metrics_jsonl_last_value_of_a_step_wins(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val/loss": 2.5},
          {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]   # step 2 logged again on resume
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  curves = report.read_metrics_jsonl(str(path))
  np.testing.assert_array_equal(curves["loss"][0], [1, 2, 3])
  np.testing.assert_array_equal(curves["loss"][1], [3.0, 1.5, 1.0])
  np.testing.assert_array_equal(curves["val/loss"][0], [2])
  assert report.read_metrics_jsonl(str(tmp_path / "missing.jsonl")) == {}
  path.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON line"):
    report.read_metrics_jsonl(str(path))


def test_report_figures(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
  path = report.plot_class_samples(str(tmp_path / "s.png"), imgs, ["a", "b", "c"],
                                   real=imgs[:, 0])
  with Image.open(path) as im:
    assert im.format == "PNG"
  with pytest.raises(ValueError, match=r"not \(C=2, K, H, W, 3\)"):
    report.plot_class_samples(str(tmp_path / "x.png"), imgs, ["a", "b"])
  with pytest.raises(ValueError, match="rows have different lengths"):
    report.plot_image_rows(str(tmp_path / "r.png"), {"a": imgs[0], "b": imgs[:, 0]})
  with pytest.raises(ValueError, match="no curve has any point"):
    report.plot_training_curves(str(tmp_path / "c.png"),
                                [{"title": "t", "curves": {"x": (np.zeros(0), np.zeros(0))}}])
  path = report.plot_training_curves(str(tmp_path / "c.png"), [
      {"title": "t", "curves": {"x": (np.arange(3), np.ones(3))}},
      {"title": "empty", "curves": {}}])
  assert os.path.getsize(path) > 0


def test_config_diff_names_changed_added_and_missing_fields(tmp_path):
  c = demo.demo_config("tiny").dit
  path = str(tmp_path / "config.json")
  assert demo.config_diff(c, path) == []                      # no config.json yet
  saved = json.loads(c.to_json_best_effort())
  saved["optim"]["lr"] = 123.0
  saved["old_field"] = 1
  del saved["seed"]
  with open(path, "w") as f:
    json.dump(saved, f)
  assert demo.config_diff(c, path) == ["old_field", "optim.lr", "seed"]


def test_rerun_logic_with_recording_trainers(tmp_path, monkeypatch):
  """Orchestration only: each trainer is replaced by one that records the call and writes
  the outputs `output_signature` looks for."""
  calls = []

  def recording(key):
    def train_and_evaluate(cfg, d):
      calls.append(key)
      os.makedirs(d, exist_ok=True)
      if key in demo.TRAINING_STAGES:
        os.makedirs(os.path.join(d, "checkpoints", str(cfg.total_steps)), exist_ok=True)
      else:
        name = {"cache": "manifest.json", "sample": "samples.npz", "eval": "metrics.json"}
        with open(os.path.join(d, name[key]), "w") as f:
          f.write(key + "x" * len(calls))     # sizes differ: signatures change
    return type("Trainer", (), {"train_and_evaluate": staticmethod(train_and_evaluate)})

  trainers = {s.trainer: recording(s.key) for s in demo.STAGES}
  monkeypatch.setattr(demo, "trainer_module", trainers.__getitem__)
  monkeypatch.setattr(demo, "write_report", lambda config, w, *a: {
      "report": os.path.join(w, "report.md"), "metrics": os.path.join(w, "metrics.json")})
  w = str(tmp_path)
  keys = [s.key for s in demo.STAGES]
  config = demo.demo_config("tiny")

  out = demo.train_and_evaluate(config, w)
  assert calls == keys and all(v["status"] == "ran" for v in out["stages"].values())
  calls.clear()
  assert demo.train_and_evaluate(config, w) and calls == []          # everything done
  # A longer DiT: the DiT resumes, samples and evaluation (stale inputs) run again.
  config.dit.total_steps = 4
  out = demo.train_and_evaluate(config, w)
  assert calls == ["dit", "sample", "eval"]
  assert out["stages"]["gae"]["status"] == "reused"
  calls.clear()
  # A longer GAE: the cache built from the old one is not silently reused.
  config.gae.total_steps = 4
  with pytest.raises(demo.StaleStageError, match=r"stage 3/6 latent cache: .*3_latents.* gae"):
    demo.train_and_evaluate(config, w)
  assert calls == ["gae"]
