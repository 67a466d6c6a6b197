"""Engine-specific keys are refused by engines that do not read them, and the vLLM engine's
start-up checks name the key, all before any model loads (no vLLM needed)."""

from __future__ import annotations

import importlib.util

import pytest

from uniopd.config import ConfigError, load_config
from uniopd.rollout.base import ROLLOUT_ENGINES, checked_engine_class
from uniopd.train.plan import plan_teachers

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("key,value", [("vllm_gpu_memory_utilization", 0.5), ("vllm_tensor_parallel_size", 1),
                                       ("vllm_max_model_len", 512), ("vllm_enable_sleep_mode", "false")])
def test_a_vllm_key_with_the_hf_engine_is_refused_naming_it(key, value):
    cfg = load_config(None, [f"rollout.{key}={value}"])
    with pytest.raises(ConfigError, match=f"rollout.{key}=.* is a vLLM engine setting, but "
                                          f"rollout.backend='hf' does not read it"):
        plan_teachers(cfg)


def test_a_dotted_path_engine_refuses_vllm_keys_too():
    cfg = load_config(None, ["rollout.backend=external_backends:PlainSampler", "rollout.vllm_max_model_len=64"])
    with pytest.raises(ConfigError, match="rollout.vllm_max_model_len=64 is a vLLM engine setting"):
        checked_engine_class(cfg.rollout)


def test_vllm_is_registered_and_imported_only_when_chosen():
    import sys

    assert ROLLOUT_ENGINES["vllm"] == "uniopd.rollout.vllm:VLLMEngine"
    assert "vllm" not in sys.modules or HAS_VLLM


@pytest.mark.parametrize("overrides,message", [
    (["rollout.old_logprobs=engine", "rollout.top_p=0.9"],
     "rollout.old_logprobs=engine with rollout.top_p=0.9: vLLM reports the log-probs of the top-p nucleus"),
])
def test_vllm_engine_start_up_checks_name_the_key(overrides, message):
    cfg = load_config(None, ["rollout.backend=vllm"] + overrides)
    with pytest.raises(ConfigError, match=message):
        checked_engine_class(cfg.rollout)


@pytest.mark.parametrize("overrides,message", [
    ([], "rollout.vllm_tensor_parallel_size=2 shards the engine over the trainer's processes: use "
         "trainer.strategy=data_parallel with a multiple of 2 processes"),
    (["trainer.strategy=data_parallel", "teachers.t.path=x", "teachers.t.backend=vllm", "teachers.t.domains=[d]"],
     "rollout.vllm_tensor_parallel_size=2 with teachers.t.backend=vllm: a process holds one vLLM parallel layout"),
])
def test_a_sharded_engine_needs_data_parallel_processes_and_no_in_process_vllm_teacher(overrides, message):
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm_tensor_parallel_size=2"] + overrides)
    with pytest.raises(ConfigError, match=message):
        plan_teachers(cfg)


def test_sleep_mode_is_refused_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm_enable_sleep_mode=true"])
    with pytest.raises(ConfigError, match="rollout.vllm_enable_sleep_mode=true needs a GPU"):
        checked_engine_class(cfg.rollout)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_names_the_extra_before_any_model_loads():
    cfg = load_config(None, ["rollout.backend=vllm"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm needs vLLM, which is not installed: "
                                          r"pip install 'uniopd\[vllm\]'"):
        plan_teachers(cfg)
    teacher = load_config(None, ["teachers.t.path=x", "teachers.t.backend=vllm", "teachers.t.domains=[d]"])
    with pytest.raises(ConfigError, match=r"teachers.t.backend=vllm needs vLLM.*uniopd\[vllm\]"):
        plan_teachers(teacher)


def test_weights_pushed_to_vllm_carry_checkpoint_names_without_wrapper_parts():
    import torch

    from uniopd.rollout.vllm import named_weights

    inner = torch.nn.Module()
    inner.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False)])
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()  # DDP's attribute
    wrapped.module._orig_mod = torch.nn.Module()  # torch.compile's
    wrapped.module._orig_mod.model = inner
    names = [n for n, _ in named_weights(wrapped)]
    assert names == ["model.layers.0.weight"]
    assert not any(t.requires_grad for _, t in named_weights(wrapped))
