"""A vLLM worker extension: load a published weights step and say which step is loaded.

Started with ``--worker-extension-cls examples.reverse_text.vllm_worker.StepReloader`` (the
repository root on ``PYTHONPATH``); the orchestrator calls its methods through the dev-mode
``POST /collective_rpc`` route. It imports nothing from this project, so it loads inside the
inference server's own environment (``.venv-inference``).
"""

from __future__ import annotations


class StepReloader:
    """Mixed into every vLLM worker: reload from ``weights/step_<N>`` and remember ``N``."""

    def prime_load_step(self, weights_path: str, step: int) -> int:
        """Reload the model's weights from a Hugging Face directory (its ``*.safetensors``, HF
        names; the architecture and shapes must not change) and record ``step``. Returns it."""
        self.reload_weights(weights_path=weights_path)  # vLLM's own reload (worker API)
        self._prime_step = int(step)
        self._prime_path = str(weights_path)
        return self._prime_step

    def prime_loaded_step(self) -> dict:
        """``{"step": N | None, "path": str | None}``: what this worker serves now."""
        return {"step": getattr(self, "_prime_step", None), "path": getattr(self, "_prime_path", None)}
