"""Model-folder I/O that needs more than the models (the processors of `data`): the official IVT-LR
`.pth` import. Weight streaming, HF import/export and orbax folders still live in `models/`."""
