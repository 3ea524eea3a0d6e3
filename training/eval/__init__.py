"""Model evaluation, next to the training that produces the models: the shipped detector on
labelled photos (``python -m training.eval.detector DATA``), the default pipeline on the
synthetic test families (``training.eval.synthetic``), and which harder payload reads pay
for their time (``training.eval.payload_attempts``). Speed benchmarks live in ``bench/``."""
