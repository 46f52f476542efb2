"""The training loop: the run from start to test (``trainer``), one epoch and one step
(``engine``), the model/optimizer/scaler bundle (``learner``) and optimizers and schedules
(``optim``)."""
