import pytest
import yaml

from uniopd.config import ConfigError, RunConfig, apply_override, field_help, load_config, save_config


def test_overrides_compose_on_a_yaml_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  lr: 1e-6\n  steps: 3\nrollout:\n  n: 4\nteachers:\n  math:\n    path: t\n"
                      "    domains: [math]\n")
    cfg = load_config(recipe, ["trainer.lr=2e-5", "rollout.n=8", "teachers.math.view=privileged",
                               "calibration.logratio_clip=10"])
    assert cfg.trainer.lr == 2e-5 and cfg.trainer.steps == 3 and cfg.rollout.n == 8
    assert cfg.teachers["math"].view == "privileged" and cfg.teachers["math"].domains == ["math"]
    assert cfg.calibration.logratio_clip == 10.0


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "trainer.lrr: unknown key"),
    ("nosuch.x=1", "nosuch: unknown key"),
    ("rollout.n=eight", "rollout.n: expected an integer"),
    ("rollout.n=2.5", "rollout.n: expected an integer"),
    ("trainer.lr=fast", "trainer.lr: expected a number"),
    ("logging.progress=maybe", "logging.progress: expected true/false"),
    ("loss.kind=magic", "loss.kind: 'magic' is not one of"),
    ("rollout.temperature=0", "rollout.temperature: 0.0 must be > 0"),
    ("calibration.delta=-1", "calibration.delta"),
    ("teachers.a.pth=x", "teachers.a.pth: unknown key"),
    ("trainer.lr", "expected key=value"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bad_yaml_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rollout.temprature: unknown key"):
        load_config(recipe)


def test_two_teachers_cannot_claim_one_domain():
    with pytest.raises(ConfigError, match="already claimed"):
        load_config(None, ["teachers.a.domains=[math]", "teachers.b.domains=[math]"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.lr=3e-4", "teachers.t.path=x", "loss.kind=jsd", "loss.beta=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["beta"] == 0.25


def test_every_field_has_help():
    rows = field_help(RunConfig)
    assert len(rows) > 60
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_apply_override_rejects_descending_into_a_value():
    tree = {"trainer": {"lr": 1.0}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(tree, "trainer.lr.x=1")


def test_rollout_old_logprobs_keys_are_validated():
    with pytest.raises(ConfigError, match="rollout.old_logprobs: 'both' is not one of"):
        load_config(None, ["rollout.old_logprobs=both"])
    with pytest.raises(ConfigError, match="rollout.tis_cap=3.0 applies to rollout.old_logprobs=engine only"):
        load_config(None, ["rollout.tis_cap=3"])
    with pytest.raises(ConfigError, match="rollout.tis_cap: 0.0 must be > 0"):
        load_config(None, ["rollout.old_logprobs=engine", "rollout.tis_cap=0"])
    with pytest.raises(ConfigError, match="rollout.vllm_gpu_memory_utilization: 1.5 must be <= 1"):
        load_config(None, ["rollout.vllm_gpu_memory_utilization=1.5"])
