"""Algorithm 1 (Cascade Distillation) as a resumable pipeline of stages with artefacts and a run report."""
