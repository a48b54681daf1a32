"""Run infrastructure shared by evaluation and training (the entry layer under ``eval_ds.py`` and
``train_ds.py``): the model from its config node (``runs.models``), distributed launch
(``runs.distributed``), the run directory and its manifest (``runs.rundir``), image opening
(``runs.images``) and data preparation (``runs.data``)."""
