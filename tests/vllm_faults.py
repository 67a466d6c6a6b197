"""A real vLLM rollout engine that dies mid-run, chosen by dotted path
(`rollout.backend: vllm_faults:VLLMEngineThatDies`) so the crash goes through `uniopd train`.

After `DIE_AFTER_SYNCS` weight syncs it shuts its engine core down (vLLM's own shutdown: the
worker, its model and the parallel groups go), as when the engine dies under the trainer; the
next call then fails inside vLLM. uniopd runs the engine core in the training process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so there is no EngineCore child process to kill.
"""

from __future__ import annotations

from uniopd.rollout.vllm import VLLMEngine

DIE_AFTER_SYNCS = 2


class VLLMEngineThatDies(VLLMEngine):
    syncs = 0

    def update_weights(self, model):
        super().update_weights(model)
        self.syncs += 1
        if self.syncs == DIE_AFTER_SYNCS:
            self.llm.llm_engine.engine_core.shutdown()
